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
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from importlib.util import find_spec
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.abc import Process

from layers import Channel, create_layer
from tests.app.conftest import free_port
from tests.browser.conftest import ConsolePage, shown_ids, subscribe_in_page, wait_shown
from tests.conftest import require_service

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
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


@asynccontextmanager
async def gateway_process(port: int, layer: str, log: Path) -> AsyncIterator[Process]:
    """`python -m app` on `port`; stopped with SIGTERM (graceful drain) when the block ends."""
    env = {
        **os.environ,
        "GATEWAY_PORT": str(port),
        "GATEWAY_LAYER": layer,
        "GATEWAY_RETRY_MS": "300",  # the SSE reconnect delay the browser is told
        "GATEWAY_SHUTDOWN_GRACE_SECONDS": "2",
    }
    with log.open("ab") as output:
        process = await anyio.open_process(
            [sys.executable, "-m", "app"],
            env=env,
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
            with anyio.fail_after(30):
                while True:  # another process: nothing to await but its answer
                    if process.returncode is not None:
                        raise RuntimeError(f"the gateway exited; see {log}")
                    try:
                        if (await http.get("/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.1)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            with anyio.move_on_after(20):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def publish(port: int, channel: str, data: object) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
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
    log = tmp_path / "gateway.log"
    expected: list[str] = []
    with anyio.fail_after(120):
        async with gateway_process(port, persistent_layer, log) as first:
            await page.goto(f"http://127.0.0.1:{port}/")
            await subscribe_in_page(page, transport, channel)
            expected += [await publish(port, channel, n) for n in (1, 2, 3)]
            await wait_shown(page, expected[-1])
            first.terminate()
            await first.wait()
        await page.locator("#sub-status.bad", has_text="reconnecting").wait_for()
        async with Channel(create_layer(persistent_layer)) as library:
            expected += [await library.publish(channel, n) for n in (4, 5)]
        async with gateway_process(port, persistent_layer, log):
            expected += [await publish(port, channel, n) for n in (6, 7)]
            await wait_shown(page, expected[-1])
            await page.locator("#sub-status.ok").wait_for()
            # a duplicate would be replayed before anything live: after this one, none can come
            expected.append(await publish(port, channel, 8))
            await wait_shown(page, expected[-1])
            assert await shown_ids(page) == expected
