"""Idempotent publish through the HTTP API and WebSocket, on every layer: the `Idempotency-Key`
header, batch and WebSocket `idempotency_key`, replays, reused keys, concurrency, expiry, retries
on another gateway process, and MQTT's 501."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.app.conftest import RunningGateway, serve
from tests.app.processes import gateway_process
from tests.fixtures_postgres import forget_channels
from tests.sse import SSEStream

pytestmark = pytest.mark.anyio

TIMEOUT = 15
KEYED = ["memory", "redis", "redis+streams", "postgresql", "nats"]
SENTINEL = "sentinel"
RULE = "1-200 printable ASCII characters"


def layer_url(request: pytest.FixtureRequest, scheme: str) -> str:
    """The layer URL of `scheme` for this test alone (its own key prefix, stream or topics)."""
    if scheme == "memory":
        return "memory://"
    if scheme.startswith("redis"):
        url = request.getfixturevalue("redis_url").replace("redis://", f"{scheme}://", 1)
        return f"{url}?key_prefix={request.getfixturevalue('redis_prefix')}"
    if scheme == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        return url
    if scheme == "nats":
        stream, prefix = request.getfixturevalue("nats_stream")
        # publish_timeout bounds the stream's duplicate window from below: 1 s lets keys expire
        nats = request.getfixturevalue("nats_url")
        return f"{nats}?stream={stream}&subject_prefix={prefix}&publish_timeout=1"
    unique = request.getfixturevalue("unique")
    return f"{request.getfixturevalue('mqtt_url')}/?topic_prefix=gwtest/{unique}/"


@pytest.fixture(params=KEYED)
async def url(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[str]:
    yield layer_url(request, request.param)
    if request.param == "postgresql":
        await forget_channels(request.getfixturevalue("postgres_url"), unique)


@pytest.fixture
def gateway(url: str) -> Iterator[RunningGateway]:
    with serve(layer=url, keepalive_seconds=0.5) as running:
        yield running


async def publish(
    http: httpx.AsyncClient, channel: str, data: Any, key: str | bytes | None, **body: Any
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    with anyio.fail_after(TIMEOUT):
        return await http.post(
            f"/channels/{channel}/publish", json={"data": data, **body}, headers=headers
        )


async def delivered(sse: SSEStream, http: httpx.AsyncClient, channel: str) -> list[Any]:
    """The envelopes the stream got up to a sentinel published now: what was published before."""
    assert (await publish(http, channel, SENTINEL, None)).status_code == 200
    envelopes = []
    with anyio.fail_after(TIMEOUT):
        while (envelope := (await sse.next()).json)["data"] != SENTINEL:
            envelopes.append(envelope)
    return envelopes


async def test_a_retry_after_a_dropped_connection_publishes_once(
    gateway: RunningGateway, unique: str
) -> None:
    channel = f"{unique}.orders"
    body = orjson.dumps({"data": {"order": 1}})
    request = (
        f"POST /channels/{channel}/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Idempotency-Key: order-1\r\nConnection: close\r\n\r\n"
    ).encode() + body
    async with gateway.client() as http, gateway.sse(f"/channels/{channel}/events") as sse:
        with anyio.fail_after(TIMEOUT):
            stream = await anyio.connect_tcp("127.0.0.1", gateway.port)
            await stream.send(request)
            await stream.aclose()  # gone before the reply: the publisher cannot know
        retry = await publish(http, channel, {"order": 1}, "order-1")
        assert retry.status_code == 200, retry.text
        envelopes = await delivered(sse, http, channel)
        assert [(e["id"], e["data"]) for e in envelopes] == [(retry.json()["id"], {"order": 1})]
        again = await publish(http, channel, {"order": 1}, "order-1")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == {"channel": channel, "id": retry.json()["id"], "replayed": True}


async def test_a_replay_answers_the_first_id_and_publishes_nothing(
    gateway: RunningGateway, unique: str
) -> None:
    channel = f"{unique}.orders"
    async with gateway.client() as http, gateway.sse(f"/channels/{channel}/events") as sse:
        first = await publish(http, channel, [1, 2], "k", event="created")
        again = await publish(http, channel, [1, 2], "k", event="created")
        elsewhere = await publish(http, f"{unique}.other", [1, 2], "k", event="created")
        envelopes = await delivered(sse, http, channel)
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    assert first.json() == {"channel": channel, "id": first.json()["id"]}
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == {**first.json(), "replayed": True}
    assert "replayed" not in elsewhere.json()  # a key belongs to its channel
    assert [e["id"] for e in envelopes] == [first.json()["id"]]


async def test_the_key_with_another_body_is_a_422(gateway: RunningGateway, unique: str) -> None:
    channel = f"{unique}.orders"
    async with gateway.client() as http, gateway.sse(f"/channels/{channel}/events") as sse:
        first = await publish(http, channel, {"n": 1}, "k")
        other_data = await publish(http, channel, {"n": 2}, "k")
        other_event = await publish(http, channel, {"n": 1}, "k", event="other")
        envelopes = await delivered(sse, http, channel)
    for reply in (other_data, other_event):
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"] == "idempotency_key_reused"
        assert first.json()["id"] in reply.json()["detail"]
    assert [e["id"] for e in envelopes] == [first.json()["id"]]


async def test_concurrent_duplicates_publish_once(gateway: RunningGateway, unique: str) -> None:
    channel = f"{unique}.orders"
    replies: list[httpx.Response] = []
    limits = httpx.Limits(max_connections=20)
    async with (
        gateway.client(limits=limits) as http,
        gateway.sse(f"/channels/{channel}/events") as sse,
    ):

        async def send() -> None:
            replies.append(await publish(http, channel, "once", "same"))

        async with anyio.create_task_group() as tasks:
            for _ in range(20):
                tasks.start_soon(send)
        envelopes = await delivered(sse, http, channel)
    assert [r.status_code for r in replies] == [200] * 20
    assert len({r.json()["id"] for r in replies}) == 1
    assert sum("Idempotent-Replayed" not in r.headers for r in replies) == 1
    assert [e["id"] for e in envelopes] == [replies[0].json()["id"]]


@pytest.mark.parametrize("scheme", KEYED)
async def test_a_key_publishes_again_after_the_ttl(
    request: pytest.FixtureRequest, scheme: str, unique: str
) -> None:
    channel = f"{unique}.orders"
    with serve(layer=layer_url(request, scheme), idempotency_ttl_seconds=1) as gateway:
        async with gateway.client() as http:
            started = time.monotonic()
            first = await publish(http, channel, "x", "k")
            assert "Idempotent-Replayed" in (await publish(http, channel, "x", "k")).headers
            with anyio.fail_after(TIMEOUT):
                while True:
                    again = await publish(http, channel, "x", "k")
                    if "Idempotent-Replayed" not in again.headers:
                        break
                    await anyio.sleep(0.1)  # the broker forgets the key: no event to await
    assert time.monotonic() - started >= 0.9
    assert again.status_code == 200 and again.json()["id"] != first.json()["id"]
    if scheme == "postgresql":
        await forget_channels(request.getfixturevalue("postgres_url"), unique)


async def test_a_batch_replays_its_keyed_messages(gateway: RunningGateway, unique: str) -> None:
    a, b = f"{unique}.a", f"{unique}.b"
    batch = {
        "messages": [
            {"channel": a, "data": 1, "idempotency_key": "k1"},
            {"channel": b, "data": 2, "idempotency_key": "k1"},
            {"channel": a, "data": 3},
        ]
    }
    async with gateway.client() as http:
        first = await http.post("/publish", json=batch)
        again = await http.post("/publish", json=batch)
        mixed = await http.post(
            "/publish",
            json={
                "messages": [
                    {"channel": a, "data": 1, "idempotency_key": "k1"},
                    {"channel": a, "data": 4, "idempotency_key": "k2"},
                ]
            },
        )
        reused = await http.post(
            "/publish", json={"messages": [{"channel": b, "data": 5, "idempotency_key": "k1"}]}
        )
        twice = await http.post(
            "/publish",
            json={"messages": [{"channel": a, "data": 6, "idempotency_key": "k3"}] * 2},
        )
        history = await http.get(f"/channels/{a}/history")
    ids = [entry["id"] for entry in first.json()["published"]]
    assert first.status_code == 200 and not any("replayed" in e for e in first.json()["published"])
    replayed = again.json()["published"]
    assert replayed[:2] == [
        {"channel": a, "id": ids[0], "replayed": True},
        {"channel": b, "id": ids[1], "replayed": True},
    ]
    assert "replayed" not in replayed[2] and replayed[2]["id"] != ids[2]  # unkeyed: published
    assert mixed.json()["published"][0] == {"channel": a, "id": ids[0], "replayed": True}
    assert "replayed" not in mixed.json()["published"][1]
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"
    assert twice.status_code == 422 and "messages[1] repeats" in twice.json()["detail"]
    if history.status_code == 200:  # layers with history
        assert [m["data"] for m in history.json()["messages"]] == [1, 3, 3, 4]


async def test_websocket_publish_frames_take_a_key(gateway: RunningGateway, unique: str) -> None:
    channel = f"{unique}.orders"
    frame = {"op": "publish", "channel": channel, "data": "x", "idempotency_key": "k"}
    replies = []
    with anyio.fail_after(TIMEOUT):
        async with connect(gateway.ws_url) as ws:
            for ref, data in enumerate(["x", "x", "y"]):
                await ws.send(orjson.dumps({**frame, "data": data, "ref": ref}).decode())
                replies.append(orjson.loads(await ws.recv()))
            await ws.send(orjson.dumps({**frame, "idempotency_key": "caf\u00e9"}).decode())
            replies.append(orjson.loads(await ws.recv()))
    first, again, other, bad = replies
    assert first == {"type": "ok", "ref": 0, "op": "publish", "channel": channel, "id": first["id"]}
    assert again == {**first, "ref": 1, "replayed": True}
    assert other["type"] == "error" and other["error"] == "idempotency_key_reused"
    assert other["status"] == 422
    assert bad["error"] == "invalid_argument" and RULE in bad["detail"]


@pytest.mark.parametrize(
    "key",
    ["", "k" * 201, b"caf\xe9", "tab\there", "trailing-del\x7f"],
    ids=["empty", "201-chars", "non-ascii", "tab", "del"],
)
async def test_bad_keys_are_a_422_naming_the_rule(key: str | bytes, unique: str) -> None:
    with serve() as gateway:
        async with gateway.client() as http:
            reply = await publish(http, f"{unique}.x", 1, key)
            text = key.decode("latin-1") if isinstance(key, bytes) else key
            batch = await http.post(
                "/publish",
                json={"messages": [{"channel": f"{unique}.x", "data": 1, "idempotency_key": text}]},
            )
            control = await http.post(
                "/publish",
                json={
                    "messages": [{"channel": f"{unique}.x", "data": 1, "idempotency_key": "\x01"}]
                },
            )
            wrong_type = await http.post(
                "/publish",
                json={"messages": [{"channel": f"{unique}.x", "data": 1, "idempotency_key": 7}]},
            )
            longest = await publish(http, f"{unique}.x", 1, "k" * 200)
    if key == "trailing-del\x7f":  # not valid in an HTTP field: the server's parser refuses it
        assert reply.status_code == 400
        reply = batch
    for refused in (reply, batch, control, wrong_type):
        assert refused.status_code == 422, refused.text
        assert RULE in refused.json()["detail"]
    assert batch.json()["detail"].startswith("messages[0]: ")
    assert longest.status_code == 200


async def test_mqtt_answers_a_keyed_publish_with_501(
    request: pytest.FixtureRequest, unique: str
) -> None:
    channel = f"{unique}.orders"
    with serve(layer=layer_url(request, "mqtt")) as gateway:
        async with gateway.client() as http:
            keyed = await publish(http, channel, 1, "k")
            batch = await http.post(
                "/publish",
                json={"messages": [{"channel": channel, "data": 1, "idempotency_key": "k"}]},
            )
            plain = await publish(http, channel, 1, None)
        with anyio.fail_after(TIMEOUT):
            async with connect(gateway.ws_url) as ws:
                frame = {"op": "publish", "channel": channel, "data": 1, "idempotency_key": "k"}
                await ws.send(orjson.dumps(frame).decode())
                ws_reply = orjson.loads(await ws.recv())
    for reply in (keyed, batch):
        assert reply.status_code == 501, reply.text
        assert reply.json()["error"] == "not_supported"
        assert "redis://" in reply.json()["detail"] and "nats://" in reply.json()["detail"]
    assert ws_reply["status"] == 501
    assert plain.status_code == 200


@pytest.fixture(params=["redis", "redis+streams", "postgresql", "nats"])
async def cross_process_url(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[str]:
    yield layer_url(request, request.param)
    if request.param == "postgresql":
        await forget_channels(request.getfixturevalue("postgres_url"), unique)


async def test_a_retry_on_another_gateway_process_is_replayed(
    cross_process_url: str, unique: str, tmp_path: Path
) -> None:
    channel = f"{unique}.orders"
    with ExitStack() as stack:
        first, second = (
            stack.enter_context(gateway_process(cross_process_url, tmp_path / f"{n}.log"))
            for n in ("first", "second")
        )
        await first.wait_ready()
        await second.wait_ready()
        async with (
            first.client() as one,
            second.client() as two,
            second.sse(f"/channels/{channel}/events") as sse,
        ):
            original = await publish(one, channel, {"n": 1}, "k")
            retry = await publish(two, channel, {"n": 1}, "k")
            reused = await publish(two, channel, {"n": 2}, "k")
            replies: list[httpx.Response] = []

            async def send(http: httpx.AsyncClient) -> None:
                replies.append(await publish(http, channel, "both", "together"))

            async with anyio.create_task_group() as tasks:
                for index in range(10):
                    tasks.start_soon(send, (one, two)[index % 2])
            envelopes = await delivered(sse, two, channel)
    assert retry.json() == {**original.json(), "replayed": True}
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"
    assert len({r.json()["id"] for r in replies}) == 1
    assert sum("Idempotent-Replayed" not in r.headers for r in replies) == 1
    assert [e["data"] for e in envelopes] == [{"n": 1}, "both"]
