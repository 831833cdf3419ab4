"""Limits that keep one client from exhausting the gateway, on both SSE and WebSocket."""

from __future__ import annotations

import logging
import socket

import anyio
import anyio.to_thread
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.app.conftest import RunningGateway, serve, server_log
from tests.app.test_ws import receive, request
from tests.conftest import eventually

pytestmark = pytest.mark.anyio


async def test_websocket_publish_rate_is_limited_per_socket() -> None:
    # 0.2 a second: a burst of one, then the next token is 5 s away, far beyond this test's pace
    with serve(ws_publish_rate=0.2) as gateway:
        async with connect(gateway.ws_url) as ws, connect(gateway.ws_url) as other:
            first = await request(ws, op="publish", channel="c", data=1, ref=1)
            assert first["type"] == "ok"
            limited = await request(ws, op="publish", channel="c", data=2, ref=2)
            assert (limited["type"], limited["error"], limited["status"], limited["ref"]) == (
                "error",
                "rate_limited",
                429,
                2,
            )
            assert "GATEWAY_WS_PUBLISH_RATE" in limited["detail"]
            # the socket stays open and usable, and the bucket is per socket
            assert (await request(ws, op="subscribe", channels=["c"]))["type"] == "ok"
            assert (await request(other, op="publish", channel="c", data=3))["type"] == "ok"
            assert (await receive(ws))["data"] == 3


async def test_connection_limit_counts_websockets_and_streams_alike() -> None:
    with serve(max_connections=1) as gateway:
        async with connect(gateway.ws_url) as ws:
            # an idle socket holds its slot: the limit is per connection, not per subscription
            async with gateway.client() as http:
                refused = await http.get("/channels/c/events")
                assert refused.status_code == 503
                assert refused.json()["error"] == "too_many_connections"
            async with connect(gateway.ws_url) as second:
                frame = await receive(second)
                assert (frame["error"], frame["status"]) == ("too_many_connections", 503)
                with anyio.fail_after(10), pytest.raises(ConnectionClosed):
                    await second.recv()
                assert second.close_code == 1013
            # one socket may hold several subscriptions within its one slot
            assert (await request(ws, op="subscribe", channels=["a"]))["type"] == "ok"
            joined = await request(ws, op="subscribe", channels=["b"], group="g", consumer="x")
            assert joined["type"] == "ok"


async def test_websocket_channels_per_subscription() -> None:
    with serve(max_channels_per_subscription=2) as gateway:
        async with connect(gateway.ws_url) as ws:
            too_many = await request(ws, op="subscribe", channels=["a", "b", "c"])
            assert (too_many["error"], too_many["status"]) == ("too_many_channels", 422)
            assert (await request(ws, op="subscribe", channels=["a"]))["type"] == "ok"
            assert (await request(ws, op="subscribe", patterns=["b.*"]))["type"] == "ok"
            # adding to a live subscription counts what it already holds
            growing = await request(ws, op="subscribe", channels=["c"])
            assert growing["error"] == "too_many_channels"
            for group in ("g1", "g2"):
                joined = await request(ws, op="subscribe", channels=["jobs"], group=group)
                assert joined["type"] == "ok"
            third = await request(ws, op="subscribe", channels=["jobs"], group="g3")
            assert third["error"] == "too_many_channels"


async def test_websocket_frame_limit_counts_bytes_not_characters() -> None:
    with serve(max_payload_bytes=200) as gateway:
        async with connect(gateway.ws_url) as ws:
            # 100 characters, 300 bytes in UTF-8
            text = '{"op":"publish","channel":"c","data":"' + "€" * 60 + '"}'
            assert len(text) <= 200 < len(text.encode())
            await ws.send(text)
            refused = await receive(ws)
            assert (refused["error"], refused["status"]) == ("payload_too_large", 413)
            assert (await request(ws, op="publish", channel="c", data="€"))["type"] == "ok"


