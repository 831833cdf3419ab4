"""What the servers bound before the app sees a request, under `python -m app` and gunicorn: the
time to send headers, the open sockets, the size of a WebSocket message."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from anyio.abc import SocketStream
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.app.conftest import free_port
from tests.app.processes import running, wait_serving

pytestmark = pytest.mark.anyio

SERVERS = {
    "python-m-app": ["-m", "app"],
    "gunicorn": ["-m", "gunicorn", "-c", "app/gunicorn_conf.py", "app.main:app"],
}
HEADER_TIMEOUT = 1.0
MAX_SOCKETS = 40


async def healthz(url: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        return (await http.get("/healthz")).status_code


async def until_closed(stream: SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    with anyio.fail_after(HEADER_TIMEOUT + 10):
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


async def dribble(port: int, closed_after: list[float], kept_alive: bool = False) -> None:
    """A slowloris client: a request line, then one header line every 0.2 s, never the end;
    `kept_alive`: after a whole request answered on the same connection."""
    started = time.monotonic()
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        if kept_alive:
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            with anyio.fail_after(5):
                assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")

        async def send_slowly() -> None:
            try:
                await stream.send(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
                while True:
                    await anyio.sleep(0.2)
                    await stream.send(b"X-Slow: 1\r\n")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send_slowly)
            answer = await until_closed(stream)
            tasks.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    closed_after.append(time.monotonic() - started)


@pytest.mark.parametrize("server", list(SERVERS))
async def test_slow_headers_are_cut_and_sockets_have_a_ceiling(server: str, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "GATEWAY_PORT": str(port),
        "GATEWAY_LAYER": "memory://",
        "GATEWAY_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
        "GATEWAY_MAX_SOCKETS": str(MAX_SOCKETS),
    }
    log = tmp_path / "server.log"
    with running([sys.executable, *SERVERS[server]], log, env) as process:
        await wait_serving(url, process, log)

        # 20 slowloris clients, half of them on a kept-alive connection, are cut after the
        # header timeout; meanwhile the gateway answers
        closed_after: list[float] = []
        async with anyio.create_task_group() as tasks:
            for index in range(20):
                tasks.start_soon(dribble, port, closed_after, index % 2 == 1)
            await anyio.sleep(0.3)
            assert await healthz(url) == 200
        assert len(closed_after) == 20
        assert all(HEADER_TIMEOUT * 0.8 <= after < HEADER_TIMEOUT + 5 for after in closed_after)

        # past the ceiling a connection is answered 503 and closed at once
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(MAX_SOCKETS)]
        try:
            async with await anyio.connect_tcp("127.0.0.1", port) as extra:
                with anyio.fail_after(HEADER_TIMEOUT / 2):  # not the header timeout
                    assert (await until_closed(extra)).startswith(b"HTTP/1.1 503 ")
        finally:
            for stream in idle:
                await stream.aclose()
        # the idle ones are gone (closed by us, or cut by the header timeout): serving again
        with anyio.fail_after(10):
            while True:
                try:
                    if await healthz(url) == 200:
                        break
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)  # the server notices closed sockets with no event to await


@pytest.mark.parametrize("server", list(SERVERS))
async def test_websocket_messages_are_bounded_while_read(server: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_PORT": str(port),
        "GATEWAY_LAYER": "memory://",
        "GATEWAY_MAX_PAYLOAD_BYTES": "1000",
    }
    log = tmp_path / "server.log"
    with running([sys.executable, *SERVERS[server]], log, env) as process:
        await wait_serving(f"http://127.0.0.1:{port}", process, log)
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send('{"op": "publish", "channel": "c", "data": "' + "x" * 1500 + '"}')
            with anyio.fail_after(10):
                refused = orjson.loads(await ws.recv())
            assert (refused["error"], refused["status"]) == ("payload_too_large", 413)
            await ws.send('{"op": "publish", "channel": "c", "data": "' + "x" * 5000 + '"}')
            with anyio.fail_after(10), pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009
