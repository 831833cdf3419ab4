"""Graceful shutdown: streams end when SIGTERM arrives, not at the server's lifespan shutdown.

uvicorn, alone (`python -m app`) or as a gunicorn worker, answers SIGTERM by closing its listening
sockets and then waiting, up to its graceful timeout, for open connections to finish; only then does
it run the lifespan shutdown. An SSE stream or a WebSocket never finishes by itself, so ending them
in lifespan shutdown would always cost the whole grace period and then cut them without a word.

So the drain starts with the signal. Both servers install their SIGTERM/SIGINT handler before the
lifespan starts, on the main thread; `drain_on_signal` (entered in the lifespan) puts a handler in
front of it that schedules `Gateway.drain` on the event loop and then calls the server's handler,
which goes on as before: stop accepting, wait for requests in flight (publishes included, since the
channel stays open until lifespan shutdown), run lifespan shutdown. No server internals are
patched; the previous handlers are restored when the lifespan ends.

A server running in a thread (the tests, an embedding application) cannot receive signals: its
owner stops it and may call `Gateway.drain` itself.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

logger = logging.getLogger("app")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def drain_on_signal(drain: Callable[[], None]) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT first call `drain` on the running event loop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {int(sig): signal.getsignal(sig) for sig in SIGNALS}

    def handler(sig: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of whatever the loop was doing: only
        # schedule the drain from here, never touch the channel directly.
        loop.call_soon_threadsafe(drain)
        chained = previous[sig]
        if callable(chained):
            chained(sig, frame)
        elif chained != signal.SIG_IGN:  # the default action: terminate, as without us
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    for sig in SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for number, chained in previous.items():
            if signal.getsignal(number) is handler:
                signal.signal(number, chained)
