"""`memory://`: one process, with history and consumer groups.

Ids are `<epoch>-<sequence>`: one sequence for all channels, so a single id places a subscriber in
every channel it follows, and an epoch per layer instance, so an id issued before a restart is
recognised as foreign (a gap) instead of being mistaken for a position in the new sequence.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Collection, Sequence

import anyio
from anyio.abc import TaskStatus

from ._idempotency import DEFAULT_TTL, KeyTable
from ._ids import epoch
from ._pending import PendingEntry, PendingTable
from .base import Capabilities, ChannelLayer, GroupInfo, Replay, Sink
from .errors import UnknownGroup
from .event import Event, Message
from .names import compile_pattern


class _Group(PendingTable[PendingEntry]):
    def __init__(self, channel: str, group: str, cursor: int) -> None:
        super().__init__(channel, group)
        self.cursor = cursor  # sequence of the last message handed to the group


class InMemoryChannelLayer(ChannelLayer):
    scheme = "memory"
    capabilities = Capabilities(cross_process=False, history=True, groups=True, idempotency=True)

    def __init__(
        self,
        history_size: int = 1000,
        history_ttl: float | None = None,
        idempotency_ttl: float = DEFAULT_TTL,
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self._keys = KeyTable(idempotency_ttl)  # `publish` never awaits: a check and its record
        # happen in one step, so concurrent duplicates publish once
        self._epoch = epoch()
        self._sequence = itertools.count(1)
        self._issued = 0  # the last sequence number handed out
        self._logs: dict[str, deque[tuple[int, Event]]] = {}
        self._evicted: dict[str, int] = {}  # channel -> highest evicted sequence
        self._groups: dict[tuple[str, str], _Group] = {}
        self._sink: Sink | None = None

    async def run(self, sink: Sink, *, task_status: TaskStatus[None]) -> None:
        self._sink = sink
        task_status.started()
        try:
            while True:  # expire idle channels' history even when nobody publishes
                await anyio.sleep(self.history_ttl or 60.0)
                for channel in list(self._logs):
                    self._trim(channel)
        finally:
            self._sink = None

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        sink = self._sink
        replayed = self._keys.recall(messages)
        ids: list[str] = []
        for index, message in enumerate(messages):
            if index in replayed:
                ids.append(replayed[index])
                continue
            sequence = self._issued = next(self._sequence)
            event = Event.from_message(message, f"{self._epoch}-{sequence}")
            log = self._logs.get(message.channel)
            if log is None:
                log = self._logs[message.channel] = deque()
            log.append((sequence, event))
            self._trim(message.channel)
            ids.append(event.id)
            self._keys.remember(message, event.id)
            if sink is not None:
                sink.deliver(event)
        return ids

    def _trim(self, channel: str) -> None:
        log = self._logs[channel]
        deadline = time.time() - self.history_ttl if self.history_ttl else None
        while log and (
            len(log) > self.history_size
            or (deadline is not None and log[0][1].published_at < deadline)
        ):
            self._evicted[channel] = log.popleft()[0]
        if not log and not any(key[0] == channel for key in self._groups):
            del self._logs[channel]

    async def broadcast(self, blob: bytes) -> None:
        """One process: straight to the sink."""
        if self._sink is not None:
            self._sink.broadcast(blob)

    async def subscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        """Every publish reaches the core, which routes it; nothing to register."""

    async def unsubscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        """See `subscribe`."""

    async def ping(self) -> None:
        """Always reachable."""

    # -- history ---------------------------------------------------------------------------------

    def _parse(self, id: str) -> int | None:
        """The sequence of an id this instance issued; None for any other (an unknown id)."""
        epoch, _, sequence = id.partition("-")
        if epoch != self._epoch or not (sequence.isascii() and sequence.isdigit()):
            return None
        if len(sequence) > len(str(self._issued)) or int(sequence) > self._issued:
            return None  # from the future: not issued here
        return int(sequence)

    def _matching(self, channels: Collection[str], patterns: Collection[str]) -> list[str]:
        matchers = [compile_pattern(p) for p in patterns]
        names = set(channels)
        return [c for c in self._logs if c in names or any(m(c) for m in matchers)]

    async def replay(
        self,
        channels: Collection[str],
        patterns: Collection[str],
        *,
        after: str | None,
        limit: int | None,
    ) -> Replay:
        names = self._matching(channels, patterns)
        for name in names:
            self._trim(name)
        logs = [self._logs.get(name, ()) for name in names]
        merged = [event for _, event in heapq.merge(*logs, key=lambda entry: entry[0])]
        if after is None:
            return Replay(merged[-limit:] if limit else merged)
        position = self._parse(after)
        if position is None:
            return Replay(merged[:limit] if limit else merged, gap=True, reason="unknown_id")
        gap = any(self._evicted.get(name, 0) > position for name in names)
        events = [
            event
            for sequence, event in heapq.merge(*logs, key=lambda entry: entry[0])
            if sequence > position
        ]
        return Replay(
            events[:limit] if limit else events, gap=gap, reason="evicted" if gap else None
        )

    # -- consumer groups -------------------------------------------------------------------------

    def _group(self, channel: str, group: str) -> _Group:
        try:
            return self._groups[channel, group]
        except KeyError:
            raise UnknownGroup.named(channel, group) from None

    async def group_join(
        self, channel: str, group: str, consumer: str, *, start: str | None = None
    ) -> None:
        state = self._groups.get((channel, group))
        if state is None:
            log = self._logs.setdefault(channel, deque())
            if start is None:
                cursor = log[-1][0] if log else 0
            else:  # "earliest" and ids not issued here: the oldest retained
                cursor = (self._parse(start) if start != "earliest" else None) or 0
            state = self._groups[channel, group] = _Group(channel, group, cursor)
        state.seen(consumer)

    async def group_leave(
        self, channel: str, group: str, consumer: str, *, forget: bool = False
    ) -> None:
        state = self._groups.get((channel, group))
        if state is not None:
            state.leave(consumer, forget=forget)

    async def group_release(self, channel: str, group: str, consumer: str) -> None:
        state = self._groups.get((channel, group))
        if state is None:
            return
        state.release(consumer)
        if self._sink is not None:
            self._sink.wake(channel, released=True)

    async def group_read(self, channel: str, group: str, consumer: str, count: int) -> list[Event]:
        state = self._group(channel, group)
        fresh: list[PendingEntry] = []
        for sequence, event in self._logs.get(channel, ()):
            if len(fresh) >= count:
                break
            if sequence > state.cursor:
                state.cursor = sequence
                fresh.append(PendingEntry(event))
        return state.hand_out(fresh, consumer)

    async def group_claim(
        self, channel: str, group: str, consumer: str, min_idle: float, count: int
    ) -> list[Event]:
        return self._group(channel, group).claim(consumer, min_idle, count)

    async def group_ack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        return [entry.event.id for entry in self._group(channel, group).ack(ids)]

    async def group_nack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        nacked = self._group(channel, group).nack(ids)
        if nacked and self._sink is not None:
            self._sink.wake(channel, released=True)
        return nacked

    async def group_extend(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        return self._group(channel, group).extend(ids)

    async def group_delete(self, channel: str, group: str) -> None:
        self._group(channel, group)
        del self._groups[channel, group]

    async def group_info(self, channel: str, group: str) -> GroupInfo:
        return self._group(channel, group).info()
