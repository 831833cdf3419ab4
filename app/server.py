"""The HTTP protocol the gateway's servers run: uvicorn's httptools protocol, plus two limits.

uvicorn bounds the idle time between two requests of a connection (`timeout_keep_alive`) but not
the time a client takes to send a request's headers, nor the number of open sockets: a client
that opens connections and sends one header line every few seconds (slowloris) holds each one
forever, and enough of them exhaust the process's file descriptors. So this protocol, passed to
uvicorn as `http=` by `python -m app` and the gunicorn configuration:

- closes a connection whose request headers are not complete `GATEWAY_HEADER_TIMEOUT_SECONDS`
  after it opened (or after the first byte of a following request on a kept-alive connection),
  with a 408 answer;
- answers 503 and closes at once a connection that would make more than `GATEWAY_MAX_SOCKETS`
  open in this process (requests, streams, WebSockets and unfinished requests alike).

Once the headers are in, the request is the gateway's: streams are long-lived by design, bodies
are bounded by `GATEWAY_MAX_PAYLOAD_BYTES`, and WebSocket messages by `ws_max_size`.

It also writes a response's head together with the first part of its body (`HeadWithBody`):
uvicorn writes the status line and headers as soon as the app starts its response, then the body,
two system calls where one does; they were a quarter of a publish's server CPU.
"""

from __future__ import annotations

import asyncio
from functools import cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import Settings

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
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
        _, max_sockets = limits()
        if len(self.connections) > max_sockets:
            transport.write(UNAVAILABLE)
            transport.close()
            return
        self._start_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # the next request of a kept-alive connection
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # this request's own cycle
            cycle.transport = HeadWithBody(self.transport, self.loop)  # type: ignore[assignment]

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


class HeadWithBody:
    """One request's view of its connection's transport: the response's first write (uvicorn's
    status line and headers) waits for the next one, so both leave in one system call.

    The head never waits longer than the loop iteration it was written in: a streaming response
    whose first body part comes later (or an app that fails before any body) still has its head
    sent at once. Every later write goes straight through; the protocol's flow control, reading
    and closing keep using the real transport.
    """

    __slots__ = ("_head", "_loop", "_started", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if not self._started:
            self._started = True
            self._head = data
            self._loop.call_soon(self._send_head)
        elif self._head is not None:
            head, self._head = self._head, None
            self._transport.writelines((head, data))
        else:
            self._transport.write(data)

    def _send_head(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._send_head()
        self._transport.close()
