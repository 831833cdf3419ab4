"""How the server writes a response: its head leaves with the first part of its body, in one write
(`app.server.HeadWithBody`), and never waits longer than the loop iteration it was written in."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import anyio
import orjson
import pytest

from app.server import HeadWithBody
from tests.app.conftest import free_port
from tests.app.processes import running, wait_serving


class Recorder(asyncio.Transport):
    """A transport that records what it is asked to send, one entry per call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bytes, ...]] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append((bytes(data),))

    def writelines(self, list_of_data: object) -> None:
        self.calls.append(tuple(bytes(part) for part in list_of_data))  # type: ignore[attr-defined]

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_head_and_body_leave_in_one_call() -> None:
    async def main() -> None:
        transport = Recorder()
        joined = HeadWithBody(transport, asyncio.get_running_loop())
        joined.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert transport.calls == []
        joined.write(b"body")
        joined.write(b"more")
        assert transport.calls == [(b"HTTP/1.1 200 OK\r\n\r\n", b"body"), (b"more",)]
        await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
        assert len(transport.calls) == 2

    asyncio.run(main())


def test_a_head_without_body_leaves_at_the_next_loop_iteration() -> None:
    async def main() -> None:
        transport = Recorder()
        joined = HeadWithBody(transport, asyncio.get_running_loop())
        joined.write(b"HTTP/1.1 200 OK\r\n\r\n")
        await asyncio.sleep(0)
        assert transport.calls == [(b"HTTP/1.1 200 OK\r\n\r\n",)]
        joined.write(b"event")
        assert transport.calls[-1] == (b"event",)

        closing = Recorder()
        joined = HeadWithBody(closing, asyncio.get_running_loop())
        joined.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
        joined.close()  # an app that failed after starting its response: the head still goes
        assert closing.calls == [(b"HTTP/1.1 500 Internal Server Error\r\n\r\n",)]
        assert closing.closed

    asyncio.run(main())


async def read_response(stream: anyio.abc.SocketStream, buffer: bytes) -> tuple[bytes, bytes]:
    """One response with a content-length, and what came after it."""
    with anyio.fail_after(10):
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive()
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            rest += await stream.receive()
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


@pytest.mark.anyio
async def test_continue_pipelining_and_streams_through_the_server(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GATEWAY_PORT": str(port), "GATEWAY_LAYER": "memory://"}
    with running([sys.executable, "-m", "app"], tmp_path / "server.log", env) as process:
        await wait_serving(url, process, tmp_path / "server.log")
        body = b'{"data": 1}'
        request = (
            b"POST /channels/w/publish HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        )
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            # a client that waits for 100 Continue before its body gets it, alone, at once
            await stream.send(request + b"Expect: 100-continue\r\n\r\n")
            with anyio.fail_after(5):
                interim = await stream.receive()
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send(body)
            response, rest = await read_response(stream, b"")
            assert response.startswith(b"HTTP/1.1 200 ")
            assert orjson.loads(response.partition(b"\r\n\r\n")[2])["channel"] == "w"

            # two pipelined requests: two whole responses, in order
            await stream.send((request + b"\r\n" + body) * 2)
            first, rest = await read_response(stream, rest)
            second, rest = await read_response(stream, rest)
            ids = [orjson.loads(r.partition(b"\r\n\r\n")[2])["id"] for r in (first, second)]
            assert ids[0] != ids[1] and rest == b""

        # a stream's head comes before any event does
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET /channels/w/events HTTP/1.1\r\nHost: gateway\r\n\r\n")
            received = b""
            with anyio.fail_after(5):
                while b": connected" not in received:
                    received += await stream.receive()
            assert received.startswith(b"HTTP/1.1 200 ")
            assert b"content-type: text/event-stream" in received
