"""The core's `Sink`: routes each live event to the local subscribers and group pumps it concerns.

Exact channels are a dictionary lookup; patterns are matched with `names.compile_pattern`, which
is linear in the channel name whatever the pattern. Control messages (`layers._broadcast`) arrive
through `broadcast`; a message published to a pattern goes to each local subscription with a
channel it matches or a pattern within it, once, and never to a group pump.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from . import _broadcast
from ._presence import KINDS, PresenceEvent
from .base import ChannelObserver, GroupNotice
from .event import Event, Gap
from .names import compile_pattern, pattern_within


class Receiver(Protocol):
    """A local subscriber, as the router sees it (`layers.subscription.Subscription`)."""

    presence: bool  # it asked for join and leave events

    def push(self, item: Event | Gap) -> None: ...


class Pump(Protocol):
    """A group consumer's pump, as the router sees it (`layers._groups.GroupPump`)."""

    group: str
    consumer: str
    prefetch: int

    @property
    def in_flight(self) -> int: ...

    def wake(self, *, claim: bool = False) -> None: ...

    def settle(self, ids: Sequence[str]) -> None: ...

    def extend(self, ids: Sequence[str]) -> None: ...

    def end(self) -> None: ...


class Router:
    """The `Sink` of the layer: routes each live event to local subscribers and group pumps."""

    def __init__(self, scheme: str, observer: ChannelObserver, *, catches_up: bool) -> None:
        self.scheme = scheme
        self.observer = observer
        self.catches_up = catches_up  # after a reconnect the layer delivers what it missed
        self.exact: dict[str, set[Receiver]] = {}
        self.patterns: dict[str, set[Receiver]] = {}
        self.pumps: dict[str, set[Pump]] = {}
        self.on_presence: Callable[[str, dict[str, Any]], None] | None = None  # `Presence.receive`

    def deliver(self, event: Event) -> None:
        subscribers = self.exact.get(event.channel)
        if self.patterns:
            targets = set(subscribers) if subscribers else set()
            for pattern, matched in self.patterns.items():
                if compile_pattern(pattern)(event.channel):
                    targets |= matched
            subscribers = targets
        if subscribers:
            for subscriber in subscribers:
                subscriber.push(event)
        self.wake(event.channel)

    def broadcast(self, blob: bytes) -> None:
        control = _broadcast.read(blob)
        if control is None:
            return
        kind, content = control
        if kind == _broadcast.PATTERN:
            self.deliver_pattern(content)
        elif kind in KINDS and self.on_presence is not None:
            self.on_presence(kind, content)

    def notify_presence(self, channel: str, event: PresenceEvent) -> None:
        """A join or leave on `channel`: to its local subscribers that asked for them."""
        for subscriber in self.exact.get(channel, ()):
            if subscriber.presence:
                subscriber.push(event)

    def deliver_pattern(self, event: Event) -> None:
        """A message published to the pattern `event.channel`: to each subscription concerned."""
        matches = compile_pattern(event.channel)
        targets: set[Receiver] = set()
        for name, members in self.exact.items():
            if matches(name):
                targets |= members
        for pattern, members in self.patterns.items():
            if pattern_within(event.channel, pattern):
                targets |= members
        for subscriber in targets:
            subscriber.push(event)

    def wake(self, channel: str, *, released: bool = False) -> None:
        pumps = self.pumps.get(channel)
        if pumps:
            for pump in pumps:
                pump.wake(claim=released)

    def group_notice(self, notice: GroupNotice) -> None:
        for pump in list(self.pumps.get(notice.channel, ())):
            if pump.group != notice.group:
                continue
            if notice.kind == "settled":
                pump.settle(notice.ids)
            elif notice.kind == "extended":
                pump.extend(notice.ids)
            else:
                pump.end()

    def reconnected(self) -> None:
        self.observer.reconnected(self.scheme)
        if self.catches_up:
            return
        # Whatever was published while the connection was down never reaches this process:
        # every live subscriber is told, where it happened in its stream.
        subscribers: set[Receiver] = set()
        for table in (self.exact, self.patterns):
            for members in table.values():
                subscribers |= members
        for subscriber in subscribers:
            subscriber.push(Gap("reconnected"))

    def layer_error(self, error: BaseException) -> None:
        self.observer.layer_error(self.scheme, error)

    def add(self, subscriber: Receiver, channels: Iterable[str], patterns: Iterable[str]) -> None:
        for name in channels:
            self.exact.setdefault(name, set()).add(subscriber)
        for pattern in patterns:
            self.patterns.setdefault(pattern, set()).add(subscriber)

    def remove(
        self, subscriber: Receiver, channels: Iterable[str], patterns: Iterable[str]
    ) -> None:
        for table, names in ((self.exact, channels), (self.patterns, patterns)):
            for name in names:
                members = table.get(name)
                if members is not None:
                    members.discard(subscriber)
                    if not members:
                        del table[name]
