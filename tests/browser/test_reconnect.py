"""The console's subscriptions survive a gateway restart, with nothing lost or repeated.

The gateway runs as a real process (`python -m app`) on a layer that keeps history across
restarts; it is stopped with SIGTERM (its graceful drain) and a new one starts on the same port.
Messages are published before the stop through the gateway, while it is down straight into the
layer with the library (no gateway to publish through), and after the restart through the new
gateway. The page must show every one exactly once, in order: its plain EventSource reconnects by
itself and resumes with `Last-Event-ID`; its WebSocket client reconnects and resubscribes with
`last_event_id`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import anyio
import pytest

from layers import Channel, create_layer
from tests.app.conftest import free_port
from tests.app.processes import GatewayProcess, gateway_process
from tests.browser.conftest import ConsolePage, shown_ids, subscribe_in_page, wait_shown
from tests.conftest import require_service

pytestmark = pytest.mark.anyio

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# Not the Redis tests' database, so their clean-ups and this gateway's keys never meet.
STREAMS_URL = "redis+streams://" + REDIS_URL.split("://", 1)[1].rsplit("/", 1)[0] + "/14"


@pytest.fixture
def persistent_layer(unique: str) -> Iterator[str]:
    """The URL of a layer that keeps messages across a gateway restart, emptied afterwards."""
    if find_spec("layers.redis_streams") is None:
        pytest.skip("no persistent layer (layers/redis_streams.py) in this tree")
    import redis

    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1) as client:
            reachable = bool(client.ping())
    except (redis.RedisError, OSError):
        reachable = False
    require_service("Redis", reachable, REDIS_URL)
    yield STREAMS_URL
    # the gateway uses the layer's default key prefix; this test's channels all start `unique`
    with redis.Redis.from_url(STREAMS_URL.replace("redis+streams", "redis", 1)) as client:
        keys = list(client.scan_iter(match=f"gw:{unique}*"))
        if keys:
            client.delete(*keys)


async def publish(gateway: GatewayProcess, channel: str, data: object) -> str:
    async with gateway.client() as http:
        reply = await http.post(f"/channels/{channel}/publish", json={"data": data})
    assert reply.status_code == 200, reply.text
    message_id: str = reply.json()["id"]
    return message_id


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_subscription_resumes_across_a_gateway_restart(
    console: ConsolePage, persistent_layer: str, unique: str, transport: str, tmp_path: Path
) -> None:
    page = console.page
    port = free_port()
    channel = f"{unique}.feed"
    retry = "300"  # ms: the SSE reconnect delay the browser is told
    expected: list[str] = []
    with anyio.fail_after(120):
        with gateway_process(
            persistent_layer, tmp_path / "first.log", port=port, GATEWAY_RETRY_MS=retry
        ) as first:
            await first.wait_ready()
            await page.goto(first.url)
            await subscribe_in_page(page, transport, channel)
            expected += [await publish(first, channel, n) for n in (1, 2, 3)]
            await wait_shown(page, expected[-1])
        # stopped (SIGTERM, drained); nothing listens on the port now
        await page.locator("#sub-status.bad", has_text="reconnecting").wait_for()
        async with Channel(create_layer(persistent_layer)) as library:
            expected += [await library.publish(channel, n) for n in (4, 5)]
        with gateway_process(
            persistent_layer, tmp_path / "second.log", port=port, GATEWAY_RETRY_MS=retry
        ) as second:
            await second.wait_ready()
            expected += [await publish(second, channel, n) for n in (6, 7)]
            await wait_shown(page, expected[-1])
            await page.locator("#sub-status.ok").wait_for()
            # a duplicate would be replayed before anything live: after this one, none can come
            expected.append(await publish(second, channel, 8))
            await wait_shown(page, expected[-1])
            assert await shown_ids(page) == expected
