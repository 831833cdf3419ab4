"""A `Sink` that records what a layer reports, for driving a layer without a `Channel`."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from layers import Event

TIMEOUT = 15


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.reconnects = 0
        self.errors: list[BaseException] = []
        self._changed = anyio.Event()

    def _tell(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def deliver(self, event: Event) -> None:
        self.events.append(event)
        self._tell()

    def wake(self, channel: str, *, released: bool = False) -> None:
        pass

    def reconnected(self) -> None:
        self.reconnects += 1
        self._tell()

    def layer_error(self, error: BaseException) -> None:
        self.errors.append(error)

    async def wait_for(self, count: int) -> list[Event]:
        """The first `count` events, once that many arrived (bounded in time)."""
        await self.wait_until(lambda: len(self.events) >= count)
        return self.events[:count]

    async def wait_until(self, check: Callable[[], bool]) -> None:
        with anyio.fail_after(TIMEOUT):
            while not check():
                await self._changed.wait()

    async def wait_reconnected(self, count: int = 1) -> None:
        with anyio.fail_after(TIMEOUT):
            while self.reconnects < count:
                await self._changed.wait()
