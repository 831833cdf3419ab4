"""Two gateway processes (`python -m app`) on one broker, for every cross-process layer: what one
accepts, the other streams; where the layer keeps history either process resumes a stream; a
consumer group spread over both gets each message once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from tests.app.processes import GatewayProcess, gateway_process
from tests.fixtures_postgres import forget_channels
from tests.sse import SSEEvent, SSEStream

pytestmark = pytest.mark.anyio

TIMEOUT = 15


@dataclass(frozen=True)
class Layer:
    url: str
    history: bool
    groups: bool
    acks_anywhere: bool  # group state lives in the broker, so any process takes any ack
    round_robin: bool  # the broker deals a group's messages to its consumers in turn


@pytest.fixture(params=["redis", "redis+streams", "postgresql", "mqtt", "nats"])
async def layer(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Layer]:
    scheme: str = request.param
    if scheme.startswith("redis"):
        url = request.getfixturevalue("redis_url").replace("redis://", f"{scheme}://", 1)
        prefix = request.getfixturevalue("redis_prefix")
        streams = scheme == "redis+streams"
        yield Layer(f"{url}?key_prefix={prefix}", streams, streams, True, False)
    elif scheme == "postgresql":
        url = request.getfixturevalue("postgres_url")
        yield Layer(url, True, True, True, False)
        await forget_channels(url, unique)
    elif scheme == "nats":
        stream, prefix = request.getfixturevalue("nats_stream")
        url = request.getfixturevalue("nats_url")
        yield Layer(f"{url}?stream={stream}&subject_prefix={prefix}", True, True, True, False)
    else:
        # Two processes on one host: each takes its own instance slot, so its own MQTT sessions.
        url = request.getfixturevalue("mqtt_url")
        yield Layer(
            f"{url}/?topic_prefix=gwtest/{unique}/&session_expiry=60", False, True, False, True
        )


@pytest.fixture
async def gateways(
    layer: Layer, tmp_path: Path
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    with ExitStack() as stack:
        first = stack.enter_context(gateway_process(layer.url, tmp_path / "first.log"))
        second = stack.enter_context(gateway_process(layer.url, tmp_path / "second.log"))
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
    layer: Layer, gateways: tuple[GatewayProcess, GatewayProcess], unique: str
) -> None:
    if not layer.history:
        pytest.skip("this layer keeps no history by design")
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
    layer: Layer, gateways: tuple[GatewayProcess, GatewayProcess], unique: str
) -> None:
    if not layer.groups:
        pytest.skip("this layer has no consumer groups by design")
    count = 10  # within Mosquitto's 20 unacknowledged messages per session
    path = f"/channels/{unique}/events?group=workers&consumer="
    received: dict[int, list[SSEEvent]] = {0: [], 1: []}
    all_in = anyio.Event()

    async def collect(index: int, sse: SSEStream) -> None:
        async for event in sse:
            received[index].append(event)
            if len(received[0]) + len(received[1]) >= count:
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
                await http.post(f"/channels/{unique}/publish", json={"data": n})
                for n in range(count)
            ]
            await all_in.wait()
            if layer.acks_anywhere:  # the second process acknowledges what both delivered
                acks = [(second, received[0] + received[1])]
            else:  # acks go to the process that delivered the message
                acks = [(first, received[0]), (second, received[1])]
            for process, events in acks:
                ids = [event.last_event_id for event in events]
                async with process.client() as acker:
                    reply = await acker.post(
                        f"/channels/{unique}/groups/workers/ack", json={"ids": ids}
                    )
                    assert reply.json() == {"acked": len(ids), "unknown": []}
                    if layer.acks_anywhere:
                        info = (await acker.get(f"/channels/{unique}/groups/workers")).json()
                        assert info["pending"] == 0
        tasks.cancel_scope.cancel()
    published = sorted(reply.json()["id"] for reply in replies)
    assert sorted(e.last_event_id for e in received[0] + received[1]) == published
    if layer.round_robin:
        assert received[0]
        assert received[1]


async def test_a_burst_is_shared_across_processes_within_prefetch(
    layer: Layer, tmp_path: Path, unique: str
) -> None:
    """Two consumers of one group on two processes: both get work, neither ever holds more than
    its prefetch unacked, and each message is delivered once. Acks go through the other process
    where the layer allows, so the next message must follow a remote ack."""
    if not layer.groups:
        pytest.skip("this layer has no consumer groups by design")
    count, prefetch = 16, 3  # within Mosquitto's 20 unacknowledged messages per session
    with ExitStack() as stack:
        processes = [
            stack.enter_context(
                gateway_process(
                    layer.url,
                    tmp_path / f"{n}.log",
                    GATEWAY_GROUP_PREFETCH=str(prefetch),
                    GATEWAY_ACK_TIMEOUT_SECONDS="60",  # no redelivery timer helps
                )
            )
            for n in range(2)
        ]
        for process in processes:
            await process.wait_ready()
        received: list[list[str]] = [[], []]
        most_held = [0, 0]
        done = anyio.Event()

        async def consume(index: int, sse: SSEStream) -> None:
            acker = processes[1 - index] if layer.acks_anywhere else processes[index]
            held = 0
            async with acker.client() as http:
                async for event in sse:
                    held += 1
                    most_held[index] = max(most_held[index], held)
                    received[index].append(event.last_event_id)
                    await anyio.sleep(0.02)  # some work
                    held -= 1  # before the ack: the next may arrive before its reply
                    path = f"/channels/{unique}/groups/workers/ack"
                    reply = await http.post(path, json={"ids": [event.last_event_id]})
                    assert reply.json()["acked"] == 1, reply.text
                    if sum(map(len, received)) >= count:
                        done.set()

        path = f"/channels/{unique}/events?group=workers&consumer=c"
        async with (
            processes[0].sse(path + "0") as first,
            processes[1].sse(path + "1") as second,
            processes[0].client() as http,
            anyio.create_task_group() as tasks,
        ):
            tasks.start_soon(consume, 0, first)
            tasks.start_soon(consume, 1, second)
            with anyio.fail_after(TIMEOUT):
                replies = [
                    await http.post(f"/channels/{unique}/publish", json={"data": n})
                    for n in range(count)
                ]
                await done.wait()
            tasks.cancel_scope.cancel()
    assert sorted(received[0] + received[1]) == sorted(r.json()["id"] for r in replies)
    assert received[0] and received[1], received  # both got work
    assert max(most_held) <= prefetch


async def test_a_stalled_consumer_holds_its_prefetch_while_another_process_drains_the_rest(
    layer: Layer, tmp_path: Path, unique: str
) -> None:
    if not layer.acks_anywhere or not layer.groups:
        pytest.skip("the broker deals this layer's group messages to each process's session")
    count, prefetch = 20, 3
    with ExitStack() as stack:
        processes = [
            stack.enter_context(
                gateway_process(layer.url, tmp_path / f"{n}.log", GATEWAY_ACK_TIMEOUT_SECONDS="60")
            )
            for n in range(2)
        ]
        for process in processes:
            await process.wait_ready()
        stalled_path = f"/channels/{unique}/events?group=g&consumer=stalled&prefetch={prefetch}"
        worker_path = f"/channels/{unique}/events?group=g&consumer=worker"
        async with (
            processes[0].sse(stalled_path) as stalled,
            processes[1].sse(worker_path) as worker,
            processes[0].client() as http,
        ):
            with anyio.fail_after(TIMEOUT):
                for n in range(count):
                    await http.post(f"/channels/{unique}/publish", json={"data": n})
                held = await stalled.take(prefetch)
                drained = []
                while len(drained) < count - prefetch:  # acked through the stalled one's process
                    event = await worker.next()
                    drained.append(event)
                    path = f"/channels/{unique}/groups/g/ack"
                    await http.post(path, json={"ids": [event.last_event_id]})
                info = (await http.get(f"/channels/{unique}/groups/g")).json()
    assert sorted(e.json["data"] for e in held + drained) == list(range(count))
    consumers = {c["name"]: c for c in info["consumers"]}
    assert consumers["stalled"]["in_flight"] == prefetch
    assert consumers["stalled"]["prefetch"] == prefetch  # it is connected to the answering one
    assert info["pending"] == prefetch
