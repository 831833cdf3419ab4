"""Publishing to a pattern through the HTTP API and WebSocket: a batch item with `pattern` on one
gateway process reaches the other's subscribers without an `id:` line; WS publish frames with
`pattern`; rights and the `GATEWAY_CHANNELS` allow-list cover the whole pattern."""

from __future__ import annotations

import anyio
import pytest
from websockets.asyncio.client import connect

from tests.app.conftest import RunningGateway, serve
from tests.app.processes import GatewayProcess
from tests.app.test_auth import SECRET, bearer, token
from tests.app.test_cross_process import gateways, layer  # noqa: F401 - fixtures
from tests.app.test_ws import receive, request

pytestmark = pytest.mark.anyio

TIMEOUT = 15


async def test_a_batch_pattern_item_streams_from_the_other_process_without_an_id(
    gateways: tuple[GatewayProcess, GatewayProcess],  # noqa: F811 - the fixture
    unique: str,
) -> None:
    first, second = gateways
    room, elsewhere = f"{unique}.rooms.a", f"{unique}.elsewhere"
    async with (
        first.client() as http,
        second.sse(f"/events?channel={room}&channel={elsewhere}") as sse,
    ):
        with anyio.fail_after(TIMEOUT):
            before = (await http.post(f"/channels/{room}/publish", json={"data": 0})).json()["id"]
            reply = await http.post(
                "/publish",
                json={
                    "messages": [
                        {"pattern": f"{unique}.rooms.*", "data": {"to": "rooms"}, "event": "news"},
                        {"channel": room, "data": "after"},
                    ]
                },
            )
            assert reply.status_code == 200, reply.text
            received = await sse.take(3)
    to_pattern, to_channel = reply.json()["published"]
    assert set(to_pattern) == {"pattern", "id"} and to_pattern["pattern"] == f"{unique}.rooms.*"
    assert set(to_channel) == {"channel", "id"}
    assert [e.json["data"] for e in received] == [0, {"to": "rooms"}, "after"]
    _, pattern_event, last = received
    assert pattern_event.type == "news"
    assert pattern_event.json == {
        "channel": f"{unique}.rooms.*",
        "pattern": True,
        "id": to_pattern["id"],
        "event": "news",
        "data": {"to": "rooms"},
        "published_at": pattern_event.json["published_at"],
    }
    assert pattern_event.last_event_id == before  # no `id:` line: the resume point stays
    assert last.last_event_id == to_channel["id"]


async def test_a_batch_item_names_a_channel_or_a_pattern(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        for item, problem in (
            ({"data": 1}, "messages[0]: give either channel or pattern, as a string"),
            ({"channel": "a", "pattern": "a.*", "data": 1}, "either channel or pattern"),
            ({"pattern": "a b*", "data": 1}, "invalid pattern"),
            ({"pattern": "a.*", "data": 1, "event": "a b"}, "invalid event type"),
        ):
            reply = await http.post("/publish", json={"messages": [item]})
            assert reply.status_code == 422, reply.text
            assert problem in reply.json()["detail"]


async def test_websocket_publish_to_a_pattern(gateway: RunningGateway) -> None:
    async with connect(gateway.ws_url) as ws:
        await request(ws, op="subscribe", channels=["chat.a", "news"], patterns=["chat.*"])
        ok = await request(ws, op="publish", pattern="chat.*", data="all", event="e", ref=7)
        assert (ok["type"], ok["ref"], ok["pattern"]) == ("ok", 7, "chat.*")
        message = await receive(ws)
        assert message["type"] == "message"
        assert (message["channel"], message["pattern"], message["id"]) == ("chat.*", True, ok["id"])
        assert (message["event"], message["data"]) == ("e", "all")
        bad = await request(ws, op="publish", pattern="chat.*", channel="chat.a", data=1, ref=8)
        assert (bad["type"], bad["status"]) == ("error", 422)


async def test_a_pattern_needs_a_publish_right_covering_all_of_it() -> None:
    with serve(jwt_secret=SECRET) as gateway:
        value = token(publish=["chat.*"], subscribe=["*"])
        async with gateway.client() as http:
            for pattern, status in (("chat.*", 200), ("chat.rooms.?", 200), ("*", 403)):
                reply = await http.post(
                    "/publish",
                    json={"messages": [{"pattern": pattern, "data": 1}]},
                    headers=bearer(value),
                )
                assert reply.status_code == status, reply.text
            anonymous = await http.post(
                "/publish", json={"messages": [{"pattern": "c*", "data": 1}]}
            )
            assert anonymous.status_code == 401
        async with connect(f"{gateway.ws_url}?access_token={value}") as ws:
            denied = await request(ws, op="publish", pattern="c*", data=1)
            assert (denied["error"], denied["status"]) == ("forbidden", 403)


async def test_the_allow_list_covers_all_of_a_pattern() -> None:
    with serve(channels=["chat.*"]) as gateway:
        async with gateway.client() as http:
            inside = await http.post(
                "/publish", json={"messages": [{"pattern": "chat.a*", "data": 1}]}
            )
            outside = await http.post(
                "/publish", json={"messages": [{"pattern": "ch*", "data": 1}]}
            )
        assert inside.status_code == 200, inside.text
        assert (outside.status_code, outside.json()["error"]) == (403, "channel_not_allowed")
        async with connect(gateway.ws_url) as ws:
            refused = await request(ws, op="publish", pattern="*", data=1)
        assert (refused["error"], refused["status"]) == ("channel_not_allowed", 403)
