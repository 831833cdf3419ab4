"""The load side: SSE subscribers and HTTP publishers on raw asyncio protocols.

httpx and friends cost tens of microseconds per event; at 200,000 events/s that alone would make
the client the bottleneck. So every connection is an `asyncio.Protocol` that counts events by
scanning the received bytes for `\\ndata: ` (one per message frame) and frames for `\\n\\n`,
carrying a few bytes across reads so a split marker is still counted once. Only a sample of the
connections parses payloads: the sequence number (loss and duplicates) and the send timestamp
(publish→receive latency). The publisher is open-loop: requests go out on schedule on pipelined
keep-alive connections whatever the responses do, so a slow server shows up as latency and loss
instead of silently lowering the offered rate.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import orjson

DATA_MARK = b"\ndata: "
SAMPLE_RE = re.compile(rb'"seq":(\d+),"t":([0-9.]+)')


class SSEConnection(asyncio.Protocol):
    """One SSE subscriber: counts every event; a sampled one also records seq and latency."""

    def __init__(self, request: bytes, sample: bool) -> None:
        self.request = request
        self.sample = sample
        self.status: int | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.opened_at = time.perf_counter()
        self.connect_seconds = 0.0
        self.events = 0
        self.frames = 0
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self._tail = b""
        self._pending = b""  # sampled connections: bytes after the last complete frame
        self.seqs: list[int] = []
        self.latencies: list[float] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        tail = self._tail
        self.events += (tail + data).count(DATA_MARK)  # the 6-byte tail cannot hold a whole mark
        # a frame ends with a blank line: "\n\n", or "\r\n\r\n" (Litestar's line ends)
        self.frames += (tail[-1:] + data).count(b"\n\n") + (tail[-2:] + data).count(b"\n\r\n")
        self._tail = (tail + data)[-6:] if len(data) < 6 else data[-6:]
        if self.status is None:
            self.status = int(data[9:12]) if data.startswith(b"HTTP/1.") else 0
            self.connect_seconds = time.perf_counter() - self.opened_at
            if not self.ready.done():
                if self.status == 200:
                    self.ready.set_result(None)
                else:
                    self.ready.set_exception(RuntimeError(f"subscribe answered {data[:200]!r}"))
        if self.sample:
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        buffer = self._pending + data
        lf, crlf = buffer.rfind(b"\n\n"), buffer.rfind(b"\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
        if end == 0:
            self._pending = buffer
            return
        now = time.time()
        for match in SAMPLE_RE.finditer(buffer, 0, end):
            self.seqs.append(int(match[1]))
            self.latencies.append(now - float(match[2]))
        self._pending = buffer[end:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection closed: {exc}"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Subscribers:
    """N SSE connections to one URL path."""

    host: str
    port: int
    path: str
    connections: list[SSEConnection] = field(default_factory=list)

    async def open(
        self,
        count: int,
        *,
        sample_every: int = 20,
        last_event_id: str | None = None,
        concurrency: int = 500,
        within: float = 60.0,
    ) -> float:
        """Open `count` connections, `concurrency` at a time; return the seconds it took."""
        loop = asyncio.get_running_loop()
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n"
        ).encode()
        gate = asyncio.Semaphore(concurrency)
        started = time.perf_counter()

        async def one(index: int) -> None:
            async with gate:
                protocol = SSEConnection(request, sample=index % sample_every == 0)
                self.connections.append(protocol)
                await loop.create_connection(lambda: protocol, self.host, self.port)
                await protocol.ready

        async with asyncio.timeout(within):
            await asyncio.gather(*(one(i) for i in range(count)))
        return time.perf_counter() - started

    @property
    def events(self) -> int:
        return sum(c.events for c in self.connections)

    def counts(self) -> list[int]:
        return [c.events for c in self.connections]

    async def wait_for(self, per_connection: Sequence[int], within: float) -> bool:
        """Wait until every connection counted at least its expected events; False if that takes
        longer than `within` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if all(
                c.events >= want for c, want in zip(self.connections, per_connection, strict=True)
            ):
                return True
            await asyncio.sleep(0.05)
        return False

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.connections.clear()


class HttpConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection with pipelining; responses need a Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[tuple[int, bytes]]] = deque()
        self.buffer = b""
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def request(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(raw)
        return future

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while True:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                break
            head = buffer[:head_end].lower()
            start = head.find(b"content-length:")
            if start < 0:
                raise RuntimeError(f"response without content-length: {head!r}")
            line_end = head.find(b"\r\n", start)
            length = int(head[start + 15 : line_end if line_end >= 0 else len(head)])
            end = head_end + 4 + length
            if len(buffer) < end:
                break
            future = self.waiting.popleft()
            if not future.done():
                future.set_result((int(head[9:12]), buffer[head_end + 4 : end]))
            buffer = buffer[end:]
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self.waiting:
            if not future.done():
                future.set_exception(ConnectionError(f"publisher connection closed: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)


def post_request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def connect(host: str, port: int, count: int) -> list[HttpConnection]:
    loop = asyncio.get_running_loop()
    connections = []
    for _ in range(count):
        _, protocol = await loop.create_connection(HttpConnection, host, port)
        connections.append(protocol)
    return connections


@dataclass
class PublishResult:
    sent: int
    ok: int
    seconds: float  # from the first request to the last sent
    ids: list[str]


async def publish_at_rate(
    host: str,
    port: int,
    path: str,
    *,
    rate: float,
    duration: float,
    first_seq: int,
    connections: int = 4,
) -> PublishResult:
    """Open-loop: message i goes out at start + i/rate, carrying seq and send time."""
    pool = await connect(host, port, connections)
    count = max(1, round(rate * duration))
    futures = []
    started = time.monotonic()
    try:
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = b'{"data":{"seq":%d,"t":%.6f}}' % (first_seq + i, time.time())
            futures.append(pool[i % connections].request(post_request(host, port, path, body)))
        seconds = time.monotonic() - started
        await asyncio.wait(futures, timeout=30)  # unanswered by then: counted as failed
    finally:
        for future in futures:
            future.cancel()  # no-op for the answered ones
        for connection in pool:
            if connection.transport is not None:
                connection.transport.close()
    ids = []
    ok = 0
    for future in futures:
        if future.cancelled() or not future.done() or future.exception() is not None:
            continue
        reply = future.result()
        if 200 <= reply[0] < 300:
            ok += 1
            try:
                ids.append(str(orjson.loads(reply[1])["id"]))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                ids.append("")
    return PublishResult(count, ok, seconds, ids)


async def publish_flood(
    host: str, port: int, path: str, *, duration: float, connections: int = 64
) -> tuple[int, int]:
    """Closed-loop throughput without wrk: (ok, failed) requests in `duration` seconds."""
    pool = await connect(host, port, connections)
    request = post_request(host, port, path, b'{"data":{"x":1}}')
    ok = failed = 0
    deadline = time.monotonic() + duration

    async def worker(connection: HttpConnection) -> None:
        nonlocal ok, failed
        while time.monotonic() < deadline:
            status, _ = await connection.request(request)
            if 200 <= status < 300:
                ok += 1
            else:
                failed += 1

    try:
        await asyncio.gather(*(worker(c) for c in pool))
    finally:
        for connection in pool:
            if connection.transport is not None:
                connection.transport.close()
    return ok, failed
