"""One timer for the send timeout of every open stream, SSE and WebSocket alike.

A client that stops reading fills the socket's buffers, and then a write waits for as long as the
client keeps the connection, holding its subscription and everything queued for it. Each writer
notes when its current write began (`sending_since`); a few times per
`GATEWAY_SEND_TIMEOUT_SECONDS` this timer ends the streams whose write has waited longer than
that. One timer rather than a timeout around every write: a cancel scope per write costs more
than the write itself (see `app.transports.sse`).
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio


class Writer(Protocol):
    sending_since: float | None  # `time.monotonic()` when the write in progress began

    def stuck(self) -> None:
        """The write in progress passed the send timeout: end the stream."""


class SendWatchdog:
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
