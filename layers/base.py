"""The contract every channel layer implements.

A layer moves messages through one broker. It runs one listener per process (`run`) and hands every
live message it receives to the `Sink` exactly once; fan-out to local subscribers, backpressure,
redelivery timing and dead-lettering live in `layers.core.Channel`, once, for all layers. History
and consumer groups are optional: a layer without them inherits methods that raise
`CapabilityNotSupported`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import orjson
from anyio.abc import TaskStatus

from .errors import CapabilityNotSupported
from .event import Event, Message
from .registry import layers_with


@dataclass(frozen=True)
class Capabilities:
    cross_process: bool
    history: bool
    groups: bool
    idempotency: bool = False  # records idempotency keys for every process on the broker


class Sink(Protocol):
    """What a layer reports to the core. Every method is called on the event loop, never blocks."""

    def deliver(self, event: Event) -> None:
        """A live message arrived; called once per message, on the event loop."""

    def wake(self, channel: str, *, released: bool = False) -> None:
        """Group work may be waiting on `channel` (for layers whose group messages are pushed).

        `released=True`: pending messages were released (`group_release`), so group consumers
        claim them now instead of at their next timed claim.
        """

    def group_notice(self, notice: GroupNotice) -> None:
        """Another process acked, nacked or extended a group's messages, or deleted the group
        (what `ChannelLayer.group_notify` sent): the consumers here holding them are told."""

    def reconnected(self) -> None:
        """The layer lost its broker connection and has it back (counted in the metrics).

        Call it once live delivery is restored (subscriptions in place). A layer that keeps
        history delivers what was published meanwhile; for one that does not, the core tells
        each live subscriber it may have missed messages (`Gap("reconnected")`).
        """

    def layer_error(self, error: BaseException) -> None:
        """The listener hit a broker error it is recovering from (counted in the metrics)."""

    def broadcast(self, blob: bytes) -> None:
        """A control message sent with `ChannelLayer.broadcast`, by this process or another."""


class ChannelObserver:
    """Counts what happens inside a `Channel`, for metrics; every hook here does nothing.

    The gateway passes a subclass (`Channel(layer, observer=...)`) that feeds Prometheus, so
    `layers` stays free of any metrics library. Hooks run on the event loop and must not block.
    """

    def published(self, count: int, seconds: float) -> None:
        """The layer accepted `count` messages in one publish call that took `seconds`."""

    def publish_failed(self, count: int, error: BaseException) -> None:
        """`count` messages queued by `Channel.publish_nowait` could not be published."""

    def redelivered(self, channel: str, group: str, count: int) -> None:
        """`count` timed-out or released group messages were claimed for another delivery."""

    def dead_lettered(self, channel: str, group: str) -> None:
        """A message passed `max_deliveries` and moved to `<channel>.dead`."""

    def reconnected(self, scheme: str) -> None:
        """The layer reconnected to its broker (reported by the layer through `Sink`)."""

    def layer_error(self, scheme: str, error: BaseException) -> None:
        """A broker error the layer or a group pump is recovering from."""


@dataclass(frozen=True)
class Replay:
    """Retained events, oldest first; `gap` when some that followed the cursor are gone."""

    events: list[Event]
    gap: bool = False
    reason: str | None = None  # why there is a gap: "evicted" or "unknown_id"


@dataclass(frozen=True)
class ConsumerInfo:
    name: str
    pending: int  # unacked messages the layer counts as the consumer's
    idle_seconds: float | None = None
    # Of consumers connected to the process that answers (the core fills them in): the unacked
    # messages its pump counts against `prefetch` (nacked ones leave at once), and `prefetch`.
    in_flight: int | None = None
    prefetch: int | None = None


@dataclass(frozen=True)
class GroupInfo:
    channel: str
    group: str
    pending: int
    consumers: list[ConsumerInfo] = field(default_factory=list)
    oldest_unacked_id: str | None = None
    oldest_unacked_age_seconds: float | None = None


NOTICE_IDS = 200  # ids per encoded notice, well inside PostgreSQL's 8,000-byte NOTIFY payload

NoticeKind = Literal["settled", "extended", "deleted"]


@dataclass(frozen=True)
class GroupNotice:
    """What one process tells the others of a group: ids acked or nacked (`settled`), ids whose
    ack timeout restarts (`extended`), or the group deleted (`deleted`, no ids)."""

    channel: str
    group: str
    kind: NoticeKind
    ids: tuple[str, ...] = ()

    def encode(self) -> list[str]:
        """As JSON texts of at most `NOTICE_IDS` ids each (one for a deletion)."""
        chunks = [self.ids[i : i + NOTICE_IDS] for i in range(0, len(self.ids), NOTICE_IDS)]
        return [
            orjson.dumps([self.channel, self.group, self.kind, list(chunk)]).decode()
            for chunk in chunks or [()]
        ]

    @classmethod
    def decode(cls, text: str | bytes) -> GroupNotice | None:
        """The notice `encode` wrote; None for anything else (another version's, or garbage)."""
        try:
            channel, group, kind, ids = orjson.loads(text)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
        if kind not in ("settled", "extended", "deleted") or not isinstance(ids, list):
            return None
        return cls(str(channel), str(group), kind, tuple(str(id) for id in ids))


class ChannelLayer(ABC):
    """A broker behind the `Channel` core."""

    scheme: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    # How many `publish` calls the core keeps in flight at once (`layers._group_commit`). More
    # than one only where the broker, not the call order, orders ids so that they become visible
    # in id order, and where a call waits on the broker's own work (a commit) more than on the
    # round trip.
    publish_calls: ClassVar[int] = 1

    @abstractmethod
    async def run(self, sink: Sink, *, task_status: TaskStatus[None]) -> None:
        """Connect, call `task_status.started()`, then listen until cancelled."""

    @abstractmethod
    async def publish(self, messages: Sequence[Message]) -> list[str]:
        """Store or send `messages` in order; return their ids once the broker accepted them.

        A layer with `capabilities.idempotency` records each message's `idempotency_key` (with its
        `layers._idempotency.fingerprint`) for its `idempotency_ttl`, for every process that
        shares the broker, atomically with the publish where the broker allows it. A message
        whose key on its channel is still recorded is not published: its id is the recorded one,
        as a `Replayed`. If the fingerprint differs, nothing of the call is published where the
        broker allows it, and `IdempotencyKeyReused` is raised. No two messages of one call
        share a channel and key (the core checks). The core never hands a keyed message to a
        layer without the capability: it raises `CapabilityNotSupported` instead.
        """

    @abstractmethod
    async def subscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        """Start receiving live messages of these channels and patterns in this process.

        Once it returns, every message published afterwards reaches the sink (`deliver`), once,
        and in id order across everything subscribed (a layer whose ids are ordered per
        publisher only, like MQTT's, in the order it receives them).
        """

    @abstractmethod
    async def unsubscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        """Stop receiving what `subscribe` started."""

    @abstractmethod
    async def broadcast(self, blob: bytes) -> None:
        """Carry `blob` to every process running this layer on the broker, this one included.

        Each of them hands it to its sink (`Sink.broadcast`) once. It is live only and never a
        channel's message: it is kept in no history, takes no id, reaches no consumer group, and
        no subscription, not even a `*` pattern, sees it through `Sink.deliver`. The carrier stays
        under the layer's key, topic or subject prefix, so layers under other prefixes on the
        same broker do not receive it. Processes not connected when it passes miss it. Returns
        once the broker accepted it; `LayerUnavailable` when it cannot.
        """

    @abstractmethod
    async def ping(self) -> None:
        """Raise `LayerUnavailable` unless the broker answers."""

    async def replay(
        self,
        channels: Collection[str],
        patterns: Collection[str],
        *,
        after: str | None,
        limit: int | None,
    ) -> Replay:
        """Retained events after `after` (the first `limit`), or the last `limit` without it.

        The hand-off to live delivery is the core's: it subscribes first, holds live events
        aside while this runs, then drops the live events whose ids the replay returned, also
        those arriving up to `layers.subscription.HANDOFF_SECONDS` later. So a layer returns at
        once: it need not wait for its listener to pass the replayed events, and an event may be
        both replayed and delivered live. What it must not do is leave an event out of both: every
        retained event after `after` that was published before the subscription took effect
        is in the replay. An `after` this layer did not issue (malformed, out of range, from
        the future, from before the broker lost its data) is not an error: the replay starts
        from the oldest retained event with `gap=True, reason="unknown_id"`.
        """
        raise self._lacks("history")

    async def group_join(
        self, channel: str, group: str, consumer: str, *, start: str | None = None
    ) -> None:
        """Create the group if needed and register the consumer.

        A group created here starts at new messages (`start=None`), at the oldest retained one
        (`start="earliest"`), or after the id `start` (an id this layer did not issue: the oldest
        retained). `start` is ignored when the group exists. A layer without history raises
        `CapabilityNotSupported` for any `start` but None.
        """
        raise self._lacks("groups")

    async def group_leave(
        self, channel: str, group: str, consumer: str, *, forget: bool = False
    ) -> None:
        """The consumer went away; its pending messages stay pending until they time out.

        `forget=True`: the core named the consumer for this one subscription (none was given), so
        it never comes back: remove it from the group's consumers. Its pending messages stay
        pending for the group and are claimed by others after `ack_timeout`, as ever.
        """
        raise self._lacks("groups")

    async def group_release(  # noqa: B027 - optional on purpose: the default is documented
        self, channel: str, group: str, consumer: str
    ) -> None:
        """Make the consumer's unacked messages claimable by other consumers now (shutdown).

        Called before `group_leave` when the `Channel` closes its subscriptions with
        `release=True`; afterwards call `sink.wake(channel, released=True)` (or tell the other
        processes, for a cross-process layer) so live consumers claim at once. This default does
        nothing: the messages then wait for `ack_timeout` like those of a consumer that crashed.
        """

    async def group_read(self, channel: str, group: str, consumer: str, count: int) -> list[Event]:
        """Claim up to `count` messages never delivered to the group, without waiting."""
        raise self._lacks("groups")

    async def group_claim(
        self, channel: str, group: str, consumer: str, min_idle: float, count: int
    ) -> list[Event]:
        """Take over up to `count` messages unacked for `min_idle` seconds; counts go up by one."""
        raise self._lacks("groups")

    async def group_ack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        """Acknowledge; return the ids that were pending (the rest are unknown)."""
        raise self._lacks("groups")

    async def group_nack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        """Hand pending messages back to the group now; return the ids that were pending.

        They stay pending, claimable by the next `group_claim` of any consumer in any process
        whatever its `min_idle`, which counts the delivery up (so `max_deliveries` applies as
        for a timeout). Wake the group's consumers as `group_release` does: `sink.wake(channel,
        released=True)` in every process. `UnknownGroup` if the group is absent.
        """
        raise self._lacks("groups")

    async def group_extend(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        """Restart the ack timeout of pending messages (idle from now, same consumer, same
        delivery count); return the ids that were pending. `UnknownGroup` if absent."""
        raise self._lacks("groups")

    async def group_delete(self, channel: str, group: str) -> None:
        """Remove the group, its consumers and its pending messages; `UnknownGroup` if absent.

        A group joined again with that name starts afresh (new messages, no pending ones).
        """
        raise self._lacks("groups")

    async def group_notify(self, notice: GroupNotice) -> None:  # noqa: B027 - see its docstring
        """Tell every other process of the layer, whose listener calls `sink.group_notice`.

        The core calls it after an ack, nack, extend or delete, having told this process's
        consumers itself; a notice may reach this process too (it changes nothing twice). A
        layer whose groups are seen by one process only needs nothing here: this default.
        """

    async def group_info(self, channel: str, group: str) -> GroupInfo:
        """Pending count, consumers (each with its pending count) and oldest unacked message;
        `UnknownGroup` if absent."""
        raise self._lacks("groups")

    def _lacks(self, capability: str) -> CapabilityNotSupported:
        keepers = [f"{scheme}://" for scheme in layers_with(capability)]
        choice = ", ".join(keepers[:-1]) + f" or {keepers[-1]}" if len(keepers) > 1 else keepers[0]
        what = {"groups": "consumer groups", "idempotency": "record of idempotency keys"}.get(
            capability, capability
        )
        return CapabilityNotSupported(
            f"the {self.scheme}:// layer has no {what}; configure a layer that keeps it: {choice}"
        )
