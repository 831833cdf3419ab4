"""README's configuration table: one table, every setting in it exactly once."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_in_the_configuration_table_once() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `GATEWAY_")]
    documented = [
        name for row in rows for name in re.findall(r"`(GATEWAY_[A-Z_]+)`", row.split("|")[1])
    ]
    expected = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}
    assert sorted(documented) == sorted(set(documented)), "a setting has two rows"
    assert set(documented) == expected
