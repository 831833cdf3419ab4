"""Messages going into a layer and events coming out of it.

Payloads travel as the JSON bytes of the data (`raw`), encoded once at publish. An event builds its
envelope and its SSE frame once and caches them, so fanning one event out to many subscribers costs
one encoding, not one per subscriber.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from .errors import InvalidPayload

DEFAULT_EVENT_TYPE = "message"


def encode_data(data: Any) -> bytes:
    """JSON-encode a payload, refusing what is not a JSON value."""
    try:
        return orjson.dumps(data)
    except TypeError as exc:
        raise InvalidPayload(f"data is not a JSON value: {exc}") from None


@dataclass(frozen=True, slots=True)
class Message:
    """What a layer is asked to publish; the layer assigns the id."""

    channel: str
    raw: bytes
    event: str = DEFAULT_EVENT_TYPE
    published_at: float = 0.0
    idempotency_key: str | None = None  # publish it once per key (see `layers._idempotency`)

    def to_wire(self) -> bytes:
        """One self-contained blob for brokers that carry a single payload per message."""
        return orjson.dumps(
            {
                "c": self.channel,
                "e": self.event,
                "t": self.published_at,
                "d": orjson.Fragment(self.raw),
            }
        )


class Event:
    """One message as a subscriber sees it."""

    __slots__ = (
        "_ack",
        "_envelope",
        "_frame",
        "channel",
        "deliveries",
        "event",
        "group",
        "id",
        "published_at",
        "raw",
    )

    def __init__(
        self,
        channel: str,
        id: str,
        raw: bytes,
        event: str = DEFAULT_EVENT_TYPE,
        published_at: float = 0.0,
        deliveries: int | None = None,
        group: str | None = None,
    ) -> None:
        self.channel = channel
        self.id = id
        self.raw = raw
        self.event = event
        self.published_at = published_at
        self.deliveries = deliveries
        self.group = group
        self._envelope: bytes | None = None
        self._frame: bytes | None = None
        self._ack: Callable[[], Awaitable[bool]] | None = None

    @classmethod
    def from_message(cls, message: Message, id: str) -> Event:
        return cls(message.channel, id, message.raw, message.event, message.published_at)

    @classmethod
    def from_wire(cls, id: str, blob: bytes | str) -> Event:
        """Inverse of `Message.to_wire`."""
        fields = orjson.loads(blob)
        return cls(fields["c"], id, orjson.dumps(fields["d"]), fields["e"], float(fields["t"]))

    @property
    def data(self) -> Any:
        return orjson.loads(self.raw)

    def redelivered(self, group: str, deliveries: int) -> Event:
        """A copy of this event as delivered to a consumer group."""
        return Event(
            self.channel, self.id, self.raw, self.event, self.published_at, deliveries, group
        )

    def envelope(self) -> bytes:
        """The JSON object sent to clients: channel, id, event, data, published_at[, deliveries]."""
        if self._envelope is None:
            fields: dict[str, Any] = {
                "channel": self.channel,
                "id": self.id,
                "event": self.event,
                "data": orjson.Fragment(self.raw),
                "published_at": iso_timestamp(self.published_at),
            }
            if self.deliveries is not None:
                fields["deliveries"] = self.deliveries
            self._envelope = orjson.dumps(fields)
        return self._envelope

    def sse_frame(self) -> bytes:
        """The Server-Sent Events frame; ids and event types never hold CR, LF or NUL."""
        if self._frame is None:
            self._frame = b"".join(
                (
                    b"id: ",
                    self.id.encode(),
                    b"\nevent: ",
                    self.event.encode(),
                    b"\ndata: ",
                    self.envelope(),
                    b"\n\n",
                )
            )
        return self._frame

    def bind_ack(self, ack: Callable[[], Awaitable[bool]]) -> None:
        """What `ack` does: acknowledge this delivery to its group (set by the core)."""
        self._ack = ack

    async def ack(self) -> bool:
        """Acknowledge a group delivery; True if the group still had it pending."""
        if self._ack is None:
            return False
        return await self._ack()

    def __repr__(self) -> str:
        return f"Event(channel={self.channel!r}, id={self.id!r}, event={self.event!r})"


class GapReason(StrEnum):
    """Why a subscriber will not get some events (the `reason` of a `Gap`)."""

    DROPPED = "dropped"  # its backlog policy dropped them
    EVICTED = "evicted"  # older than what the layer retains
    UNKNOWN_ID = "unknown_id"  # the id to resume after is not one the layer knows
    NO_HISTORY = "no_history"  # the layer keeps no history to replay
    RECONNECTED = "reconnected"  # a layer without history lost its broker connection meanwhile


@dataclass(frozen=True, slots=True)
class Gap:
    """Events this subscriber will not get: evicted from history, or dropped by backpressure."""

    reason: str  # a `GapReason`
    last_event_id: str | None = None
    dropped: int = 0

    def to_json(self) -> bytes:
        fields: dict[str, Any] = {"reason": self.reason}
        if self.last_event_id is not None:
            fields["last_event_id"] = self.last_event_id
        if self.dropped:
            fields["dropped"] = self.dropped
        return orjson.dumps(fields)


def iso_timestamp(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
