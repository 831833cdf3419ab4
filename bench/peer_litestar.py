"""A peer for the benchmarks: Litestar channels on its memory backend, written as its docs show.

The same routes and frames as the gateway's (`POST /channels/{c}/publish` with `{"data": ...}`,
`GET /channels/{c}/events` as Server-Sent Events of the gateway's envelope), through Litestar's own
idiom: the `ChannelsPlugin` injected as `channels`, `wait_published` to answer once the backend
has the message, `start_subscription` + `iter_events` behind a `ServerSentEvent` response. It has
no ids to resume from, no validation of names, no auth and no metrics: a framework's floor for the
same job, not an equivalent of the gateway.

Run it with the same uvicorn as the gateway: `uvicorn bench.peer_litestar:app`.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
from litestar import Litestar, get, post
from litestar.channels import ChannelsPlugin
from litestar.channels.backends.memory import MemoryChannelsBackend
from litestar.response import ServerSentEvent, ServerSentEventMessage

_ids = itertools.count(1)


@post("/channels/{channel:str}/publish", status_code=200)
async def publish(channel: str, data: dict[str, Any], channels: ChannelsPlugin) -> dict[str, str]:
    message_id = str(next(_ids))
    envelope = {
        "channel": channel,
        "id": message_id,
        "event": data.get("event") or "message",
        "data": data.get("data"),
        "published_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    await channels.wait_published(orjson.dumps(envelope), channels=[channel])
    return {"channel": channel, "id": message_id}


@get("/channels/{channel:str}/events")
async def events(channel: str, channels: ChannelsPlugin) -> ServerSentEvent:
    async def stream() -> AsyncIterator[ServerSentEventMessage]:
        async with channels.start_subscription([channel]) as subscriber:
            async for message in subscriber.iter_events():
                envelope = orjson.loads(message)
                yield ServerSentEventMessage(
                    data=message.decode(), event=envelope["event"], id=envelope["id"]
                )

    return ServerSentEvent(stream(), headers={"Cache-Control": "no-store"})


app = Litestar(
    route_handlers=[publish, events],
    plugins=[ChannelsPlugin(backend=MemoryChannelsBackend(), arbitrary_channels_allowed=True)],
)
