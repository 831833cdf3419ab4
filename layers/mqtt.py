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
  channel for each publishing process (not across publishers). A payload is `<id>\\n<wire blob>`.
- One delivery per message. Mosquitto sends a copy for every matching subscription (a channel and
  an overlapping pattern filter); the listener drops an id it has just delivered.
- Publishing waits for the broker's PUBACK, bounded by `timeout`. The listener connection (clean
  session) also publishes; while it is down, publishing fails at once with `LayerUnavailable`.
  It reconnects (`layers._supervisor`, backoff up to `max_reconnect_delay`), also when the broker
  is down at start-up, and resubscribes everything; messages published while it was away are not
  seen by this process, since nothing keeps history (the core signals a gap).
- Consumer groups. Each (channel, group) a process joins gets its own connection: a persistent
  session (clean start off, `session_expiry` seconds) subscribed at QoS 1 to
  `$share/<group>/<topic>`, so several gateway processes share one group's messages. It stays
  connected while the layer runs, so messages arriving while no local consumer listens wait here.
  PUBACKs are sent by hand (paho's manual ack), only once the message was acked through the group
  (or dead-lettered by the core). MQTT requires PUBACKs in the order the PUBLISHes arrived
  (MQTT 5.0 section 4.6, [MQTT-4.6.0-2]), so an ack that overtakes an earlier unacked message is
  held until that one is acked. The core hands unacked messages out again after `ack_timeout`
  from this process's pending table; after a reconnect the broker resends what was not PUBACKed
  (DUP flag), and a resent message is matched to the pending table by id instead of being handed
  out twice.
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
- The broker has at most `max_inflight_messages` (Mosquitto: 20) unPUBACKed messages out per
  session; a message nobody acks holds later acks back until the core dead-letters it.
- Each (channel, group) a process joined keeps one connection open while the layer runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import secrets
import socket
import ssl
import tempfile
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import anyio
import sniffio
from anyio.abc import TaskGroup, TaskStatus
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ._ids import epoch
from ._pending import PendingEntry, PendingTable
from ._supervisor import Supervisor
from .base import Capabilities, ChannelLayer, GroupInfo, Sink
from .errors import InvalidArgument, LayerConfigurationError, LayerUnavailable, UnknownGroup
from .event import Event, Message
from .names import compile_pattern, is_pattern
from .urls import redact, split_options

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
URL_OPTIONS = ("instance", "topic_prefix", "client_id_prefix", "session_expiry")
_RESERVED = frozenset("+#/$\0")
_PING_FILTER = ".ping"  # no channel maps to a level holding a dot
_RECEIVE_MAXIMUM = 1000  # group messages a session may hold unacked; the broker may allow fewer
_MAX_CLIENT_ID = 128  # brokers may refuse longer ids; longer ones are shortened with a hash
_KEEPALIVE = 30


# -- topics and payloads --------------------------------------------------------------------------


def topic_for(prefix: str, channel: str) -> str:
    """The MQTT topic of a channel: dots become topic levels."""
    if _RESERVED.intersection(channel):
        raise InvalidArgument(
            f"channel {channel!r} cannot be an MQTT topic: '+', '#', '/', '$' and NUL are "
            "reserved by MQTT; use letters, digits and '_ - : @ .'"
        )
    return prefix + channel.replace(".", "/")


def filter_for(prefix: str, pattern: str) -> str:
    """The narrowest MQTT filter that matches every channel the glob `pattern` matches."""
    if not is_pattern(pattern):
        return topic_for(prefix, pattern)
    fixed = list(itertools.takewhile(lambda segment: not is_pattern(segment), pattern.split(".")))
    return (topic_for(prefix, ".".join(fixed)) + "/#") if fixed else prefix + "#"


def channel_of(prefix: str, topic: str) -> str | None:
    """Inverse of `topic_for`; None for a topic outside the prefix."""
    if not topic.startswith(prefix):
        return None
    return topic[len(prefix) :].replace("/", ".")


def encode_payload(id: str, message: Message) -> bytes:
    return id.encode() + b"\n" + message.to_wire()


def decode_payload(payload: bytes | bytearray) -> Event | None:
    """The event in a payload `encode_payload` made; None for anything else on the topic."""
    id, newline, blob = payload.partition(b"\n")
    if not newline:
        return None
    try:
        return Event.from_wire(id.decode(), bytes(blob))
    except (ValueError, KeyError, TypeError):  # JSON and UTF-8 errors are ValueErrors
        return None


class _RecentIds:
    """The last `size` ids seen."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, id: object) -> bool:
        return id in self._ids

    def add(self, id: str) -> None:
        self._ids[id] = None
        self._ids.move_to_end(id)
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)


@contextlib.contextmanager
def _instance_slot(scope: str) -> Iterator[int]:
    """Hold the lowest slot number that no other process on this host holds for `scope`."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one process per host, or set `instance`
        yield 0
        return
    key = hashlib.sha256(scope.encode()).hexdigest()[:16]
    for slot in itertools.count():
        path = os.path.join(tempfile.gettempdir(), f"channels-gateway-mqtt-{key}-{slot}.lock")
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        except PermissionError:  # another user's lock file
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield slot
        finally:
            os.close(fd)  # releases the lock; the file stays for the next process
        return


def _is_failure(code: int | ReasonCode) -> bool:
    return code.is_failure if isinstance(code, ReasonCode) else code >= 0x80


# -- the layer ------------------------------------------------------------------------------------


class MQTTLayer(ChannelLayer):
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
        self._up = anyio.Event()  # set (and replaced) whenever a connection is up again
        self._lock = anyio.Lock()  # subscription changes and resubscribing take turns
        self._filters: Counter[str] = Counter()
        self._channels: set[str] = set()
        self._patterns: set[str] = set()
        self._recent = _RecentIds(4096)
        self._groups: dict[tuple[str, str], _GroupSession] = {}
        self._groups_lock = anyio.Lock()

    # -- connections ------------------------------------------------------------------------------

    def _unavailable(self, what: str, exc: BaseException | None = None) -> LayerUnavailable:
        reason = f": {exc}" if exc is not None and str(exc) else ""
        return LayerUnavailable(
            f"MQTT broker at {self.address} {what}{reason}; check that it is running and reachable"
        )

    def _new_client(
        self,
        identifier: str,
        on_message: Callable[[PahoClient, Any, MQTTMessage], None],
        *,
        persistent: bool,
    ) -> aiomqtt.Client:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            properties.SessionExpiryInterval = self.session_expiry
            properties.ReceiveMaximum = _RECEIVE_MAXIMUM
        client = aiomqtt.Client(
            self._host,
            self._port,
            username=self._username,
            password=self._password,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not persistent,
            properties=properties,
            timeout=self.timeout,
            keepalive=_KEEPALIVE,
            tls_context=self._tls_context,
        )
        client.pending_calls_threshold = 1 << 30  # many publishes in flight is what a batch is
        # Messages are handled in paho's callback, on the event loop, as each packet is read:
        # aiomqtt's Message drops the DUP flag, and a group's receipt order and acks are kept in
        # step with the packets without a queue in between. aiomqtt has no manual-ack option.
        client._client.on_message = on_message
        client._client.manual_ack_set(persistent)
        return client

    async def _until_disconnected(self, client: aiomqtt.Client) -> None:
        """Wait until the connection ends, then raise `LayerUnavailable`.

        Messages are taken in paho's callback (see `_new_client`), so aiomqtt's queue stays
        empty and its iterator only reports the disconnect.
        """
        try:
            async for _ in client.messages:
                pass
        except aiomqtt.MqttError as exc:
            raise self._unavailable("closed the connection", exc.__cause__ or exc) from None
        raise self._unavailable("closed the connection")

    @contextlib.asynccontextmanager
    async def _connection(self, client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Client]:
        """Connect `client`; always disconnect it, even when cancelled."""
        try:
            await client.__aenter__()
        except BaseException as exc:
            # No CONNACK (timed out, cancelled): aiomqtt leaves the socket open; this closes it.
            client._client.disconnect()
            if isinstance(exc, aiomqtt.MqttCodeError):  # a CONNACK with an error code
                raise self._unavailable("refused the connection", exc) from None
            if isinstance(exc, aiomqtt.MqttError | OSError):  # OSError: TLS, DNS
                raise self._unavailable("is unreachable", exc) from None
            raise
        try:
            yield client
        finally:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.timeout),
                contextlib.suppress(aiomqtt.MqttError),
            ):
                await client.__aexit__(None, None, None)

    def _supervisor(self, what: str, *, groups: bool = False) -> Supervisor:
        assert self._sink is not None
        return Supervisor(
            f"{what} at MQTT broker {self.address}",
            self._sink,
            logger,
            max_delay=self.max_reconnect_delay,
            reports_reconnects=not groups,  # a group session's broker resends what it missed
        )

    def _connected(self, ready: Callable[[], None]) -> None:
        """A connection is up and subscribed: tell its supervisor and `wait_connected`."""
        ready()
        up, self._up = self._up, anyio.Event()
        up.set()

    async def _subscribe_filters(self, client: aiomqtt.Client, filters: Sequence[str]) -> None:
        try:
            codes: Sequence[int | ReasonCode] = await client.subscribe(
                [(name, SubscribeOptions(qos=1)) for name in filters], timeout=self.timeout
            )
        except aiomqtt.MqttError as exc:
            raise self._unavailable("did not confirm a subscription", exc) from None
        refused = [
            f"{name} ({code})"
            for name, code in zip(filters, codes, strict=True)
            if _is_failure(code)
        ]
        if refused:
            raise LayerUnavailable(
                f"MQTT broker at {self.address} refused subscribing to {', '.join(refused)}; "
                "check its access control"
            )

    # -- the listener -----------------------------------------------------------------------------

    async def run(self, sink: Sink, *, task_status: TaskStatus[None]) -> None:
        if sniffio.current_async_library() != "asyncio":
            raise LayerConfigurationError(
                "the mqtt:// layer needs asyncio (its driver, aiomqtt, is asyncio-only)"
            )
        self._sink = sink
        scope = f"{self.address}|{self.client_id_prefix}|{socket.gethostname()}"
        with contextlib.nullcontext(-1) if self.instance else _instance_slot(scope) as slot:
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
        async with self._connection(client):
            try:
                async with self._lock:
                    if self._filters:
                        await self._subscribe_filters(client, list(self._filters))
                    self._client = client
                self._connected(ready)
                await self._until_disconnected(client)
            finally:
                self._client = None

    def _on_live_message(self, client: PahoClient, userdata: Any, message: MQTTMessage) -> None:
        channel = channel_of(self.topic_prefix, message.topic)
        if channel is None or self._sink is None:
            return
        if channel not in self._channels and not any(
            compile_pattern(pattern)(channel) for pattern in self._patterns
        ):
            return  # the filter was wider than the pattern, or the subscription just ended
        id = message.payload.partition(b"\n")[0].decode(errors="replace")
        if id in self._recent:
            return  # another copy through an overlapping subscription
        event = decode_payload(message.payload)
        if event is None:
            logger.debug("ignoring a message on %s that no gateway published", message.topic)
            return
        self._recent.add(event.id)
        self._sink.deliver(event)

    async def wait_connected(self) -> None:
        """Wait until the listener and every group session are connected (after a broker restart,
        say)."""
        while self._client is None or not all(s.connected for s in self._groups.values()):
            await self._up.wait()

    # -- publish and subscribe --------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        client = self._client
        if client is None:
            raise self._unavailable("is not connected (reconnecting)")
        prefix = self.topic_prefix
        ids = [f"{self._epoch}-{next(self._sequence)}" for _ in messages]
        packets = [
            (topic_for(prefix, message.channel), encode_payload(id, message))
            for id, message in zip(ids, messages, strict=True)
        ]
        # paho writes them to the socket in call order; the PUBACKs are awaited together.
        if len(packets) == 1:
            results = [await _outcome(client.publish(*packets[0], qos=1, timeout=self.timeout))]
        else:
            results = await _gather(
                [
                    client.publish(topic, data, qos=1, timeout=self.timeout)
                    for topic, data in packets
                ]
            )
        for result in results:
            if isinstance(result, aiomqtt.MqttError):
                raise self._unavailable("did not acknowledge a publish", result)
            if isinstance(result, BaseException):
                raise result
        return ids

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

    # -- consumer groups --------------------------------------------------------------------------

    def _group_client_id(self, channel: str, group: str) -> str:
        identifier = f"{self.client_id_prefix}{self.instance_name}|{group}|{channel}"
        if len(identifier.encode()) > _MAX_CLIENT_ID:
            digest = hashlib.sha256(f"{group}|{channel}".encode()).hexdigest()[:32]
            identifier = f"{self.client_id_prefix}{self.instance_name}|{digest}"
        return identifier

    def _group(self, channel: str, group: str) -> _GroupSession:
        try:
            return self._groups[channel, group]
        except KeyError:
            raise UnknownGroup.named(
                channel, group, scope=" in this process (MQTT groups are kept per process)"
            ) from None

    async def group_join(self, channel: str, group: str, consumer: str) -> None:
        async with self._groups_lock:
            session = self._groups.get((channel, group))
            if session is None:
                if self._tasks is None:
                    raise self._unavailable("is not connected (the layer is not running)")
                session = _GroupSession(self, channel, group)
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

    async def group_info(self, channel: str, group: str) -> GroupInfo:
        return self._group(channel, group).info()


