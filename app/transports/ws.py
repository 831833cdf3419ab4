"""The WebSocket protocol: JSON text frames `subscribe`, `unsubscribe`, `publish`, `ack`, `nack`,
`extend`.

One writer task owns the socket's send side; subscription forwarders and replies queue frames for
it in a bounded outbox, so frames never interleave and a slow socket pushes back: on the
subscription backlog, where the backlog policy applies, and on the frame reader, which stops
reading while its reply cannot be queued. A bad frame is answered with an error frame and the
socket stays open; so is a group subscription whose group was deleted (`unknown_group`), which
ends.

The token is checked at the handshake (header, query parameter or cookie, as for HTTP); a refused
handshake is accepted and then closed with an error frame and code 1008, because a browser sees
neither the HTTP status of a refused upgrade nor its body. The socket closes the same way when the
token expires. Each socket counts once against `GATEWAY_MAX_CONNECTIONS`, and publishes are
limited per socket by a token bucket (`GATEWAY_WS_PUBLISH_RATE`, a burst of one second's worth).
"""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup, TaskStatus
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.auth import Grant
from app.errors import ApiError, close_code_of, status_of
from app.gateway import Gateway
from app.idempotency import published
from app.payloads import check_fields, parse_json_object
from app.transports.outbox import Outbox
from layers import (
    ChannelClosed,
    ChannelError,
    Event,
    Member,
    PresenceEvent,
    SubscriberOverflow,
    Subscription,
    UnknownGroup,
    make_message,
    new_member,
)

OUTBOX_SIZE = 256
MAX_REF_BYTES = 256  # a `ref` is echoed in the reply: bounded, and always encodable

logger = logging.getLogger("app")


@dataclass
class _Close:
    code: int
    reason: str = ""


@dataclass
class _Feed:
    """One subscription of this socket, with the task forwarding it."""

    subscription: Subscription
    cleanup: AsyncExitStack
    forwarder: anyio.CancelScope | None = None


def message_frame(event: Event) -> str:
    """A message, or a join or leave (`{"type": "join", "channel", "client_id", ...}`)."""
    kind = event.event if isinstance(event, PresenceEvent) else "message"
    return '{"type":"' + kind + '",' + event.envelope()[1:].decode()


def reply(kind: str, ref: Any, **fields: Any) -> str:
    body = {"type": kind, **fields}
    if ref is not None:
        body["ref"] = ref
    return orjson.dumps(body).decode()


