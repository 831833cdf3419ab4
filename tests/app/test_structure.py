"""`app/` reads top-down: no module imports in a circle, lazily or not, and the transports do not
reach up into the routes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def import_graph() -> dict[str, set[str]]:
    """Module -> the `app` modules it imports anywhere in it (`TYPE_CHECKING` blocks included)."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (ROOT / "app").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {other for other in imported & modules.keys() if other != name}
    return graph


def test_no_module_of_app_imports_in_a_circle() -> None:
    graph = import_graph()

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == target:
                return True
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return False

    circles = sorted(
        (module, other)
        for module, imported in graph.items()
        for other in imported
        if reaches(other, module)
    )
    assert not circles


def test_transports_do_not_import_the_routes() -> None:
    graph = import_graph()
    for module in ("app.transports.sse", "app.transports.ws"):
        assert not {other for other in graph[module] if other.startswith("app.api")}, module
