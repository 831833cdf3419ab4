"""Consumer groups on NATS JetStream: one durable pull consumer per channel and group.

Design decisions:

- JetStream keeps the state: what the group has been delivered, what is unacknowledged, how often
  each message was delivered. A gateway restart loses nothing, and any process of the gateway
  serves the group. The durable consumer's name is derived from channel and group (a hash, since
  channel names hold dots, which consumer names cannot); it lives in the layer's stream.
- The core's pump pulls (`group_read`, `group_claim`) with no-wait pull requests, as many messages
  as the consumer's backlog has room for. JetStream itself redelivers a message whose `ack_wait`
  passed, so `ack_wait` follows the core's ack timeout (the `min_idle` of its claims) and the
  consumer never stops redelivering (`max_deliver` unlimited): the core dead-letters past
  `max_deliveries` to `<channel>.dead`, as on every layer. A pull returns new and redelivered
  messages together; the first go out through `group_read`, the others through `group_claim`
  (where the core counts and dead-letters them), each kept for the other call meanwhile.
- Acks: a message pulled by this process is acked through its own reply subject and reported as
  acked. An id delivered by another process (an HTTP ack behind a load balancer) is acked by its
  stream sequence and reported as acked when it is on the channel, past the consumer's ack floor
  and already delivered: JetStream does not say whether a single sequence is still pending.
- Releasing (graceful shutdown) naks the consumer's messages held here, which JetStream redelivers
  at the next pull of any process.
- Nacks and extends of messages held here go through their reply subjects (`-NAK`, `+WPI`); of
  others by stream sequence, as acks. Acks, nacks, extends and deletions are announced on a core
  NATS subject (`notices_subject`), so the pumps of every process settle their in-flight counts.
  A group is deleted with its durable consumer; a pump elsewhere that pulls before the notice
  reaches it finds the consumer gone and creates it afresh (from new messages), then ends.
- The consumers listed by `group_info` are those that joined through this process since it
  started: JetStream knows pull requests, not who sent them.
"""

from __future__ import annotations

import hashlib
import time
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ._nats import REQUEST_TIMEOUT, JetStreamConnection, NoSuchConsumer, decode, parse_id
from .base import ConsumerInfo, GroupInfo, GroupNotice, Sink
from .errors import UnknownGroup
from .event import Event

DEFAULT_ACK_WAIT = 30.0  # until the core's first claim tells the real ack timeout


@dataclass
class _Held:
    """A message this process pulled for a group and has not seen acked."""

    msg: Msg
    consumer: str
    pulled_at: float


@dataclass
class _Group:
    """What this process knows of one group: its consumers, held messages and pulled extras."""

    durable: str
    consumers: dict[str, float] = field(default_factory=dict)  # name -> last pull (monotonic)
    held: dict[str, _Held] = field(default_factory=dict)  # id -> message
    new: list[Msg] = field(default_factory=list)  # first deliveries pulled by a claim
    redelivered: list[Msg] = field(default_factory=list)  # redeliveries pulled by a read
    ack_wait: float | None = None


