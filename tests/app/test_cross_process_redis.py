"""Two gateway processes (`python -m app`) on one Redis, through Pub/Sub and through Streams: what
one accepts, the other streams; on Streams either process resumes a stream and acknowledges a
group's messages, whichever delivered them."""

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


@pytest.fixture(params=["redis", "redis+streams"])
def scheme(request: pytest.FixtureRequest) -> str:
    scheme: str = request.param
    return scheme


@pytest.fixture
async def gateways(
    scheme: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    layer = f"{redis_url.replace('redis://', f'{scheme}://', 1)}?key_prefix={redis_prefix}"
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


async def test_a_stream_resumes_on_the_other_process(
    gateways: tuple[GatewayProcess, GatewayProcess], scheme: str, unique: str
) -> None:
    if scheme == "redis":
        pytest.skip("redis:// keeps no history")
    first, second = gateways
    async with first.client() as http:
        with anyio.fail_after(TIMEOUT):
            ids = [
                (await http.post(f"/channels/{unique}/publish", json={"data": n})).json()["id"]
                for n in range(3)
            ]
        path = f"/events?channel={unique}&pattern={unique}.*&last_event_id={ids[0]}"
        async with second.sse(path) as sse:
            with anyio.fail_after(TIMEOUT):
                replayed = await sse.take(2)
                live = await http.post(f"/channels/{unique}.new/publish", json={"data": 3})
                (event,) = await sse.take(1)
    assert [e.last_event_id for e in replayed] == ids[1:]
    assert [e.json["data"] for e in replayed] == [1, 2]
    assert (event.last_event_id, event.json["data"]) == (live.json()["id"], 3)


async def test_a_group_spread_over_both_processes_gets_each_message_once(
    gateways: tuple[GatewayProcess, GatewayProcess], scheme: str, unique: str
) -> None:
    if scheme == "redis":
        pytest.skip("redis:// has no consumer groups")
    path = f"/channels/{unique}/events?group=workers&consumer="
    received: dict[int, list[SSEEvent]] = {0: [], 1: []}
    all_in = anyio.Event()

    async def collect(index: int, sse: SSEStream) -> None:
        async for event in sse:
            received[index].append(event)
            if len(received[0]) + len(received[1]) >= 20:
                all_in.set()

    first, second = gateways
    async with (
        first.sse(path + "on-first") as on_first,
        second.sse(path + "on-second") as on_second,
        first.client() as http,
        second.client() as acker,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(collect, 0, on_first)
        tasks.start_soon(collect, 1, on_second)
        with anyio.fail_after(TIMEOUT):
            replies = [
                await http.post(f"/channels/{unique}/publish", json={"data": n}) for n in range(20)
            ]
            await all_in.wait()
            # The group lives in Redis: one process acknowledges what both delivered.
            ids = [event.last_event_id for event in received[0] + received[1]]
            reply = await acker.post(f"/channels/{unique}/groups/workers/ack", json={"ids": ids})
            assert reply.json() == {"acked": 20, "unknown": []}
            info = (await acker.get(f"/channels/{unique}/groups/workers")).json()
        tasks.cancel_scope.cancel()
    published = sorted(reply.json()["id"] for reply in replies)
    assert sorted(e.last_event_id for e in received[0] + received[1]) == published
    assert info["pending"] == 0
