"""The timers every open stream shares: keepalives and the send timeout, one task each.

A timer per stream, or a timeout around every wait or write, costs more than the rest of a
delivery (a cancel scope per wait was most of an SSE delivery's CPU, see `app.transports.sse`).
So each stream only notes what the timers need (`wrote`, `sending_since`) and one task per process
looks at all of them a few times per interval.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio


class Quiet(Protocol):
    wrote: bool  # since the previous tick

    def wake(self) -> None:
        """Write a keepalive now."""


class Keepalives:
    """Keepalive comments for every open SSE stream.

    Every half interval it wakes the streams that wrote nothing since the previous tick, so a
    silent stream gets a comment between half an interval and one interval after its last write.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.streams: set[Quiet] = set()

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval / 2)
            for stream in self.streams:
                if stream.wrote:
                    stream.wrote = False
                else:
                    stream.wake()


class Writer(Protocol):
    sending_since: float | None  # `time.monotonic()` when the write in progress began

    def stuck(self) -> None:
        """The write in progress passed the send timeout: end the stream."""


class SendWatchdog:
    """The send timeout of every open stream, SSE and WebSocket alike.

    A client that stops reading fills the socket's buffers, and then a write waits for as long as
    the client keeps the connection, holding its subscription and everything queued for it. Each
    writer notes when its current write began; four times per `GATEWAY_SEND_TIMEOUT_SECONDS`
    this ends the streams whose write has waited longer than that.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.writers: set[Writer] = set()

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.timeout / 4)
            started_before = time.monotonic() - self.timeout
            stuck = [
                writer
                for writer in self.writers
                if writer.sending_since is not None and writer.sending_since <= started_before
            ]
            for writer in stuck:
                self.writers.discard(writer)
                writer.stuck()
