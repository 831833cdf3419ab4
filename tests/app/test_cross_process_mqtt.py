"""Two gateway processes (`python -m app`) on one Mosquitto: what one accepts, the other streams,
and a consumer group spread over both gets every message once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path

import anyio
import pytest

from tests.app.processes import GatewayProcess, gateway_process
from tests.sse import SSEEvent, SSEStream

pytestmark = pytest.mark.anyio

TIMEOUT = 15


@pytest.fixture
async def gateways(
    mqtt_url: str, unique: str, tmp_path: Path
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two processes on one host: each takes its own instance slot, so its own MQTT sessions."""
    layer = f"{mqtt_url}/?topic_prefix=gwtest/{unique}/&session_expiry=60"
    with ExitStack() as stack:
        first = stack.enter_context(gateway_process(layer, tmp_path / "first.log"))
        second = stack.enter_context(gateway_process(layer, tmp_path / "second.log"))
        await first.wait_ready()
        await second.wait_ready()
        yield first, second


async def test_published_on_one_process_streams_from_the_other(
    gateways: tuple[GatewayProcess, GatewayProcess], unique: str
) -> None:
    first, second = gateways
    channel = f"{unique}.room"
    for publisher, subscriber in ((first, second), (second, first)):
        async with publisher.client() as http, subscriber.sse(f"/channels/{channel}/events") as sse:
            with anyio.fail_after(TIMEOUT):
                reply = await http.post(
                    f"/channels/{channel}/publish", json={"data": {"from": publisher.url}}
                )
                assert reply.status_code == 200, reply.text
                event = await sse.next()
            assert event.last_event_id == reply.json()["id"]
            assert event.json["channel"] == channel
            assert event.json["data"] == {"from": publisher.url}


async def test_a_group_spread_over_both_processes_gets_each_message_once(
    gateways: tuple[GatewayProcess, GatewayProcess], unique: str
) -> None:
    path = f"/channels/{unique}/events?group=workers&consumer="
    received: dict[int, list[SSEEvent]] = {0: [], 1: []}
    all_in = anyio.Event()

    async def collect(index: int, sse: SSEStream) -> None:
        async for event in sse:
            received[index].append(event)
            if len(received[0]) + len(received[1]) >= 10:
                all_in.set()

    first, second = gateways
    async with (
        first.sse(path + "on-first") as on_first,
        second.sse(path + "on-second") as on_second,
        first.client() as http,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(collect, 0, on_first)
        tasks.start_soon(collect, 1, on_second)
        with anyio.fail_after(TIMEOUT):
            replies = [
                await http.post(f"/channels/{unique}/publish", json={"data": n}) for n in range(10)
            ]
            await all_in.wait()
            # Acks go to the process that delivered the message: group state is per process.
            for process, index in ((first, 0), (second, 1)):
                ids = [event.last_event_id for event in received[index]]
                async with process.client() as acker:
                    reply = await acker.post(
                        f"/channels/{unique}/groups/workers/ack", json={"ids": ids}
                    )
                assert reply.json() == {"acked": len(ids), "unknown": []}
        tasks.cancel_scope.cancel()
    published = sorted(reply.json()["id"] for reply in replies)
    assert sorted(e.last_event_id for e in received[0] + received[1]) == published
    assert received[0] and received[1]  # Mosquitto deals a shared subscription round robin