@dataclass
class _Entry(PendingEntry):
    # The packet id on the current connection; None once that connection is gone.
    mid: int | None = None


class _GroupSession(PendingTable[_Entry]):
    """One consumer group on one channel in this process: a persistent session and its messages."""

    def __init__(self, layer: MQTTLayer, channel: str, group: str) -> None:
        super().__init__(channel, group)
        self.layer = layer
        self.client_id = layer._group_client_id(channel, group)
        self.filter = f"$share/{group}/{topic_for(layer.topic_prefix, channel)}"
        self.fresh: OrderedDict[str, _Entry] = OrderedDict()  # received, not handed out yet
        # Packet ids of this connection in the order their PUBLISHes arrived -> acked yet.
        self.receipts: OrderedDict[int, bool] = OrderedDict()
        # Acked ids whose PUBACK may not have reached the broker: PUBACKed again if resent.
        self.acked = _RecentIds(2 * _RECEIVE_MAXIMUM)
        self._paho: PahoClient | None = None
        self.connected = False

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Connected until the layer stops; the first connection's failure is the joiner's."""
        supervisor = self.layer._supervisor(f"group {self.group} on {self.channel}", groups=True)
        await supervisor.run(self._connect, task_status=task_status, fail_fast=True)

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


async def _outcome(call: Awaitable[None]) -> Exception | None:
    try:
        await call
    except Exception as exc:
        return exc
    return None


async def _gather(calls: list[Awaitable[None]]) -> list[Exception | None]:
    """Await every call concurrently; return each one's exception or None."""
    results: list[Exception | None] = [None] * len(calls)

    async def run(index: int, call: Awaitable[None]) -> None:
        results[index] = await _outcome(call)

    async with anyio.create_task_group() as tasks:
        for index, call in enumerate(calls):
            tasks.start_soon(run, index, call)
    return results
