"""The floor the gateway is measured against: a minimal raw-ASGI SSE fan-out app.

It speaks the gateway's routes and wire format (`POST /channels/{c}/publish` with
`{"data": ...}`, `GET /channels/{c}/events` with `Last-Event-ID` resume, the same envelope and
frame) and does the least work that can: parse the JSON, encode the frame once, append it to a
history list and to each subscriber's pending list, wake the subscriber, which writes everything
pending in one send. No framework, no validation, no backpressure, no metrics. Keepalives come
from one ticker for all connections rather than a timer per connection.

Run it with the same uvicorn as the gateway: `uvicorn bench.baseline:app`.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from typing import Any

import orjson

KEEPALIVE_SECONDS = float(os.environ.get("GATEWAY_KEEPALIVE_SECONDS", "15"))
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]
JSON_HEADERS = [(b"content-type", b"application/json")]


class Subscriber:
    __slots__ = ("closed", "pending", "wake")

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.wake = asyncio.Event()
        self.closed = False

    def push(self, frame: bytes) -> None:
        self.pending.append(frame)
        self.wake.set()


class Hub:
    def __init__(self) -> None:
        self.frames: dict[str, list[bytes]] = {}  # channel -> every frame, index = id - 1
        self.subscribers: dict[str, set[Subscriber]] = {}
        self.ticker: asyncio.Task[None] | None = None

    def publish(self, channel: str, data: Any, event: str) -> int:
        history = self.frames.setdefault(channel, [])
        message_id = len(history) + 1
        envelope = orjson.dumps(
            {
                "channel": channel,
                "id": str(message_id),
                "event": event,
                "data": data,
                "published_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
        )
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (message_id, event.encode(), envelope)
        history.append(frame)
        for subscriber in self.subscribers.get(channel, ()):
            subscriber.push(frame)
        return message_id

    async def keepalive(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_SECONDS)
            for subscribers in self.subscribers.values():
                for subscriber in subscribers:
                    if not subscriber.pending:
                        subscriber.push(b": keepalive\n\n")


hub = Hub()


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


async def publish(channel: str, receive: Any, send: Any) -> None:
    body = orjson.loads(await read_body(receive))
    message_id = hub.publish(channel, body["data"], body.get("event", "message"))
    reply = b'{"channel":"%s","id":"%d"}' % (channel.encode(), message_id)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*JSON_HEADERS, (b"content-length", b"%d" % len(reply))],
        }
    )
    await send({"type": "http.response.body", "body": reply})


async def events(channel: str, scope: Any, receive: Any, send: Any) -> None:
    if hub.ticker is None:
        hub.ticker = asyncio.get_running_loop().create_task(hub.keepalive())
    subscriber = Subscriber()
    last_id = dict(scope["headers"]).get(b"last-event-id")
    if last_id is not None:
        subscriber.pending.extend(hub.frames.get(channel, [])[int(last_id) :])
    members = hub.subscribers.setdefault(channel, set())
    members.add(subscriber)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        subscriber.closed = True
        subscriber.wake.set()

    watcher = asyncio.ensure_future(watch())
    try:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send(
            {
                "type": "http.response.body",
                "body": b": connected\nretry: 3000\n\n",
                "more_body": True,
            }
        )
        while not subscriber.closed:
            if not subscriber.pending:
                subscriber.wake.clear()
                await subscriber.wake.wait()
                continue
            body = b"".join(subscriber.pending)
            subscriber.pending.clear()
            await send({"type": "http.response.body", "body": body, "more_body": True})
    except OSError:
        pass
    finally:
        members.discard(subscriber)
        watcher.cancel()


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    parts = scope["path"].split("/")  # "", "channels", name, "publish" | "events"
    if len(parts) == 4 and parts[1] == "channels":
        if parts[3] == "publish" and scope["method"] == "POST":
            return await publish(parts[2], receive, send)
        if parts[3] == "events":
            return await events(parts[2], scope, receive, send)
    await send({"type": "http.response.start", "status": 404, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": b""})
