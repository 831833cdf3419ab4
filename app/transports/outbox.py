"""The frames waiting for a WebSocket's writer, bounded in frames and in characters.

Every producer (the frame reader's replies, the subscription forwarders) waits in `put` while the
outbox is full, in the order they came: a socket whose client does not read stops being read
(its replies cannot be queued) and stops taking events from its subscriptions (where the backlog
policy applies). So a connection's queued frames never exceed `max_frames` and `max_chars`,
except for one frame larger than `max_chars`, which passes alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

Frame = TypeVar("Frame")


@dataclass
class _Waiting(Generic[Frame]):
    frame: Frame
    size: int
    turn: anyio.Event = field(default_factory=anyio.Event)
    queued: bool = False


class Outbox(Generic[Frame]):
    def __init__(self, max_frames: int, max_chars: int) -> None:
        self.max_frames = max_frames
        self.max_chars = max_chars
        self._frames: deque[tuple[Frame, int]] = deque()
        self._chars = 0
        self._waiting: deque[_Waiting[Frame]] = deque()
        self._reader: anyio.Event | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._frames) + len(self._waiting)

    def _fits(self, size: int) -> bool:
        frames = self._frames
        return not frames or (
            len(frames) < self.max_frames and self._chars + size <= self.max_chars
        )

    def _append(self, frame: Frame, size: int) -> None:
        self._frames.append((frame, size))
        self._chars += size
        if self._reader is not None:
            self._reader.set()
            self._reader = None

    def put_nowait(self, frame: Frame, size: int = 0) -> None:
        """Queue `frame` (`size` characters) now, or raise `anyio.WouldBlock` if full."""
        if self._closed:
            raise anyio.ClosedResourceError
        if self._waiting or not self._fits(size):
            raise anyio.WouldBlock
        self._append(frame, size)

    def put_first(self, frame: Frame) -> None:
        """Queue `frame` ahead of everything, whatever the bounds (a close)."""
        if not self._closed:
            self._frames.appendleft((frame, 0))
            if self._reader is not None:
                self._reader.set()
                self._reader = None

    async def put(self, frame: Frame, size: int = 0) -> None:
        """Queue `frame`, waiting (behind earlier waiters) while the outbox is full."""
        try:
            self.put_nowait(frame, size)
            return
        except anyio.WouldBlock:
            pass
        waiting = _Waiting(frame, size)
        self._waiting.append(waiting)
        try:
            await waiting.turn.wait()
        finally:
            if not waiting.turn.is_set():
                self._waiting.remove(waiting)
        if not waiting.queued:
            raise anyio.ClosedResourceError

    async def get(self) -> Frame:
        """The oldest frame; `anyio.EndOfStream` once closed and empty."""
        while not self._frames:
            if self._closed:
                raise anyio.EndOfStream
            reader = self._reader = anyio.Event()
            await reader.wait()
        frame, size = self._frames.popleft()
        self._chars -= size
        while self._waiting and self._fits(self._waiting[0].size):
            waiting = self._waiting.popleft()
            self._append(waiting.frame, waiting.size)
            waiting.queued = True
            waiting.turn.set()
        return frame

    def close(self) -> None:
        """No more frames: waiting producers get `anyio.ClosedResourceError`."""
        self._closed = True
        for waiting in self._waiting:
            waiting.turn.set()
        self._waiting.clear()
        if self._reader is not None:
            self._reader.set()
            self._reader = None
