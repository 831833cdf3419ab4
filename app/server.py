"""The HTTP protocol the gateway's servers run: uvicorn's httptools protocol, plus two limits.

uvicorn bounds the idle time between two requests of a connection (`timeout_keep_alive`) but not
the time a client takes to send a request's headers, nor the number of open sockets: a client
that opens connections and sends one header line every few seconds (slowloris) holds each one
forever, and enough of them exhaust the process's file descriptors. So this protocol, passed to
uvicorn as `http=` by `python -m app` and the gunicorn configuration:

- closes a connection whose request headers are not complete `GATEWAY_HEADER_TIMEOUT_SECONDS`
  after it opened (or after the read that brought the start of a following request on a
  kept-alive connection, if its headers were not all in it), with a 408 answer;
- answers 503 and closes at once a connection that would make more than `GATEWAY_MAX_SOCKETS`
  open in this process (requests, streams, WebSockets and unfinished requests alike).

Once the headers are in, the request is the gateway's: streams are long-lived by design, bodies
are bounded by `GATEWAY_MAX_PAYLOAD_BYTES`, and WebSocket messages by `ws_max_size`.

It also holds a connection's writes until the loop's next turn and sends them together
(`CoalescedWrites`): one system call per connection and turn, and clients woken once per turn.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable
from functools import cache
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import Settings

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
FLUSH_AT = 64 * 1024  # bytes held before they are sent without waiting for the next turn
UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nretry-after: 1\r\n"
    b"connection: close\r\n\r\n"
)


def ws_max_size(settings: Settings) -> int:
    """The largest WebSocket message uvicorn assembles before refusing it (close 1009).

    Twice `GATEWAY_MAX_PAYLOAD_BYTES`: a frame somewhat over the limit still reaches the gateway,
    which answers it with a 413 error frame and keeps the socket open; a larger one is cut off
    while it is read, so no connection buffers more than this (uvicorn's default is 16 MiB).
    """
    return 2 * settings.max_payload_bytes


@cache
def limits() -> tuple[float, int]:
    """(header timeout, socket ceiling) from the settings, read once per process."""
    settings = Settings()
    return settings.header_timeout_seconds, settings.max_sockets


class GatewayHttpProtocol(HttpToolsProtocol):
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CoalescedWrites(transport, outbox(self.loop))  # type: ignore[assignment]
        _, max_sockets = limits()
        if len(self.connections) > max_sockets:
            transport.write(UNAVAILABLE)
            transport.close()
            return
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A following request of a kept-alive connection whose headers this read did not bring
        # whole (its cycle is not made yet, the last one is complete) gets its timer now: most
        # requests arrive whole and cost no timer. (A flag of its own would grow every
        # connection's attribute dictionary past a resize: a kilobyte per idle stream.)
        cycle = self.cycle
        if (
            self._header_timer is None
            and cycle is not None
            and cycle.response_complete
            and not self.transport.is_closing()
        ):
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        header_timeout, _ = limits()
        self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()


class Outbox:
    """The connections of one event loop with writes held this turn: one callback at the start
    of the next turn sends them all, in the order their first writes came."""

    __slots__ = ("_held", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[CoalescedWrites] = []

    def add(self, connection: CoalescedWrites) -> None:
        if not self._held:
            self._loop.call_soon(self._send)
        self._held.append(connection)

    def _send(self) -> None:
        held, self._held = self._held, []
        for connection in held:
            connection.flush()


_outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = (
    weakref.WeakKeyDictionary()
)


def outbox(loop: asyncio.AbstractEventLoop) -> Outbox:
    """The loop's `Outbox` (one per loop, so per server process)."""
    found = _outboxes.get(loop)
    if found is None:
        found = _outboxes[loop] = Outbox(loop)
    return found


class CoalescedWrites:
    """A connection's transport whose writes leave together at the loop's next turn.

    Everything written to the connection during one turn of the event loop (a response's head and
    body, several SSE events, pipelined responses) is held and sent in one system call at the
    start of the next turn, by the loop's `Outbox`. Responses to many connections finished in one
    turn then leave back to back: a client waiting on several of them is woken once, not once per
    response, and each connection makes one system call instead of one per write. In a profile of
    the publish benchmark, the sends were a third of the server's CPU, mostly waking the client
    each time.

    Nothing waits longer than that turn, and order is kept: every writer of the connection
    (uvicorn's protocol and request cycles, the WebSocket protocol after an upgrade) writes
    through this view, and `close` and `write_eof` send what is held first. More than
    `FLUSH_AT` bytes held are sent at once, so a large body still meets the transport's flow
    control. Everything else goes straight to the real transport. One write held is kept as it
    is, a list only from the second: most turns write a connection once (a reply, a keepalive).
    """

    __slots__ = ("_held", "_held_bytes", "_outbox", "_transport")

    def __init__(self, transport: asyncio.Transport, outbox: Outbox) -> None:
        self._transport = transport
        self._outbox = outbox
        self._held: bytes | list[bytes] | None = None
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is not bytes:
            data = bytes(data)  # held, so a buffer the caller reuses must not change under it
        held = self._held
        if held is None:
            self._held = data
            self._held_bytes = len(data)
            self._outbox.add(self)
        else:
            if isinstance(held, bytes):
                self._held = held = [held]
            held.append(data)
            self._held_bytes += len(data)
        if self._held_bytes >= FLUSH_AT:
            self.flush()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is None or self._transport.is_closing():
            return
        if isinstance(held, bytes):
            self._transport.write(held)
        else:
            self._transport.writelines(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
