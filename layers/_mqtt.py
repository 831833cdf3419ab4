"""Plumbing of the MQTT layer: topics and payloads, client connections, instance slots, PUBACKs.

`MQTTConnections` is what the layer (`layers.mqtt`) and its group sessions
(`layers._mqtt_groups`) share: how a client is built and connected, and how aiomqtt's errors
become `LayerUnavailable`. `Pubacks` publishes a batch and awaits its PUBACKs on one connection.
See `layers.mqtt` for the design.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import ssl
import struct
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, cast

import aiomqtt
import anyio
from anyio.abc import TaskGroup
from paho.mqtt.client import CallbackOnPublish_v2, MQTTMessage, error_string
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ._supervisor import Supervisor
from .base import ChannelLayer, Sink
from .errors import InvalidArgument, LayerUnavailable
from .event import Event, Message
from .names import is_pattern

logger = logging.getLogger("layers.mqtt")

_RESERVED = frozenset("+#/$\0")
RECEIVE_MAXIMUM = 1000  # PUBLISHes a group session may hold unacked; the broker may allow fewer
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


PACKED = "application/vnd.channels-gateway.packed"  # the ContentType of a packed PUBLISH
MAX_PACKED_BYTES = 256 * 1024  # payload of a packed PUBLISH, beyond which a run is split
MAX_PACKED_MESSAGES = 100  # messages in a packed PUBLISH
_FRAME = struct.Struct(">HI")  # a packed message's id length and wire blob length
_PACKED_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
_PACKED_PROPERTIES.ContentType = PACKED

Packet = tuple[str, bytes, Properties | None]  # topic, payload, PUBLISH properties


def encode_packets(prefix: str, ids: Sequence[str], messages: Sequence[Message]) -> list[Packet]:
    """The PUBLISHes of a batch, in order: one per run of consecutive messages on one topic.

    A run of one message is a plain payload, `<id>\\n<wire blob>`. A longer one is packed: its
    ContentType is `PACKED` and its payload is, for each message, a `_FRAME` (the lengths of its
    id and wire blob), the id and the wire blob. A run is split where a packet would exceed
    `MAX_PACKED_BYTES` or `MAX_PACKED_MESSAGES`. Runs follow the batch's order, never regrouped
    by topic, so a pattern subscriber still sees one publisher's messages in id order across
    channels. Raises `InvalidArgument` for a channel MQTT cannot carry, before anything is sent.
    """
    runs: list[tuple[str, list[tuple[bytes, bytes]]]] = []  # topic, (id, wire blob)s
    size = 0  # of the last run's packed payload
    for id, message in zip(ids, messages, strict=True):
        topic = topic_for(prefix, message.channel)
        raw_id, blob = id.encode(), message.to_wire()
        frame_size = _FRAME.size + len(raw_id) + len(blob)
        if (
            runs
            and runs[-1][0] == topic
            and len(runs[-1][1]) < MAX_PACKED_MESSAGES
            and size + frame_size <= MAX_PACKED_BYTES
        ):
            runs[-1][1].append((raw_id, blob))
            size += frame_size
        else:
            runs.append((topic, [(raw_id, blob)]))
            size = frame_size
    return [
        (topic, run[0][0] + b"\n" + run[0][1], None)
        if len(run) == 1
        else (
            topic,
            b"".join(_FRAME.pack(len(raw_id), len(blob)) + raw_id + blob for raw_id, blob in run),
            _PACKED_PROPERTIES,
        )
        for topic, run in runs
    ]


def decode_payload(payload: bytes | bytearray, properties: Properties | None) -> list[Event] | None:
    """The events of a PUBLISH that `encode_packets` made, in order (its `properties` say whether
    it is packed); None for anything else on the topic."""
    try:
        if getattr(properties, "ContentType", None) != PACKED:
            raw_id, newline, blob = payload.partition(b"\n")
            return [Event.from_wire(raw_id.decode(), bytes(blob))] if newline else None
        events = []
        offset = 0
        while offset < len(payload):
            id_size, blob_size = _FRAME.unpack_from(payload, offset)
            start = offset + _FRAME.size
            offset = start + id_size + blob_size
            if offset > len(payload):
                return None  # cut short
            id = payload[start : start + id_size].decode()
            events.append(Event.from_wire(id, bytes(payload[start + id_size : offset])))
        return events or None
    except (ValueError, KeyError, TypeError, struct.error):  # JSON and UTF-8 errors: ValueErrors
        return None


class RecentIds:
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
def instance_slot(scope: str) -> Iterator[int]:
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


class _Batch:
    """The PUBACKs one `Pubacks.publish` call waits for."""

    __slots__ = ("future", "mids", "missing", "refused")

    def __init__(self, future: asyncio.Future[None], count: int) -> None:
        self.future = future
        self.mids: list[int] = []
        self.missing = count
        self.refused: ReasonCode | int | None = None

    def acked(self, reason_code: ReasonCode | int) -> None:
        if self.refused is None and _is_failure(reason_code):
            self.refused = reason_code
        self.missing -= 1
        if self.missing == 0 and not self.future.done():
            self.future.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Pubacks:
    """QoS 1 publishing on one connection, with one waiter per batch instead of one per packet.

    paho writes the PUBLISHes in call order and reports each PUBACK through its `on_publish`
    callback, on the event loop, while it reads the socket: never during `publish`, which only
    queues the packets. The callback set here counts the PUBACKs of each batch and completes the
    batch's future at the last one; a PUBACK for any other packet id (aiomqtt's own `publish`)
    goes on to the callback aiomqtt installed. A batch fails at once when `close` is called (the
    connection ended: its PUBACKs will never come) and after `timeout` seconds; a PUBACK with a
    failure reason code (the broker refused a packet) fails it too, once every PUBACK is in.
    """

    def __init__(
        self,
        paho: PahoClient,
        unavailable: Callable[[str], LayerUnavailable],
        timeout: float,
    ) -> None:
        self._paho = paho
        self._timeout = timeout
        self._unavailable = unavailable
        self._awaited: dict[int, _Batch] = {}  # packet id -> its batch
        self._error: LayerUnavailable | None = None  # once the connection is over
        chained = cast("CallbackOnPublish_v2 | None", paho.on_publish)
        awaited = self._awaited

        def on_publish(
            client: PahoClient, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
        ) -> None:
            batch = awaited.pop(mid, None)
            if batch is not None:
                batch.acked(reason_code)
            elif chained is not None:
                chained(client, userdata, mid, reason_code, properties)

        paho.on_publish = on_publish

    async def publish(self, packets: Sequence[Packet]) -> None:
        """Publish packets at QoS 1, in order; return once all are PUBACKed.

        Raises `LayerUnavailable` when paho cannot send one (not connected), when the connection
        ends or the timeout passes before every PUBACK came, and when the broker refused one.
        Packets sent before a failure may still reach subscribers.
        """
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        batch = _Batch(loop.create_future(), len(packets))
        awaited = self._awaited
        mids = batch.mids
        publish = self._paho.publish
        try:
            for topic, payload, properties in packets:
                info = publish(topic, payload, 1, properties=properties)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise self._unavailable(f"refused a publish ({error_string(info.rc)})")
                awaited[info.mid] = batch
                mids.append(info.mid)
            timer = loop.call_later(self._timeout, self._time_out, batch)
            try:
                await batch.future
            finally:
                timer.cancel()
        finally:
            if batch.missing:  # failed or cancelled: later PUBACKs of the batch go nowhere
                for mid in mids:
                    if awaited.get(mid) is batch:
                        del awaited[mid]
        if batch.refused is not None:
            raise self._unavailable(
                f"refused a publish ({batch.refused}); check its access control and limits"
            )

    def _time_out(self, batch: _Batch) -> None:
        batch.fail(self._unavailable(f"did not acknowledge a publish within {self._timeout:g} s"))

    def close(self, error: LayerUnavailable) -> None:
        """The connection ended: fail every batch still waiting, and every later call."""
        self._error = error
        batches = list(dict.fromkeys(self._awaited.values()))
        self._awaited.clear()
        for batch in batches:
            batch.fail(error)


class MQTTConnections(ChannelLayer):
    """The connection half of `MQTTLayer` (which sets these attributes)."""

    address: str
    topic_prefix: str
    session_expiry: int
    timeout: float
    max_reconnect_delay: float
    _host: str
    _port: int
    _username: str | None
    _password: str | None
    _tls_context: ssl.SSLContext | None
    _sink: Sink | None
    _tasks: TaskGroup | None
    _up: anyio.Event

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
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
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
            # paho leaves Nagle's algorithm on: each PUBACK of ours for a QoS 1 message would wait
            # for the broker to acknowledge the one before (40 ms when it delays its ACKs), and
            # the broker sends no more than its in-flight window unacknowledged: deliveries ran at
            # about 45 messages a second.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        client.pending_calls_threshold = 1 << 30  # many publishes in flight is what a batch is
        # Messages are handled in paho's callback, on the event loop, as each packet is read:
        # aiomqtt's Message drops the DUP flag, and a group's receipt order and acks are kept in
        # step with the packets without a queue in between. aiomqtt has no manual-ack option.
        client._client.on_message = on_message
        client._client.manual_ack_set(persistent)
        _tune_socket_io(client._client)
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


def _tune_socket_io(paho: PahoClient) -> None:
    """Wrap paho's `loop_read` and `loop_write` for prompt and whole TCP segments (Linux).

    The socket has Nagle's algorithm off (see `_new_client`), so paho's one `send` per packet
    would leave as one segment each: `loop_write` corks the socket while it writes what is
    queued, so a batch of publishes (or of acks) leaves in as few segments as fit.

    A broker that leaves Nagle's algorithm on (Mosquitto does unless `set_tcp_nodelay true`) holds
    every PUBACK after the first of a batch until that first one is acknowledged, and Linux delays
    the acknowledgement by up to 40 ms when it has nothing to send back: a batch of QoS 1
    publishes took 45 ms instead of 1 to 2, and publishing on mqtt:// ran at a fortieth of the
    memory layer's rate. `loop_read` re-arms TCP_QUICKACK after each read, so we acknowledge at
    once.
    """
    cork = getattr(socket, "TCP_CORK", None)
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if cork is None or quickack is None:
        return
    read, write = paho.loop_read, paho.loop_write

    def set_option(option: int, value: int) -> None:
        sock = paho.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        result = read(max_packets)
        set_option(quickack, 1)
        return result

    def loop_write() -> MQTTErrorCode:
        set_option(cork, 1)
        try:
            return write()
        finally:
            set_option(cork, 0)

    paho.loop_read = loop_read  # type: ignore[method-assign]
    paho.loop_write = loop_write  # type: ignore[method-assign]
