"""Group consumers: the pump that feeds a consumer's backlog from the layer, and dead letters.

Consumer groups are pulled: one pump task per group consumer reads new and timed-out messages
from the layer, woken by live messages on the channel (through the router), by the consumer taking
its queue, or by a timer. Redelivery timing and dead-lettering therefore work the same on every
layer that can claim and ack.

A group is a work queue, so a pump reads no more than its consumer's `prefetch` allows: it keeps
the ids it handed out and not yet seen settled (acked or nacked), each until its ack timeout
passes (then the message is anyone's to claim). An ack or nack in this process settles ids at
once; one in another process reaches the pump as a `GroupNotice` through the layer
(`ChannelLayer.group_notify`), so the next message follows at once there too. A notice lost
costs only time: the ids still leave the count when their ack timeout passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio
import orjson
from anyio.abc import TaskStatus

from .base import ChannelLayer, ChannelObserver
from .errors import ChannelError, LayerUnavailable, UnknownGroup
from .event import Event, Gap, Message

logger = logging.getLogger("layers.core")

DEAD_LETTER_SUFFIX = ".dead"


class Backlog(Protocol):
    """A group consumer's subscription, as its pump sees it (`layers.subscription.Subscription`)."""

    @property
    def free_slots(self) -> int: ...

    def push(self, item: Event | Gap) -> None: ...

    def when_space(self, callback: Callable[[], None]) -> None: ...

    def close(self, *, release: bool = False, error: ChannelError | None = None) -> None: ...


class GroupPump:
    """Feeds one group consumer's backlog from the layer: new messages, then timed-out ones, at
    most `prefetch` unsettled at a time."""

    def __init__(
        self,
        layer: ChannelLayer,
        subscriber: Backlog,
        channel: str,
        group: str,
        consumer: str,
        *,
        ack_timeout: float,
        max_deliveries: int,
        prefetch: int,
        observer: ChannelObserver,
        report_error: Callable[[BaseException], None],
    ) -> None:
        self.layer = layer
        self.prefetch = prefetch
        self._in_flight: dict[str, float] = {}  # id handed out -> when its ack timeout passes
        self.ended = False
        self.subscriber = subscriber
        self.ack_timeout = ack_timeout
        self.max_deliveries = max_deliveries
        self.observer = observer
        self.report_error = report_error
        self.channel = channel
        self.group = group
        self.consumer = consumer
        self._wakeup = anyio.Event()
        self._claim_now = False  # released messages are waiting: claim before the timer says so
        self.finished = anyio.Event()
        subscriber.when_space(self.wake)

    def wake(self, *, claim: bool = False) -> None:
        self._claim_now = self._claim_now or claim
        self._wakeup.set()

    @property
    def in_flight(self) -> int:
        """Messages handed to the consumer and neither settled nor past their ack timeout."""
        now = time.monotonic()
        for id in [id for id, until in self._in_flight.items() if until <= now]:
            del self._in_flight[id]
        return len(self._in_flight)

    def settle(self, ids: Sequence[str]) -> None:
        """`ids` were acked or nacked: their slots are free, the next messages follow now."""
        freed = [id for id in ids if self._in_flight.pop(id, None) is not None]
        if freed:
            self._wakeup.set()

    def extend(self, ids: Sequence[str]) -> None:
        """The ack timeout of `ids` starts again: they keep their slots as long."""
        until = time.monotonic() + self.ack_timeout
        for id in ids:
            if id in self._in_flight:
                self._in_flight[id] = until

    def end(self) -> None:
        """The group was deleted: the consumer's stream ends and nothing more is read."""
        self.ended = True
        self.subscriber.close(
            error=UnknownGroup(f"group {self.group!r} of {self.channel!r} was deleted")
        )

    async def run(self, *, task_status: TaskStatus[anyio.CancelScope]) -> None:
        try:
            await self._pump(task_status)
        finally:
            self.finished.set()

    async def _pump(self, task_status: TaskStatus[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            claim_every = max(0.01, min(self.ack_timeout / 2, 5.0))
            # The first fill claims: a consumer that joins (or reconnects to this instance after
            # another one shut down) takes over timed-out and released messages at once.
            next_claim = time.monotonic()
            backoff = 0.1
            while True:
                self._wakeup = anyio.Event()
                try:
                    delivered = await self._fill(claim_due=time.monotonic() >= next_claim)
                    backoff = 0.1
                except UnknownGroup:  # deleted: the consumer's stream ends
                    self.end()
                    return
                except LayerUnavailable as exc:
                    logger.warning("group %s on %s: %s", self.group, self.channel, exc.detail)
                    self.report_error(exc)
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + claim_every
                if delivered:
                    continue
                with anyio.move_on_after(max(0.0, next_claim - time.monotonic())):
                    await self._wakeup.wait()

    async def _fill(self, *, claim_due: bool) -> int:
        layer = self.layer
        room = min(self.subscriber.free_slots, self.prefetch - self.in_flight)
        if room <= 0 or self.ended:
            # Released messages wait for room: a nack's release can arrive before its settle
            # notice, which frees the slot and wakes the pump again.
            return 0
        events: list[Event] = []
        if claim_due or self._claim_now:
            self._claim_now = False
            claimed = await layer.group_claim(
                self.channel, self.group, self.consumer, self.ack_timeout, room
            )
            for event in claimed:
                if event.deliveries is not None and event.deliveries > self.max_deliveries:
                    # Publish and ack as one step: cancelled in between (the consumer leaving),
                    # the message would stay pending and be dead-lettered a second time.
                    with anyio.CancelScope(shield=True):
                        await dead_letter(layer, self.observer, event, self.group)
                else:
                    events.append(event)
            if events:
                self.observer.redelivered(self.channel, self.group, len(events))
        if len(events) < room:
            events += await layer.group_read(
                self.channel, self.group, self.consumer, room - len(events)
            )
        until = time.monotonic() + self.ack_timeout
        for event in events:
            event.bind_ack(self._acker(event.id))
            self._in_flight[event.id] = until
            self.subscriber.push(event)
        return len(events)

    def _acker(self, id: str) -> Callable[[], Awaitable[bool]]:
        async def ack() -> bool:
            acked = await self.layer.group_ack(self.channel, self.group, [id])
            self.settle(acked)
            return bool(acked)

        return ack


async def dead_letter(
    layer: ChannelLayer, observer: ChannelObserver, event: Event, group: str
) -> None:
    """Move a message past `max_deliveries` to `<channel>.dead` and ack it in its group."""
    dead = Message(
        event.channel + DEAD_LETTER_SUFFIX,
        orjson.dumps(
            {
                "group": group,
                "deliveries": (event.deliveries or 1) - 1,
                "message": orjson.Fragment(event.envelope()),
            }
        ),
        event.event,
        time.time(),
    )
    await layer.publish([dead])
    await layer.group_ack(event.channel, group, [event.id])
    observer.dead_lettered(event.channel, group)
