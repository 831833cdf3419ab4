"""Consumer groups as work queues through HTTP, SSE and the WebSocket, on every layer with
acknowledgement: prefetch, nack (with a delay), extend, the start position and deletion."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.app.conftest import RunningGateway, serve
from tests.app.test_ws import receive, request
from tests.sse import SSEEvent

pytestmark = pytest.mark.anyio

TIMEOUT = 15
GROUP_LAYERS = ["memory", "redis+streams", "postgresql", "mqtt", "nats"]


def layer_url(request: pytest.FixtureRequest, scheme: str, unique: str) -> str:
    if scheme == "memory":
        return "memory://"
    if scheme.startswith("redis"):
        base = request.getfixturevalue("redis_url").replace("redis://", f"{scheme}://", 1)
        return f"{base}?key_prefix={request.getfixturevalue('redis_prefix')}"
    if scheme == "postgresql":
        request.getfixturevalue("postgres_layer_factory")  # removes the test's rows afterwards
        url: str = request.getfixturevalue("postgres_url")
        return url
    if scheme == "nats":
        stream, prefix = request.getfixturevalue("nats_stream")
        return f"{request.getfixturevalue('nats_url')}?stream={stream}&subject_prefix={prefix}"
    return f"{request.getfixturevalue('mqtt_url')}/?topic_prefix=gwtest/{unique}/"


@pytest.fixture(params=GROUP_LAYERS)
def groups_gateway(request: pytest.FixtureRequest, unique: str) -> Iterator[RunningGateway]:
    url = layer_url(request, request.param, unique)
    with serve(layer=url, keepalive_seconds=0.5, ack_timeout_seconds=60) as running:
        yield running


async def publish(http: httpx.AsyncClient, channel: str, data: Any) -> str:
    reply = await http.post(f"/channels/{channel}/publish", json={"data": data})
    assert reply.status_code == 200, reply.text
    message_id: str = reply.json()["id"]
    return message_id


async def test_a_consumer_holds_its_prefetch_and_an_ack_sends_the_next(
    groups_gateway: RunningGateway, unique: str
) -> None:
    group = f"/channels/{unique}/groups/g"
    async with (
        groups_gateway.client() as http,
        groups_gateway.sse(f"/channels/{unique}/events?group=g&consumer=w&prefetch=2") as sse,
    ):
        with anyio.fail_after(TIMEOUT):
            for n in range(5):
                await publish(http, unique, n)
            held = await sse.take(2)
        await anyio.sleep(0.4)  # time to hand out more, were it wrong
        info = (await http.get(group)).json()
        assert info["pending"] == 2  # the layer handed out no more than the prefetch
        (consumer,) = info["consumers"]
        assert (consumer["name"], consumer["in_flight"], consumer["prefetch"]) == ("w", 2, 2)
        stats = (await http.get("/stats")).json()
        (local,) = [g for g in stats["groups"] if g["channel"] == unique]
        assert local["members"] == [{"name": "w", "in_flight": 2, "prefetch": 2}]
        with anyio.fail_after(2):  # at once, not after the 60 s ack timeout
            ack = await http.post(f"{group}/ack", json={"ids": [held[0].last_event_id]})
            assert ack.json() == {"acked": 1, "unknown": []}
            (following,) = await sse.take(1)
        assert [e.json["data"] for e in [*held, following]] == [0, 1, 2]


async def test_nack_redelivers_and_extend_restarts_the_timeout(
    groups_gateway: RunningGateway, unique: str
) -> None:
    group = f"/channels/{unique}/groups/g"
    async with (
        groups_gateway.client() as http,
        groups_gateway.sse(f"/channels/{unique}/events?group=g&consumer=w&prefetch=1") as sse,
    ):
        with anyio.fail_after(TIMEOUT):
            message_id = await publish(http, unique, "job")
            first = await sse.next()
            extended = await http.post(f"{group}/extend", json={"ids": [message_id, "0-0"]})
            assert extended.json() == {"extended": 1, "unknown": ["0-0"]}
            nacked = await http.post(f"{group}/nack", json={"ids": [message_id, "0-0"]})
            assert nacked.json() == {"nacked": 1, "unknown": ["0-0"]}
            again = await sse.next()
            assert (first.json["deliveries"], again.json["deliveries"]) == (1, 2)
            assert again.last_event_id == message_id
            delayed = await http.post(
                f"{group}/nack", json={"ids": [message_id], "delay_seconds": 0.5}
            )
            assert delayed.json() == {"nacked": 1, "unknown": []}
            started = anyio.current_time()
            third = await sse.next()
            assert anyio.current_time() - started >= 0.4
            assert (third.last_event_id, third.json["deliveries"]) == (message_id, 3)
            await http.post(f"{group}/ack", json={"ids": [message_id]})


async def test_bad_group_bodies_and_queries_name_the_field(
    groups_gateway: RunningGateway, unique: str
) -> None:
    group = f"/channels/{unique}/groups/g"
    async with groups_gateway.client() as http:
        for query in ("prefetch=0", "prefetch=1001", "prefetch=x"):
            reply = await http.get(f"/channels/{unique}/events?group=g&{query}")
            assert reply.status_code == 422 and "prefetch" in reply.json()["detail"], reply.text
        reply = await http.get(f"/channels/{unique}/events?prefetch=3")
        assert reply.status_code == 422 and "prefetch" in reply.json()["detail"], reply.text
        async with groups_gateway.sse(f"/channels/{unique}/events?group=g&consumer=w"):
            for route, body, field in (
                ("nack", {"ids": ["1"], "delay_seconds": -1}, "delay_seconds"),
                ("nack", {"ids": ["1"], "delay_seconds": "soon"}, "delay_seconds"),
                ("nack", {"ids": ["1"], "delay_seconds": 3601}, "delay_seconds"),
                ("nack", {"ids": "1"}, "ids"),
                ("nack", {"ids": ["1"], "later": 1}, "later"),
                ("extend", {"ids": [1]}, "ids"),
                ("extend", {}, "ids"),
            ):
                reply = await http.post(f"{group}/{route}", json=body)
                assert reply.status_code == 422, (route, body, reply.text)
                assert field in reply.json()["detail"], (route, body, reply.text)
        for method, route in (("POST", "nack"), ("POST", "extend"), ("DELETE", "")):
            path = f"/channels/{unique}/groups/nobody/{route}".rstrip("/")
            reply = await http.request(method, path, json={"ids": ["1"]} if route else None)
            assert (reply.status_code, reply.json()["error"]) == (404, "unknown_group"), path


async def test_start_places_a_new_group(groups_gateway: RunningGateway, unique: str) -> None:
    history = groups_gateway.gateway.channel.capabilities.history
    async with groups_gateway.client() as http:
        if not history:
            reply = await http.get(f"/channels/{unique}/events?group=g&start=earliest")
            assert reply.status_code == 501, reply.text
            return
        first = await publish(http, unique, "one")
        await publish(http, unique, "two")
        async with groups_gateway.sse(f"/channels/{unique}/events?group=a&start=earliest") as sse:
            with anyio.fail_after(TIMEOUT):
                assert [e.json["data"] for e in await sse.take(2)] == ["one", "two"]
        async with groups_gateway.sse(f"/channels/{unique}/events?group=b&start={first}") as sse:
            with anyio.fail_after(TIMEOUT):
                assert (await sse.next()).json["data"] == "two"


async def test_a_deleted_group_ends_its_streams_and_starts_afresh(
    groups_gateway: RunningGateway, unique: str
) -> None:
    group = f"/channels/{unique}/groups/g"
    path = f"/channels/{unique}/events?group=g&consumer=w"
    async with groups_gateway.client() as http:
        async with groups_gateway.sse(path) as sse:
            with anyio.fail_after(TIMEOUT):
                await publish(http, unique, "left pending")
                await sse.next()
                assert (await http.delete(group)).status_code == 204
                events: list[SSEEvent] = []
                while True:  # until the stream ends
                    try:
                        events.append(await sse.next())
                    except StopAsyncIteration:
                        break
        assert [(e.type, e.json["error"]) for e in events] == [("error", "unknown_group")]
        assert (await http.get(group)).status_code == 404
        assert (await http.delete(group)).status_code == 404
        async with groups_gateway.sse(path) as sse:
            assert (await http.get(group)).json()["pending"] == 0
            with anyio.fail_after(TIMEOUT):
                await publish(http, unique, "afresh")
                event = await sse.next()
            assert (event.json["data"], event.json["deliveries"]) == ("afresh", 1)


async def test_websocket_prefetch_nack_extend_and_delete(
    groups_gateway: RunningGateway, unique: str
) -> None:
    async with connect(groups_gateway.ws_url) as ws, groups_gateway.client() as http:
        bad = await request(ws, op="subscribe", channels=[unique], group="g", prefetch=0)
        assert bad["type"] == "error" and "prefetch" in bad["detail"], bad
        bad = await request(ws, op="subscribe", channels=[unique], prefetch=2)
        assert bad["type"] == "error" and "prefetch" in bad["detail"], bad
        joined = await request(
            ws, op="subscribe", channels=[unique], group="g", consumer="w", prefetch=1, ref=1
        )
        assert joined["type"] == "ok", joined
        ids = [await publish(http, unique, n) for n in range(2)]
        message = await receive(ws)
        assert (message["id"], message["deliveries"]) == (ids[0], 1)
        extended = await request(ws, op="extend", channel=unique, group="g", ids=[ids[0], "0-0"])
        assert (extended["extended"], extended["unknown"]) == (1, ["0-0"])
        bad = await request(
            ws, op="nack", channel=unique, group="g", ids=[ids[0]], delay_seconds="x"
        )
        assert bad["type"] == "error" and "delay_seconds" in bad["detail"], bad
        await ws.send(
            orjson.dumps({"op": "nack", "channel": unique, "group": "g", "ids": [ids[0]]}).decode()
        )
        frames = [await receive(ws), await receive(ws)]  # the reply and the redelivery
        (reply,) = [f for f in frames if f["type"] == "ok"]
        (again,) = [f for f in frames if f["type"] == "message"]
        assert (reply["nacked"], reply["unknown"]) == (1, [])
        assert (again["deliveries"], again["id"]) in {(2, ids[0]), (1, ids[1])}
        assert (await http.delete(f"/channels/{unique}/groups/g")).status_code == 204
        with anyio.fail_after(TIMEOUT):
            while (frame := await receive(ws))["type"] != "error":
                assert frame["type"] == "message"
        assert frame["error"] == "unknown_group"
        rejoined = await request(ws, op="subscribe", channels=[unique], group="g", consumer="w")
        assert rejoined["type"] == "ok", rejoined  # the ended feed is gone from the socket


async def test_a_layer_without_groups_answers_501_to_every_group_route(
    request: pytest.FixtureRequest, unique: str
) -> None:
    with serve(layer=layer_url(request, "redis", unique)) as gateway:
        group = f"/channels/{unique}/groups/g"
        async with gateway.client() as http:
            for method, path, body in (
                ("GET", group, None),
                ("POST", f"{group}/ack", {"ids": ["1"]}),
                ("POST", f"{group}/nack", {"ids": ["1"]}),
                ("POST", f"{group}/extend", {"ids": ["1"]}),
                ("DELETE", group, None),
                ("GET", f"/channels/{unique}/events?group=g", None),
            ):
                reply = await http.request(method, path, json=body)
                assert reply.status_code == 501, (method, path, reply.text)
