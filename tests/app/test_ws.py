"""The WebSocket protocol through a real server, with the `websockets` client."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.app.conftest import RunningGateway, serve
from tests.conftest import eventually

pytestmark = pytest.mark.anyio


async def send(ws: ClientConnection, **frame: Any) -> None:
    await ws.send(orjson.dumps(frame).decode())


async def receive(ws: ClientConnection) -> dict[str, Any]:
    with anyio.fail_after(10):
        frame: dict[str, Any] = orjson.loads(await ws.recv())
    return frame


async def request(ws: ClientConnection, **frame: Any) -> dict[str, Any]:
    await send(ws, **frame)
    return await receive(ws)


async def test_subscribe_publish_and_receive(gateway: RunningGateway) -> None:
    async with connect(gateway.ws_url) as ws:
        ok = await request(ws, op="subscribe", channels=["room"], patterns=["side.*"], ref=1)
        assert ok == {
            "type": "ok",
            "ref": 1,
            "op": "subscribe",
            "channels": ["room"],
            "patterns": ["side.*"],
        }
        published = await request(ws, op="publish", channel="room", data={"hi": 1}, ref="p")
        assert published["type"] == "ok"
        assert published["ref"] == "p"
        message = await receive(ws)
        assert message["type"] == "message"
        assert message["id"] == published["id"]
        assert message["channel"] == "room"
        assert message["data"] == {"hi": 1}
        assert message["event"] == "message"
        async with gateway.client() as http:
            await http.post("/channels/side.b/publish", json={"data": "via http", "event": "e"})
        from_http = await receive(ws)
        assert (from_http["channel"], from_http["data"], from_http["event"]) == (
            "side.b",
            "via http",
            "e",
        )


async def test_bad_frames_get_errors_and_the_socket_stays_usable(gateway: RunningGateway) -> None:
    async with connect(gateway.ws_url) as ws:
        await ws.send("{not json")
        assert (await receive(ws))["error"] == "invalid_json"
        await ws.send(b"\x00binary")
        assert (await receive(ws))["error"] == "invalid_frame"
        await ws.send("[1,2]")
        assert (await receive(ws))["error"] == "invalid_argument"
        unknown = await request(ws, op="dance", ref=7)
        assert (unknown["type"], unknown["ref"], unknown["error"]) == ("error", 7, "unknown_op")
        bad_name = await request(ws, op="subscribe", channels=["a..b"], ref=8)
        assert (bad_name["error"], bad_name["status"]) == ("invalid_argument", 422)
        bad_publish = await request(ws, op="publish", channel="c", ref=9)
        assert bad_publish["error"] == "invalid_argument"
        no_group = await request(ws, op="ack", channel="c", group="none", ids=["1"])
        assert no_group["error"] == "unknown_group"
        wrong_type = await request(ws, op="subscribe", channels="c")
        assert wrong_type["error"] == "invalid_argument"
        # still fully working
        assert (await request(ws, op="subscribe", channels=["fine"]))["type"] == "ok"
        await request(ws, op="publish", channel="fine", data=1)
        assert (await receive(ws))["data"] == 1


async def test_oversized_frame_is_refused_without_closing() -> None:
    with serve(max_payload_bytes=200) as gateway:
        async with connect(gateway.ws_url) as ws:
            big = await request(ws, op="publish", channel="c", data="x" * 500)
            assert big["error"] == "payload_too_large"
            assert (await request(ws, op="publish", channel="c", data="ok"))["type"] == "ok"


async def test_unsubscribe_stops_delivery(gateway: RunningGateway) -> None:
    async with connect(gateway.ws_url) as ws:
        await request(ws, op="subscribe", channels=["keep", "drop"])
        await request(ws, op="unsubscribe", channels=["drop"])
        await request(ws, op="publish", channel="drop", data="gone")
        await request(ws, op="publish", channel="keep", data="kept")
        assert (await receive(ws))["data"] == "kept"


async def test_resume_and_gap_over_websocket() -> None:
    with serve(history_size=3) as gateway:
        async with gateway.client() as http:
            ids = [
                (await http.post("/channels/r/publish", json={"data": n})).json()["id"]
                for n in range(6)
            ]
        async with connect(gateway.ws_url) as ws:
            await send(ws, op="subscribe", channels=["r"], last_event_id=ids[0])
            frames = [await receive(ws) for _ in range(5)]
    assert frames[0]["type"] == "ok"
    assert frames[1]["type"] == "gap"
    assert frames[1]["reason"] == "evicted"
    assert [f["data"] for f in frames[2:]] == [3, 4, 5]


async def test_group_consumer_acks_over_websocket(gateway: RunningGateway) -> None:
    async with connect(gateway.ws_url) as ws:
        joined = await request(ws, op="subscribe", channels=["tasks"], group="g", consumer="w")
        assert joined["type"] == "ok"
        await request(ws, op="publish", channel="tasks", data="job")
        message = await receive(ws)
        assert message["deliveries"] == 1
        acked = await request(ws, op="ack", channel="tasks", group="g", ids=[message["id"], "0-0"])
        assert (acked["acked"], acked["unknown"]) == (1, ["0-0"])
        again = await request(ws, op="subscribe", channels=["tasks"], group="g")
        assert again["error"] == "already_subscribed"
        await request(ws, op="unsubscribe", channels=["tasks"], group="g")
    async with gateway.client() as http:
        info = (await http.get("/channels/tasks/groups/g")).json()
    assert info["pending"] == 0


async def test_closing_the_socket_frees_subscriptions(gateway: RunningGateway) -> None:
    channel = gateway.gateway.channel
    async with connect(gateway.ws_url) as ws:
        await request(ws, op="subscribe", channels=["x"])
        await request(ws, op="subscribe", channels=["y"], group="g")
        assert channel.subscriber_count == 2
    await eventually(lambda: not channel.subscriber_count and not gateway.gateway.connections)


async def test_a_subscribe_naming_nothing_is_an_error_frame(gateway: RunningGateway) -> None:
    async with connect(gateway.ws_url) as ws:
        for frame in ({}, {"channels": [], "patterns": []}, {"group": "g"}):
            nothing = await request(ws, op="subscribe", ref=1, **frame)
            assert (nothing["type"], nothing["error"], nothing["status"], nothing["ref"]) == (
                "error",
                "invalid_argument",
                422,
                1,
            )
        assert (await request(ws, op="subscribe", channels=["c"]))["type"] == "ok"
        again = await request(ws, op="subscribe")  # adding nothing to the live subscription
        assert again["error"] == "invalid_argument"
        await request(ws, op="publish", channel="c", data="still here")
        assert (await receive(ws))["data"] == "still here"


async def test_a_deeply_nested_or_large_ref_is_refused_and_the_socket_stays_open(
    gateway: RunningGateway,
) -> None:
    async with connect(gateway.ws_url) as ws:
        deep = '{"op": "publish", "channel": "c", "data": 1, "ref": ' + "[" * 300 + "]" * 300 + "}"
        for frame in (deep, orjson.dumps({"op": "unsubscribe", "ref": "r" * 1000}).decode()):
            await ws.send(frame)
            refused = await receive(ws)
            assert (refused["type"], refused["error"], refused["status"]) == (
                "error",
                "invalid_argument",
                422,
            )
            assert "ref" not in refused
        nested = {"a": [[[1]]]}
        assert (await request(ws, op="subscribe", channels=["c"], ref=nested))["ref"] == nested
