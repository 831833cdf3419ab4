"""Presence through the HTTP API and WebSocket: counted over two gateway processes on every
cross-process layer (and one on memory://), join and leave to the subscribers that asked for them
only, a leave when a client disconnects, a killed process's clients gone within
GATEWAY_PRESENCE_TTL_SECONDS, and the rights the route needs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect

from tests.app.conftest import RunningGateway, serve
from tests.app.processes import GatewayProcess, gateway_process
from tests.app.test_auth import SECRET, bearer, token
from tests.app.test_cross_process import Layer, layer  # noqa: F401 - the fixture
from tests.app.test_ws import receive, request
from tests.sse import SSEStream

pytestmark = pytest.mark.anyio

TIMEOUT = 15
TTL = "1.5"  # GATEWAY_PRESENCE_TTL_SECONDS of the processes here


@pytest.fixture
async def gateways(
    layer: Layer,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    with ExitStack() as stack:
        first, second = (
            stack.enter_context(
                gateway_process(
                    layer.url, tmp_path / f"{name}.log", GATEWAY_PRESENCE_TTL_SECONDS=TTL
                )
            )
            for name in ("first", "second")
        )
        await first.wait_ready()
        await second.wait_ready()
        yield first, second


async def presence_of(gateway: GatewayProcess | RunningGateway, channel: str) -> dict[str, Any]:
    async with gateway.client() as http:
        reply = await http.get(f"/channels/{channel}/presence")
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


async def until_counted(
    gateways: tuple[GatewayProcess | RunningGateway, ...], channel: str, count: int
) -> list[dict[str, Any]]:
    """Every gateway's answer, once each counts `count` subscribers."""
    with anyio.fail_after(TIMEOUT):
        while True:
            answers = [await presence_of(gateway, channel) for gateway in gateways]
            if all(answer["subscribers"] == count for answer in answers):
                return answers
            await anyio.sleep(0.05)


async def presence_events(sse: SSEStream, count: int) -> list[tuple[str, str]]:
    """The next `count` join or leave events as (type, transport), past any messages."""
    received = []
    resume_point = MESSAGE_IDS.get(id(sse), "")
    with anyio.fail_after(TIMEOUT):
        while len(received) < count:
            event = await sse.next()
            if event.type == "message":
                resume_point = event.last_event_id
            else:
                assert event.last_event_id == resume_point  # no `id:` line changed it
                received.append(event)
    MESSAGE_IDS[id(sse)] = resume_point
    return [(event.type, event.json["transport"]) for event in received]


MESSAGE_IDS: dict[int, str] = {}  # stream -> the id of the last message it brought


async def test_counted_over_both_processes_with_join_and_leave(
    gateways: tuple[GatewayProcess, GatewayProcess], unique: str
) -> None:
    first, second = gateways
    room = f"{unique}.room"
    async with second.sse(f"/channels/{room}/events?presence=true") as watcher:
        assert await presence_events(watcher, 1) == [("join", "sse")]  # itself
        async with first.sse(f"/channels/{room}/events") as plain:
            assert await presence_events(watcher, 1) == [("join", "sse")]
            async with connect(first.url.replace("http", "ws") + "/ws") as ws:
                await request(ws, op="subscribe", channels=[room, f"{unique}.other"])
                await request(ws, op="subscribe", patterns=[f"{unique}.*"])  # not counted
                assert await presence_events(watcher, 1) == [("join", "ws")]
                answers = await until_counted((first, second), room, 3)
                assert answers[0]["clients"] == answers[1]["clients"]
                assert sorted(c["transport"] for c in answers[0]["clients"]) == ["sse", "sse", "ws"]
                assert answers[0]["truncated"] is False
            assert await presence_events(watcher, 1) == [("leave", "ws")]  # closed: left at once
            async with first.client() as http:
                await http.post(f"/channels/{room}/publish", json={"data": "marker"})
            with anyio.fail_after(TIMEOUT):
                first_seen = await plain.next()  # no join or leave for who did not ask
            assert (first_seen.type, first_seen.json["data"]) == ("message", "marker")
        assert await presence_events(watcher, 1) == [("leave", "sse")]
        await until_counted((first, second), room, 1)


