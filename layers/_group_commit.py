"""Group commit: publishes that arrive while one is in flight share the next layer call.

A cross-process layer answers a publish after a broker round trip, so one call at a time per
request would bound a process's publishes by the round trip, not by its CPU. Every layer's
`publish` takes a batch in one round trip; this puts the publishes that arrive while a call is
in flight into the next one, in their order of arrival, and hands each caller its own ids.

- The first publish with nothing in flight is the call itself, in its caller's task: no hand-off
  and no added latency when publishes do not overlap.
- The following groups are published by one task of the `Channel` (`run`), so a caller that goes
  away does not cancel the call the others wait for; its messages may still be published, as
  they may be once any layer call has started. A caller that goes away before its group starts
  is left out.
- One call at a time: groups go to the layer in order, so ids follow arrival order as they do
  for one caller. An unavailable broker is every member's error; a message the layer refuses
  (`InvalidArgument`, raised before a layer sends anything of the batch) is its caller's alone:
  the members are then published one by one.
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
    ) -> None:
        self._publish = publish
        self._new_event = new_event
        self._waiting: list[_Waiter] = []
        self._busy = False  # a layer call is in flight: a caller's own, or the worker's
        self._wake: Settable | None = None  # what the worker waits on while it is idle
        self._closed = False

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        if self._closed:
            raise ChannelClosed("the channel is closed")
        if not self._busy:
            self._busy = True
            try:
                return await self._publish(messages)
            finally:
                self._hand_on()
        waiter = _Waiter(messages, self._new_event())
        self._waiting.append(waiter)
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
        """A caller's own call ended: the worker takes what waits meanwhile, if anything does."""
        wake = self._wake
        if self._waiting and wake is not None:
            self._wake = None
            wake.set()
            return
        self._busy = False
        self._fail(self._take())  # only once the worker is gone: the channel closed

    def _take(self) -> list[_Waiter]:
        group, self._waiting = self._waiting, []
        return group

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish the groups that wait, one call at a time, for the life of the channel.

        One task of the `Channel` for all groups, woken when a caller's own call ends with
        others waiting: no task is started per group.
        """
        group: list[_Waiter] = []
        try:
            self._wake = self._new_event()
            task_status.started()
            while True:
                await self._wake.wait()
                group = self._take()
                while group:
                    await self._publish_group(group)
                    # The next group's call goes first: these callers resume once it is on its
                    # way to the broker, so their replies overlap its round trip.
                    done, group = group, self._take()
                    for waiter in done:
                        waiter.done.set()
                self._busy = False
                self._wake = self._new_event()
        finally:
            self._closed = True
            self._wake = None
            self._fail([*group, *self._take()])

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
