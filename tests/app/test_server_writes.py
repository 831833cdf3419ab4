"""How the server writes: what a connection is sent in one turn of the event loop leaves in one
write at the next turn (`app.server.CoalescedWrites`), in order, and never waits longer."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import anyio
import orjson
import pytest

from app.server import FLUSH_AT, CoalescedWrites, outbox
from tests.app.conftest import free_port
from tests.app.processes import running, wait_serving


class Recorder(asyncio.Transport):
    """A transport that records what it is asked to send, one entry per call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bytes, ...]] = []
        self.closed = False
        self.eof = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append((bytes(data),))

    def writelines(self, list_of_data: object) -> None:
        self.calls.append(tuple(bytes(part) for part in list_of_data))  # type: ignore[attr-defined]

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write_eof(self) -> None:
        self.eof = True


def test_writes_of_one_turn_leave_together_at_the_next() -> None:
    async def main() -> None:
        transport = Recorder()
        held = CoalescedWrites(transport, outbox(asyncio.get_running_loop()))
        held.write(b"HTTP/1.1 200 OK\r\n\r\n")
        held.write(bytearray(b"body"))
        held.writelines([b"more"])
        assert transport.calls == []
        await asyncio.sleep(0)
        assert transport.calls == [(b"HTTP/1.1 200 OK\r\n\r\n", b"body", b"more")]
        held.write(b"event")  # a later turn's writes are held again, for one turn
        assert len(transport.calls) == 1
        await asyncio.sleep(0)
        assert transport.calls[-1] == (b"event",)

    asyncio.run(main())


def test_every_connection_written_in_a_turn_is_sent_at_the_next() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        first, second = Recorder(), Recorder()
        a, b = CoalescedWrites(first, outbox(loop)), CoalescedWrites(second, outbox(loop))
        b.write(b"to b")
        a.write(b"to a")
        a.write(b"again")
        assert first.calls == second.calls == []
        await asyncio.sleep(0)
        assert first.calls == [(b"to a", b"again")] and second.calls == [(b"to b",)]

    asyncio.run(main())


def test_close_and_eof_send_what_is_held_first_and_large_writes_go_at_once() -> None:
    async def main() -> None:
        closing = Recorder()
        held = CoalescedWrites(closing, outbox(asyncio.get_running_loop()))
        held.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
        held.close()  # an app that failed after starting its response: the head still goes
        assert closing.calls == [(b"HTTP/1.1 500 Internal Server Error\r\n\r\n",)]
        assert closing.closed
        await asyncio.sleep(0)  # the scheduled send finds nothing left
        assert len(closing.calls) == 1

        transport = Recorder()
        held = CoalescedWrites(transport, outbox(asyncio.get_running_loop()))
        held.write(b"frame")
        held.write_eof()
        assert transport.calls == [(b"frame",)] and transport.eof

        transport = Recorder()
        held = CoalescedWrites(transport, outbox(asyncio.get_running_loop()))
        held.write(b"head")
        held.write(b"x" * FLUSH_AT)  # past the bound: sent now, under the transport's flow control
        assert transport.calls == [(b"head", b"x" * FLUSH_AT)]

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