async def test_a_killed_process_leaves_within_the_ttl(
    layer: Layer,  # noqa: F811 - the fixture
    gateways: tuple[GatewayProcess, GatewayProcess],
    tmp_path: Path,
    unique: str,
) -> None:
    first, second = gateways
    room = f"{unique}.room"
    with gateway_process(
        layer.url, tmp_path / "doomed.log", GATEWAY_PRESENCE_TTL_SECONDS=TTL
    ) as doomed:
        await doomed.wait_ready()
        async with second.sse(f"/channels/{room}/events?presence=true") as watcher:
            assert await presence_events(watcher, 1) == [("join", "sse")]
            async with doomed.sse(f"/channels/{room}/events"):
                assert await presence_events(watcher, 1) == [("join", "sse")]
                await until_counted((first, second), room, 2)
                doomed.process.kill()
                started = anyio.current_time()
                assert await presence_events(watcher, 1) == [("leave", "sse")]
                assert anyio.current_time() - started < 3 * float(TTL)
                await until_counted((first, second), room, 1)


async def test_websocket_presence_events_and_one_process(gateway: RunningGateway) -> None:
    async with connect(gateway.ws_url) as ws:
        ok = await request(ws, op="subscribe", channels=["lobby"], presence=True, ref=1)
        assert ok["type"] == "ok"
        own = await receive(ws)
        assert own == {
            "type": "join",
            "channel": "lobby",
            "client_id": own["client_id"],
            "user": None,
            "transport": "ws",
        }
        async with gateway.sse("/channels/lobby/events"):
            joined = await receive(ws)
            assert (joined["type"], joined["transport"]) == ("join", "sse")
            (answer,) = await until_counted((gateway,), "lobby", 2)
            assert {c["client_id"] for c in answer["clients"]} >= {own["client_id"]}
        left = await receive(ws)
        assert (left["type"], left["client_id"]) == ("leave", joined["client_id"])
        bad = await request(ws, op="subscribe", channels=["x"], presence="yes")
        assert (bad["type"], bad["status"]) == ("error", 422)
        async with gateway.client() as http:
            metrics = (await http.get("/metrics")).text
    delivered = [
        line for line in metrics.splitlines() if line.startswith("gateway_messages_delivered_total")
    ]
    assert all(line.endswith(" 0.0") for line in delivered), delivered  # joins are no deliveries


async def test_presence_needs_the_subscribe_right() -> None:
    with serve(jwt_secret=SECRET, channels=["chat.*"]) as gateway:
        value = token(subscribe=["chat.*"], sub="alice")
        async with gateway.client() as http:
            mine = await http.get("/channels/chat.a/presence", headers=bearer(value))
            other = await http.get(
                "/channels/chat.a/presence", headers=bearer(token(subscribe=["x"]))
            )
            anonymous = await http.get("/channels/chat.a/presence")
            outside = await http.get("/channels/news/presence", headers=bearer(value))
            bad = await http.get("/channels/a..b/presence", headers=bearer(value))
        assert mine.status_code == 200, mine.text
        assert mine.json() == {
            "channel": "chat.a",
            "subscribers": 0,
            "clients": [],
            "truncated": False,
        }
        assert (other.status_code, anonymous.status_code, bad.status_code) == (403, 401, 422)
        assert (outside.status_code, outside.json()["error"]) == (403, "channel_not_allowed")
        async with (
            gateway.sse(f"/channels/chat.a/events?access_token={value}"),
            gateway.client(headers=bearer(value)) as http,
        ):
            answer: dict[str, Any] = {"clients": []}
            with anyio.fail_after(TIMEOUT):
                while not answer["clients"]:
                    await anyio.sleep(0.05)
                    answer = (await http.get("/channels/chat.a/presence")).json()
        assert answer["clients"][0]["user"] == "alice"
