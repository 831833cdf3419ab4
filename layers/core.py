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
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import sniffio
from anyio.abc import TaskGroup

from ._broadcast import pattern_blob
from ._group_commit import GroupCommit
from ._groups import GroupPump
from ._idempotency import Replayed, check_distinct, collapse, expand, keyed, validate_key
from ._presence import DEFAULT_TTL, Member, Presence
from ._publish_queue import PublishQueue
from ._router import Router
from .base import (
    ChannelLayer,
    ChannelObserver,
    ConsumerInfo,
    GroupInfo,
    GroupNotice,
    NoticeKind,
    Replay,
)
from .errors import (
    ChannelClosed,
    ChannelError,
    InvalidArgument,
)
from .event import DEFAULT_EVENT_TYPE, Gap, Message, encode_data
from .names import (
    validate_channel,
    validate_event_type,
    validate_group_name,
    validate_pattern,
)
from .subscription import (
    BacklogPolicy,
    FutureWaiter,
    Item,
    Subscription,
    _wait_at_most,
    _wait_at_most_asyncio,
)

logger = logging.getLogger(__name__)

PRESENCE_DRAIN_SECONDS = 2.0  # closing waits this long for its members' leaves to be sent


MAX_PREFETCH = 1000  # unacked messages one group consumer may hold, at most
MAX_NACK_DELAY = 3600.0  # seconds a nacked message may wait before it is redelivered


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
        self._queue = PublishQueue(self, max_queued_publishes)  # what publish_nowait queued
        # concurrent publishes share a broker round trip (see __aenter__)
        self._group_commit: GroupCommit | None = None
        self._keyed_commit: GroupCommit | None = None

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
        asyncio_backend = sniffio.current_async_library() == "asyncio"
        if asyncio_backend:
            self._checkpoint = functools.partial(asyncio.sleep, 0)
            self._wait_at_most = _wait_at_most_asyncio  # a timer, not a cancel scope, per wait
        self._listen_lock = anyio.Lock()
        if self.layer.capabilities.cross_process:
            # a future per waiting publish under asyncio (see FutureWaiter), an Event elsewhere
            new_waiter = FutureWaiter if asyncio_backend else self._new_event
            self._group_commit = GroupCommit(
                self.layer.publish, new_waiter, calls=self.layer.publish_calls
            )
            # Keyed publishes share calls only with each other. A layer may refuse a reused key
            # after it stored the call's other messages (NATS learns of the reuse from the
            # stream); the group commit then publishes the callers one by one, and a keyed
            # message sent again is a replay, where an unkeyed one would be a second copy.
            # One call at a time, whatever the layer takes: of two publishes of one key, the one
            # that arrived first is the one published.
            self._keyed_commit = GroupCommit(self._publish_keyed, new_waiter)
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
        for commit in (self._group_commit, self._keyed_commit):
            if commit is not None:
                await task_group.start(commit.run)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        await self._queue.close()
        self.close_subscriptions()
        if self._task_group is not None:
            with anyio.CancelScope(shield=True):
                await self._presence.drain(PRESENCE_DRAIN_SECONDS)
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
        commit = self._keyed_commit if replayable else self._group_commit
        if commit is None:
            ids = await self.layer.publish(messages)
        else:
            ids = await commit.publish(messages)
        fresh = sum(not isinstance(id, Replayed) for id in ids) if replayable else len(ids)
        self.observer.published(fresh, time.perf_counter() - started)  # replays published nothing
        return ids

    async def _publish_keyed(self, messages: Sequence[Message]) -> list[str]:
        """One layer call for several callers' keyed publishes: two copies of one key are sent
        once."""
        sent, where = collapse(messages)
        return expand(await self.layer.publish(sent), where)

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
        self._queue.put(make_message(channel, data, event), self._running())

    async def flush(self) -> None:
        """Wait until every message queued by `publish_nowait` so far is published (or failed)."""
        await self._queue.flush()

    @property
    def publish_failures(self) -> int:
        """Messages queued by `publish_nowait` that could not be published."""
        return self._queue.failures

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
            self._presence.join(name, subscription.member)
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
            self._presence.leave(name, subscription.member)
        if self._task_group is not None and (channels or patterns):
            # The broker hears of it in the background: a stream that ends (a client gone, a
            # drain) never waits on a broker that is slow or down to say so.
            self._task_group.start_soon(self._unlisten, channels, patterns)

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
