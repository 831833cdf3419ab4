"""`app/` reads top-down and `layers/` is a library: no module of either imports in a circle,
lazily or not, the transports do not reach up into the routes, and `layers/` never imports
`app/`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def import_graph(package: str = "app") -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports anywhere in it (`TYPE_CHECKING` blocks
    included), relative imports resolved; the package's own `__init__` (its re-exports) aside."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (ROOT / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (
                    here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
                )
                module = ".".join([*base, *([node.module] if node.module else [])])
                imported |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {other for other in imported & modules.keys() if other not in (name, package)}
    graph.pop(package, None)
    return graph


@pytest.mark.parametrize("package", ["app", "layers"])
def test_no_module_imports_in_a_circle(package: str) -> None:
    graph = import_graph(package)

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


def test_layers_never_import_the_app() -> None:
    for path in (ROOT / "layers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            assert not any(name == "app" or name.startswith("app.") for name in names), path


def test_transports_do_not_import_the_routes() -> None:
    graph = import_graph()
    for module in ("app.transports.sse", "app.transports.ws"):
        assert not {other for other in graph[module] if other.startswith("app.api")}, module
