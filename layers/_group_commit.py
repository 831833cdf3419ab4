"""Group commit: publishes that arrive while one is in flight share the next layer call.

A cross-process layer answers a publish after a broker round trip, so one call at a time per
request would bound a process's publishes by the round trip, not by its CPU. Every layer's
`publish` takes a batch in one round trip; this puts the publishes that arrive while a call is
in flight into the next one, in their order of arrival, and hands each caller its own ids.

- The first publish with nothing in flight is the call itself, in its caller's task: no hand-off
  and no added latency when publishes do not overlap.
- The following group is published by a task of the `Channel`, so a caller that goes away does
  not cancel the call the others wait for; its messages may still be published, as they may be
  once any layer call has started. A caller that goes away before its group starts is left out.
- One call at a time: groups go to the layer in order, so ids follow arrival order as they do
  for one caller. An unavailable broker is every member's error; a message the layer refuses
  (`InvalidArgument`, raised before a layer sends anything of the batch) is its caller's alone:
  the members are then published one by one.
- A group's callers are woken once the next group's call has started (one yield after it is
  scheduled), so its messages are on their way to the broker while the callers reply: the round
  trip overlaps the replies instead of following them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from .errors import ChannelClosed, InvalidArgument

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

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
        self._busy = False

    async def publish(self, messages: Sequence[Message], task_group: TaskGroup) -> list[str]:
        if not self._busy:
            self._busy = True
            try:
                return await self._publish(messages)
            finally:
                self._next(task_group)
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

    def _next(self, task_group: TaskGroup) -> None:
        if self._waiting:
            task_group.start_soon(self._publish_group, task_group)
        else:
            self._busy = False

    async def _publish_group(self, task_group: TaskGroup) -> None:
        group, self._waiting = self._waiting, []
        try:
            ids = await self._publish([m for waiter in group for m in waiter.messages])
        except InvalidArgument:
            await self._publish_each(group)
        except Exception as exc:
            for waiter in group:
                waiter.error = exc
        except BaseException:
            for waiter in group:
                if waiter.ids is None:
                    waiter.error = ChannelClosed("the channel closed while publishing")
            for waiter in group:
                waiter.done.set()
            self._next(task_group)
            raise
        else:
            start = 0
            for waiter in group:
                waiter.ids = ids[start : start + len(waiter.messages)]
                start += len(waiter.messages)
        self._next(task_group)
        try:
            if self._busy:
                # The next group's call goes first, so its messages are on their way to the
                # broker while this group's callers reply.
                await anyio.lowlevel.checkpoint()
        finally:
            for waiter in group:
                waiter.done.set()

    async def _publish_each(self, group: list[_Waiter]) -> None:
        for waiter in group:
            try:
                waiter.ids = await self._publish(waiter.messages)
            except Exception as exc:
                waiter.error = exc