class JetStreamGroups(JetStreamConnection):
    """The consumer-group half of `NatsJetStreamLayer`."""

    _sink: Sink | None

    def __init__(self) -> None:
        super().__init__()
        self._groups: dict[tuple[str, str], _Group] = {}

    @property
    def notices_subject(self) -> str:
        """Where the processes of this stream tell each other of their groups (core NATS, not
        in the stream)."""
        return f"_gateway.{self.stream}.groups"

    # -- provided by the layer -------------------------------------------------------------------

    @abstractmethod
    async def pull(self, consumer: str, batch: int) -> list[Msg]: ...

    # -- joining ---------------------------------------------------------------------------------

    def _group(self, channel: str, group: str) -> _Group:
        key = (channel, group)
        state = self._groups.get(key)
        if state is None:
            digest = hashlib.sha256(f"{channel}\n{group}".encode()).hexdigest()[:32]
            state = self._groups[key] = _Group(durable=f"group_{digest}")
        return state

    async def group_join(
        self, channel: str, group: str, consumer: str, *, start: str | None = None
    ) -> None:
        state = self._group(channel, group)
        await self._create(channel, group, state, start=start)
        state.consumers[consumer] = time.monotonic()

    async def _create(
        self, channel: str, group: str, state: _Group, *, start: str | None = None
    ) -> None:
        policy, first = DeliverPolicy.NEW, None
        if start is not None:
            after = parse_id(start) if start != "earliest" else None
            policy, first = (
                (DeliverPolicy.BY_START_SEQUENCE, after + 1) if after else (DeliverPolicy.ALL, None)
            )
        js = self._jetstream()
        with self.unavailable():
            try:
                await js.consumer_info(self.stream, state.durable)
                return
            except nats.js.errors.NotFoundError:
                pass
            await js.add_consumer(
                self.stream,
                ConsumerConfig(
                    durable_name=state.durable,
                    description=f"channels-gateway group {group!r} on channel {channel!r}",
                    filter_subject=self.subject(channel),
                    deliver_policy=policy,
                    opt_start_seq=first,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=state.ack_wait or DEFAULT_ACK_WAIT,
                    max_deliver=-1,
                    max_ack_pending=-1,
                ),
            )

    async def group_leave(
        self, channel: str, group: str, consumer: str, *, forget: bool = False
    ) -> None:
        """The durable consumer stays, with its unacknowledged messages; a named consumer stays
        listed (with its idle time), as on Redis Streams, and one the core named for a single
        connection (`forget`) is no longer listed."""
        if forget:
            state = self._groups.get((channel, group))
            if state is not None:
                state.consumers.pop(consumer, None)

    async def group_release(self, channel: str, group: str, consumer: str) -> None:
        state = self._group(channel, group)
        mine = [id for id, held in state.held.items() if held.consumer == consumer]
        nc = self._client()
        with self.unavailable():
            for id in mine:
                await nc.publish(state.held.pop(id).msg.reply, b"-NAK")
            await nc.flush(timeout=int(REQUEST_TIMEOUT))
        if mine and self._sink is not None:
            self._sink.wake(channel, released=True)

    # -- pulling ---------------------------------------------------------------------------------

    async def group_read(self, channel: str, group: str, consumer: str, count: int) -> list[Event]:
        state = self._group(channel, group)
        taken, state.new = state.new[:count], state.new[count:]
        if len(taken) < count:
            for msg in await self._pull(channel, group, state, count - len(taken)):
                (taken if msg.metadata.num_delivered == 1 else state.redelivered).append(msg)
            if state.redelivered and self._sink is not None:
                self._sink.wake(channel, released=True)  # the pump claims them next
        return await self._hand_out(state, group, consumer, taken)

    async def group_claim(
        self, channel: str, group: str, consumer: str, min_idle: float, count: int
    ) -> list[Event]:
        state = self._group(channel, group)
        if state.ack_wait != min_idle:
            await self._set_ack_wait(channel, group, state, min_idle)
        taken, state.redelivered = state.redelivered[:count], state.redelivered[count:]
        if len(taken) < count:
            for msg in await self._pull(channel, group, state, count - len(taken)):
                (taken if msg.metadata.num_delivered > 1 else state.new).append(msg)
        return await self._hand_out(state, group, consumer, taken)

    async def _set_ack_wait(self, channel: str, group: str, state: _Group, ack_wait: float) -> None:
        js = self._jetstream()
        with self.unavailable():
            try:
                info = await js.consumer_info(self.stream, state.durable)
            except nats.js.errors.NotFoundError:
                state.ack_wait = ack_wait
                await self._create(channel, group, state)
                return
            config = info.config
            if config.ack_wait != ack_wait:
                config.ack_wait = ack_wait
                await js.add_consumer(self.stream, config)
        state.ack_wait = ack_wait

    async def _pull(self, channel: str, group: str, state: _Group, count: int) -> list[Msg]:
        try:
            return await self.pull(state.durable, count)
        except NoSuchConsumer:
            # Deleted, or lost with a server's storage: start it again from new messages.
            await self._create(channel, group, state)
            return []

    async def _hand_out(
        self, state: _Group, group: str, consumer: str, msgs: list[Msg]
    ) -> list[Event]:
        now = time.monotonic()
        state.consumers[consumer] = now
        self._forget_stale(state, now)
        events = []
        for msg in sorted(msgs, key=lambda m: m.metadata.sequence.stream):
            seq = msg.metadata.sequence.stream
            event = decode(seq, msg)
            if event is None:
                with self.unavailable():
                    await self._client().publish(msg.reply, b"+TERM")  # never redeliver it
                continue
            state.held[event.id] = _Held(msg, consumer, now)
            events.append(event.redelivered(group, msg.metadata.num_delivered))
        return events

    @staticmethod
    def _forget_stale(state: _Group, now: float) -> None:
        """Held messages long past their ack wait were redelivered elsewhere: an ack for them
        goes by sequence, like one for a message another process delivered."""
        horizon = now - 2 * (state.ack_wait or DEFAULT_ACK_WAIT) - 60
        for id in [id for id, held in state.held.items() if held.pulled_at < horizon]:
            del state.held[id]

    # -- acknowledging ---------------------------------------------------------------------------

    async def group_ack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        return await self._reply(channel, group, ids, b"+ACK")

    async def group_nack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        nacked = await self._reply(channel, group, ids, b"-NAK")
        if nacked and self._sink is not None:
            self._sink.wake(channel, released=True)
        return nacked

    async def group_extend(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        extended = await self._reply(channel, group, ids, b"+WPI", keep=True)
        state = self._group(channel, group)
        now = time.monotonic()
        for id in extended:
            if (held := state.held.get(id)) is not None:
                held.pulled_at = now
        return extended

    async def group_delete(self, channel: str, group: str) -> None:
        state = self._group(channel, group)
        with self.unavailable():
            try:
                await self._jetstream().delete_consumer(self.stream, state.durable)
            except nats.js.errors.NotFoundError:
                raise UnknownGroup.named(channel, group) from None
            finally:
                self._groups.pop((channel, group), None)

    async def group_notify(self, notice: GroupNotice) -> None:
        nc = self._client()
        with self.unavailable():
            for text in notice.encode():
                await nc.publish(self.notices_subject, text.encode())

    async def _on_notice(self, msg: Msg) -> None:
        notice = GroupNotice.decode(msg.data)
        if notice is not None and self._sink is not None:
            self._sink.group_notice(notice)

    async def _reply(
        self, channel: str, group: str, ids: Sequence[str], reply: bytes, *, keep: bool = False
    ) -> list[str]:
        """Ack, nak or extend (`reply`) the messages of `ids`; those it reached."""
        state = self._group(channel, group)
        nc = self._client()
        done: set[str] = set()
        elsewhere: list[int] = []
        with self.unavailable():
            for id in ids:
                held = state.held.get(id) if keep else state.held.pop(id, None)
                if held is not None:
                    await nc.request(held.msg.reply, reply, timeout=REQUEST_TIMEOUT)
                    done.add(id)
                elif (sequence := parse_id(id)) is not None:
                    elsewhere.append(sequence)
            if elsewhere:
                done.update(
                    str(seq)
                    for seq in await self._ack_by_sequence(channel, state, elsewhere, reply)
                )
        return [id for id in dict.fromkeys(ids) if id in done]

    async def _ack_by_sequence(
        self, channel: str, state: _Group, seqs: list[int], reply: bytes
    ) -> list[int]:
        js, nc = self._jetstream(), self._client()
        try:
            info = await js.consumer_info(self.stream, state.durable)
        except nats.js.errors.NotFoundError:
            return []
        floor, delivered = info.ack_floor, info.delivered
        low = floor.stream_seq if floor and floor.stream_seq else 0
        high = delivered.stream_seq if delivered and delivered.stream_seq else 0
        acked = []
        for seq in seqs:
            if not low < seq <= high:
                continue
            try:
                stored = await js.get_msg(self.stream, seq=seq)
            except nats.js.errors.NotFoundError:
                continue
            if stored.subject != self.subject(channel):
                continue
            # The ack subject names the sequence; JetStream takes the delivery details from its
            # pending record, and a consumer sequence of 0 leaves its ack floor alone if the
            # message was no longer pending.
            await nc.request(
                f"$JS.ACK.{self.stream}.{state.durable}.1.{seq}.0.0.0",
                reply,
                timeout=REQUEST_TIMEOUT,
            )
            acked.append(seq)
        return acked

    async def group_info(self, channel: str, group: str) -> GroupInfo:
        state = self._group(channel, group)
        js = self._jetstream()
        with self.unavailable():
            try:
                info = await js.consumer_info(self.stream, state.durable)
            except nats.js.errors.NotFoundError:
                if not state.consumers:
                    self._groups.pop((channel, group), None)
                raise UnknownGroup(
                    f"no group {group!r} on channel {channel!r}; subscribe with ?group= to "
                    "create it"
                ) from None
            pending = info.num_ack_pending or 0
            oldest = None
            if pending:
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                try:
                    oldest = await js.get_msg(
                        self.stream, seq=(floor or 0) + 1, subject=self.subject(channel), next=True
                    )
                except nats.js.errors.NotFoundError:
                    oldest = None
        now = time.monotonic()
        held_by: dict[str, int] = {}
        for held in state.held.values():
            held_by[held.consumer] = held_by.get(held.consumer, 0) + 1
        return GroupInfo(
            channel=channel,
            group=group,
            pending=pending,
            consumers=[
                ConsumerInfo(name, held_by.get(name, 0), round(now - seen, 3))
                for name, seen in sorted(state.consumers.items())
            ],
            oldest_unacked_id=str(oldest.seq) if oldest is not None else None,
            oldest_unacked_age_seconds=(
                round(max(0.0, time.time() - _epoch(oldest.time)), 3)
                if oldest is not None and oldest.time
                else None
            ),
        )


def _epoch(timestamp: object) -> float:
    """A stored message's time (RFC 3339 from the API) as epoch seconds."""
    from datetime import datetime

    text = str(timestamp)
    if "." in text:  # nanoseconds: Python parses at most microseconds
        head, _, tail = text.partition(".")
        digits = "".join(c for c in tail if c.isdigit())
        zone = tail[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
