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

from pathlib import Path

import anyio
import pytest

from layers import Channel, create_layer
from tests.app.conftest import free_port
from tests.app.processes import GatewayProcess, gateway_process
from tests.browser.conftest import ConsolePage, shown_ids, subscribe_in_page, wait_shown

pytestmark = pytest.mark.anyio


@pytest.fixture
def persistent_layer(redis_url: str, redis_prefix: str) -> str:
    """Redis Streams under a key prefix of this test's own (removed afterwards)."""
    return redis_url.replace("redis://", "redis+streams://", 1) + f"?key_prefix={redis_prefix}"


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