async def test_a_websocket_that_does_not_read_stops_being_read() -> None:
    # Each unsubscribe frame of ~100 KB is answered with a reply as large (it echoes the names).
    # The client never reads: once its replies cannot be queued the server stops reading its
    # frames, so the client's sends block long before 100 MB went out (what kernel buffers hold
    # on loopback is tens of MB).
    names = [f"c{n:05d}" for n in range(12_000)]
    frame = orjson.dumps({"op": "unsubscribe", "channels": names}).decode()
    with serve() as gateway:
        async with connect(gateway.ws_url, max_queue=1, write_limit=2**16) as ws:
            sent = 0
            with anyio.move_on_after(5):
                for _ in range(1000):
                    await ws.send(frame)
                    sent += 1
            assert sent < 1000, "the server read every frame of a client that does not read"
            async with gateway.client() as http:
                assert (await http.get("/healthz")).status_code == 200


def dropped(gateway: RunningGateway, transport: str) -> float:
    metrics = gateway.gateway.metrics
    value = metrics.registry.get_sample_value(
        "gateway_messages_dropped_total", {"transport": transport, "layer": "memory"}
    )
    return value or 0.0


async def publish_a_lot(gateway: RunningGateway, channel: str) -> None:
    """10 MB: more than the socket buffers of a client that reads nothing can take."""
    async with gateway.client() as http:
        for _ in range(40):
            response = await http.post(f"/channels/{channel}/publish", json={"data": "x" * 2**18})
            assert response.status_code == 200


def read_to_the_end(sock: socket.socket) -> None:
    sock.settimeout(10)
    while sock.recv(2**16):
        pass


@pytest.mark.parametrize("policy", ["drop_oldest", "disconnect"])
async def test_an_sse_client_that_stops_reading_is_disconnected(policy: str) -> None:
    with serve(send_timeout_seconds=0.5, backlog_policy=policy) as gateway, server_log() as log:
        channel = gateway.gateway.channel
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gateway.port))
            sock.sendall(b"GET /channels/slow/events HTTP/1.1\r\nHost: gateway\r\n\r\n")
            await eventually(lambda: channel.subscriber_count == 1)
            await publish_a_lot(gateway, "slow")
            await eventually(lambda: channel.subscriber_count == 0, within=10)
            assert gateway.gateway.connections == 0
            assert dropped(gateway, "sse") > 0
            # the server closed the connection: what it had written, then the end
            await anyio.to_thread.run_sync(read_to_the_end, sock)
        async with gateway.client() as http:
            assert (await http.get("/healthz")).status_code == 200
    assert not [r for r in log if r.levelno >= logging.ERROR], [r.getMessage() for r in log]


def client_frame(text: str) -> bytes:
    """A masked WebSocket text frame (RFC 6455 section 5.2), short enough for a 7-bit length."""
    payload = text.encode()
    assert len(payload) < 126
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def test_a_websocket_that_never_reads_is_closed() -> None:
    with serve(send_timeout_seconds=0.5) as gateway:
        channel = gateway.gateway.channel
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gateway.port))
            sock.sendall(
                b"GET /ws HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")  # frames may follow only then
            sock.sendall(client_frame('{"op": "subscribe", "channels": ["slow"]}'))
            await eventually(lambda: channel.subscriber_count == 1)
            await publish_a_lot(gateway, "slow")
            await eventually(lambda: gateway.gateway.connections == 0, within=10)
            assert channel.subscriber_count == 0
            assert dropped(gateway, "ws") > 0
            await anyio.to_thread.run_sync(read_to_the_end, sock)


async def test_backlogs_are_bounded_in_bytes_too() -> None:
    # one batch lands in the backlog before the stream's writer wakes: 10 messages of 300 bytes
    # against a 1,000-byte backlog keep the newest three
    with serve(max_backlog_bytes=1000) as gateway:
        async with gateway.sse("/channels/b/events") as stream, gateway.client() as http:
            batch = [{"channel": "b", "data": f"{n}" + "x" * 297} for n in range(10)]
            assert (await http.post("/publish", json={"messages": batch})).status_code == 200
            with anyio.fail_after(10):
                gap, *kept = await stream.take(4)
    assert (gap.type, gap.json) == ("gap", {"reason": "dropped", "dropped": 7})
    assert [event.json["data"][0] for event in kept] == ["7", "8", "9"]
    assert dropped(gateway, "sse") == 7
