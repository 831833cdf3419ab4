"""Group state kept in this process, for the layers whose broker does not keep it (memory, MQTT).

A `PendingTable` is one group on one channel: its consumers (with when each was last seen) and
its pending messages, handed out and not yet acknowledged (to whom, since when, how often). The
core's group pump drives it through the layer: new messages are handed out, messages idle past
the ack timeout are claimed again with their delivery count raised, acks remove them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .base import ConsumerInfo, GroupInfo
from .event import Event


@dataclass
class PendingEntry:
    event: Event  # as published; each hand-out is a copy with the delivery count
    deliveries: int = 0  # hand-outs so far
    consumer: str | None = None
    handed_out_at: float = 0.0  # monotonic


Entry = TypeVar("Entry", bound=PendingEntry)


class PendingTable(Generic[Entry]):
    def __init__(self, channel: str, group: str) -> None:
        self.channel = channel
        self.group = group
        self.consumers: dict[str, float] = {}  # consumer -> last seen (monotonic)
        self.pending: OrderedDict[str, Entry] = OrderedDict()  # by id, in hand-out order

    def seen(self, consumer: str) -> float:
        self.consumers[consumer] = now = time.monotonic()
        return now

    def leave(self, consumer: str, *, forget: bool) -> None:
        if forget:  # its pending messages stay, claimed by others after the ack timeout
            self.consumers.pop(consumer, None)
        else:
            self.seen(consumer)

    def hand_out(self, entries: Iterable[Entry], consumer: str) -> list[Event]:
        """Deliver `entries` (new ones, or claimed pending ones) to `consumer`."""
        now = self.seen(consumer)
        events = []
        for entry in entries:
            entry.deliveries += 1
            entry.consumer, entry.handed_out_at = consumer, now
            self.pending.setdefault(entry.event.id, entry)
            events.append(entry.event.redelivered(self.group, entry.deliveries))
        return events

    def claim(self, consumer: str, min_idle: float, count: int) -> list[Event]:
        """Hand out again up to `count` messages unacked for `min_idle` seconds."""
        now = time.monotonic()
        idle = [e for e in self.pending.values() if now - e.handed_out_at >= min_idle][:count]
        return self.hand_out(idle, consumer)

    def release(self, consumer: str) -> None:
        """Make the consumer's unacked messages claimable by any consumer now."""
        for entry in self.pending.values():
            if entry.consumer == consumer:
                entry.handed_out_at = float("-inf")  # idle long enough for any claim

    def nack(self, ids: Sequence[str]) -> list[str]:
        """Make pending `ids` claimable by any consumer now; return those that were pending."""
        return self._touch(ids, float("-inf"))

    def extend(self, ids: Sequence[str]) -> list[str]:
        """Restart the ack timeout of pending `ids`; return those that were pending."""
        return self._touch(ids, time.monotonic())

    def _touch(self, ids: Sequence[str], handed_out_at: float) -> list[str]:
        touched = []
        for id in ids:
            entry = self.pending.get(id)
            if entry is not None:
                entry.handed_out_at = handed_out_at
                touched.append(id)
        return touched

    def ack(self, ids: Sequence[str]) -> list[Entry]:
        """Remove the pending entries of `ids`; return those that were pending."""
        return [entry for id in ids if (entry := self.pending.pop(id, None)) is not None]

    def info(self) -> GroupInfo:
        now = time.monotonic()
        per_consumer = dict.fromkeys(self.consumers, 0)
        for entry in self.pending.values():
            if entry.consumer is not None and entry.consumer in per_consumer:
                per_consumer[entry.consumer] += 1  # else it left for good: only in the total
        oldest = next(iter(self.pending.values()), None)
        return GroupInfo(
            channel=self.channel,
            group=self.group,
            pending=len(self.pending),
            consumers=[
                ConsumerInfo(name, count, round(now - self.consumers[name], 3))
                for name, count in per_consumer.items()
            ],
            oldest_unacked_id=oldest.event.id if oldest else None,
            oldest_unacked_age_seconds=(
                round(time.time() - oldest.event.published_at, 3) if oldest else None
            ),
        )
