"""Server-Sent Events as a raw ASGI response.

Design decisions, so nobody "fixes" them:

- The subscription is opened by the route, before the response starts, so a bad channel name or a
  missing capability is still a JSON error with the right status. This response owns it from then
  on and closes it when the stream ends.
- Each event's frame is encoded once per message (`Event.sse_frame`) and whatever a subscriber has
  queued is written in one `send`, so a lagging client costs one write, not one per event.
- The disconnect listener (the request task) and the writer (a task of its own) end together:
  whichever ends first cancels the other, so a client that goes away frees its subscription at
  once. The writer is the second task: waking it resumes a short chain of coroutines, not the
  whole middleware stack the request task runs under, and it is woken once per message per
  subscriber. They are two plain asyncio tasks, not an anyio task group: the group, its cancel
  scopes and its task handles were about 3 KiB of every idle stream (benchmark S3). The server
  runs asyncio (uvicorn), and the writer's end stops the listener with `Task.cancel`, taken back
  with `Task.uncancel` so a cancel from anyone else still goes on.
- No timeout around the wait for events: a cancel scope per wait cost more than the rest of a
  delivery. One `Keepalives` timer for all streams (`app.timers`) wakes those that wrote nothing
  lately, and a stream with an expiring token gets one event-loop timer that wakes it at the
  expiry (a timer handle, not a task).
- A stream lasts as long as its client stays, so it holds as little as it can: slots, its
  subscription and the two context managers to close, never the request (`app.api.stream_path`
  serves the routes without FastAPI's request state for the same reason).
- Gap notices carry no `id:` field, so the browser's last event id stays on the last real event.
- A stream ends with `event: error` (`token_expired`) when its token expires, and a group
  consumer's with `event: error` (`unknown_group`) when its group is deleted.
- A write stuck past `GATEWAY_SEND_TIMEOUT_SECONDS` (a client that stopped reading) ends the
  stream and frees its subscription, whatever the backlog policy (`app.timers.SendWatchdog`);
  what was queued for it counts as dropped. The response cannot be finished (the final write
  would wait too), so the server closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from app.errors import error_body
from app.gateway import Gateway
from app.logs import STREAM_CUT
from layers import (
    ChannelClosed,
    Event,
    Gap,
    PresenceEvent,
    SubscriberOverflow,
    Subscription,
    UnknownGroup,
)

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
]
KEEPALIVE = b": keepalive\n\n"

logger = logging.getLogger("app")


def gap_frame(gap: Gap) -> bytes:
    return b"event: gap\ndata: " + gap.to_json() + b"\n\n"


def error_frame(code: str, detail: str) -> bytes:
    return b"event: error\ndata: " + error_body(code, detail) + b"\n\n"


def _body(chunk: bytes) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


class EventStream(Response):
    """The ASGI response that streams one `Subscription` as SSE.

    It lives as long as its connection, so it keeps only what the stream needs: slots, not the
    `Response` attributes (headers, body) it never uses, and no reference to the request.
    """

    __slots__ = (
        "_cut",
        "_expiry",
        "_host",
        "_in_flight",
        "_listening",
        "_subscribing",
        "_writer",
        "background",
        "connection",
        "expired",
        "expires_at",
        "gateway",
        "sending_since",
        "subscription",
        "wrote",
    )

    def __init__(
        self,
        gateway: Gateway,
        subscription: Subscription,
        subscribing: AbstractAsyncContextManager[Subscription],
        connection: AbstractContextManager[None],
        expires_at: float = math.inf,
    ) -> None:
        self.gateway = gateway
        self.subscription = subscription
        self._subscribing = subscribing  # entered: `subscription` is what it gave
        self.connection = connection  # entered: this stream counts as one connection
        self.background = None  # what FastAPI looks for on a response an endpoint returns
        self.expires_at = expires_at  # on the event loop's clock (`Grant.deadline`)
        self.expired = False
        self.wrote = False  # since the last keepalive tick (`app.timers.Keepalives`)
        self.sending_since: float | None = None  # for the send watchdog
        self._in_flight = 0  # events in the write in progress
        self._cut = False
        self._listening = False  # the request task waits for the client to go
        self._host: asyncio.Task[Any] | None = None  # the request task
        self._writer: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None

    async def close(self) -> None:
        """End the subscription and the connection's count (also when the stream never ran)."""
        try:
            await self._subscribing.__aexit__(None, None, None)
        finally:
            self.connection.__exit__(None, None, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # As few locals as can be: this frame lasts as long as the stream.
        self._started(send)
        host = self._host
        writer = self._writer
        assert host is not None and writer is not None
        self._listening = True
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except asyncio.CancelledError:
            # `_end` stopped the wait (the writer is done); a cancel of anyone else's goes on
            if self._listening or host.uncancel() > 0:
                raise
        finally:
            self._listening = False
            if self._expiry is not None:
                self._expiry.cancel()
            writer.cancel()
            self._stopped()
            if self._cut:
                STREAM_CUT.set(True)  # uvicorn's "returned without completing" is no error here
            with anyio.CancelScope(shield=True):
                await asyncio.wait((writer,))  # its last write done before the subscription ends
                await self.close()
            self._host = self._writer = self._expiry = None
        if not writer.cancelled() and (error := writer.exception()) is not None:
            raise error

    def _started(self, send: Send) -> None:
        gateway = self.gateway
        gateway.metrics.subscribers("sse").inc()
        gateway.keepalives.streams.add(self)
        gateway.watchdog.writers.add(self)
        loop = asyncio.get_running_loop()
        self._host = asyncio.current_task()
        self._writer = loop.create_task(self._write(send))
        if self.expires_at < math.inf:
            self._expiry = loop.call_at(self.expires_at, self._expire)

    def _stopped(self) -> None:
        gateway = self.gateway
        gateway.keepalives.streams.discard(self)
        gateway.watchdog.writers.discard(self)
        gateway.metrics.subscribers("sse").dec()

    def wake(self) -> None:
        self.subscription.wake()

    def stuck(self) -> None:
        subscription = self.subscription
        lost = self._in_flight + subscription.max_backlog - subscription.free_slots
        self.gateway.metrics.dropped("sse").inc(max(1, lost))
        logger.info(
            "ending an SSE stream whose client stopped reading (GATEWAY_SEND_TIMEOUT_SECONDS)"
        )
        self._cut = True
        if self._writer is not None:
            self._writer.cancel()  # its end (`_end`) ends the request's wait too

    def _end(self) -> None:
        """The writer is done: stop the request task's wait for the client to go."""
        if self._listening and self._host is not None:
            self._listening = False
            self._host.cancel()

    def _expire(self) -> None:
        self.expired = True
        self.subscription.wake()

    def _retry_ms(self) -> int:
        return self.gateway.settings.retry_ms

    def _ending(self, exc: SubscriberOverflow | UnknownGroup | ChannelClosed) -> bytes:
        """The stream's last frame when its subscription ends."""
        if isinstance(exc, SubscriberOverflow):
            self.gateway.metrics.dropped("sse").inc()
            return error_frame(exc.code, exc.detail) + b"retry: %d\n\n" % self._retry_ms()
        if isinstance(exc, UnknownGroup):  # the group was deleted
            return error_frame(exc.code, exc.detail)
        # shutting down: reconnect soon, to another instance if there is one
        return b"retry: %d\n\n" % min(self._retry_ms(), 1000)

    def _frames(self, batch: list[Event | Gap]) -> bytes:
        """One write for everything a subscriber had queued; counts what it drops and notes the
        messages the write carries (`_in_flight`, counted delivered once it is done)."""
        frames = []
        events = 0
        for item in batch:
            if isinstance(item, Event):
                frames.append(item.sse_frame())
                events += not isinstance(item, PresenceEvent)  # a join or leave: no message
            else:
                if item.dropped:
                    self.gateway.metrics.dropped("sse").inc(item.dropped)
                frames.append(gap_frame(item))
        self._in_flight = events
        return b"".join(frames)

    def _delivered(self) -> None:
        self.gateway.metrics.delivered("sse").inc(self._in_flight)
        self._in_flight = 0

    async def _send(self, send: Send, message: Message) -> None:
        self.sending_since = time.monotonic()
        await send(message)
        self.sending_since = None

    async def _write(self, send: Send) -> None:
        """The writer task: the stream until it ends, which ends the request too.

        Few locals: its frame is held for as long as the stream waits for events."""
        try:
            await self._send(
                send, {"type": "http.response.start", "status": 200, "headers": HEADERS}
            )
            await self._send(send, _body(b": connected\nretry: %d\n\n" % self._retry_ms()))
            subscription = self.subscription
            while True:
                try:
                    batch = await subscription.next_batch()
                except (SubscriberOverflow, UnknownGroup, ChannelClosed) as exc:
                    ending = self._ending(exc)
                    break
                if self.expired:
                    ending = error_frame(
                        "token_expired", "the token has expired; reconnect with a new one"
                    )
                    break
                self.wrote = True
                if not batch:  # woken by `Keepalives`
                    await self._send(send, _body(KEEPALIVE))
                    continue
                await self._send(send, _body(self._frames(batch)))
                self._delivered()
            await self._send(
                send, {"type": "http.response.body", "body": ending, "more_body": False}
            )
        except OSError:  # the client went away mid-write
            pass
        finally:
            self._end()
