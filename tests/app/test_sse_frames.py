"""Property tests: every SSE frame the gateway writes parses back, with a WHATWG-conformant parser,
into exactly the event it encodes, whatever a client put into the data, event type, channel or
ids; no input can add or change an SSE field."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from app.transports.sse import KEEPALIVE, error_frame, gap_frame
from layers import Event, Gap, InvalidArgument, make_message
from tests.sse import SSEParser, parse

TRICKY = '\r\n\0\u2028\u2029\u0085\x0b\x0c:\ufeff \t"\\'
hostile_text = st.text(st.sampled_from(TRICKY) | st.characters(exclude_categories=["Cs"]))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | hostile_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4)
    ),
    max_leaves=12,
)
channels = st.from_regex(r"[A-Za-z0-9_\-:@]{1,8}(\.[A-Za-z0-9_\-:@]{1,8}){0,3}", fullmatch=True)
event_types = st.from_regex(r"[A-Za-z0-9_\-:.@]{1,64}", fullmatch=True)
# layer ids: opaque, but never CR, LF or NUL (`Event.sse_frame`)
ids = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"), min_size=1)


def event_of(channel: str, data: Any, event_type: str | None, message_id: str) -> Event:
    return Event.from_message(make_message(channel, data, event_type), message_id)


@given(channels, json_values, st.none() | event_types, ids)
def test_any_message_round_trips(
    channel: str, data: Any, event_type: str | None, message_id: str
) -> None:
    (parsed,) = parse(event_of(channel, data, event_type, message_id).sse_frame().decode())
    assert parsed.type == (event_type or "message")
    assert parsed.last_event_id == message_id
    envelope = parsed.json
    assert envelope["data"] == data
    assert (envelope["channel"], envelope["id"], envelope["event"]) == (
        channel,
        message_id,
        event_type or "message",
    )


@given(hostile_text, hostile_text, json_values)
def test_hostile_names_are_refused_or_harmless(channel: str, event_type: str, data: Any) -> None:
    try:
        message = make_message(channel, data, event_type)
    except InvalidArgument:
        return
    (parsed,) = parse(Event.from_message(message, "1-0").sse_frame().decode())
    assert (parsed.type, parsed.json["channel"], parsed.json["data"]) == (event_type, channel, data)


@given(st.lists(st.tuples(channels, json_values, st.none() | event_types), max_size=5), st.data())
def test_a_stream_split_anywhere_parses_the_same(
    messages: list[tuple[str, Any, str | None]], data: st.DataObject
) -> None:
    """Chunk boundaries (a CR/LF pair cut in two included) change nothing."""
    frames = [b": connected\nretry: 3000\n\n"]
    for index, (channel, value, event_type) in enumerate(messages):
        frames.append(event_of(channel, value, event_type, f"{index}-0").sse_frame())
        frames.append(KEEPALIVE)
    stream = b"".join(frames).decode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = SSEParser()
    events = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        events.extend(parser.feed(stream[start:end]))
    assert [orjson.loads(e.data)["data"] for e in events] == [value for _, value, _ in messages]
    assert parser.retry == 3000


@given(hostile_text, st.integers(0, 2**32))
def test_gap_notices_carry_client_ids_safely(last_event_id: str, dropped: int) -> None:
    gap = Gap("unknown_id", last_event_id=last_event_id, dropped=dropped)
    (parsed,) = parse(gap_frame(gap).decode())
    assert parsed.type == "gap"
    assert parsed.last_event_id == ""  # a notice never moves the browser's resume point
    assert parsed.json["last_event_id"] == last_event_id


@given(hostile_text, hostile_text)
def test_error_frames_carry_any_detail_safely(code: str, detail: str) -> None:
    (parsed,) = parse(error_frame(code, detail).decode())
    assert parsed.type == "error"
    assert parsed.json == {"error": code, "detail": detail}
