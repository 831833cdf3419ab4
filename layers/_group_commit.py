"""Group commit: publishes that arrive while one is in flight share the next layer call.

A cross-process layer answers a publish after a broker round trip, so one call at a time per
request would bound a process's publishes by the round trip, not by its CPU. Every layer's
`publish` takes a batch in one round trip; this puts the publishes that arrive while a call is
in flight into the next one, in their order of arrival, and hands each caller its own ids.

- The first publish with nothing in flight is the call itself, in its caller's task: no hand-off
  and no added latency when publishes do not overlap.
- The following groups are published by the `Channel`'s worker tasks (`run`), so a caller that
  goes away does not cancel the call the others wait for; its messages may still be published, as
  they may be once any layer call has started. A caller that goes away before its group starts
  is left out.
- `calls` calls at a time (one unless the layer takes more, see `ChannelLayer.publish_calls`):
  groups go to the layer in order, so ids follow arrival order as they do for one caller, except
  between calls in flight at once, whose order the broker decides. An unavailable broker is every
  member's error; a message the layer refuses (`InvalidArgument`, raised before a layer sends
  anything of the batch) is its caller's alone: the members are then published one by one.
- A group's callers are woken as the next group's call starts, and resume once its messages are
  on their way to the broker: the round trip overlaps the replies instead of following them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from .errors import ChannelClosed, InvalidArgument

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from .event import Message


class Settable(Protocol):
    """A one-shot event: `anyio.Event`, or `layers.subscription.FutureWaiter` under asyncio."""

    def set(self) -> None: ...

    def wait(self) -> Awaitable[Any]: ...


class _Waiter:
    __slots__ = ("done", "error", "ids", "messages")

    def __init__(self, messages: Sequence[Message], done: Settable) -> None:
        self.messages = messages
        self.done = done
        self.ids: list[str] | None = None
        self.error: BaseException | None = None


class GroupCommit:
    def __init__(
        self,
        publish: Callable[[Sequence[Message]], Awaitable[list[str]]],
        new_event: Callable[[], Settable] = anyio.Event,
        *,
        calls: int = 1,
    ) -> None:
        self._publish = publish
        self._new_event = new_event
        self._max_calls = calls
        self._waiting: list[_Waiter] = []
        self._calls = 0  # layer calls in flight or handed to a worker: callers' own and workers'
        self._idle: list[Settable] = []  # what each idle worker waits on
        self._closed = False

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        if self._closed:
            raise ChannelClosed("the channel is closed")
        if not self._calls:
            self._calls += 1
            try:
                return await self._publish(messages)
            finally:
                self._calls -= 1
                self._hand_on()
        waiter = _Waiter(messages, self._new_event())
        self._waiting.append(waiter)
        self._hand_on()
        try:
            await waiter.done.wait()
        except BaseException:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.ids is not None
        return waiter.ids

    def _hand_on(self) -> None:
        """Wake an idle worker for what waits, if a call is free; fail it once the workers are
        gone (the channel closed)."""
        if not self._waiting or self._calls >= self._max_calls:
            return
        if self._idle:
            self._calls += 1
            self._idle.pop().set()
        elif self._closed:
            self._fail(self._take())

    def _take(self) -> list[_Waiter]:
        group, self._waiting = self._waiting, []
        return group

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish the groups that wait, `calls` at a time, for the life of the channel.

        One worker task per call, each woken when it is free and a group waits: no task is
        started per group.
        """
        try:
            async with anyio.create_task_group() as workers:
                for _ in range(self._max_calls):
                    await workers.start(self._work)
                task_status.started()
        finally:
            self._closed = True
            self._fail(self._take())

    async def _work(self, *, task_status: TaskStatus[None]) -> None:
        group: list[_Waiter] = []
        wake = self._new_event()
        self._idle.append(wake)
        task_status.started()
        try:
            while True:
                await wake.wait()  # whoever woke this counted its call
                group = self._take()
                while group:
                    await self._publish_group(group)
                    # The next group's call goes first: these callers resume once it is on its
                    # way to the broker, so their replies overlap its round trip.
                    done, group = group, self._take()
                    for waiter in done:
                        waiter.done.set()
                self._calls -= 1
                wake = self._new_event()
                self._idle.append(wake)
                self._hand_on()
        finally:
            if wake in self._idle:
                self._idle.remove(wake)
            self._fail(group)

    async def _publish_group(self, group: list[_Waiter]) -> None:
        try:
            ids = await self._publish([m for waiter in group for m in waiter.messages])
        except InvalidArgument:
            await self._publish_each(group)
        except Exception as exc:
            for waiter in group:
                waiter.error = exc
        else:
            start = 0
            for waiter in group:
                waiter.ids = ids[start : start + len(waiter.messages)]
                start += len(waiter.messages)

    async def _publish_each(self, group: list[_Waiter]) -> None:
        for waiter in group:
            try:
                waiter.ids = await self._publish(waiter.messages)
            except Exception as exc:
                waiter.error = exc

    @staticmethod
    def _fail(waiters: list[_Waiter]) -> None:
        """Wake waiters left without an answer: the channel closed."""
        for waiter in waiters:
            if waiter.ids is None and waiter.error is None:
                waiter.error = ChannelClosed("the channel closed while publishing")
            waiter.done.set()
