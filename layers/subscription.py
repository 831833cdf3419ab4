"""`Subscription`: one local subscriber's bounded backlog, its backpressure and its resume.

The `Channel` (`layers.core`) feeds each subscription from the router and changes its channels;
this module holds what one subscriber owns: the backlog with its policy (by count and by bytes),
the replayed events that come first, the live events held while a replay runs, the hand-off that
drops replayed ids arriving live afterwards, and the pacing that lets a subscriber woken again
within `BATCH_INTERVAL` take what arrived meanwhile in one batch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from enum import StrEnum
from typing import Protocol

import anyio
import sniffio

from ._presence import Member, new_member
from .base import Replay
from .errors import ChannelClosed, ChannelError, SubscriberOverflow
from .event import Event, Gap

Item = Event | Gap


class BacklogPolicy(StrEnum):
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    DISCONNECT = "disconnect"


# a subscriber woken sooner than this after taking events waits out the rest (see next_batch)
BATCH_INTERVAL = 0.1


async def _wait_at_most(event: anyio.Event, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        await event.wait()


async def _wait_at_most_asyncio(event: anyio.Event, seconds: float) -> None:
    timer = asyncio.get_running_loop().call_later(seconds, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()


class FutureWaiter:
    """A one-shot event under asyncio: one future, set once (what a subscriber and a waiting
    publish wait on there).

    An `anyio.Event` there is an `asyncio.Event` inside a wrapper, with a deque of waiters: about
    a kilobyte for the one waiter a subscriber ever has, held by every idle subscriber; and its
    wait looks the running loop up again, a `getpid` system call per wait on Python 3.11.
    """

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def set(self) -> None:
        if not self._future.done():  # done: set already, or its waiter was cancelled
            self._future.set_result(None)

    def wait(self) -> Awaitable[None]:
        return self._future  # awaited as it is: no coroutine frame of its own while waiting


class _Settable(Protocol):
    def set(self) -> None: ...


class Owner(Protocol):
    """What a subscription needs of the `Channel` that owns it."""

    _new_event: Callable[[], anyio.Event]
    _checkpoint: Callable[[], Awaitable[None]]
    _wait_at_most: Callable[[anyio.Event, float], Awaitable[None]]

    async def _attach(
        self,
        subscription: Subscription,
        channels: list[str],
        patterns: list[str],
        last_event_id: str | None,
        history: int | None,
    ) -> None: ...

    async def _detach(
        self, subscription: Subscription, channels: list[str], patterns: list[str]
    ) -> None: ...


class Subscription:
    """One local subscriber: the events of its channels and patterns, in a bounded backlog.

    Iterate it for one `Event` or `Gap` at a time, or call `next_batch` for everything queued.
    """

    # One per subscriber, for as long as it stays: slots, not a dict.
    __slots__ = (
        "_bytes",
        "_closed",
        "_core",
        "_ending",
        "_handoff",
        "_head",
        "_held",
        "_new_waiter",
        "_on_space",
        "_overflowed",
        "_pacing",
        "_queue",
        "_taken_at",
        "_waiter",
        "_woken",
        "channels",
        "dropped",
        "max_backlog",
        "max_bytes",
        "member",
        "patterns",
        "policy",
        "presence",
        "releases_group",
    )

    def __init__(
        self, core: Owner, max_backlog: int, policy: BacklogPolicy, max_bytes: int | None = None
    ) -> None:
        self._core = core
        self.channels: set[str] = set()
        self.patterns: set[str] = set()
        self.max_backlog = max_backlog
        self.max_bytes = max_bytes  # of event data queued; one larger event still fits alone
        self._bytes = 0
        self.policy = policy
        self.dropped = 0
        # Made at the first event: an idle subscriber holds no queue (a deque is 760 bytes).
        self._queue: deque[Item] | None = None
        self._head: list[Item] = []  # replayed events and gap notices come first
        self._held: list[Event] | None = None  # live events held back while replaying
        self._waiter: _Settable | None = None
        self._new_waiter: Callable[[], anyio.Event | FutureWaiter] | None = (
            None  # at the first wait
        )
        self._woken = False
        self._taken_at = -math.inf  # when `next_batch` last returned events
        self._pacing: anyio.Event | None = None  # set to end the wait for BATCH_INTERVAL
        self._overflowed = False
        self._closed = False
        self._ending: ChannelError | None = None  # why the stream ended, when not a close
        self._handoff: _Handoff | None = None  # replayed ids that may still arrive live
        self._on_space: Callable[[], None] | None = None  # a group pump's wake-up (see below)
        self.releases_group = False  # on leaving its group, release its unacked messages
        self.member: Member = new_member()  # who it is in its channels' presence
        self.presence = False  # it receives join and leave events of its channels

    # -- fed by the core -------------------------------------------------------------------------

    def push(self, item: Item) -> None:
        if self._closed or self._overflowed:
            return
        if self._held is not None and isinstance(item, Event):
            self._held.append(item)
            return
        if self._handoff is not None and isinstance(item, Event) and self._replayed(item):
            return
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        size = len(item.raw) if isinstance(item, Event) else 0
        if len(queue) >= self.max_backlog or self._over_bytes(size):
            if self.policy is BacklogPolicy.DISCONNECT:
                self.dropped += 1
                self._overflowed = True
            elif self.policy is BacklogPolicy.DROP_NEWEST:
                self._drop_newest()
                return
            else:
                self._drop_oldest()
                while self._over_bytes(size):
                    self._drop_oldest()
                queue.append(item)
                self._bytes += size
        else:
            queue.append(item)
            self._bytes += size
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()
        if self._pacing is not None and (self._half_full() or self._overflowed):
            self._end_pacing()

    def _over_bytes(self, size: int) -> bool:
        return (
            self.max_bytes is not None and self._bytes > 0 and self._bytes + size > self.max_bytes
        )

    def _drop_newest(self) -> None:
        self.dropped += 1
        queue = self._queue
        assert queue is not None
        last = queue[-1]
        if isinstance(last, Gap) and last.reason == "dropped":
            queue[-1] = Gap("dropped", dropped=last.dropped + 1)
        else:
            queue.append(Gap("dropped", dropped=1))

    def _drop_oldest(self) -> None:
        queue = self._queue
        assert queue is not None
        lost = 0
        head = queue[0]
        if isinstance(head, Gap):
            queue.popleft()
            lost += head.dropped
        oldest = queue[0] if queue else None
        if isinstance(oldest, Event):
            queue.popleft()
            self._bytes -= len(oldest.raw)
            self.dropped += 1
            lost += 1
        queue.appendleft(Gap("dropped", dropped=lost))

    def close(self, *, release: bool = False, error: ChannelError | None = None) -> None:
        """End the stream; `release=True` also releases a group consumer's unacked messages;
        `error` is what `next_batch` raises then (instead of `ChannelClosed`)."""
        self.releases_group = self.releases_group or release
        self._ending = self._ending or error
        self._closed = True
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None
        self._end_pacing()

    def _half_full(self) -> bool:
        return 2 * len(self._queue or ()) >= self.max_backlog or (
            self.max_bytes is not None and 2 * self._bytes >= self.max_bytes
        )

    def _end_pacing(self) -> None:
        pacing, self._pacing = self._pacing, None
        if pacing is not None:
            pacing.set()

    def when_space(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever the consumer takes its queue (a group pump fills it again)."""
        self._on_space = callback

    # -- resuming: the replay/live hand-off ------------------------------------------------------

    def notify(self, gap: Gap) -> None:
        """Put a notice ahead of the live queue (a resume that cannot replay everything)."""
        self._head.append(gap)

    def hold(self) -> None:
        """A replay starts: live events wait aside until `resume` or `cancel_hold`."""
        self._held = []

    def cancel_hold(self) -> None:
        """The replay failed: what was held goes on as live events."""
        held, self._held = self._held or [], None
        for event in held:
            self.push(event)

    def resume(self, replay: Replay, last_event_id: str | None) -> None:
        """Put the replayed events first, then the held live events the replay did not hold.

        Live delivery may trail the replay (a layer reads what was published a moment later), so
        a replayed event can still arrive live afterwards: such events are dropped for
        `HANDOFF_SECONDS`. Ids are only matched, never compared.
        """
        if replay.gap:
            self._head.append(Gap(replay.reason or "evicted", last_event_id))
        self._head.extend(replay.events)
        if replay.events:
            self._handoff = _Handoff(replay.events, time.monotonic() + HANDOFF_SECONDS)
        self.cancel_hold()
        waiter = self._waiter
        if waiter is not None and (self._head or self._queue):
            self._waiter = None
            waiter.set()

    def _replayed(self, event: Event) -> bool:
        """Whether a live event is one the replay delivered (then it is dropped)."""
        handoff = self._handoff
        assert handoff is not None
        if time.monotonic() > handoff.until:
            self._handoff = None
            return False
        if not handoff.drops(event.id):
            return False
        if not handoff.ids:
            self._handoff = None
        return True

    def wake(self) -> None:
        """Make the waiting (or the next) `next_batch` return, with an empty batch if nothing
        is queued. One timer can drive the keepalives of many subscribers this way, instead of a
        timeout around every wait."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    # -- read by the consumer --------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return max(0, self.max_backlog - len(self._queue or ()))

    async def next_batch(self) -> list[Item]:
        """Wait for at least one item and return every item queued, in order; an empty list
        after a `wake` with nothing queued.

        Raises `SubscriberOverflow` when the `disconnect` policy ended the subscription,
        `UnknownGroup` when a group consumer's group was deleted, and `ChannelClosed` when the
        `Channel` was closed.
        """
        while True:
            if self._head:
                items, self._head = self._head, []
                if self._held is None:
                    items.extend(self._take_queue())
                self._woken = False
                self._taken_at = time.monotonic()
                return items
            if self._queue and self._held is None:
                self._woken = False
                self._taken_at = time.monotonic()
                return self._take_queue()
            if self._overflowed:
                raise SubscriberOverflow(
                    f"subscriber fell more than {self.max_backlog} events"
                    + (f" or {self.max_bytes} bytes" if self.max_bytes is not None else "")
                    + " behind; "
                    "reconnect with the last event id to resume"
                )
            if self._closed:
                raise self._ending or ChannelClosed("the channel was closed")
            if self._woken:
                self._woken = False
                return []
            new_waiter = self._new_waiter or self._waiters()
            waiter = new_waiter()
            self._waiter = waiter
            await waiter.wait()
            # Let the other woken tasks and the publishers run once before taking the batch:
            # under load, events published meanwhile join it, so a subscriber takes several
            # events per wake-up and write instead of one (what capped fan-out at high rates).
            await self._core._checkpoint()
            # Woken again within BATCH_INTERVAL of its last batch, it waits out the rest: events
            # that reach the process one per loop cycle (from a broker) share one write too, and
            # the cycles between stay short enough for publishes to make their round trips. A
            # backlog half full ends the wait, so pacing never costs a subscriber an event.
            wait = self._taken_at + BATCH_INTERVAL - time.monotonic()
            if wait > 0 and not self._half_full():
                self._pacing = self._core._new_event()
                await self._core._wait_at_most(self._pacing, wait)
                self._pacing = None

    def _waiters(self) -> Callable[[], anyio.Event | FutureWaiter]:
        """What this subscriber's waits are made of, looked up once (in its first wait)."""
        if sniffio.current_async_library() == "asyncio":
            self._new_waiter = FutureWaiter
        else:
            self._new_waiter = self._core._new_event
        return self._new_waiter

    def _take_queue(self) -> list[Item]:
        queue = self._queue
        items = list(queue) if queue else []
        if queue:
            queue.clear()
        self._bytes = 0
        if self._on_space is not None:
            self._on_space()
        return items

    def __aiter__(self) -> AsyncIterator[Item]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Item]:
        while True:
            try:
                batch = await self.next_batch()
            except ChannelClosed:
                return
            for item in batch:
                yield item

    # -- changed by the owner (WebSocket subscribe / unsubscribe) ---------------------------------

    async def add(
        self,
        channels: Iterable[str] = (),
        patterns: Iterable[str] = (),
        *,
        last_event_id: str | None = None,
        history: int | None = None,
    ) -> None:
        """Subscribe to more channels and patterns, replaying from `last_event_id` if given."""
        await self._core._attach(self, list(channels), list(patterns), last_event_id, history)

    async def remove(self, channels: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        await self._core._detach(self, list(channels), list(patterns))


HANDOFF_SECONDS = 10.0  # how long after a replay its events may still arrive live


class _Handoff:
    """The ids of a replay, in order, that live delivery has not brought yet."""

    __slots__ = ("ids", "until")

    def __init__(self, events: Sequence[Event], until: float) -> None:
        self.ids = dict.fromkeys(event.id for event in events)
        self.until = until

    def drops(self, id: str) -> bool:
        if id not in self.ids:
            return False
        # Live delivery comes in id order, so replayed events before this one will not follow.
        for replayed in list(self.ids):
            del self.ids[replayed]
            if replayed == id:
                break
        return True
