"""Control messages to every gateway process on a layer, beside the channels.

`ChannelLayer.broadcast(blob)` carries bytes to every process running the layer on the same broker
and prefix (the sender's own included), each getting `Sink.broadcast(blob)` once. A blob is never a
channel's message: it is kept in no history, reaches no consumer group and matches no pattern
subscription. The core writes one JSON object per blob, `{"k": <kind>, ...}`, and the router
(`layers._router`) acts on it by kind:

- `"pattern"`: a message published to a glob pattern (`Channel.publish_pattern`), delivered live to
  the local subscriptions it concerns as a `PatternEvent`.
- the kinds of `layers._presence.KINDS`: members joining and leaving, heartbeats and replicas.

A blob of an unknown kind (a newer gateway beside this one) or not written by a gateway is ignored.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from .event import Event, Message, iso_timestamp

logger = logging.getLogger(__name__)

PATTERN = "pattern"


class PatternEvent(Event):
    """A message published to a pattern: `channel` is the pattern, and it is no resume point.

    Its envelope says `"pattern": true`; its SSE frame has no `id:` line, so a client's
    Last-Event-ID stays the id of the last channel message it received.
    """

    __slots__ = ()

    def envelope(self) -> bytes:
        if self._envelope is None:
            self._envelope = orjson.dumps(
                {
                    "channel": self.channel,
                    "pattern": True,
                    "id": self.id,
                    "event": self.event,
                    "data": orjson.Fragment(self.raw),
                    "published_at": iso_timestamp(self.published_at),
                }
            )
        return self._envelope

    def sse_frame(self) -> bytes:
        if self._frame is None:
            self._frame = b"".join(
                (b"event: ", self.event.encode(), b"\ndata: ", self.envelope(), b"\n\n")
            )
        return self._frame


def pattern_blob(id: str, message: Message) -> bytes:
    """The blob of a pattern publish; `message.channel` holds the pattern."""
    return orjson.dumps(
        {
            "k": PATTERN,
            "i": id,
            "c": message.channel,
            "e": message.event,
            "t": message.published_at,
            "d": orjson.Fragment(message.raw),
        }
    )


def read(blob: bytes | str) -> tuple[str, Any] | None:
    """(kind, what it carries) of a blob: a `PatternEvent` for a pattern publish, the fields of
    other kinds; None for a blob this gateway did not write."""
    try:
        fields = orjson.loads(blob)
        kind = fields["k"]
        if kind != PATTERN:
            return str(kind), fields
        event = PatternEvent(
            fields["c"], fields["i"], orjson.dumps(fields["d"]), fields["e"], float(fields["t"])
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        logger.warning("ignoring a control message this gateway did not write")
        return None
    return kind, event
