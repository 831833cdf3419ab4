"""Presence: who is subscribed to a channel in every process on the layer, and join/leave events.

Design decisions:

- One mechanism for every layer, on the control-message carrier (`ChannelLayer.broadcast`, see
  `layers._broadcast`), so no layer needs presence storage of its own and MQTT has it too. Each
  process (`Channel`) keeps its own members and a replica of every other process's, built from the
  `join` and `leave` messages each process broadcasts. A presence query is answered from the
  replica, without a round trip to the broker.
- A member is a subscription's exact channel with the subscriber's `Member` (client id, user,
  transport, since when); patterns and consumer groups are not counted.
- Join and leave events are handed to the local subscriptions of that channel that asked for them
  (`presence=True`) when the control message arrives, also in the process that sent it, so every
  process tells its own subscribers once. They are `PresenceEvent`s: no id, never stored.
- Liveness: each process with members broadcasts `alive` every `ttl / 3` seconds with their count
  and a digest of them (an XOR of a hash per member, kept up to date as members come and go). A
  process not heard of for `ttl` seconds died: its members leave (each process tells its own
  subscribers). A process asks for everyone's members (`hello`) on its first join or query, so one
  that only publishes sends nothing, and a digest that
  differs from the replica's (a control message lost while a connection was down) asks that
  process again (`sync`); the answer (`state`, in parts of `STATE_PART` members) replaces the
  replica without join or leave events.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from .errors import ChannelError
from .event import Event

logger = logging.getLogger(__name__)

KINDS = frozenset({"join", "leave", "alive", "hello", "sync", "state"})
STATE_PART = 500  # members per `state` message
DEFAULT_TTL = 30.0
GREETING_SECONDS = 0.3  # a first query waits this long for the other processes' members


@dataclass(frozen=True, slots=True)
class Member:
    """One subscriber as presence shows it."""

    client_id: str
    user: str | None = None
    transport: str = "library"
    connected_at: float = field(default_factory=time.time)

    def to_json(self) -> list[Any]:
        return [self.client_id, self.user, self.transport, self.connected_at]

    @classmethod
    def from_json(cls, fields: list[Any]) -> Member:
        client_id, user, transport, connected_at = fields
        return cls(str(client_id), user, str(transport), float(connected_at))


def new_member(user: str | None = None, transport: str = "library") -> Member:
    return Member(uuid.uuid4().hex, user, transport)


class PresenceEvent(Event):
    """`join` or `leave` of a member on a channel: no id, no SSE `id:` line, never stored."""

    __slots__ = ()

    def __init__(self, kind: str, channel: str, member: Member) -> None:
        data = orjson.dumps(
            {
                "channel": channel,
                "client_id": member.client_id,
                "user": member.user,
                "transport": member.transport,
            }
        )
        super().__init__(channel, "", data, kind, time.time())

    def envelope(self) -> bytes:
        return self.raw

    def sse_frame(self) -> bytes:
        if self._frame is None:
            self._frame = b"event: " + self.event.encode() + b"\ndata: " + self.raw + b"\n\n"
        return self._frame


Key = tuple[str, str]  # (channel, client_id)


def _hash(channel: str, client_id: str) -> int:
    digest = hashlib.blake2b(f"{channel}\0{client_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass
class _Node:
    """What is known of one process: its members, and when it was last heard of."""

    seen: float
    members: dict[Key, Member] = field(default_factory=dict)
    digest: int = 0
    incoming: dict[Key, Member] | None = None  # a `state` arriving in parts

    def add(self, key: Key, member: Member) -> None:
        if key not in self.members:
            self.digest ^= _hash(*key)
        self.members[key] = member

    def discard(self, key: Key) -> Member | None:
        member = self.members.pop(key, None)
        if member is not None:
            self.digest ^= _hash(*key)
        return member


class Presence:
    """The presence of one `Channel`: its own members, the replica of the others', the events."""

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        notify: Callable[[str, PresenceEvent], None],
        ttl: float = DEFAULT_TTL,
    ) -> None:
        """`send` broadcasts a control message; `notify(channel, event)` hands an event to the
        local subscriptions of `channel` that asked for presence events."""
        self.node = uuid.uuid4().hex
        self.ttl = ttl
        self._send = send
        self._notify = notify
        self.local = _Node(seen=0.0)
        self.others: dict[str, _Node] = {}
        self.heartbeats = 0  # `alive` messages sent
        self._greeted = False  # `hello` was sent
        self._outbox: list[bytes] = []
        self._pending: anyio.Event | None = None  # set when `_outbox` has messages
        self._sending = False  # the sender task is sending a batch of `_outbox`
        self._sent = anyio.Event()  # set (and replaced) when the sender emptied `_outbox`

    # -- this process's members ------------------------------------------------------------------

    def join(self, channel: str, member: Member) -> None:
        self.greet()
        self.local.add((channel, member.client_id), member)
        self._tell("join", c=channel, m=member.to_json())

    def greet(self) -> None:
        """Ask the other processes for their members, once: on the first join or query, so a
        `Channel` that only publishes sends no presence messages."""
        if not self._greeted:
            self._greeted = True
            self._tell("hello")

    async def query(self, channel: str) -> list[Member]:
        """`members`, after the replies to this process's `hello` had `GREETING_SECONDS`."""
        if not self._greeted:
            self.greet()
            await anyio.sleep(GREETING_SECONDS)
        return self.members(channel)

    def leave(self, channel: str, member: Member) -> None:
        if self.local.discard((channel, member.client_id)) is not None:
            self._tell("leave", c=channel, m=member.to_json())

    def members(self, channel: str) -> list[Member]:
        """Every member of `channel` in every process, oldest first."""
        found = [m for (c, _), m in self.local.members.items() if c == channel]
        for node in self.others.values():
            found += [m for (c, _), m in node.members.items() if c == channel]
        return sorted(found, key=lambda member: member.connected_at)

    def _tell(self, kind: str, **fields: Any) -> None:
        """Queue a message for the sender task: a subscriber never waits on the broker for its
        presence, and every message leaves in the order it was told."""
        self._queue(self._message(kind, **fields))

    def _message(self, kind: str, **fields: Any) -> bytes:
        return orjson.dumps({"k": kind, "n": self.node, **fields})

    async def _broadcast(self, message: bytes) -> None:
        try:
            await self._send(message)
        except ChannelError as exc:  # the next heartbeat's digest makes the others ask again
            logger.warning("a presence message was not sent: %s", exc.detail)

    # -- liveness --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Send heartbeats and answers, and expire silent processes, until cancelled."""
        self._pending = anyio.Event()
        if self._outbox:
            self._pending.set()  # told before the task ran
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._send_queued)
            await self._beat()

    async def _beat(self) -> None:
        while True:
            await anyio.sleep(self.ttl / 3)
            if self.local.members:  # a process without members need not be known to be alive
                self._tell("alive", d=self.local.digest, s=len(self.local.members))
                self.heartbeats += 1
            self.expire()

    def expire(self) -> None:
        deadline = time.monotonic() - self.ttl
        for name, node in list(self.others.items()):
            if node.seen < deadline:
                del self.others[name]
                for (channel, _), member in node.members.items():
                    self._notify(channel, PresenceEvent("leave", channel, member))

    # -- control messages ------------------------------------------------------------------------

    def receive(self, kind: str, fields: dict[str, Any]) -> None:
        try:
            self._receive(kind, fields)
        except (KeyError, TypeError, ValueError):
            logger.warning("ignoring a presence message this gateway did not write")

    def _receive(self, kind: str, fields: dict[str, Any]) -> None:
        sender = str(fields["n"])
        own = sender == self.node
        if kind in ("join", "leave"):
            channel, member = str(fields["c"]), Member.from_json(fields["m"])
            if not own:
                node = self._node(sender)
                key = (channel, member.client_id)
                node.add(key, member) if kind == "join" else node.discard(key)
            self._notify(channel, PresenceEvent(kind, channel, member))
            return
        if own:
            return
        if kind == "hello" or (kind == "sync" and fields["to"] == self.node):
            self._send_state()
        elif kind == "alive":
            node = self._node(sender)
            if node.incoming is None and (
                node.digest != int(fields["d"]) or len(node.members) != int(fields["s"])
            ):
                self._ask(sender)
        elif kind == "state":
            node = self._node(sender)
            if fields["p"] == 0:
                node.incoming = {}
            if node.incoming is not None:
                for channel, *member in fields["m"]:
                    parsed = Member.from_json(member)
                    node.incoming[(str(channel), parsed.client_id)] = parsed
                if fields["last"]:
                    node.members, node.incoming, node.digest = node.incoming, None, 0
                    for key in node.members:
                        node.digest ^= _hash(*key)

    def _node(self, name: str) -> _Node:
        node = self.others.get(name)
        if node is None:
            node = self.others[name] = _Node(seen=time.monotonic())
        node.seen = time.monotonic()
        return node

    def _ask(self, node: str) -> None:
        self._queue(self._message("sync", to=node))

    def _send_state(self) -> None:
        entries = [[channel, *m.to_json()] for (channel, _), m in self.local.members.items()]
        parts = [entries[i : i + STATE_PART] for i in range(0, len(entries), STATE_PART)] or [[]]
        for number, part in enumerate(parts):
            self._queue(self._message("state", p=number, last=number == len(parts) - 1, m=part))

    def _queue(self, message: bytes) -> None:
        """Answers to other processes, sent in order by `_send_queued` (never from a callback)."""
        self._outbox.append(message)
        if self._pending is not None:
            self._pending.set()

    async def _send_queued(self) -> None:
        while True:
            assert self._pending is not None
            await self._pending.wait()
            self._pending = anyio.Event()
            outbox, self._outbox = self._outbox, []
            self._sending = True
            for message in outbox:
                await self._broadcast(message)
            self._sending = False
            if not self._outbox:
                self._sent.set()
                self._sent = anyio.Event()

    async def drain(self, within: float) -> None:
        """Wait (at most `within` seconds) until what was told is sent: a closing `Channel`'s
        leaves reach the other processes before it goes."""
        with anyio.move_on_after(within):
            while self._outbox or self._sending:
                await self._sent.wait()
