"""README's "Use it as a library": every Python block runs as written and prints what the text
block after it shows, so the examples cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Use it as a library"
TIMEOUT = 60


@dataclass
class Example:
    code: str
    output: str | None = None


def examples() -> list[Example]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    found: list[Example] = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```$", section, re.MULTILINE | re.DOTALL):
        if language == "python":
            found.append(Example(body))
        elif language == "text":
            assert found and found[-1].output is None, "a text block follows no Python block"
            found[-1].output = body
    return found


def test_the_section_has_its_examples() -> None:
    found = examples()
    assert len(found) == 7
    assert all(example.output is not None for example in found)


@pytest.mark.parametrize("number", range(len(examples())))
def test_example_runs_as_written(number: int) -> None:
    example = examples()[number]
    result = subprocess.run(
        [sys.executable, "-c", example.code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert example.output is not None
    # Lines printed by different handler threads come in any order; each thread's in its own.
    assert Counter(result.stdout.splitlines()) == Counter(example.output.splitlines())
