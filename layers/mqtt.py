"""`mqtt://` and `mqtts://`: MQTT 5 through aiomqtt, QoS 1, consumer groups on persistent sessions.

Design decisions:

- Topics. Channel `a.b.c` is topic `<topic_prefix>a/b/c`. Channel names hold only letters, digits
  and `_ - : @ .`, so MQTT's reserved `+ # /`, a leading `$` and NUL never occur in a segment:
  the mapping is injective and needs no escaping. `topic_for` refuses anything else by name.
- Patterns. A glob's `*` may span dots, so topic levels, which MQTT's `+` cannot. A pattern is
  subscribed as its narrowest superset filter (the segments before the first one holding a
  wildcard, then `#`) and filtered exactly here with `names.compile_pattern`, so the core only
  sees messages a local subscription wants.
- Ids. MQTT has no server-side ids, so the publishing layer assigns `<epoch>-<sequence>`: the epoch
  is unique per layer instance and the sequence counts up, so ids are unique, and ordered per
  channel for each publishing process (not across publishers).
- Payloads. A PUBLISH carrying one message has the payload `<id>\\n<wire blob>`. A batch's run of
  consecutive messages on one topic goes as one packed PUBLISH (`_mqtt.encode_packets`): its
  MQTT 5 ContentType is `_mqtt.PACKED`, so it is never taken for one message, and its payload
  frames each message's id and wire blob with their lengths. A packet holds at most
  `MAX_PACKED_MESSAGES` messages and `MAX_PACKED_BYTES` of payload (a larger message goes alone);
  runs are cut at each change of topic, not regrouped, so ids stay in publish order across
  channels. Listener and group sessions read both forms through one decoder (`decode_payload`).
- One delivery per message. Mosquitto sends a copy for every matching subscription (a channel and
  an overlapping pattern filter); the listener drops an id it has just delivered, message by
  message within a packet.
- Control messages (`ChannelLayer.broadcast`) go at QoS 1 to `<topic_prefix>.broadcast`, which the
  listener always subscribes to: a level holding a dot is no channel's, and the copies a `#`
  filter of a pattern subscription brings are recognised by topic (and their ids deduplicated).
- Publishing waits for the broker's PUBACK, bounded by `timeout`. The listener connection (clean
  session) also publishes; while it is down, publishing fails at once with `LayerUnavailable`.
  It reconnects (`layers._supervisor`, backoff up to `max_reconnect_delay`), also when the broker
  is down at start-up, and resubscribes everything; messages published while it was away are not
  seen by this process, since nothing keeps history (the core signals a gap).
  A batch (what group commit gathered) goes to paho's `publish` packet by packet, written in
  order, and waits for its PUBACKs with one future (`_mqtt.Pubacks`), not a task and a timer per
  message as aiomqtt's `publish` would; one PUBACK confirms every message of its packet. A batch
  whose connection ends before every PUBACK came fails at once, one whose PUBACKs take longer
  than `timeout` fails then, and a PUBACK with a failure reason code (the broker refused a
  packet) fails it too: never a silent success.
- Consumer groups. Each (channel, group) a process joins gets its own connection: a persistent
  session (clean start off, `session_expiry` seconds) subscribed at QoS 1 to
  `$share/<group>/<topic>`, so several gateway processes share one group's messages. It stays
  connected while the layer runs, so messages arriving while no local consumer listens wait here.
  The broker hands a packed PUBLISH to one session as a whole; each of its messages is a pending
  entry of its own, handed out and acked on its own (as Pulsar's shared subscriptions treat a
  batch). PUBACKs are sent by hand (paho's manual ack): a packet's only once every message of it
  was acked through the group (or dead-lettered by the core). MQTT requires PUBACKs in the order
  the PUBLISHes arrived (MQTT 5.0 section 4.6, [MQTT-4.6.0-2]), so an acked packet behind an
  earlier unacked one is held until that one is acked. The core hands unacked messages out again
  after `ack_timeout` from this process's pending table; after a reconnect the broker resends
  the packets it had no PUBACK for (DUP flag), and a resent packet is matched to the one held
  here by the id of its first message: its unacked messages stay the pending entries they were,
  its acked ones are not handed out again.
- Client ids. A persistent session is found again by its client id:
  `<client_id_prefix><instance>|<group>|<channel>`. `instance` defaults to the host name plus the
  lowest slot number no other process on this host holds (a lock file per slot), so gunicorn
  workers on one host do not take each other's sessions over, and a restarted worker takes a free
  slot and finds its sessions again. Where host names change on restart (Kubernetes Deployments),
  set `instance` (URL query `?instance=`) to a stable name, such as a StatefulSet pod name;
  otherwise the old sessions' messages wait until `session_expiry` ends them.

Limits, with Mosquitto 2.0 as the reference broker:

- Group state (pending messages, consumers, delivery counts) lives in each process: `group_info`
  describes this process's share and raises `UnknownGroup` in a process that never joined.
- Delivery counts survive reconnects but not restarts: a message the broker resends to a restarted
  process counts as delivered once before (MQTT only says DUP, not how often).
- A process's session keeps receiving its share of a group while the process is down (Mosquitto
  deals shared-subscription messages to offline sessions too); they wait for that instance.
- Acks are per process too: an ack must reach the process that delivered the message (a
  WebSocket ack does; HTTP acks behind a load balancer need sticky sessions). Elsewhere the group
  is unknown, or the id is reported unknown.
- The broker has at most `RECEIVE_MAXIMUM` (1000) unPUBACKed PUBLISHes out per session: the
  Receive Maximum a session asks for, which Mosquitto uses for MQTT 5 clients instead of its
  `max_inflight_messages` (20). The window counts packets, so with packing a session may hold
  up to `MAX_PACKED_MESSAGES` times as many messages (bounded in bytes by `MAX_PACKED_BYTES` per
  packet). A message nobody acks holds its packet's PUBACK, and the later ones, back until the
  core dead-letters it.
- A partly acked packet comes back whole to a restarted process (the broker resends it, and the
  acks were this process's): its acked messages are delivered again, as any message acked while
  its PUBACK was held back.
- Each (channel, group) a process joined keeps one connection open while the layer runs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import anyio
import sniffio
from anyio.abc import TaskGroup, TaskStatus
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.client import MQTTMessage

from ._ids import epoch
from ._mqtt import (
    Pubacks,
    RecentIds,
    channel_of,
    decode_payload,
    encode_packets,
    filter_for,
    instance_slot,
    topic_for,
)
from ._mqtt_groups import GroupSession, MQTTGroups
from .base import Capabilities, Sink
from .errors import LayerConfigurationError
from .event import Message
from .names import compile_pattern
from .urls import redact, split_options

logger = logging.getLogger(__name__)

__all__ = ["MQTTLayer", "channel_of", "decode_payload", "encode_packets", "filter_for", "topic_for"]

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
URL_OPTIONS = ("instance", "topic_prefix", "client_id_prefix", "session_expiry")
_PING_FILTER = ".ping"  # no channel maps to a level holding a dot
_BROADCAST_TOPIC = ".broadcast"  # control messages, after the topic prefix


class MQTTLayer(MQTTGroups):
    """Channels as MQTT topics on one broker; see the module docstring for the design."""

    scheme = "mqtt"
    capabilities = Capabilities(cross_process=True, history=False, groups=True)

    def __init__(
        self,
        url: str = "mqtt://127.0.0.1:1883",
        *,
        topic_prefix: str | None = None,
        client_id_prefix: str | None = None,
        instance: str | None = None,
        session_expiry: int | None = None,
        timeout: float = 5.0,
        max_reconnect_delay: float = 2.0,
    ) -> None:
        """`url` is `mqtt[s]://[user:password@]host[:port][?instance=&topic_prefix=&...]`.

        Options missing from the arguments are read from the URL query (the gateway only passes
        the URL): `instance`, `topic_prefix` (default `gw/`), `client_id_prefix` (default `gw-`)
        and `session_expiry` (seconds a group session outlives its connection, default one day).
        """
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS:
            raise LayerConfigurationError(f"not an MQTT URL: {redact(url)!r}; use mqtt://host:1883")
        _, query = split_options(url, URL_OPTIONS)  # MQTT's driver takes no URL options
        try:
            self._port = parts.port or DEFAULT_PORTS[parts.scheme]
            if session_expiry is None:
                session_expiry = int(query.get("session_expiry", 86400))
        except ValueError as exc:
            raise LayerConfigurationError(f"invalid MQTT URL {redact(url)!r}: {exc}") from None
        self._host = parts.hostname or "127.0.0.1"
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._tls_context = ssl.create_default_context() if parts.scheme == "mqtts" else None
        self.address = f"{self._host}:{self._port}"
        prefix = topic_prefix if topic_prefix is not None else query.get("topic_prefix", "gw/")
        if (
            (prefix and not prefix.endswith("/"))
            or prefix.startswith("$")
            or {"+", "#", "\0"}.intersection(prefix)
        ):
            raise LayerConfigurationError(
                f"invalid topic_prefix {prefix!r}: use '' or topic levels ending in '/', "
                "without '+', '#', NUL or a leading '$'"
            )
        self.topic_prefix = prefix
        self.client_id_prefix = (
            client_id_prefix
            if client_id_prefix is not None
            else query.get("client_id_prefix", "gw-")
        )
        self.instance = instance or query.get("instance")
        self.session_expiry = session_expiry
        self.timeout = timeout
        self.max_reconnect_delay = max_reconnect_delay

        self._epoch = f"{epoch()}{secrets.token_hex(2)}"
        self._sequence = itertools.count(1)
        self._sink: Sink | None = None
        self._tasks: TaskGroup | None = None
        self.instance_name = ""  # what this process runs as, once running
        # The listener connection while it is up, and what it is (or should be) subscribed to.
        self._client: aiomqtt.Client | None = None
        self._pubacks: Pubacks | None = None  # publishing on that connection
        self._up = anyio.Event()  # set (and replaced) whenever a connection is up again
        self._lock = anyio.Lock()  # subscription changes and resubscribing take turns
        self._broadcast_topic = prefix + _BROADCAST_TOPIC
        self._filters: Counter[str] = Counter({self._broadcast_topic: 1})  # kept while running
        self._channels: set[str] = set()
        self._patterns: set[str] = set()
        self._recent = RecentIds(4096)
        self._groups: dict[tuple[str, str], GroupSession] = {}
        self._groups_lock = anyio.Lock()

    # -- the listener -----------------------------------------------------------------------------

    async def run(self, sink: Sink, *, task_status: TaskStatus[None]) -> None:
        if sniffio.current_async_library() != "asyncio":
            raise LayerConfigurationError(
                "the mqtt:// layer needs asyncio (its driver, aiomqtt, is asyncio-only)"
            )
        self._sink = sink
        scope = f"{self.address}|{self.client_id_prefix}|{socket.gethostname()}"
        with contextlib.nullcontext(-1) if self.instance else instance_slot(scope) as slot:
            self.instance_name = self.instance or f"{socket.gethostname()}-{slot}"
            fatal: LayerConfigurationError | None = None
            try:
                async with anyio.create_task_group() as tasks:  # group sessions run in here
                    self._tasks = tasks
                    try:
                        await self._supervisor("listener").run(
                            self._listen, task_status=task_status
                        )
                    except LayerConfigurationError as exc:
                        fatal = exc  # raised outside, not wrapped in an ExceptionGroup
            finally:
                self._tasks = None
                self._groups.clear()
                self._sink = None
            if fatal is not None:
                raise fatal

    async def _listen(self, ready: Callable[[], None]) -> None:
        identifier = f"{self.client_id_prefix}{self.instance_name}|live|{secrets.token_hex(4)}"
        client = self._new_client(identifier, self._on_live_message, persistent=False)
        pubacks = Pubacks(client._client, self._unavailable, self.timeout)
        async with self._connection(client):
            try:
                async with self._lock:
                    if self._filters:
                        await self._subscribe_filters(client, list(self._filters))
                    self._client, self._pubacks = client, pubacks
                self._connected(ready)
                await self._until_disconnected(client)
            finally:
                self._client = self._pubacks = None
                pubacks.close(self._unavailable("closed the connection before acknowledging"))

    def _on_live_message(self, client: PahoClient, userdata: Any, message: MQTTMessage) -> None:
        if message.topic == self._broadcast_topic:
            raw_id, _, blob = message.payload.partition(b"\n")
            id = raw_id.decode(errors="replace")
            if self._sink is not None and id not in self._recent:
                self._recent.add(id)
                self._sink.broadcast(bytes(blob))
            return
        channel = channel_of(self.topic_prefix, message.topic)
        if channel is None or self._sink is None:
            return
        if channel not in self._channels and not any(
            compile_pattern(pattern)(channel) for pattern in self._patterns
        ):
            return  # the filter was wider than the pattern, or the subscription just ended
        events = decode_payload(message.payload, message.properties)
        if events is None:
            logger.debug("ignoring a message on %s that no gateway published", message.topic)
            return
        for event in events:
            if event.id not in self._recent:  # else another copy, through an overlapping filter
                self._recent.add(event.id)
                self._sink.deliver(event)

    async def wait_connected(self) -> None:
        """Wait until the listener and every group session are connected (after a broker restart,
        say)."""
        while self._client is None or not all(s.connected for s in self._groups.values()):
            await self._up.wait()

    # -- publish and subscribe --------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        pubacks = self._pubacks
        if pubacks is None:
            raise self._unavailable("is not connected (reconnecting)")
        ids = [f"{self._epoch}-{next(self._sequence)}" for _ in messages]
        await pubacks.publish(encode_packets(self.topic_prefix, ids, messages))
        return ids

    async def broadcast(self, blob: bytes) -> None:
        pubacks = self._pubacks
        if pubacks is None:
            raise self._unavailable("is not connected (reconnecting)")
        payload = f"{self._epoch}-{next(self._sequence)}\n".encode() + blob
        await pubacks.publish([(self._broadcast_topic, payload, None)])

    async def subscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        async with self._lock:
            channels = [c for c in dict.fromkeys(channels) if c not in self._channels]
            patterns = [p for p in dict.fromkeys(patterns) if p not in self._patterns]
            wanted = [topic_for(self.topic_prefix, c) for c in channels]
            wanted += [filter_for(self.topic_prefix, p) for p in patterns]
            new = list(dict.fromkeys(name for name in wanted if self._filters[name] == 0))
            client = self._client
            if client is None:
                raise self._unavailable("is not connected (reconnecting)")
            # Registered before the SUBSCRIBE so that no message after the SUBACK is filtered out.
            self._channels.update(channels)
            self._patterns.update(patterns)
            self._filters.update(wanted)
            try:
                if new:
                    await self._subscribe_filters(client, new)
            except BaseException:
                self._forget(channels, patterns, wanted)
                raise

    async def unsubscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        async with self._lock:
            channels = [c for c in dict.fromkeys(channels) if c in self._channels]
            patterns = [p for p in dict.fromkeys(patterns) if p in self._patterns]
            wanted = [topic_for(self.topic_prefix, c) for c in channels]
            wanted += [filter_for(self.topic_prefix, p) for p in patterns]
            gone = self._forget(channels, patterns, wanted)
            client = self._client
            if gone and client is not None:  # a new connection starts without them anyway
                try:
                    await client.unsubscribe(gone, timeout=self.timeout)
                except aiomqtt.MqttError as exc:
                    raise self._unavailable("did not confirm an unsubscribe", exc) from None

    def _forget(self, channels: list[str], patterns: list[str], filters: list[str]) -> list[str]:
        """Drop local interest; return the filters nothing needs any more."""
        self._channels.difference_update(channels)
        self._patterns.difference_update(patterns)
        self._filters.subtract(filters)
        gone = [name for name in dict.fromkeys(filters) if self._filters[name] <= 0]
        for name in gone:
            del self._filters[name]
        return gone

    async def ping(self) -> None:
        """A round trip to the broker: UNSUBSCRIBE from a filter nobody uses (no side effects)."""
        client = self._client
        if client is None:
            raise self._unavailable("is not connected (reconnecting)")
        try:
            await client.unsubscribe(self.topic_prefix + _PING_FILTER, timeout=self.timeout)
        except aiomqtt.MqttError as exc:
            raise self._unavailable("did not answer", exc) from None
