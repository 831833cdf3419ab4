"""`SyncChannel`: the `Channel` core for sync code (WSGI apps, scripts, task workers, handlers).

Design decisions:

- One event loop per `SyncChannel`, in a thread of its own, run by an anyio blocking portal
  (`anyio.from_thread.start_blocking_portal`). Every call from sync code is a portal call into that
  loop, so any thread may publish or subscribe, and the core stays the one async implementation.
- The `Channel` and each subscription are async context managers entered and left through the
  portal (`wrap_async_context_manager`), so each runs in one task as the core requires, and each
  always cleans up.
- A blocking subscription can be closed from any thread: closing leaves its context, which ends the
  core subscription, which wakes a thread blocked in it. Iteration then stops, as it does when the
  `SyncChannel` closes.
- A handler subscription owns one thread that calls the handler for each event in turn, so events
  reach a handler in order and a slow handler delays only its own subscription. A handler's
  exception is logged and counted; its subscription goes on with the next event. Threads are joined
  on close: after `SyncChannel.close()` no thread of it is left.
- Shutdown order: subscriptions first (handler threads handle what was delivered to them, and
  may still publish), then new calls are refused with `ChannelClosed` while calls in flight
  finish, so a publish either went through or was refused, never cut off by the close; then the
  `Channel` (which flushes what `publish_nowait` queued), then the loop and its thread.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Literal, overload

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .base import ChannelLayer, GroupInfo, Replay
from .core import Channel
from .errors import ChannelClosed, InvalidArgument, SubscriberOverflow
from .event import Event, Gap
from .factory import create_layer
from .subscription import BacklogPolicy, Item, Subscription

logger = logging.getLogger(__name__)

CHANNEL_OPTIONS = ("max_backlog", "backlog_policy", "ack_timeout", "max_deliveries", "observer")

Handler = Callable[[Event], object]

CLOSE_WAIT_SECONDS = 30.0  # closing waits this long for publishes (and other calls) in flight


class SyncChannel:
    """A `Channel` on an event loop in its own thread, for code that does not run one.

        with SyncChannel("redis+streams://localhost:6379/0") as channel:
            channel.publish("chatroom", {"message": "hello"})
            with channel.subscribe("chatroom") as subscription:
                for item in subscription:  # an Event, or a Gap telling what could not be delivered
                    ...

    `url_or_layer` is a layer URL (built with `create_layer`) or a `ChannelLayer`. `options` go to
    the `Channel` (`max_backlog`, `backlog_policy`, `ack_timeout`, `max_deliveries`, `observer`)
    and, with a URL, the rest to the layer (`history_size`, `key_prefix`, ...). `backend` is the
    anyio backend of the loop: "asyncio", or "trio" on the memory layer (broker drivers need
    asyncio).
    """

    def __init__(
        self,
        url_or_layer: str | ChannelLayer = "memory://",
        *,
        backend: Literal["asyncio", "trio"] = "asyncio",
        backend_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        channel_options = {key: options.pop(key) for key in CHANNEL_OPTIONS if key in options}
        if options and not isinstance(url_or_layer, str):
            raise InvalidArgument(
                f"layer options {sorted(options)} need a layer URL; pass them to the layer instead"
            )
        self._layer = url_or_layer
        self._layer_options = options
        self._channel_options = channel_options
        self._backend = backend
        self._backend_options = backend_options
        self._lock = threading.Lock()
        self._portal_context: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._channel_context: AbstractContextManager[Channel] | None = None
        self._channel: Channel | None = None
        self._subscriptions: set[BlockingSubscription | HandlerSubscription] = set()
        self._closing = False
        self._in_flight = 0  # calls into the loop through `_call` (publishes, acks, ...)
        self._idle = threading.Condition(self._lock)
        self._handler_errors = 0

    # -- lifetime --------------------------------------------------------------------------------

    def open(self) -> SyncChannel:
        """Start the loop thread and open the `Channel` (what `with` does)."""
        with self._lock:
            if self._portal is not None:
                raise InvalidArgument("the SyncChannel is already open")
            portal_context = start_blocking_portal(
                self._backend, self._backend_options, name=f"layers-sync-{id(self):x}"
            )
            portal = portal_context.__enter__()
            try:
                layer = self._layer
                if isinstance(layer, str):
                    layer = portal.call(
                        functools.partial(create_layer, layer, **self._layer_options)
                    )
                channel = Channel(layer, **self._channel_options)
                channel_context = portal.wrap_async_context_manager(channel)
                channel_context.__enter__()
            except BaseException as exc:
                portal_context.__exit__(type(exc), exc, exc.__traceback__)
                raise
            self._portal_context, self._portal = portal_context, portal
            self._channel_context, self._channel = channel_context, channel
        return self

    def close(self) -> None:
        """End every subscription, close the `Channel` and join the loop thread; idempotent.

        Handler threads handle what was delivered to them first (and may still publish while
        they do). Called from a handler, it does not wait for that handler's own thread.
        """
        with self._lock:
            if self._closing or self._portal is None:
                return
            self._closing = True  # no new subscriptions from here on
            subscriptions = list(self._subscriptions)
        try:
            for subscription in subscriptions:
                subscription.close()
        finally:
            with self._lock:
                portal_context, self._portal_context = self._portal_context, None
                channel_context, self._channel_context = self._channel_context, None
                self._portal = None  # calls from here on raise ChannelClosed
                self._channel = None
                self._closing = False
                # Calls in flight finish first, so a publish either went through or was refused.
                self._idle.wait_for(lambda: not self._in_flight, timeout=CLOSE_WAIT_SECONDS)
            try:
                if channel_context is not None:
                    channel_context.__exit__(None, None, None)
            finally:
                if portal_context is not None:
                    portal_context.__exit__(None, None, None)

    def __enter__(self) -> SyncChannel:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def channel(self) -> Channel:
        """The async `Channel` underneath (for its attributes; call it only on its loop)."""
        return self._open()[1]

    @property
    def handler_errors(self) -> int:
        """Exceptions raised by handlers of this `SyncChannel` so far (each one is logged)."""
        return self._handler_errors

    def _open(self) -> tuple[BlockingPortal, Channel]:
        portal, channel = self._portal, self._channel
        if portal is None or channel is None:
            raise ChannelClosed(
                "the SyncChannel is not open: use 'with SyncChannel(...) as channel:'"
            )
        return portal, channel

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `function` on the loop; `close` lets calls in flight finish before it closes."""
        with self._lock:
            portal, _ = self._open()
            self._in_flight += 1
        try:
            return portal.call(functools.partial(function, *args, **kwargs))
        finally:
            with self._lock:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.notify_all()

    # -- publishing ------------------------------------------------------------------------------

    def publish(
        self,
        channel: str,
        data: Any,
        event: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> str:
        """Publish one JSON value from any thread; return its id once the layer accepted it.

        `idempotency_key`: as `Channel.publish` (a retry with the key answers the first id).
        """
        _, core = self._open()
        message_id: str = self._call(
            core.publish, channel, data, event=event, idempotency_key=idempotency_key
        )
        return message_id

    def publish_pattern(self, pattern: str, data: Any, event: str | None = None) -> str:
        """Publish live to every channel the glob `pattern` matches (`Channel.publish_pattern`):
        kept in no history; return its id, which is no resume point."""
        _, core = self._open()
        message_id: str = self._call(core.publish_pattern, pattern, data, event=event)
        return message_id

    def publish_nowait(self, channel: str, data: Any, event: str | None = None) -> None:
        """Queue one JSON value to publish without waiting for the layer (`Channel.publish_nowait`);
        closing the `SyncChannel` flushes the queue."""
        _, core = self._open()
        self._call(core.publish_nowait, channel, data, event=event)

    # -- subscribing -----------------------------------------------------------------------------

    @overload
    def subscribe(
        self,
        *channels: str,
        patterns: Iterable[str] = ...,
        last_event_id: str | None = ...,
        history: int | None = ...,
        group: str | None = ...,
        consumer: str | None = ...,
        max_backlog: int | None = ...,
        backlog_policy: BacklogPolicy | str | None = ...,
        handler: None = ...,
    ) -> BlockingSubscription: ...

    @overload
    def subscribe(
        self,
        *channels: str,
        patterns: Iterable[str] = ...,
        last_event_id: str | None = ...,
        history: int | None = ...,
        group: str | None = ...,
        consumer: str | None = ...,
        max_backlog: int | None = ...,
        backlog_policy: BacklogPolicy | str | None = ...,
        handler: Handler,
    ) -> HandlerSubscription: ...

    def subscribe(
        self,
        *channels: str,
        patterns: Iterable[str] = (),
        last_event_id: str | None = None,
        history: int | None = None,
        group: str | None = None,
        consumer: str | None = None,
        max_backlog: int | None = None,
        backlog_policy: BacklogPolicy | str | None = None,
        handler: Handler | None = None,
    ) -> BlockingSubscription | HandlerSubscription:
        """Subscribe as `Channel.subscribe` does; live when this returns.

        Without `handler`: a blocking iterator of `Event`s and `Gap`s. With `handler`:
        `handler(event)` is called in a thread of the subscription's own for every event, in
        order; in a group, an event is acknowledged when its handler returns and left pending
        (redelivered after `ack_timeout`) when it raises.
        """
        portal, core = self._open()
        context = portal.wrap_async_context_manager(
            core.subscribe(
                *channels,
                patterns=list(patterns),
                last_event_id=last_event_id,
                history=history,
                group=group,
                consumer=consumer,
                max_backlog=max_backlog,
                backlog_policy=backlog_policy,
            )
        )
        blocking = BlockingSubscription(self, portal, context)
        subscription = (
            blocking
            if handler is None
            else HandlerSubscription(self, blocking, handler, grouped=group is not None)
        )
        with self._lock:
            closing = self._portal is None or self._closing
            if not closing:
                self._subscriptions.add(subscription)
        if closing:  # the SyncChannel closed meanwhile
            subscription.close()
            raise ChannelClosed("the SyncChannel was closed")
        return subscription

    def _forget(self, subscription: BlockingSubscription | HandlerSubscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    def _handler_failed(self) -> None:
        with self._lock:
            self._handler_errors += 1

    # -- history, groups, health -----------------------------------------------------------------

    def history(
        self, channel: str, *, after: str | None = None, limit: int | None = None
    ) -> Replay:
        """Retained events of one channel, oldest first (`Channel.history`)."""
        _, core = self._open()
        replay: Replay = self._call(core.history, channel, after=after, limit=limit)
        return replay

    def ack(self, channel: str, group: str, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Acknowledge group deliveries; return (acked, unknown) ids (`Channel.ack`)."""
        _, core = self._open()
        result: tuple[list[str], list[str]] = self._call(core.ack, channel, group, list(ids))
        return result

    def group_info(self, channel: str, group: str) -> GroupInfo:
        _, core = self._open()
        info: GroupInfo = self._call(core.group_info, channel, group)
        return info

    def ping(self) -> None:
        """Raise `LayerUnavailable` unless the broker answers."""
        _, core = self._open()
        self._call(core.ping)


class BlockingSubscription:
    """A subscription read by blocking: iterate it, or call `receive(timeout=...)`.

    Iteration ends when the subscription or its `SyncChannel` is closed, from any thread. Use it
    in `with` to close it at the end of the block.
    """

    def __init__(
        self,
        owner: SyncChannel,
        portal: BlockingPortal,
        context: AbstractContextManager[Subscription],
    ) -> None:
        self._owner = owner
        self._portal = portal
        self._context = context
        self._subscription = context.__enter__()
        self._items: deque[Item] = deque()
        self._reading = threading.Lock()  # one reader waits in the core at a time
        self._closing = threading.Lock()
        self._ending = False  # no new events; readers stop (or drain, see `_drain`)
        self._closed = False  # the core subscription's context was left
        self._drain = False  # once ending, still hand out what was delivered before
        self._finished = False  # the core subscription has nothing more to give

    @property
    def subscription(self) -> Subscription:
        """The core subscription (its `channels`, `patterns`, `dropped` count)."""
        return self._subscription

    @property
    def closed(self) -> bool:
        return self._closed

    def receive(self, timeout: float | None = None) -> Item:
        """The next `Event` or `Gap`, waiting up to `timeout` seconds (forever with None).

        Raises `TimeoutError` when nothing came in time, `ChannelClosed` once the subscription is
        closed, and `SubscriberOverflow` when the `disconnect` policy ended it.
        """
        with self._reading:
            while not self._items:
                if self._finished or (self._ending and not self._drain):
                    raise ChannelClosed("the subscription was closed")
                try:
                    batch = self._portal.call(self._next_batch, timeout)
                except ChannelClosed:
                    self._finished = True
                    raise
                except RuntimeError:
                    if self._owner._portal is not None:
                        raise
                    # a handler closed the SyncChannel itself: its loop is gone
                    self._finished = True
                    raise ChannelClosed("the SyncChannel was closed") from None
                if self._ending and not self._drain:
                    raise ChannelClosed("the subscription was closed")
                self._items.extend(batch)
            return self._items.popleft()

    async def _next_batch(self, within: float | None) -> list[Item]:
        with anyio.fail_after(within):
            return await self._subscription.next_batch()

    def __iter__(self) -> Iterator[Item]:
        return self

    def __next__(self) -> Item:
        try:
            return self.receive()
        except ChannelClosed:
            raise StopIteration from None

    def close(self) -> None:
        """End the subscription; a thread blocked reading it stops iterating. Idempotent."""
        with self._closing:
            if self._closed:
                return
            self._closed = self._ending = True
        try:
            self._context.__exit__(None, None, None)
        finally:
            self._owner._forget(self)

    def _end(self) -> None:
        """Stop the stream but stay subscribed: readers wake and stop, or drain what came."""
        with self._closing:
            if self._closed or self._ending:
                return
            self._ending = True
        self._portal.call(self._subscription.close)

    def __enter__(self) -> BlockingSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class HandlerSubscription:
    """A subscription whose events go to a handler, one at a time, in a thread of its own.

    `errors` counts the handler's exceptions (each logged); the subscription goes on after one.
    `close()` (or leaving `with`) ends it and waits for the events delivered before it to be
    handled; a group consumer stops after the event in hand instead, since the group redelivers
    what it did not acknowledge.
    """

    def __init__(
        self,
        owner: SyncChannel,
        subscription: BlockingSubscription,
        handler: Handler,
        *,
        grouped: bool,
    ) -> None:
        self._owner = owner
        self._subscription = subscription
        subscription._drain = not grouped
        self.handler = handler
        self.errors = 0
        self.handled = 0
        self._thread = threading.Thread(
            target=self._run, name=f"layers-sync-handler-{id(self):x}", daemon=True
        )
        self._thread.start()

    @property
    def subscription(self) -> Subscription:
        return self._subscription.subscription

    def _run(self) -> None:
        name = getattr(self.handler, "__qualname__", repr(self.handler))
        try:
            for item in self._subscription:
                if isinstance(item, Gap):
                    logger.warning("handler %s missed events: %s", name, item.to_json().decode())
                    continue
                try:
                    self.handler(item)
                except Exception:
                    self.errors += 1
                    self._owner._handler_failed()
                    logger.exception("handler %s failed on %r", name, item)
                    continue
                self.handled += 1
                if item.group is not None:
                    self._ack(item)
        except SubscriberOverflow as exc:
            logger.error("handler %s: %s", name, exc.detail)

    def _ack(self, event: Event) -> None:
        try:
            self._subscription._portal.call(event.ack)
        except Exception:
            logger.exception("acknowledging %r failed; it will be redelivered", event)

    def close(self) -> None:
        """End the subscription and wait for its thread (unless called from the handler).

        The thread ends before the subscription is left, so a group consumer acknowledges the
        event in hand while it is still a member.
        """
        self._subscription._end()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._subscription.close()
        self._owner._forget(self)

    def __enter__(self) -> HandlerSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["BlockingSubscription", "HandlerSubscription", "SyncChannel"]
