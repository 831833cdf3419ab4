"""Channel names, glob patterns and event types.

A name is 1-200 characters from letters, digits and ``_ - : @ .``; ``.`` separates segments and no
segment is empty. A ``.dead`` suffix (a channel's dead letters) is not counted in the length.
Patterns may also hold ``*`` (any run of characters, dots included) and ``?`` (exactly one
character): the semantics of Redis PSUBSCRIBE, so a pattern means the same thing whichever layer
evaluates it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from .errors import InvalidArgument

MAX_NAME_LENGTH = 200
DEAD_LETTER_SUFFIX = ".dead"  # `<channel>.dead` holds a group's dead letters, whatever its length
_NAME = re.compile(r"[A-Za-z0-9_\-:@]+(?:\.[A-Za-z0-9_\-:@]+)*")
_PATTERN = re.compile(r"[A-Za-z0-9_\-:@*?]+(?:\.[A-Za-z0-9_\-:@*?]+)*")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_\-:.@]{1,64}")
# The same rules as JSON Schema regular expressions, for API documents.
CHANNEL_REGEX = f"^{_NAME.pattern}$"
PATTERN_REGEX = f"^{_PATTERN.pattern}$"
EVENT_TYPE_REGEX = f"^{_EVENT_TYPE.pattern}$"
_NAME_RULE = (
    "1-200 characters from letters, digits and '_ - : @ .', where '.' separates non-empty segments"
)


def validate_channel(name: str) -> str:
    """Return `name` if it is a valid channel name, else raise `InvalidArgument`."""
    if not isinstance(name, str) or not _is_channel(name):
        raise InvalidArgument(f"invalid channel name {name!r}: use {_NAME_RULE}")
    return name


@lru_cache(maxsize=4096)  # every publish checks its channel's name, mostly one seen before
def _is_channel(name: str) -> bool:
    return (
        len(name.removesuffix(DEAD_LETTER_SUFFIX)) <= MAX_NAME_LENGTH
        and _NAME.fullmatch(name) is not None
    )


def validate_pattern(pattern: str) -> str:
    """Return `pattern` if it is a valid glob pattern, else raise `InvalidArgument`."""
    if (
        not isinstance(pattern, str)
        or len(pattern) > MAX_NAME_LENGTH
        or not _PATTERN.fullmatch(pattern)
    ):
        raise InvalidArgument(
            f"invalid pattern {pattern!r}: use {_NAME_RULE}, plus '*' and '?' as wildcards"
        )
    return pattern


def validate_event_type(event: str) -> str:
    """Event types become SSE `event:` fields, so they are kept to a safe alphabet."""
    if not isinstance(event, str) or not _EVENT_TYPE.fullmatch(event):
        raise InvalidArgument(
            f"invalid event type {event!r}: use 1-64 letters, digits and '_ - : . @'"
        )
    return event


def validate_group_name(name: str, *, what: str = "group") -> str:
    """Return `name` if it can name a consumer group (or, `what="consumer"`, a consumer)."""
    if (
        not isinstance(name, str)
        or not (1 <= len(name) <= 100)
        or not all(c.isascii() and (c.isalnum() or c in "_-:@.") for c in name)
    ):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use 1-100 letters, digits and '_ - : @ .'"
        )
    return name


def is_pattern(name: str) -> bool:
    return "*" in name or "?" in name


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate telling whether a channel name matches the glob `pattern`.

    Linear, never backtracking: the pattern is cut at its `*`s into pieces of fixed length. The
    first piece must start the name, the last must end it, and each one between is placed at its
    leftmost occurrence after the previous one. Leftmost placement is always right, because a `*`
    takes any run of characters: a later occurrence only leaves less room for the pieces after
    it. Each piece is looked for once, so a match costs at most len(name) * len(pattern) steps,
    whatever the pattern (a regex of `.*` runs backtracks exponentially on `*a*a*a*...b`).
    """
    pieces = [_Piece(text) for text in pattern.split("*")]
    if len(pieces) == 1:
        (only,) = pieces
        return lambda name: len(name) == only.length and only.at(name, 0)
    first, *middle, last = pieces
    shortest = sum(piece.length for piece in pieces)
    middle = [piece for piece in middle if piece.length]

    def matches(name: str) -> bool:
        end = len(name) - last.length
        if len(name) < shortest or not first.at(name, 0) or not last.at(name, end):
            return False
        position = first.length
        for piece in middle:
            found = piece.find(name, position, end)
            if found < 0:
                return False
            position = found + piece.length
        return True

    return matches


class _Piece:
    """A run of a pattern between two `*`s: literal characters and `?`, so of fixed length."""

    __slots__ = ("length", "literal", "regex")

    def __init__(self, text: str) -> None:
        self.length = len(text)
        self.literal: str | None = None
        self.regex: re.Pattern[str] | None = None
        if "?" in text:
            # Without repetition a regex only tries each start once: linear in the name.
            self.regex = re.compile(
                "".join("." if char == "?" else re.escape(char) for char in text), re.DOTALL
            )
        else:
            self.literal = text

    def at(self, name: str, index: int) -> bool:
        """Whether the piece occurs at `index` of `name`."""
        if self.regex is None:
            return name.startswith(self.literal or "", index)
        return self.regex.match(name, index) is not None

    def find(self, name: str, start: int, end: int) -> int:
        """The leftmost index of the piece within `name[start:end]`, or -1."""
        if self.regex is None:
            return name.find(self.literal or "", start, end)
        found = self.regex.search(name, start, end)
        return found.start() if found is not None else -1


def pattern_within(pattern: str, glob: str) -> bool:
    """True if every name `pattern` can match is also matched by `glob`.

    Sound but not complete: a True is always right, while a few unusual pairs whose inclusion
    needs reasoning across several stars (`?*` within `*?`) answer False, which only ever refuses.

    Dynamic programming over the two strings: a `*` of the pattern can only be covered by a `*` of
    the glob, a `?` by `?` or `*`, a literal by itself, `?` or `*`.
    """
    rows, cols = len(pattern), len(glob)
    # within[i][j]: pattern[i:] is within glob[j:]
    within = [[False] * (cols + 1) for _ in range(rows + 1)]
    within[rows][cols] = True
    for j in range(cols - 1, -1, -1):
        within[rows][j] = glob[j] == "*" and within[rows][j + 1]
    for i in range(rows - 1, -1, -1):
        for j in range(cols - 1, -1, -1):
            p, g = pattern[i], glob[j]
            if g == "*":
                within[i][j] = within[i][j + 1] or within[i + 1][j]
            elif p == "*":
                within[i][j] = False
            else:
                within[i][j] = (g == "?" or g == p) and within[i + 1][j + 1]
    return within[0][0]
