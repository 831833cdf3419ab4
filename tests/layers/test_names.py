"""Property tests for channel names, event types and glob containment (`pattern_within`)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layers import InvalidArgument
from layers.names import (
    compile_pattern,
    pattern_within,
    validate_channel,
    validate_event_type,
    validate_pattern,
)

# Characters a hostile client would try: SSE line breaks and NUL, Unicode line separators, the
# SSE field separator, wildcards, and a sample of everything else.
TRICKY = "\r\n\0\u2028\u2029\u0085\x0b\x0c: *?.%/\\\"'<>\t"
hostile_text = st.text(st.sampled_from(TRICKY) | st.characters(), max_size=220)
SAFE_NAME = re.compile(r"[A-Za-z0-9_\-:@.]+")


@given(hostile_text)
def test_a_valid_channel_name_holds_only_the_safe_alphabet(text: str) -> None:
    try:
        validate_channel(text)
    except InvalidArgument:
        return
    assert SAFE_NAME.fullmatch(text)
    assert 1 <= len(text) <= 200
    assert "" not in text.split(".")


@given(hostile_text)
def test_a_valid_pattern_adds_only_wildcards(text: str) -> None:
    try:
        validate_pattern(text)
    except InvalidArgument:
        return
    assert SAFE_NAME.fullmatch(text.replace("*", "a").replace("?", "a"))


@given(hostile_text)
def test_a_valid_event_type_cannot_break_an_sse_field(text: str) -> None:
    try:
        validate_event_type(text)
    except InvalidArgument:
        return
    assert not set(text) & set("\r\n\0\u2028\u2029\u0085 ")
    assert 1 <= len(text) <= 64


# Small alphabets make containment between random globs likely enough to test both answers.
globs = st.text(st.sampled_from("ab.*?"), min_size=1, max_size=7)
fills = st.text(st.sampled_from("ab.c"), max_size=4)


@st.composite
def pattern_and_instance(draw: st.DrawFn) -> tuple[str, str]:
    """A glob and one name it matches, made by filling in its wildcards."""
    pattern = draw(globs)
    name = "".join(
        draw(fills) if char == "*" else draw(st.sampled_from("ab.c")) if char == "?" else char
        for char in pattern
    )
    return pattern, name


@given(pattern_and_instance(), globs)
def test_pattern_within_is_sound(pattern_instance: tuple[str, str], glob: str) -> None:
    """Whatever a granted glob is said to cover, it matches: no escalation."""
    pattern, name = pattern_instance
    assert compile_pattern(pattern)(name)
    if pattern_within(pattern, glob):
        assert compile_pattern(glob)(name), (pattern, glob, name)


@given(st.text(st.sampled_from("ab.c"), min_size=1, max_size=8), globs)
def test_pattern_within_is_exact_for_plain_names(name: str, glob: str) -> None:
    assert pattern_within(name, glob) == compile_pattern(glob)(name)


@given(globs)
def test_every_pattern_is_within_itself_and_star(pattern: str) -> None:
    assert pattern_within(pattern, pattern)
    assert pattern_within(pattern, "*")


@pytest.mark.parametrize(
    ("pattern", "glob", "within"),
    [
        ("chat.room.*", "chat.*", True),
        ("chat.?", "chat.*", True),
        ("*", "chat.*", False),
        ("chat*", "chat.*", False),
        ("?hat.x", "chat.*", False),
        ("chat.*", "chat.?", False),
        ("a*b", "a*", True),
    ],
)
def test_pattern_within_examples(pattern: str, glob: str, within: bool) -> None:
    assert pattern_within(pattern, glob) is within


def test_pattern_within_is_conservative_across_stars() -> None:
    """Documented limit: true containments that need several stars at once may be refused."""
    assert not pattern_within("?*", "*?")


def _reference(pattern: str) -> re.Pattern[str]:
    """The glob as a regex: correct, but backtracking (only for short test inputs)."""
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
        re.DOTALL,
    )


@given(globs, st.text(st.sampled_from("ab.c"), max_size=12))
def test_glob_matching_agrees_with_the_regex_it_replaced(pattern: str, name: str) -> None:
    assert compile_pattern(pattern)(name) == bool(_reference(pattern).fullmatch(name))


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("chat.*", "chat.", True),
        ("chat.*", "chat", False),
        ("*", "", True),
        ("a*a", "a", False),
        ("a*a", "aa", True),
        ("?", "", False),
        ("*?b*", "xb", True),
        ("a?c*d?f", "abcXXdef", True),
        ("a?c*d?f", "abcdf", False),
        ("**", "x", True),
    ],
)
def test_glob_matching_examples(pattern: str, name: str, matches: bool) -> None:
    assert compile_pattern(pattern)(name) is matches


def test_glob_matching_stays_linear_on_hostile_patterns() -> None:
    """`*a*a*...*b` against a long run of `a`s made the old regex backtrack for seconds per
    publish; far larger inputs than names can be (200 characters) must answer at once."""
    hostile = ["chat.*" + "a*" * 40 + "b", "chat.*" + "?*" * 40 + "b", "*a?" * 60 + "*b"]
    name = "chat." + "a" * 100_000
    started = time.perf_counter()
    for pattern in hostile:
        assert not compile_pattern(pattern)(name)
        assert compile_pattern(pattern)(name + "b")
    assert time.perf_counter() - started < 1.0
