"""The `Channel` core: fan-out, backpressure, resume and consumer groups, once for every layer.

Design decisions:

- The layer hands each live message to the router (`layers._router`) once per process; it finds
  the local subscribers (exact channels, then glob patterns) and appends the same `Event` object
  to each bounded backlog. Nothing per subscriber is encoded or spawned: an event caches its frame.
- A backlog never blocks the publisher or other subscribers. When it is full the subscriber's
  policy drops the oldest or the newest event, or ends the subscription; dropped events become a
  `Gap` item in that subscriber's stream, where they were lost.
- Resume registers the subscriber first and holds live events aside while the layer replays, then
  releases the held events whose ids the replay did not contain. Live delivery may trail the
  replay (a layer's listener reads a moment after the publish), so replayed ids arriving live
  later are dropped too, for `HANDOFF_SECONDS`. Nothing is lost in the switch and nothing is
  delivered twice, ids never need to be compared, only matched, and no layer has to wait for
  its own listener inside `replay`.
- A layer without history cannot deliver what was published while its broker connection was
  down: when it reports `reconnected`, every live subscriber gets a `Gap("reconnected")`. Layers
  with history catch up by themselves and report no loss.
- Consumer groups are pulled, by one pump per group consumer (`layers._groups`), so redelivery
  timing and dead-lettering work the same on every layer that can claim and acknowledge.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from enum import StrEnum
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import sniffio
from anyio.abc import TaskGroup

from ._broadcast import pattern_blob
from ._group_commit import GroupCommit
from ._groups import GroupNotice, GroupPump, NoticeKind
from ._idempotency import Replayed, check_distinct, keyed, validate_key
from ._presence import DEFAULT_TTL, Member, Presence, new_member
from ._router import Router
from .base import ChannelLayer, ChannelObserver, ConsumerInfo, GroupInfo, Replay
from .errors import (
    ChannelClosed,
    ChannelError,
    InvalidArgument,
    PublishQueueFull,
    SubscriberOverflow,
)
from .event import DEFAULT_EVENT_TYPE, Event, Gap, Message, encode_data
from .names import (
    validate_channel,
    validate_event_type,
    validate_group_name,
    validate_pattern,
)

logger = logging.getLogger(__name__)

Item = Event | Gap


class BacklogPolicy(StrEnum):
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    DISCONNECT = "disconnect"


MAX_PREFETCH = 1000  # unacked messages one group consumer may hold, at most
MAX_NACK_DELAY = 3600.0  # seconds a nacked message may wait before it is redelivered
QUEUED_PUBLISH_BATCH = 100  # messages queued by publish_nowait, at most, in one layer call
FLUSH_ON_CLOSE_SECONDS = 10.0  # closing waits this long for queued messages to be published
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


def make_message(
    channel: str, data: Any, event: str | None = None, idempotency_key: str | None = None
) -> Message:
    """Validate and encode one message to publish; with a key, it is published once per key."""
    return Message(
        validate_channel(channel),
        encode_data(data),
        validate_event_type(event) if event is not None else DEFAULT_EVENT_TYPE,
        time.time(),
        validate_key(idempotency_key) if idempotency_key is not None else None,
    )


class Subscription:
    """One local subscriber: the events of its channels and patterns, in a bounded backlog.

    Iterate it for one `Event` or `Gap` at a time, or call `next_batch` for everything queued.
    """

    def __init__(
        self, core: Channel, max_backlog: int, policy: BacklogPolicy, max_bytes: int | None = None
    ) -> None:
        self._core = core
        self.channels: set[str] = set()
        self.patterns: set[str] = set()
        self.max_backlog = max_backlog
        self.max_bytes = max_bytes  # of event data queued; one larger event still fits alone
        self._bytes = 0
        self.policy = policy
        self.dropped = 0
        self._queue: deque[Item] = deque()
        self._head: deque[Item] = deque()  # replayed events and gap notices come first
        self._held: list[Event] | None = None  # live events held back while replaying
        self._waiter: anyio.Event | None = None
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
        last = self._queue[-1]
        if isinstance(last, Gap) and last.reason == "dropped":
            self._queue[-1] = Gap("dropped", dropped=last.dropped + 1)
        else:
            self._queue.append(Gap("dropped", dropped=1))

    def _drop_oldest(self) -> None:
        queue = self._queue
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
        return 2 * len(self._queue) >= self.max_backlog or (
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
        return max(0, self.max_backlog - len(self._queue))

    async def next_batch(self) -> list[Item]:
        """Wait for at least one item and return every item queued, in order; an empty list
        after a `wake` with nothing queued.

        Raises `SubscriberOverflow` when the `disconnect` policy ended the subscription,
        `UnknownGroup` when a group consumer's group was deleted, and `ChannelClosed` when the
        `Channel` was closed.
        """
        while True:
            if self._head:
                items = list(self._head)
                self._head.clear()
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
            waiter = self._waiter = self._core._new_event()
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

    def _take_queue(self) -> list[Item]:
        items = list(self._queue)
        self._queue.clear()
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


class Channel:
    """A pub-sub hub over one `ChannelLayer`; open it once for the life of the application."""

    def __init__(
        self,
        layer: ChannelLayer,
        *,
        max_backlog: int = 1000,
        backlog_policy: BacklogPolicy | str = BacklogPolicy.DROP_OLDEST,
        max_queued_publishes: int = 10_000,
        ack_timeout: float = 30.0,
        max_deliveries: int = 5,
        observer: ChannelObserver | None = None,
        max_backlog_bytes: int | None = None,
        prefetch: int = 10,
        presence_ttl: float = DEFAULT_TTL,
    ) -> None:
        if max_backlog < 1:
            raise InvalidArgument("max_backlog must be at least 1")
        self.prefetch = _checked_prefetch(prefetch)
        self.layer = layer
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self.backlog_policy = BacklogPolicy(backlog_policy)
        self.ack_timeout = ack_timeout
        self.max_deliveries = max_deliveries
        self.observer = observer or ChannelObserver()
        self._router = Router(layer.scheme, self.observer, catches_up=layer.capabilities.history)
        # Who is subscribed where, in every process (`layers._presence`); heartbeats every
        # presence_ttl / 3 seconds, silent processes' members gone after presence_ttl.
        self._presence = Presence(layer.broadcast, self._router.notify_presence, presence_ttl)
        self._router.on_presence = self._presence.receive
        self._refs: Counter[tuple[bool, str]] = Counter()  # (is_pattern, name) -> subscribers
        self._listen_lock: anyio.Lock | None = None
        self._new_event: Callable[[], anyio.Event] = anyio.Event  # see __aenter__
        self._checkpoint: Callable[[], Awaitable[None]] = anyio.lowlevel.checkpoint
        self._wait_at_most: Callable[[anyio.Event, float], Awaitable[None]] = _wait_at_most
        self._subscriptions: set[Subscription] = set()
        self._task_group: TaskGroup | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        # publish_nowait: its queue, the flusher task's wake-up, and progress for flush()
        self.max_queued_publishes = max_queued_publishes
        self.publish_failures = 0  # queued messages that could not be published
        self._queued: deque[Message] = deque()
        self._queued_total = 0
        self._queued_settled = 0  # published or failed
        self._flusher_running = False
        self._flusher_wakeup: anyio.Event | None = None
        self._flush_progress: anyio.Event | None = None
        # concurrent publishes share a broker round trip (see __aenter__)
        self._group_commit: GroupCommit | None = None

    @property
    def capabilities(self) -> Any:
        return self.layer.capabilities

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def local_groups(self) -> dict[tuple[str, str], list[ConsumerInfo]]:
        """(channel, group) -> its consumers subscribed through this `Channel` right now, each
        with its in-flight count and prefetch.

        Only what this process sees: the layer is the authority on a group's other consumers.
        """
        groups: dict[tuple[str, str], list[ConsumerInfo]] = {}
        for channel, pumps in self._router.pumps.items():
            for pump in pumps:
                groups.setdefault((channel, pump.group), []).append(
                    ConsumerInfo(
                        pump.consumer,
                        pump.in_flight,
                        in_flight=pump.in_flight,
                        prefetch=pump.prefetch,
                    )
                )
        return groups

    # -- lifetime --------------------------------------------------------------------------------

    async def __aenter__(self) -> Channel:
        # anyio.Event() looks the running backend up on every call, and a subscriber makes one
        # per wait: the backend's own Event class is looked up once here instead.
        self._new_event = type(anyio.Event())
        # anyio.lowlevel.checkpoint() does the same lookup on every call; asyncio's bare yield
        # is what it amounts to there.
        if sniffio.current_async_library() == "asyncio":
            self._checkpoint = functools.partial(asyncio.sleep, 0)
            self._wait_at_most = _wait_at_most_asyncio  # a timer, not a cancel scope, per wait
        self._listen_lock = anyio.Lock()
        if self.layer.capabilities.cross_process:
            self._group_commit = GroupCommit(self.layer.publish, self._new_event)
        self._token = anyio.lowlevel.current_token()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        try:
            await task_group.start(self.layer.run, self._router)
        except BaseException:
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
            raise
        self._task_group = task_group
        task_group.start_soon(self._presence.run)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        await self._flush_on_close()
        self.close_subscriptions()
        task_group, self._task_group = self._task_group, None
        self._token = None
        if task_group is None:
            return None
        task_group.cancel_scope.cancel()
        # The block's own exception goes on unchanged: handed to the task group it would come back
        # wrapped in an ExceptionGroup. Only the layer task's errors are raised from here.
        await task_group.__aexit__(None, None, None)
        return None

    def close_subscriptions(self, *, release: bool = False) -> None:
        """End every subscription's stream (graceful shutdown); the channel stays usable.

        `release=True` also hands each group consumer's unacked messages back to its group as the
        consumer leaves (`ChannelLayer.group_release`), so consumers elsewhere take them over at
        once instead of after `ack_timeout`.
        """
        for subscription in list(self._subscriptions):
            subscription.close(release=release)

    def _running(self) -> TaskGroup:
        if self._task_group is None:
            raise ChannelClosed("use the Channel as 'async with Channel(layer) as channel:' first")
        return self._task_group

    # -- publishing ------------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        event: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Publish one JSON value; return its id once the layer accepted it.

        With `idempotency_key`, a publish to the same channel with the same key within the
        layer's `idempotency_ttl` publishes nothing and returns the first one's id, as a
        `Replayed` (`isinstance(id, Replayed)`); the same key with other data or event type raises
        `IdempotencyKeyReused`.
        """
        message = make_message(channel, data, event, idempotency_key)
        (message_id,) = await self.publish_messages([message])
        return message_id

    async def publish_messages(self, messages: Sequence[Message]) -> list[str]:
        """Publish messages built with `make_message`, in order, in one layer call.

        The id of a keyed message answered from an earlier publish is a `Replayed`.
        """
        self._running()
        if not messages:
            return []
        replayable = keyed(messages)
        if replayable:
            if not self.layer.capabilities.idempotency:
                raise self.layer._lacks("idempotency")
            check_distinct(messages)
        started = time.perf_counter()
        if self._group_commit is None:
            ids = await self.layer.publish(messages)
        else:
            ids = await self._group_commit.publish(messages, self._running())
        fresh = sum(not isinstance(id, Replayed) for id in ids) if replayable else len(ids)
        self.observer.published(fresh, time.perf_counter() - started)  # replays published nothing
        return ids

    async def publish_pattern(self, pattern: str, data: Any, *, event: str | None = None) -> str:
        """Publish one JSON value to every channel the glob `pattern` matches, live only.

        It reaches every current subscription, in every process on the layer, that has a
        channel the pattern matches or a pattern the published pattern lies within
        (`names.pattern_within`), once per subscription. It is kept in no channel's history, so
        it is never replayed, and it reaches no consumer group. Subscribers see an `Event`
        whose `channel` is the pattern; its id (returned here) is no resume point.
        """
        self._running()
        message = Message(
            validate_pattern(pattern),
            encode_data(data),
            validate_event_type(event) if event is not None else DEFAULT_EVENT_TYPE,
            time.time(),
        )
        message_id = uuid.uuid4().hex
        started = time.perf_counter()
        await self.layer.broadcast(pattern_blob(message_id, message))
        self.observer.published(1, time.perf_counter() - started)
        return message_id

    def publish_threadsafe(self, channel: str, data: Any, *, event: str | None = None) -> str:
        """`publish` from a thread that is not running the event loop."""
        if self._token is None:
            raise ChannelClosed("the channel is not open")
        return anyio.from_thread.run(
            self.publish_messages, [make_message(channel, data, event)], token=self._token
        )[0]

    def publish_nowait(self, channel: str, data: Any, *, event: str | None = None) -> None:
        """Queue one JSON value to publish and return at once, without its id.

        A task of this `Channel` publishes queued messages in order, several per layer call;
        `flush()` waits for them and closing the `Channel` flushes them (for up to
        `FLUSH_ON_CLOSE_SECONDS`). A message that cannot be published is logged and counted in
        `publish_failures` and `ChannelObserver.publish_failed`. Bad input raises here, and
        `PublishQueueFull` when `max_queued_publishes` messages are waiting. Call it on the
        event loop (from other threads: `publish_threadsafe`).
        """
        task_group = self._running()
        message = make_message(channel, data, event)
        if len(self._queued) >= self.max_queued_publishes:
            raise PublishQueueFull(
                f"{len(self._queued)} messages are waiting to be published: await publish() "
                "instead, or raise max_queued_publishes"
            )
        self._queued.append(message)
        self._queued_total += 1
        if not self._flusher_running:
            self._flusher_running = True
            task_group.start_soon(self._publish_queued)
        elif self._flusher_wakeup is not None:
            self._flusher_wakeup.set()

    async def flush(self) -> None:
        """Wait until every message queued by `publish_nowait` so far is published (or failed)."""
        target = self._queued_total
        while self._queued_settled < target:
            if self._flush_progress is None:
                self._flush_progress = self._new_event()
            await self._flush_progress.wait()

    async def _publish_queued(self) -> None:
        queued = self._queued
        try:
            while True:
                if not queued:
                    self._flusher_wakeup = wakeup = self._new_event()
                    await wakeup.wait()
                    continue
                batch = [queued.popleft() for _ in range(min(len(queued), QUEUED_PUBLISH_BATCH))]
                try:
                    await self.publish_messages(batch)
                except Exception as exc:
                    self._queued_failed(batch, exc)
                except BaseException:
                    self._queued_failed(batch, ChannelClosed("the channel closed while publishing"))
                    raise
                finally:
                    self._queued_done(len(batch))
                await self._checkpoint()  # subscribers take each batch before the next one
        finally:
            self._flusher_running = False
            self._flusher_wakeup = None

    async def _flush_on_close(self) -> None:
        if not self._flusher_running:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(FLUSH_ON_CLOSE_SECONDS):
            await self.flush()
        if self._queued:
            left = list(self._queued)
            self._queued.clear()
            self._queued_failed(
                left, ChannelClosed("the channel closed before they were published")
            )
            self._queued_done(len(left))

    def _queued_done(self, count: int) -> None:
        self._queued_settled += count
        progress, self._flush_progress = self._flush_progress, None
        if progress is not None:
            progress.set()

    def _queued_failed(self, messages: Sequence[Message], error: BaseException) -> None:
        self.publish_failures += len(messages)
        self.observer.publish_failed(len(messages), error)
        channels = ", ".join(sorted({message.channel for message in messages}))
        detail = error.detail if isinstance(error, ChannelError) else repr(error)
        logger.error("%d queued messages to %s not published: %s", len(messages), channels, detail)

    # -- subscribing -----------------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self,
        *channels: str,
        patterns: Iterable[str] = (),
        last_event_id: str | None = None,
        history: int | None = None,
        group: str | None = None,
        consumer: str | None = None,
        max_backlog: int | None = None,
        backlog_policy: BacklogPolicy | str | None = None,
        prefetch: int | None = None,
        start: str | None = None,
        presence: bool = False,
        member: Member | None = None,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to channels and glob patterns; the subscription ends with the block.

        `last_event_id` replays every retained event after it before going live; `history=N`
        replays the last N. With `group`, the single channel's messages are shared among the
        group's consumers and each event must be acknowledged with `event.ack()` (or `ack`,
        `nack`); the consumer holds at most `prefetch` unacknowledged events (default: the
        Channel's). `start` places a group created by this subscription: None for new messages,
        `"earliest"` or an id (layers with history).

        The subscription is a member of its channels' presence (`Channel.presence`; patterns and
        groups are not counted) as `member` (a generated client id without it). `presence=True`
        also delivers `PresenceEvent`s, `join` and `leave` of its channels' members in every
        process; they have no id and are never replayed.
        """
        self._running()
        subscription = Subscription(
            self,
            max_backlog or self.max_backlog,
            BacklogPolicy(backlog_policy or self.backlog_policy),
            self.max_backlog_bytes,
        )
        subscription.presence = presence
        if member is not None:
            subscription.member = member
        patterns = list(patterns)
        self._subscriptions.add(subscription)
        try:
            if group is not None:
                async with self._group_consumer(
                    subscription,
                    channels,
                    patterns,
                    last_event_id,
                    history,
                    group,
                    consumer,
                    _checked_prefetch(prefetch if prefetch is not None else self.prefetch),
                    start,
                ):
                    yield subscription
            else:
                if prefetch is not None or start is not None:
                    raise InvalidArgument("prefetch and start are options of a group subscription")
                await self._attach(subscription, list(channels), patterns, last_event_id, history)
                yield subscription
        finally:
            subscription.close()
            self._subscriptions.discard(subscription)
            with anyio.CancelScope(shield=True):
                await self._detach(
                    subscription, list(subscription.channels), list(subscription.patterns)
                )

    async def _attach(
        self,
        subscription: Subscription,
        channels: list[str],
        patterns: list[str],
        last_event_id: str | None,
        history: int | None,
    ) -> None:
        for name in channels:
            validate_channel(name)
        for pattern in patterns:
            validate_pattern(pattern)
        if history is not None and history < 0:
            raise InvalidArgument("history must be zero or more")
        channels = [c for c in dict.fromkeys(channels) if c not in subscription.channels]
        patterns = [p for p in dict.fromkeys(patterns) if p not in subscription.patterns]
        replaying = last_event_id is not None or bool(history)
        if replaying and not self.layer.capabilities.history:
            if last_event_id is None:
                raise self.layer._lacks("history")
            # A browser keeps reconnecting with its id: it still gets a live stream.
            subscription.notify(Gap("no_history", last_event_id))
            replaying = False
        await self._listen(channels, patterns)
        subscription.channels.update(channels)
        subscription.patterns.update(patterns)
        if replaying:
            subscription.hold()
        self._router.add(subscription, channels, patterns)
        for name in channels:
            await self._presence.join(name, subscription.member)
        if not replaying:
            return
        try:
            replay = await self.layer.replay(
                channels,
                patterns,
                after=last_event_id,
                limit=None if last_event_id is not None else history,
            )
        except BaseException:
            subscription.cancel_hold()
            raise
        subscription.resume(replay, last_event_id)

    async def _detach(
        self, subscription: Subscription, channels: list[str], patterns: list[str]
    ) -> None:
        channels = [c for c in channels if c in subscription.channels]
        patterns = [p for p in patterns if p in subscription.patterns]
        self._router.remove(subscription, channels, patterns)
        subscription.channels.difference_update(channels)
        subscription.patterns.difference_update(patterns)
        for name in channels:
            await self._presence.leave(name, subscription.member)
        await self._unlisten(channels, patterns)

    async def _listen(self, channels: Collection[str], patterns: Collection[str]) -> None:
        assert self._listen_lock is not None
        async with self._listen_lock:
            keys = [(False, c) for c in channels] + [(True, p) for p in patterns]
            new = [key for key in keys if self._refs[key] == 0]
            if new:
                await self.layer.subscribe(
                    [name for is_pattern, name in new if not is_pattern],
                    [name for is_pattern, name in new if is_pattern],
                )
            self._refs.update(keys)

    async def _unlisten(self, channels: Collection[str], patterns: Collection[str]) -> None:
        assert self._listen_lock is not None
        async with self._listen_lock:
            keys = [(False, c) for c in channels] + [(True, p) for p in patterns]
            self._refs.subtract(keys)
            gone = [key for key in keys if self._refs[key] <= 0]
            for key in gone:
                del self._refs[key]
            if gone and self._task_group is not None:
                try:
                    await self.layer.unsubscribe(
                        [name for is_pattern, name in gone if not is_pattern],
                        [name for is_pattern, name in gone if is_pattern],
                    )
                except ChannelError as exc:
                    logger.warning("unsubscribe failed: %s", exc.detail)

    @asynccontextmanager
    async def _group_consumer(
        self,
        subscription: Subscription,
        channels: Sequence[str],
        patterns: Sequence[str],
        last_event_id: str | None,
        history: int | None,
        group: str,
        consumer: str | None,
        prefetch: int,
        start: str | None,
    ) -> AsyncIterator[None]:
        if len(channels) != 1 or patterns:
            raise InvalidArgument("a group subscription takes exactly one channel and no patterns")
        if last_event_id is not None or history:
            raise InvalidArgument(
                "a group resumes from its own pending messages; drop last_event_id and history"
            )
        channel = validate_channel(channels[0])
        validate_group_name(group)
        generated = consumer is None  # named for this subscription alone: forgotten on leaving
        consumer = validate_group_name(consumer or uuid.uuid4().hex, what="consumer")
        if start is not None and not start:
            raise InvalidArgument("start is 'earliest' or a message id")
        await self.layer.group_join(channel, group, consumer, start=start)
        await self._listen([channel], [])  # live messages on the channel wake the pump
        pump = GroupPump(
            self.layer,
            subscription,
            channel,
            group,
            consumer,
            ack_timeout=self.ack_timeout,
            max_deliveries=self.max_deliveries,
            prefetch=prefetch,
            observer=self.observer,
            report_error=self._router.layer_error,
        )
        self._router.pumps.setdefault(channel, set()).add(pump)
        try:
            scope = await self._running().start(pump.run)
            try:
                yield
            finally:
                scope.cancel()
                with anyio.CancelScope(shield=True):
                    await pump.finished.wait()  # a dead-lettering in progress completes
        finally:
            pumps = self._router.pumps.get(channel)
            if pumps is not None:
                pumps.discard(pump)
                if not pumps:
                    del self._router.pumps[channel]
            with anyio.CancelScope(shield=True):
                await self._unlisten([channel], [])
                try:
                    if subscription.releases_group:
                        await self.layer.group_release(channel, group, consumer)
                    await self.layer.group_leave(channel, group, consumer, forget=generated)
                except ChannelError as exc:
                    logger.warning("leaving group %s failed: %s", group, exc.detail)

    # -- history, groups, health -----------------------------------------------------------------

    async def history(
        self, channel: str, *, after: str | None = None, limit: int | None = None
    ) -> Replay:
        """Retained events of one channel, oldest first."""
        validate_channel(channel)
        if limit is not None and limit < 1:
            raise InvalidArgument("limit must be at least 1")
        return await self.layer.replay([channel], [], after=after, limit=limit)

    async def ack(
        self, channel: str, group: str, ids: Sequence[str]
    ) -> tuple[list[str], list[str]]:
        """Acknowledge group deliveries; return (acked, unknown) ids."""
        validate_channel(channel)
        validate_group_name(group)
        await self.layer.group_info(channel, group)  # UnknownGroup when absent
        acked = await self.layer.group_ack(channel, group, list(dict.fromkeys(ids)))
        await self._settled(channel, group, acked, "settled")
        done = set(acked)
        return acked, [i for i in dict.fromkeys(ids) if i not in done]

    async def nack(
        self, channel: str, group: str, ids: Sequence[str], *, delay: float = 0.0
    ) -> tuple[list[str], list[str]]:
        """Hand pending group deliveries back for redelivery to any consumer, now or after
        `delay` seconds; return (nacked, unknown) ids. Their consumers' slots are free at once.

        A delayed nack is kept by this process: until the delay passes the messages stay
        pending with their ack timeout restarted (again every half ack timeout), so if this
        process stops first they are redelivered when their ack timeout passes, as ever.
        """
        validate_channel(channel)
        validate_group_name(group)
        if not 0 <= delay <= MAX_NACK_DELAY:
            raise InvalidArgument(f"delay_seconds must be from 0 to {MAX_NACK_DELAY:g}")
        unique = list(dict.fromkeys(ids))
        await self.layer.group_info(channel, group)  # UnknownGroup when absent
        if delay:
            nacked = await self.layer.group_extend(channel, group, unique)
            if nacked:
                self._running().start_soon(self._nack_later, channel, group, nacked, delay)
        else:
            nacked = await self.layer.group_nack(channel, group, unique)
        await self._settled(channel, group, nacked, "settled")
        done = set(nacked)
        return nacked, [i for i in unique if i not in done]

    async def _nack_later(self, channel: str, group: str, ids: list[str], delay: float) -> None:
        until = time.monotonic() + delay
        try:
            while (left := until - time.monotonic()) > 0:
                await anyio.sleep(min(left, self.ack_timeout / 2))
                if until - time.monotonic() > 0:
                    ids = await self.layer.group_extend(channel, group, ids)
            if ids:
                await self.layer.group_nack(channel, group, ids)
        except ChannelError as exc:  # the group went away, or the broker: the ack timeout remains
            logger.warning("delayed nack in group %s of %s failed: %s", group, channel, exc.detail)

    async def extend(
        self, channel: str, group: str, ids: Sequence[str]
    ) -> tuple[list[str], list[str]]:
        """Restart the ack timeout of pending group deliveries; return (extended, unknown)."""
        validate_channel(channel)
        validate_group_name(group)
        unique = list(dict.fromkeys(ids))
        await self.layer.group_info(channel, group)  # UnknownGroup when absent
        extended = await self.layer.group_extend(channel, group, unique)
        await self._settled(channel, group, extended, "extended")
        done = set(extended)
        return extended, [i for i in unique if i not in done]

    async def delete_group(self, channel: str, group: str) -> None:
        """Remove a group with its consumers and pending messages; `UnknownGroup` if absent.

        Its consumers' streams end, in this process and (through the layer) in the others.
        """
        validate_channel(channel)
        validate_group_name(group)
        notice = GroupNotice(channel, group, "deleted")
        self._router.group_notice(notice)  # stop this process's consumers reading it first
        await self.layer.group_delete(channel, group)
        await self.layer.group_notify(notice)

    async def _settled(self, channel: str, group: str, ids: list[str], kind: NoticeKind) -> None:
        if not ids:
            return
        notice = GroupNotice(channel, group, kind, tuple(ids))
        self._router.group_notice(notice)
        await self.layer.group_notify(notice)

    async def group_info(self, channel: str, group: str) -> GroupInfo:
        """The layer's view of the group; consumers connected here also show their prefetch and
        their in-flight count as this process counts it."""
        validate_channel(channel)
        validate_group_name(group)
        info = await self.layer.group_info(channel, group)
        local = {c.name: c for c in self.local_groups().get((channel, group), [])}
        if not local:
            return info
        consumers = [
            dataclasses.replace(
                c, in_flight=local[c.name].in_flight, prefetch=local[c.name].prefetch
            )
            if c.name in local
            else c
            for c in info.consumers
        ]
        return dataclasses.replace(info, consumers=consumers)

    async def presence(self, channel: str) -> list[Member]:
        """The members of `channel`'s presence in every process on the layer, oldest first.

        Answered from this process's replica (`layers._presence`): a member who joined in another
        process a moment ago may be missing for the time its control message takes, and the first
        query of a `Channel` with no members yet waits `GREETING_SECONDS` for the replica.
        """
        validate_channel(channel)
        return await self._presence.query(channel)

    async def ping(self) -> None:
        await self.layer.ping()


def _checked_prefetch(prefetch: int) -> int:
    if not 1 <= prefetch <= MAX_PREFETCH:
        raise InvalidArgument(f"prefetch must be from 1 to {MAX_PREFETCH}")
    return prefetch


__all__ = ["BacklogPolicy", "Channel", "Item", "Subscription", "make_message"]