class TokenBucket:
    """`rate` tokens a second, holding at most `capacity`; `take()` is False when empty."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class WebSocketSession:
    def __init__(self, gateway: Gateway, websocket: WebSocket) -> None:
        self.gateway = gateway
        self.websocket = websocket
        self.grant: Grant
        rate = gateway.settings.ws_publish_rate
        self.publishes = TokenBucket(rate, max(1.0, rate))
        self.live: _Feed | None = None
        self.groups: dict[tuple[str, str], _Feed] = {}
        # Replies and events wait here for the writer; a full outbox stops the reader (see
        # `app.transports.outbox`), so a client that does not read cannot grow the server.
        self.outbox = Outbox[str | _Close](OUTBOX_SIZE, gateway.settings.max_backlog_bytes)
        self.tasks: TaskGroup
        self.sending_since: float | None = None  # for the send watchdog
        self.member = new_member(None, "ws")  # in presence; the user is known once authenticated

    async def run(self) -> None:
        await self.websocket.accept()
        try:
            # only the handshake's checks raise here: `_serve` answers errors with frames
            self.grant = self.gateway.auth.grant_for(self.websocket)
            with self.gateway.connection(), self.gateway.on_drain(self._going_away):
                await self._serve()
        except ApiError as exc:
            await self.websocket.send_text(
                reply("error", None, error=exc.code, detail=exc.detail, status=exc.status)
            )
            await self.websocket.close(close_code_of(exc), exc.code)

    async def _serve(self) -> None:
        active = self.gateway.metrics.subscribers("ws")
        active.inc()
        watchdog = self.gateway.watchdog
        watchdog.writers.add(self)
        try:
            async with anyio.create_task_group() as tasks:
                self.tasks = tasks
                tasks.start_soon(self._write, tasks.cancel_scope)
                if self.grant.expires_at is not None:
                    tasks.start_soon(self._expire, self.grant.deadline())
                await self._read()
                tasks.cancel_scope.cancel()
        finally:
            self.outbox.close()
            watchdog.writers.discard(self)
            active.dec()
            with anyio.CancelScope(shield=True):
                for feed in [self.live, *self.groups.values()]:
                    if feed is not None:
                        await feed.cleanup.aclose()

    async def _write(self, session: anyio.CancelScope) -> None:
        while True:
            try:
                frame = await self.outbox.get()
            except anyio.EndOfStream:
                return
            self.sending_since = time.monotonic()
            try:
                if isinstance(frame, _Close):
                    await self.websocket.close(frame.code, frame.reason)
                    session.cancel()
                    return
                await self.websocket.send_text(frame)
            except WebSocketDisconnect:  # the client went away: not an error
                session.cancel()
                return
            self.sending_since = None

    def stuck(self) -> None:
        """A write waited past `GATEWAY_SEND_TIMEOUT_SECONDS`: the client stopped reading. End
        the session (a close frame would wait too); what was queued for it counts as dropped."""
        feeds = [feed for feed in [self.live, *self.groups.values()] if feed is not None]
        lost = len(self.outbox) + sum(
            feed.subscription.max_backlog - feed.subscription.free_slots for feed in feeds
        )
        self.gateway.metrics.dropped("ws").inc(max(1, lost))
        logger.info(
            "ending a WebSocket whose client stopped reading (GATEWAY_SEND_TIMEOUT_SECONDS)"
        )
        self.tasks.cancel_scope.cancel()

    def _going_away(self) -> None:
        """The instance is draining: close with 1001 so the client reconnects elsewhere."""
        self.outbox.put_first(_Close(1001, "going_away"))

    async def _expire(self, deadline: float) -> None:
        await anyio.sleep_until(deadline)
        expired = ApiError(401, "token_expired", "the token has expired; reconnect with a new one")
        await self._error(None, expired)
        await self.outbox.put(_Close(close_code_of(expired), expired.code))

    async def _read(self) -> None:
        limit = self.gateway.settings.max_payload_bytes
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self._error(None, ApiError(422, "invalid_frame", "send JSON text frames"))
            elif (len(text) if text.isascii() else len(text.encode())) > limit:  # bytes, not chars
                await self._error(
                    None,
                    ApiError(413, "payload_too_large", f"frames are limited to {limit} bytes"),
                )
            else:
                await self._handle(text)

    async def _handle(self, text: str) -> None:
        ref = None
        try:
            frame = parse_json_object(text, "frame")
            ref = _ref(frame)
            op = frame.get("op")
            handler = {
                "subscribe": self._subscribe,
                "unsubscribe": self._unsubscribe,
                "publish": self._publish,
                "ack": self._ack,
                "nack": self._nack,
                "extend": self._extend,
            }.get(op if isinstance(op, str) else "")
            if handler is None:
                raise ApiError(
                    422,
                    "unknown_op",
                    f"op {op!r} is not subscribe, unsubscribe, publish, ack, nack or extend",
                )
            fields = await handler(frame)
            # The reply goes out before any event of a new subscription: queue it, then start
            # the forwarders the op created.
            await self._send(reply("ok", ref, op=op, **fields))
            for feed in [self.live, *self.groups.values()]:
                if feed is not None and feed.forwarder is None:
                    feed.forwarder = await self.tasks.start(self._forward, feed.subscription)
        except (ApiError, ChannelError) as exc:
            await self._error(ref, exc)

    async def _send(self, frame: str) -> None:
        await self.outbox.put(frame, len(frame))

    async def _error(self, ref: Any, exc: ApiError | ChannelError) -> None:
        status = exc.status if isinstance(exc, ApiError) else status_of(exc)
        await self._send(reply("error", ref, error=exc.code, detail=exc.detail, status=status))

    # -- ops -------------------------------------------------------------------------------------

    async def _subscribe(self, frame: dict[str, Any]) -> dict[str, Any]:
        channels = _names(frame, "channels")
        patterns = _names(frame, "patterns")
        last_event_id = _optional(frame, "last_event_id", str)
        history = _optional(frame, "history", int)
        group = _optional(frame, "group", str)
        consumer = _optional(frame, "consumer", str)
        group_options = {
            "prefetch": _optional(frame, "prefetch", int),
            "start": _optional(frame, "start", str),
        }
        presence = frame.get("presence", False)
        if not isinstance(presence, bool):
            raise ApiError(422, "invalid_argument", "presence must be true or false")
        if not channels and not patterns:  # as over SSE; adding nothing to a live one is a mistake
            raise ApiError(422, "invalid_argument", "name at least one channel or pattern")
        gateway = self.gateway
        if group is not None:
            self.grant.require_subscribe([], patterns)
            for channel in channels:
                self.grant.require_group(channel, consumer)
            gateway.check_subscription(channels, patterns)
            key = (channels[0] if channels else "", group)
            if key in self.groups:
                raise ApiError(422, "already_subscribed", f"already in group {group!r} here")
            limit = gateway.settings.max_channels_per_subscription
            if len(self.groups) >= limit:
                raise ApiError(
                    422,
                    "too_many_channels",
                    f"at most {limit} group subscriptions per socket "
                    "(GATEWAY_MAX_CHANNELS_PER_SUBSCRIPTION)",
                )
            self.groups[key] = await self._feed(
                *channels, patterns=patterns, group=group, consumer=consumer, **group_options
            )
        elif any(value is not None for value in group_options.values()):
            raise ApiError(422, "invalid_argument", "prefetch and start need a group")
        elif self.live is None:
            self.grant.require_subscribe(channels, patterns)
            gateway.check_subscription(channels, patterns)
            self.live = await self._feed(
                *channels,
                patterns=patterns,
                last_event_id=last_event_id,
                history=history,
                presence=presence,
                member=Member(self.member.client_id, self.grant.subject, "ws"),
            )
        else:
            self.grant.require_subscribe(channels, patterns)
            current = self.live.subscription
            gateway.check_subscription(
                sorted(current.channels | set(channels)), sorted(current.patterns | set(patterns))
            )
            current.presence = current.presence or presence
            await current.add(channels, patterns, last_event_id=last_event_id, history=history)
        return {"channels": channels, "patterns": patterns}

    async def _feed(self, *channels: str, **options: Any) -> _Feed:
        cleanup = AsyncExitStack()
        try:
            subscription = await cleanup.enter_async_context(
                self.gateway.channel.subscribe(*channels, **options)
            )
        except BaseException:
            await cleanup.aclose()
            raise
        return _Feed(subscription, cleanup)

    async def _forward(
        self, subscription: Subscription, *, task_status: TaskStatus[anyio.CancelScope]
    ) -> None:
        delivered = self.gateway.metrics.delivered("ws")
        dropped = self.gateway.metrics.dropped("ws")
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            try:
                while True:
                    for item in await subscription.next_batch():
                        if isinstance(item, Event):
                            await self._send(message_frame(item))
                            if not isinstance(item, PresenceEvent):  # a join or leave
                                delivered.inc()
                        else:
                            dropped.inc(item.dropped)
                            await self._send('{"type":"gap",' + item.to_json()[1:].decode())
            except UnknownGroup as exc:  # the group was deleted: this feed ends, the socket stays
                await self._error(None, exc)
                for key, feed in list(self.groups.items()):
                    if feed.subscription is subscription:
                        del self.groups[key]
                        await feed.cleanup.aclose()
            except (SubscriberOverflow, ChannelClosed) as exc:
                if isinstance(exc, SubscriberOverflow):
                    dropped.inc()
                    await self._error(None, exc)
                await self.outbox.put(_Close(close_code_of(exc), exc.code))

    async def _unsubscribe(self, frame: dict[str, Any]) -> dict[str, Any]:
        channels = _names(frame, "channels")
        patterns = _names(frame, "patterns")
        group = _optional(frame, "group", str)
        if group is not None:
            feeds = [self.groups.pop((name, group), None) for name in channels]
            for feed in feeds:
                if feed is not None:
                    if feed.forwarder is not None:
                        feed.forwarder.cancel()
                    await feed.cleanup.aclose()
        elif self.live is not None:
            await self.live.subscription.remove(channels, patterns)
        return {"channels": channels, "patterns": patterns}

    async def _publish(self, frame: dict[str, Any]) -> dict[str, Any]:
        if not self.publishes.take():
            rate = self.gateway.settings.ws_publish_rate
            raise ApiError(
                429,
                "rate_limited",
                f"at most {rate:g} publishes a second per socket (GATEWAY_WS_PUBLISH_RATE); "
                "slow down, this frame was not published",
            )
        if "pattern" in frame and "channel" not in frame:
            check_fields(frame, {"pattern", "data"}, {"event", "op", "ref"})
            pattern = self.gateway.check_pattern(frame["pattern"])
            self.grant.require_publish_pattern(pattern)
            id = await self.gateway.channel.publish_pattern(
                pattern, frame["data"], event=frame.get("event")
            )
            return {"pattern": pattern, "id": id}
        check_fields(frame, {"channel", "data"}, {"event", "idempotency_key", "op", "ref"})
        channel = self.gateway.check_channel(frame["channel"])
        self.grant.require_publish(channel)
        message = make_message(
            channel, frame["data"], frame.get("event"), frame.get("idempotency_key")
        )
        (message_id,) = await self.gateway.channel.publish_messages([message])
        return published(channel, message_id)

    async def _ack(self, frame: dict[str, Any]) -> dict[str, Any]:
        check_fields(frame, {"channel", "group", "ids"}, {"op", "ref"})
        channel = self.gateway.check_channel(frame["channel"])
        self.grant.require_group(channel)
        ids = frame["ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ApiError(422, "invalid_argument", "ids must be a list of strings")
        acked, unknown = await self.gateway.channel.ack(channel, frame["group"], ids)
        return {"acked": len(acked), "unknown": unknown}

    async def _nack(self, frame: dict[str, Any]) -> dict[str, Any]:
        check_fields(frame, {"channel", "group", "ids"}, {"delay_seconds", "op", "ref"})
        channel, ids = self._group_ids(frame)
        delay = frame.get("delay_seconds", 0)
        if not isinstance(delay, int | float) or isinstance(delay, bool):
            raise ApiError(422, "invalid_argument", "delay_seconds must be a number")
        nacked, unknown = await self.gateway.channel.nack(
            channel, frame["group"], ids, delay=float(delay)
        )
        return {"nacked": len(nacked), "unknown": unknown}

    async def _extend(self, frame: dict[str, Any]) -> dict[str, Any]:
        check_fields(frame, {"channel", "group", "ids"}, {"op", "ref"})
        channel, ids = self._group_ids(frame)
        extended, unknown = await self.gateway.channel.extend(channel, frame["group"], ids)
        return {"extended": len(extended), "unknown": unknown}

    def _group_ids(self, frame: dict[str, Any]) -> tuple[str, list[str]]:
        channel = self.gateway.check_channel(frame["channel"])
        self.grant.require_group(channel)
        ids = frame["ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ApiError(422, "invalid_argument", "ids must be a list of strings")
        return channel, ids


def _ref(frame: dict[str, Any]) -> Any:
    ref = frame.get("ref")
    if ref is None:
        return None
    try:
        size = len(orjson.dumps(ref))
    except orjson.JSONEncodeError:  # nested deeper than a reply can encode
        size = MAX_REF_BYTES + 1
    if size > MAX_REF_BYTES:
        raise ApiError(
            422, "invalid_argument", f"ref must be a JSON value of at most {MAX_REF_BYTES} bytes"
        )
    return ref


def _names(frame: dict[str, Any], field: str) -> list[str]:
    value = frame.get(field, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(422, "invalid_argument", f"{field} must be a list of strings")
    return value


def _optional(frame: dict[str, Any], field: str, kind: type) -> Any:
    value = frame.get(field)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ApiError(422, "invalid_argument", f"{field} must be a {kind.__name__}")
    return value
