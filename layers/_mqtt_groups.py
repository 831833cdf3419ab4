"""MQTT consumer groups: a persistent session per (channel, group) in each process.

See `layers.mqtt` for the design: shared subscriptions (`$share/<group>/<topic>`), each message
of a packed PUBLISH a pending entry of its own, the packet's PUBACK sent by hand once all of them
are acked and in the order MQTT requires, and group state kept in this process in a
`layers._pending.PendingTable`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


class _Packet:
    """A PUBLISH the session received: its messages are pending entries, each acked on its own,
    and its PUBACK waits until every one of them is."""

    __slots__ = ("key", "unacked")

    def __init__(self, key: str, unacked: int) -> None:
        self.key = key  # the id of its first message: the same in a resent copy
        self.unacked = unacked


@dataclass
class _Entry(PendingEntry):
    packet: _Packet = field(kw_only=True)  # the PUBLISH that brought it


class GroupSession(PendingTable[_Entry]):
    """One consumer group on one channel in this process: a persistent session and its messages."""

    def __init__(self, layer: MQTTGroups, channel: str, group: str) -> None:
        super().__init__(channel, group)
        self.layer = layer
        self.client_id = layer._group_client_id(channel, group)
        self.filter = f"$share/{group}/{topic_for(layer.topic_prefix, channel)}"
        self.fresh: OrderedDict[str, _Entry] = OrderedDict()  # received, not handed out yet
        # Packets with unacked messages, by key; they outlive a connection, as their entries do.
        self.packets: dict[str, _Packet] = {}
        # Packet ids of this connection in the order their PUBLISHes arrived -> their packets
        # (None: nothing to wait for).
        self.receipts: OrderedDict[int, _Packet | None] = OrderedDict()
        # Keys of acked packets whose PUBACK may not have reached the broker: PUBACKed again if
        # resent.
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
            # PUBACK for, and `_on_message` matches those to their packets by key.
            self.connected = False
            self._paho = None
            self.receipts.clear()

    def _on_message(self, client: PahoClient, userdata: Any, message: MQTTMessage) -> None:
        mid = message.mid if message.qos > 0 else None
        events = decode_payload(message.payload, message.properties)
        if events is None:
            logger.warning("dropping a message on %s that no gateway published", message.topic)
            self._received(mid, None)
            return
        key = events[0].id
        packet = self.packets.get(key)
        if packet is None and key not in self.acked:
            packet = self.packets[key] = _Packet(key, len(events))
            # A resent message counts as delivered once before (MQTT only says DUP, not how often).
            deliveries = 1 if message.dup else 0
            for event in events:
                self.fresh[event.id] = _Entry(event, deliveries=deliveries, packet=packet)
            if self.layer._sink is not None:
                self.layer._sink.wake(self.channel)
        # else resent: its unacked messages are still held here, its acked ones are not again
        self._received(mid, packet)

    def _received(self, mid: int | None, packet: _Packet | None) -> None:
        if mid is not None:
            self.receipts[mid] = packet
            self._send_pubacks()

    def _send_pubacks(self) -> None:
        """Send every PUBACK whose packet is acked and no longer behind an unacked one."""
        while self.receipts:
            first, packet = next(iter(self.receipts.items()))
            if packet is not None and packet.unacked:
                break
            del self.receipts[first]
            if self._paho is not None:
                self._paho.ack(first, 1)

    def read(self, consumer: str, count: int) -> list[Event]:
        fresh = [self.fresh.popitem(last=False)[1] for _ in range(min(count, len(self.fresh)))]
        return self.hand_out(fresh, consumer)

    def acknowledge(self, ids: Sequence[str]) -> list[str]:
        """Ack group messages; a packet's PUBACK goes once all its messages are acked, as MQTT's
        order allows."""
        acked = self.ack(ids)
        for entry in acked:
            packet = entry.packet
            packet.unacked -= 1
            if not packet.unacked:
                del self.packets[packet.key]
                self.acked.add(packet.key)
                self._send_pubacks()
        return [entry.event.id for entry in acked]
