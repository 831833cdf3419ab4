"""What the layers that make their own ids share."""

from __future__ import annotations

import time

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def epoch() -> str:
    """This instant in microseconds, base 36: a short prefix that tells one layer instance's ids
    from another's (an id issued before a restart is then recognised as foreign)."""
    number, out = time.time_ns() // 1000, ""
    while number:
        number, rest = divmod(number, 36)
        out = _DIGITS[rest] + out
    return out or "0"
