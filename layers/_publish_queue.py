"""The queue behind `Channel.publish_nowait`: messages published in order by a task of their own.

A caller that must not wait for the broker (litestar's non-blocking publish) queues a message and
returns. One task of the `Channel` publishes what is queued, in order, up to
`QUEUED_PUBLISH_BATCH` messages per layer call, and yields between calls so subscribers take each
batch before the next. A message that cannot be published is logged and counted, never dropped
silently; closing the `Channel` flushes the queue for up to `FLUSH_ON_CLOSE_SECONDS` and reports
what is left.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio
from anyio.abc import TaskGroup

from .base import ChannelObserver
from .errors import ChannelClosed, ChannelError, PublishQueueFull
from .event import Message

logger = logging.getLogger("layers.core")

QUEUED_PUBLISH_BATCH = 100  # messages queued by publish_nowait, at most, in one layer call
FLUSH_ON_CLOSE_SECONDS = 10.0  # closing waits this long for queued messages to be published


class Publisher(Protocol):
    """What the queue needs of the `Channel` that owns it."""

    observer: ChannelObserver
    _new_event: Callable[[], anyio.Event]
    _checkpoint: Callable[[], Awaitable[None]]

    async def publish_messages(self, messages: Sequence[Message]) -> list[str]: ...


class PublishQueue:
    def __init__(self, publisher: Publisher, limit: int) -> None:
        self.publisher = publisher
        self.limit = limit  # messages waiting, at most
        self.failures = 0  # queued messages that could not be published
        self._queued: deque[Message] = deque()
        self._total = 0
        self._settled = 0  # published or failed
        self._running = False
        self._wakeup: anyio.Event | None = None
        self._progress: anyio.Event | None = None

    def put(self, message: Message, task_group: TaskGroup) -> None:
        if len(self._queued) >= self.limit:
            raise PublishQueueFull(
                f"{len(self._queued)} messages are waiting to be published: await publish() "
                "instead, or raise max_queued_publishes"
            )
        self._queued.append(message)
        self._total += 1
        if not self._running:
            self._running = True
            task_group.start_soon(self._publish_queued)
        elif self._wakeup is not None:
            self._wakeup.set()

    async def flush(self) -> None:
        target = self._total
        while self._settled < target:
            if self._progress is None:
                self._progress = self.publisher._new_event()
            await self._progress.wait()

    async def close(self) -> None:
        """Flush for up to `FLUSH_ON_CLOSE_SECONDS`; what is still queued then is reported."""
        if not self._running:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(FLUSH_ON_CLOSE_SECONDS):
            await self.flush()
        if self._queued:
            left = list(self._queued)
            self._queued.clear()
            self._failed(left, ChannelClosed("the channel closed before they were published"))
            self._done(len(left))

    async def _publish_queued(self) -> None:
        queued, publisher = self._queued, self.publisher
        try:
            while True:
                if not queued:
                    self._wakeup = wakeup = publisher._new_event()
                    await wakeup.wait()
                    continue
                batch = [queued.popleft() for _ in range(min(len(queued), QUEUED_PUBLISH_BATCH))]
                try:
                    await publisher.publish_messages(batch)
                except Exception as exc:
                    self._failed(batch, exc)
                except BaseException:
                    self._failed(batch, ChannelClosed("the channel closed while publishing"))
                    raise
                finally:
                    self._done(len(batch))
                await publisher._checkpoint()  # subscribers take each batch before the next one
        finally:
            self._running = False
            self._wakeup = None

    def _done(self, count: int) -> None:
        self._settled += count
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.set()

    def _failed(self, messages: Sequence[Message], error: BaseException) -> None:
        self.failures += len(messages)
        self.publisher.observer.publish_failed(len(messages), error)
        channels = ", ".join(sorted({message.channel for message in messages}))
        detail = error.detail if isinstance(error, ChannelError) else repr(error)
        logger.error("%d queued messages to %s not published: %s", len(messages), channels, detail)
