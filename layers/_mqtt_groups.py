"""MQTT consumer groups: a persistent session per (channel, group) in each process.

See `layers.mqtt` for the design: shared subscriptions (`$share/<group>/<topic>`), PUBACKs sent
by hand once a message is acked and in the order MQTT requires, and group state kept in this
process in a `layers._pending.PendingTable`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.client import MQTTMessage

from ._mqtt import RECEIVE_MAXIMUM, MQTTConnections, RecentIds, decode_payload, topic_for
from ._pending import PendingEntry, PendingTable
from .base import GroupInfo
from .errors import UnknownGroup
from .event import Event

logger = logging.getLogger("layers.mqtt")

_MAX_CLIENT_ID = 128  # brokers may refuse longer ids; longer ones are shortened with a hash


class MQTTGroups(MQTTConnections):
    """The consumer-group half of `MQTTLayer`."""

    client_id_prefix: str
    instance_name: str
    _groups: dict[tuple[str, str], GroupSession]
    _groups_lock: anyio.Lock

    def _group_client_id(self, channel: str, group: str) -> str:
        identifier = f"{self.client_id_prefix}{self.instance_name}|{group}|{channel}"
        if len(identifier.encode()) > _MAX_CLIENT_ID:
            digest = hashlib.sha256(f"{group}|{channel}".encode()).hexdigest()[:32]
            identifier = f"{self.client_id_prefix}{self.instance_name}|{digest}"
        return identifier

    def _group(self, channel: str, group: str) -> GroupSession:
        try:
            return self._groups[channel, group]
        except KeyError:
            raise UnknownGroup.named(
                channel, group, scope=" in this process (MQTT groups are kept per process)"
            ) from None

    async def group_join(
        self, channel: str, group: str, consumer: str, *, start: str | None = None
    ) -> None:
        if start is not None:
            raise self._lacks("history")  # a shared subscription starts at new messages
        async with self._groups_lock:
            session = self._groups.get((channel, group))
            if session is None:
                if self._tasks is None:
                    raise self._unavailable("is not connected (the layer is not running)")
                session = GroupSession(self, channel, group)
                await self._tasks.start(session.run)  # returns after the SUBACK
                self._groups[channel, group] = session
        session.seen(consumer)

    async def group_leave(
        self, channel: str, group: str, consumer: str, *, forget: bool = False
    ) -> None:
        session = self._groups.get((channel, group))
        if session is not None:
            session.leave(consumer, forget=forget)

    async def group_release(self, channel: str, group: str, consumer: str) -> None:
        """Let this process's other consumers claim the consumer's unacked messages now.

        Other processes cannot take them: the broker sent them to this instance's session.
        """
        session = self._groups.get((channel, group))
        if session is not None:
            session.release(consumer)
            if self._sink is not None:
                self._sink.wake(channel, released=True)

    async def group_read(self, channel: str, group: str, consumer: str, count: int) -> list[Event]:
        return self._group(channel, group).read(consumer, count)

    async def group_claim(
        self, channel: str, group: str, consumer: str, min_idle: float, count: int
    ) -> list[Event]:
        return self._group(channel, group).claim(consumer, min_idle, count)

    async def group_ack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        return self._group(channel, group).acknowledge(ids)

    async def group_nack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        nacked = self._group(channel, group).nack(ids)
        if nacked and self._sink is not None:
            self._sink.wake(channel, released=True)
        return nacked

    async def group_extend(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        return self._group(channel, group).extend(ids)

    async def group_delete(self, channel: str, group: str) -> None:
        """This process's session of the group ends and the broker discards it (a clean start),
        with the messages it held; other processes' sessions are theirs (groups are kept per
        process)."""
        async with self._groups_lock:
            session = self._group(channel, group)
            del self._groups[channel, group]
            await session.discard()

    async def group_info(self, channel: str, group: str) -> GroupInfo:
        return self._group(channel, group).info()


@dataclass
class _Entry(PendingEntry):
    # The packet id on the current connection; None once that connection is gone.
    mid: int | None = None


class GroupSession(PendingTable[_Entry]):
    """One consumer group on one channel in this process: a persistent session and its messages."""

    def __init__(self, layer: MQTTGroups, channel: str, group: str) -> None:
        super().__init__(channel, group)
        self.layer = layer
        self.client_id = layer._group_client_id(channel, group)
        self.filter = f"$share/{group}/{topic_for(layer.topic_prefix, channel)}"
        self.fresh: OrderedDict[str, _Entry] = OrderedDict()  # received, not handed out yet
        # Packet ids of this connection in the order their PUBLISHes arrived -> acked yet.
        self.receipts: OrderedDict[int, bool] = OrderedDict()
        # Acked ids whose PUBACK may not have reached the broker: PUBACKed again if resent.
        self.acked = RecentIds(2 * RECEIVE_MAXIMUM)
        self._paho: PahoClient | None = None
        self.connected = False
        self._scope = anyio.CancelScope()
        self._stopped = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Connected until the layer stops or `discard`; the first connection's failure is the
        joiner's."""
        supervisor = self.layer._supervisor(f"group {self.group} on {self.channel}", groups=True)
        try:
            with self._scope:
                await supervisor.run(self._connect, task_status=task_status, fail_fast=True)
        finally:
            self._stopped.set()

    async def discard(self) -> None:
        """Disconnect, then connect once with a clean start: the broker drops the session."""
        self._scope.cancel()
        await self._stopped.wait()
        client = self.layer._new_client(self.client_id, lambda *_: None, persistent=False)
        async with self.layer._connection(client):
            pass

    async def _connect(self, ready: Callable[[], None]) -> None:
        client = self.layer._new_client(self.client_id, self._on_message, persistent=True)
        self._paho = client._client  # the broker resends right after CONNACK
        try:
            async with self.layer._connection(client):
                await self.layer._subscribe_filters(client, [self.filter])
                self.connected = True
                self.layer._connected(ready)
                await self.layer._until_disconnected(client)
        finally:
            # Packet ids die with the connection; the broker resends what it has not had a
            # PUBACK for, and `_on_message` matches those to the entries by id.
            self.connected = False
            self._paho = None
            self.receipts.clear()
            for entry in itertools.chain(self.fresh.values(), self.pending.values()):
                entry.mid = None

    def _on_message(self, client: PahoClient, userdata: Any, message: MQTTMessage) -> None:
        mid = message.mid if message.qos > 0 else None
        if mid is not None:
            self.receipts[mid] = False
        event = decode_payload(message.payload)
        if event is None:
            logger.warning("dropping a message on %s that no gateway published", message.topic)
            self._acknowledge(mid)
            return
        if event.id in self.acked:
            self._acknowledge(mid)
            return
        held = self.pending.get(event.id) or self.fresh.get(event.id)
        if held is not None:
            held.mid = mid
            return
        # A resent message counts as delivered once before (MQTT only says DUP, not how often).
        self.fresh[event.id] = _Entry(event, deliveries=1 if message.dup else 0, mid=mid)
        if self.layer._sink is not None:
            self.layer._sink.wake(self.channel)

    def _acknowledge(self, mid: int | None) -> None:
        """Mark a packet acked and send every PUBACK that is no longer behind an unacked one."""
        if mid is None or mid not in self.receipts:
            return
        self.receipts[mid] = True
        while self.receipts:
            first, done = next(iter(self.receipts.items()))
            if not done:
                break
            del self.receipts[first]
            if self._paho is not None:
                self._paho.ack(first, 1)

    def read(self, consumer: str, count: int) -> list[Event]:
        fresh = [self.fresh.popitem(last=False)[1] for _ in range(min(count, len(self.fresh)))]
        return self.hand_out(fresh, consumer)

    def acknowledge(self, ids: Sequence[str]) -> list[str]:
        """Ack group messages; their PUBACKs go out as MQTT's order allows."""
        acked = self.ack(ids)
        for entry in acked:
            self.acked.add(entry.event.id)
            self._acknowledge(entry.mid)
        return [entry.event.id for entry in acked]
