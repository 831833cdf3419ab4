"""What is particular to the MQTT layer: topic mapping, exact pattern filtering, PUBACKs,
persistent group sessions, shared subscriptions and reconnecting after the broker goes away.

The behaviour every layer shares is in test_contract.py.
"""

from __future__ import annotations

import asyncio
import gc
import re
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import MQTTMessage, topic_matches_sub

from layers import (
    Channel,
    ChannelLayer,
    ChannelObserver,
    Event,
    Gap,
    InvalidArgument,
    LayerConfigurationError,
    LayerUnavailable,
    Subscription,
    UnknownGroup,
    create_layer,
    make_message,
)
from layers._mqtt import MAX_PACKED_BYTES, MAX_PACKED_MESSAGES
from layers.mqtt import (
    MQTTLayer,
    channel_of,
    decode_payload,
    encode_packets,
    filter_for,
    topic_for,
)
from layers.names import compile_pattern
from tests.conftest import LayerFactory
from tests.fixtures_mqtt import Mosquitto

pytestmark = [pytest.mark.anyio, pytest.mark.layer_quirk]

TIMEOUT = 15
NAMES = st.from_regex(r"[A-Za-z0-9_\-:@]{1,6}(?:\.[A-Za-z0-9_\-:@]{1,6}){0,4}", fullmatch=True)
PATTERNS = st.from_regex(r"[a-c.*?]{1,8}", fullmatch=True).filter(
    lambda p: not p.startswith(".") and not p.endswith(".") and ".." not in p
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- topics, filters and payloads ------------------------------------------------------------------


def test_channel_segments_become_topic_levels() -> None:
    assert topic_for("gw/", "chat.rooms.lobby") == "gw/chat/rooms/lobby"
    assert topic_for("", "a") == "a"
    assert channel_of("gw/", "gw/chat/rooms/lobby") == "chat.rooms.lobby"
    assert channel_of("gw/", "other/chat") is None


@given(NAMES, NAMES)
def test_topic_mapping_is_injective(first: str, second: str) -> None:
    assert channel_of("gw/", topic_for("gw/", first)) == first
    if first != second:
        assert topic_for("gw/", first) != topic_for("gw/", second)


def test_characters_mqtt_reserves_are_refused_by_name() -> None:
    for bad in ("a/b", "a+", "#", "$SYS", "a\0"):
        with pytest.raises(InvalidArgument, match="reserved by MQTT"):
            topic_for("gw/", bad)


@pytest.mark.parametrize(
    ("pattern", "mqtt_filter"),
    [
        ("chat.rooms.*", "gw/chat/rooms/#"),
        ("chat.rooms*", "gw/chat/#"),  # '*' also matches 'chat.roomsX' and 'chat.rooms.x.y'
        ("chat.r?.x", "gw/chat/#"),
        ("*.x", "gw/#"),
        ("a?b", "gw/#"),  # '?' matches a dot too: 'a.b'
        ("chat.rooms", "gw/chat/rooms"),  # no wildcard: the topic itself
    ],
)
def test_pattern_filters_are_the_narrowest_superset(pattern: str, mqtt_filter: str) -> None:
    assert filter_for("gw/", pattern) == mqtt_filter


@given(PATTERNS, NAMES)
def test_every_channel_a_pattern_matches_passes_its_filter(pattern: str, name: str) -> None:
    for candidate in (name, pattern.replace("*", "x.y").replace("?", "z")):
        if compile_pattern(pattern)(candidate) and re.fullmatch(r"[^.]+(\.[^.]+)*", candidate):
            assert topic_matches_sub(filter_for("gw/", pattern), topic_for("gw/", candidate))


def test_payload_carries_id_and_message() -> None:
    message = make_message("a.b", {"x": [1, 2]}, "chat")
    ((topic, payload, properties),) = encode_packets("gw/", ["abc-7"], [message])
    assert (topic, properties) == ("gw/a/b", None)  # one message: a plain payload, as ever
    assert payload == b"abc-7\n" + message.to_wire()
    events = decode_payload(payload, properties)
    assert events is not None
    assert [(e.id, e.channel, e.event, e.data) for e in events] == [
        ("abc-7", "a.b", "chat", {"x": [1, 2]})
    ]
    assert decode_payload(b"published by something else", None) is None
    assert decode_payload(b"id\nnot json", None) is None


def test_runs_of_one_topic_are_packed_in_order() -> None:
    messages = [make_message(c, n) for n, c in enumerate(["a", "a", "a", "b", "a", "a"])]
    ids = [f"e-{n}" for n in range(len(messages))]
    packets = encode_packets("gw/", ids, messages)
    assert [(topic, props is not None) for topic, _, props in packets] == [
        ("gw/a", True),
        ("gw/b", False),
        ("gw/a", True),
    ]  # runs in the batch's order, not regrouped by topic
    decoded = [decode_payload(payload, props) or [] for _, payload, props in packets]
    assert [[(e.id, e.data) for e in events] for events in decoded] == [
        [("e-0", 0), ("e-1", 1), ("e-2", 2)],
        [("e-3", 3)],
        [("e-4", 4), ("e-5", 5)],
    ]
    _, packed, properties = packets[0]
    assert decode_payload(packed[:-1], properties) is None  # cut short
    assert decode_payload(packed, None) is None  # not read as one message without its marker


def test_packets_are_bounded_in_bytes_and_messages() -> None:
    big = [make_message("a", "x" * (MAX_PACKED_BYTES // 3)) for _ in range(7)]
    packets = encode_packets("gw/", [f"e-{n}" for n in range(7)], big)
    assert [len(decode_payload(p, props) or []) for _, p, props in packets] == [2, 2, 2, 1]
    assert all(len(payload) <= MAX_PACKED_BYTES for _, payload, _ in packets)
    many = [make_message("a", n) for n in range(2 * MAX_PACKED_MESSAGES + 1)]
    packets = encode_packets("gw/", [f"e-{n}" for n in range(len(many))], many)
    sizes = [len(decode_payload(p, props) or []) for _, p, props in packets]
    assert sizes == [MAX_PACKED_MESSAGES, MAX_PACKED_MESSAGES, 1]


def test_url_options_and_their_errors() -> None:
    layer = MQTTLayer(
        "mqtts://user:p%40ss@broker.example:8884/?instance=web-1&session_expiry=30&topic_prefix=x/"
    )
    assert (layer.address, layer.instance, layer.session_expiry) == (
        "broker.example:8884",
        "web-1",
        30,
    )
    assert layer.topic_prefix == "x/"
    assert MQTTLayer("mqtts://broker.example").address == "broker.example:8883"
    assert MQTTLayer("mqtt://h", topic_prefix="").topic_prefix == ""
    with pytest.raises(LayerConfigurationError, match="URL option qos; use instance"):
        MQTTLayer("mqtt://h/?qos=2")
    for prefix in ("gw", "gw/#/", "$gw/", "a/+/"):
        with pytest.raises(LayerConfigurationError, match="invalid topic_prefix"):
            MQTTLayer("mqtt://h", topic_prefix=prefix)


def test_group_client_ids_are_stable_and_bounded() -> None:
    layer = MQTTLayer("mqtt://h", instance="web-1")
    layer.instance_name = "web-1"
    assert layer._group_client_id("orders.eu", "billing") == "gw-web-1|billing|orders.eu"
    long_one = layer._group_client_id("c" * 200, "g")
    assert len(long_one) <= 128 and long_one.startswith("gw-web-1|")
    assert long_one == layer._group_client_id("c" * 200, "g")
    assert long_one != layer._group_client_id("c" * 199, "g")


def test_gateway_history_settings_are_not_passed_to_the_layer() -> None:
    layer = create_layer("mqtt://h", history_size=10, history_ttl=5.0)
    assert isinstance(layer, MQTTLayer)


# -- against the broker ----------------------------------------------------------------------------


@contextmanager
def closed_port() -> Iterator[int]:
    """A local port nothing listens on, held so that nothing else takes it meanwhile."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        yield bound.getsockname()[1]


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.woken: list[str] = []
        self._arrived = anyio.Event()

    def deliver(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()

    def wake(self, channel: str, *, released: bool = False) -> None:
        self.woken.append(channel)

    def reconnected(self) -> None:
        pass

    def layer_error(self, error: BaseException) -> None:
        pass

    async def until(self, check: Callable[[], bool]) -> None:
        with anyio.fail_after(TIMEOUT):
            while not check():
                self._arrived = anyio.Event()
                await self._arrived.wait()


@asynccontextmanager
async def running(layer: ChannelLayer, sink: RecordingSink) -> AsyncIterator[ChannelLayer]:
    async with anyio.create_task_group() as tasks:
        with anyio.fail_after(TIMEOUT):
            await tasks.start(layer.run, sink)
        yield layer
        tasks.cancel_scope.cancel()


def mqtt_layer(factory: LayerFactory, *args: Any, **options: Any) -> MQTTLayer:
    layer = factory(*args, **options)
    assert isinstance(layer, MQTTLayer)
    return layer


async def take(subscription: Subscription, count: int) -> list[Event]:
    events: list[Event] = []
    with anyio.fail_after(TIMEOUT):
        while len(events) < count:
            events += [e for e in await subscription.next_batch() if isinstance(e, Event)]
    assert len(events) == count, events
    return events


async def publish(channel: Channel, name: str, data: Any) -> str:
    with anyio.fail_after(TIMEOUT):
        return await channel.publish(name, data)


async def test_one_delivery_per_message_despite_overlapping_filters(
    mqtt_layer_factory: LayerFactory, unique: str
) -> None:
    sink = RecordingSink()
    async with running(mqtt_layer_factory(), sink) as layer:
        with anyio.fail_after(TIMEOUT):
            await layer.ping()
            # two MQTT subscriptions match 'u.a': u/a and u/# (the filter of both patterns)
            await layer.subscribe([f"{unique}.a"], [f"{unique}.*", f"{unique}.r?"])
            await layer.publish([make_message(f"{unique}.a", 1)])
            await layer.publish([make_message(f"{unique}.b", 2)])
        await sink.until(lambda: len(sink.events) >= 2)
    assert [(e.channel, e.data) for e in sink.events] == [(f"{unique}.a", 1), (f"{unique}.b", 2)]


def packets_received(layer: MQTTLayer, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The ids in each PUBLISH of a channel that the layer's listener receives (set before it
    runs)."""
    packets: list[list[str]] = []
    receive = layer._on_live_message

    def spy(client: Any, userdata: Any, message: MQTTMessage) -> None:
        if message.topic != layer._broadcast_topic:
            events = decode_payload(message.payload, message.properties) or []
            packets.append([e.id for e in events])
        receive(client, userdata, message)

    monkeypatch.setattr(layer, "_on_live_message", spy)
    return packets


async def test_concurrent_publishes_share_a_packet_and_arrive_once_each_in_order(
    mqtt_layer_factory: LayerFactory, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = mqtt_layer(mqtt_layer_factory)
    packets = packets_received(receiver, monkeypatch)
    sink = RecordingSink()
    published: dict[str, int] = {}
    async with running(receiver, sink), Channel(mqtt_layer_factory()) as channel:
        with anyio.fail_after(TIMEOUT):
            await receiver.subscribe([unique], [])

            async def one(n: int) -> None:
                published[await channel.publish(unique, n)] = n

            async with anyio.create_task_group() as tasks:  # group commit: one layer call
                for n in range(20):
                    tasks.start_soon(one, n)
        await sink.until(lambda: len(sink.events) >= 20)
        await anyio.sleep(0.1)  # no copy comes after
    assert any(len(ids) > 1 for ids in packets), packets  # some arrived packed
    assert sorted(len(ids) for ids in packets) != [1] * 20
    in_order = sorted(published, key=lambda id: int(id.rsplit("-", 1)[1]))
    assert [e.id for e in sink.events] == in_order  # once each, in id order
    assert [e.data for e in sink.events] == [published[id] for id in in_order]
    assert all(e.channel == unique for e in sink.events)


async def test_a_batch_across_channels_is_packed_per_run_and_delivered_once_in_order(
    mqtt_layer_factory: LayerFactory, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs on one channel are packed, a lone message is not; a channel and an overlapping
    pattern bring two copies of both kinds, and each message is delivered once."""
    receiver = mqtt_layer(mqtt_layer_factory)
    packets = packets_received(receiver, monkeypatch)
    sink = RecordingSink()
    names = ["a", "a", "a", "b", "a", "b", "b"]
    async with running(receiver, sink), running(mqtt_layer_factory(), RecordingSink()) as sender:
        with anyio.fail_after(TIMEOUT):
            await receiver.subscribe([f"{unique}.a"], [f"{unique}.*"])
            ids = await sender.publish(
                [make_message(f"{unique}.{c}", n) for n, c in enumerate(names)]
            )
        await sink.until(lambda: len(sink.events) >= len(names))
        await anyio.sleep(0.1)  # no copy comes after
    assert [(e.id, e.channel, e.data) for e in sink.events] == [
        (id, f"{unique}.{c}", n) for id, (n, c) in zip(ids, enumerate(names), strict=True)
    ]
    runs = [ids[0:3], ids[3:4], ids[4:5], ids[5:7]]
    # the 'a' runs come twice (channel and pattern filter), the 'b' ones once (pattern only)
    assert sorted(packets) == sorted([runs[0], runs[0], runs[1], runs[2], runs[2], runs[3]])


async def test_a_batch_over_the_size_bound_is_split(
    mqtt_layer_factory: LayerFactory, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = mqtt_layer(mqtt_layer_factory)
    packets = packets_received(receiver, monkeypatch)
    sink = RecordingSink()
    data = "x" * (MAX_PACKED_BYTES // 3)
    async with running(receiver, sink), running(mqtt_layer_factory(), RecordingSink()) as sender:
        with anyio.fail_after(TIMEOUT):
            await receiver.subscribe([unique], [])
            ids = await sender.publish([make_message(unique, [n, data]) for n in range(5)])
        await sink.until(lambda: len(sink.events) >= 5)
    assert packets == [ids[0:2], ids[2:4], ids[4:5]]
    assert [(e.id, e.data) for e in sink.events] == [(id, [n, data]) for n, id in enumerate(ids)]


async def test_wide_filters_are_narrowed_to_the_pattern(
    mqtt_layer_factory: LayerFactory, unique: str
) -> None:
    sink = RecordingSink()
    async with running(mqtt_layer_factory(), sink) as layer:
        with anyio.fail_after(TIMEOUT):
            await layer.subscribe([f"{unique}.end"], [f"{unique}.r?"])  # filter: <prefix>u/#
            for name in ("r12", "r", "x.r1", "r1", "end"):  # one publisher: arrive in this order
                await layer.publish([make_message(f"{unique}.{name}", name)])
        await sink.until(lambda: any(e.data == "end" for e in sink.events))
        assert [e.data for e in sink.events] == ["r1", "end"]

        with anyio.fail_after(TIMEOUT):
            await layer.unsubscribe([], [f"{unique}.r?"])
            await layer.publish([make_message(f"{unique}.r2", "gone")])
            await layer.publish([make_message(f"{unique}.end", "end again")])
        await sink.until(lambda: len(sink.events) == 3)
        assert [e.data for e in sink.events] == ["r1", "end", "end again"]


async def test_publish_waits_for_the_brokers_puback() -> None:
    """A broker that accepts the connection but never acknowledges: publish times out."""

    async def connack_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(bytes([0x20, 0x03, 0x00, 0x00, 0x00]))  # CONNACK, MQTT 5, success
        await writer.drain()
        while packet := await reader.read(1024):  # PUBLISH and PINGREQ go unanswered
            if packet[0] == 0x82:  # SUBSCRIBE (the layer's control topic): SUBACK, QoS 1
                writer.write(bytes([0x90, 0x04]) + packet[2:4] + b"\x00\x01")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(connack_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        layer = MQTTLayer(f"mqtt://127.0.0.1:{port}", instance="puback-test", timeout=0.5)
        async with running(layer, RecordingSink()):
            with anyio.fail_after(5), pytest.raises(LayerUnavailable, match="acknowledge"):
                await layer.publish([make_message("a", 1)])
            with anyio.fail_after(5), pytest.raises(LayerUnavailable, match="did not answer"):
                await layer.ping()
    finally:
        server.close()
        await server.wait_closed()


async def test_unreachable_broker_is_a_prompt_clear_error(mqtt_layer_factory: LayerFactory) -> None:
    """The layer starts without its broker (it connects when the broker comes up); calls fail
    at once, naming the broker."""
    with closed_port() as port, anyio.fail_after(5):
        async with Channel(
            mqtt_layer_factory(f"mqtt://127.0.0.1:{port}", instance="nobody")
        ) as channel:
            for call in (channel.ping(), channel.publish("c", 1)):
                with pytest.raises(LayerUnavailable, match=f"127.0.0.1:{port} is not connected"):
                    await call
            with pytest.raises(LayerUnavailable, match=f"127.0.0.1:{port} is unreachable"):
                async with channel.subscribe("c", group="g"):
                    pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_mqtts_speaks_tls(mqtt_layer_factory: LayerFactory, mqtt_url: str) -> None:
    """The shared broker's listener is plain MQTT: a TLS handshake with it fails."""
    observer = ConnectionObserver()
    layer = mqtt_layer_factory(mqtt_url.replace("mqtt://", "mqtts://", 1))
    with anyio.fail_after(5):
        async with Channel(layer, observer=observer) as channel:
            with pytest.raises(LayerUnavailable):
                await channel.ping()
            while not observer.errors:  # noqa: ASYNC110 - the layer retries on its own timer
                await anyio.sleep(0.02)
    assert isinstance(observer.errors[0], LayerUnavailable)  # the handshake failed
    observer.errors.clear()  # its traceback holds the socket paho left open (below)
    # paho 2.2 does not close the socket whose handshake failed (Client._ssl_wrap_socket); the
    # garbage collector does, with a ResourceWarning: let that happen here, not in a later test.
    gc.collect()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_refuses_to_run_under_trio(mqtt_layer_factory: LayerFactory) -> None:
    with anyio.fail_after(5), pytest.raises(LayerConfigurationError, match="asyncio"):
        async with Channel(mqtt_layer_factory()):
            pass


async def test_processes_on_one_host_get_distinct_instances(
    mqtt_layer_factory: LayerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # slot lock files: this test's own

    def layer() -> MQTTLayer:
        return mqtt_layer(mqtt_layer_factory)

    first, second = layer(), layer()
    async with running(first, RecordingSink()), running(second, RecordingSink()):
        host = socket.gethostname()
        assert (first.instance_name, second.instance_name) == (f"{host}-0", f"{host}-1")
    again = layer()
    async with running(again, RecordingSink()):
        assert again.instance_name == f"{host}-0"  # a restarted process finds its sessions again


# -- consumer groups ------------------------------------------------------------------------------


async def test_unacked_group_message_outlives_the_process_acked_one_does_not(
    mqtt_layer_factory: LayerFactory, unique: str
) -> None:
    instance = f"{unique}-host"
    async with (
        Channel(mqtt_layer_factory(instance=instance)) as channel,
        channel.subscribe(unique, group="g", consumer="c") as sub,
    ):
        acked_id = await publish(channel, unique, "acked")
        kept_id = await publish(channel, unique, "never acked")
        first, second = await take(sub, 2)
        assert (first.id, second.id) == (acked_id, kept_id)
        assert await first.ack()
    # The process is gone; the broker kept its session, with the unacked message.
    async with (
        Channel(mqtt_layer_factory(instance=instance)) as channel,
        channel.subscribe(unique, group="g", consumer="c") as sub,
    ):
        marker_id = await publish(channel, unique, "marker")
        again, marker = await take(sub, 2)
        assert (again.id, again.data) == (kept_id, "never acked")
        assert again.deliveries == 2  # the broker flagged it as resent
        assert (marker.id, marker.deliveries) == (marker_id, 1)
        assert await again.ack() and await marker.ack()
    async with (
        Channel(mqtt_layer_factory(instance=instance)) as channel,
        channel.subscribe(unique, group="g", consumer="c") as sub,
    ):
        marker_id = await publish(channel, unique, "second marker")
        (first_seen,) = await take(sub, 1)
        assert first_seen.id == marker_id  # nothing acked came back
        assert await first_seen.ack()


async def test_acks_out_of_order_wait_for_the_earlier_message(
    mqtt_layer_factory: LayerFactory, unique: str
) -> None:
    """PUBACKs go in the order the messages arrived (MQTT 4.6): acking the second message first
    holds its PUBACK back, so a restart before the first is acked brings both back."""
    instance = f"{unique}-host"
    async with (
        Channel(mqtt_layer_factory(instance=instance)) as channel,
        channel.subscribe(unique, group="g", consumer="c") as sub,
    ):
        ids = [await publish(channel, unique, n) for n in range(2)]
        _, second = await take(sub, 2)
        assert await second.ack()  # acked for the gateway, PUBACK held behind the first
        info = await channel.group_info(unique, "g")
        assert (info.pending, info.oldest_unacked_id) == (1, ids[0])
    async with (
        Channel(mqtt_layer_factory(instance=instance)) as channel,
        channel.subscribe(unique, group="g", consumer="c") as sub,
    ):
        back = await take(sub, 2)
        assert [e.id for e in back] == ids
        assert await back[1].ack() and await back[0].ack()  # now both PUBACKs go, in order
    async with (
        Channel(mqtt_layer_factory(instance=instance)) as channel,
        channel.subscribe(unique, group="g", consumer="c") as sub,
    ):
        marker_id = await publish(channel, unique, "marker")
        (first_seen,) = await take(sub, 1)
        assert first_seen.id == marker_id
        assert await first_seen.ack()


async def test_shared_subscription_splits_a_group_between_processes(
    mqtt_layer_factory: LayerFactory, unique: str
) -> None:
    async with (
        Channel(mqtt_layer_factory(instance=f"{unique}-a")) as first,
        Channel(mqtt_layer_factory(instance=f"{unique}-b")) as second,
        first.subscribe(unique, group="g", consumer="a") as on_first,
        second.subscribe(unique, group="g", consumer="b") as on_second,
    ):
        ids = [await publish(first, unique, n) for n in range(20)]
        got: dict[str, list[Event]] = {"a": [], "b": []}
        with anyio.fail_after(TIMEOUT):
            while len(got["a"]) + len(got["b"]) < 20:
                for name, sub in (("a", on_first), ("b", on_second)):
                    with anyio.move_on_after(0.05):
                        got[name] += [e for e in await sub.next_batch() if isinstance(e, Event)]
        for event in got["a"] + got["b"]:
            assert await event.ack()
    received = [e.id for e in got["a"] + got["b"]]
    assert sorted(received) == sorted(ids)  # every message once, none twice
    assert got["a"] and got["b"]


async def test_a_packet_goes_to_one_session_of_a_group(
    mqtt_layer_factory: LayerFactory, unique: str
) -> None:
    async with (
        Channel(mqtt_layer_factory(instance=f"{unique}-a")) as first,
        Channel(mqtt_layer_factory(instance=f"{unique}-b")) as second,
        first.subscribe(unique, group="g", consumer="a") as on_first,
        second.subscribe(unique, group="g", consumer="b") as on_second,
    ):
        batches = [
            await first.publish_messages([make_message(unique, [b, n]) for n in range(5)])
            for b in range(6)
        ]
        got: dict[str, list[Event]] = {"a": [], "b": []}
        with anyio.fail_after(TIMEOUT):
            while len(got["a"]) + len(got["b"]) < 30:
                for name, sub in (("a", on_first), ("b", on_second)):
                    events: list[Event] = []
                    with anyio.move_on_after(0.05):
                        events = [e for e in await sub.next_batch() if isinstance(e, Event)]
                    for event in events:  # acked as they come: a consumer's prefetch is 10
                        assert await event.ack()
                    got[name] += events
    where = {event.id: name for name, events in got.items() for event in events}
    assert sorted(where) == sorted(id for ids in batches for id in ids)  # each once
    for ids in batches:
        assert len({where[id] for id in ids}) == 1  # a packet is one session's, whole
        assert [e.id for e in got[where[ids[0]]] if e.id in ids] == ids  # in order
    assert got["a"] and got["b"]


async def test_a_packets_puback_waits_for_every_message_of_it(
    mqtt_layer_factory: LayerFactory, unique: str
) -> None:
    """Four of five acked: the PUBACK is held, so a restarted process gets the whole packet
    again (the acks were the old process's); once all five are acked it is gone."""
    instance = f"{unique}-host"
    async with (
        Channel(mqtt_layer_factory(instance=instance)) as channel,
        channel.subscribe(unique, group="g", consumer="c") as sub,
    ):
        ids = await channel.publish_messages([make_message(unique, n) for n in range(5)])
        events = await take(sub, 5)
        assert [e.id for e in events] == ids
        for event in events[:2] + events[3:]:
            assert await event.ack()
        info = await channel.group_info(unique, "g")
        assert (info.pending, info.oldest_unacked_id) == (1, ids[2])
    async with (
        Channel(mqtt_layer_factory(instance=instance)) as channel,
        channel.subscribe(unique, group="g", consumer="c") as sub,
    ):
        again = await take(sub, 5)
        assert [(e.id, e.deliveries) for e in again] == [(id, 2) for id in ids]
        for event in reversed(again):  # the last ack sends the PUBACK
            assert await event.ack()
    async with (
        Channel(mqtt_layer_factory(instance=instance)) as channel,
        channel.subscribe(unique, group="g", consumer="c") as sub,
    ):
        marker_id = await publish(channel, unique, "marker")
        (first_seen,) = await take(sub, 1)
        assert first_seen.id == marker_id
        assert await first_seen.ack()


async def test_group_state_is_per_process(mqtt_layer_factory: LayerFactory, unique: str) -> None:
    async with (
        Channel(mqtt_layer_factory(instance=f"{unique}-a")) as member,
        Channel(mqtt_layer_factory(instance=f"{unique}-b")) as outsider,
        member.subscribe(unique, group="g", consumer="c"),
    ):
        assert (await member.group_info(unique, "g")).pending == 0
        with pytest.raises(UnknownGroup, match="per process"):
            await outsider.group_info(unique, "g")


# -- faults ---------------------------------------------------------------------------------------


class ConnectionObserver(ChannelObserver):
    def __init__(self) -> None:
        self.reconnects: list[str] = []
        self.errors: list[BaseException] = []

    def reconnected(self, scheme: str) -> None:
        self.reconnects.append(scheme)

    def layer_error(self, scheme: str, error: BaseException) -> None:
        self.errors.append(error)


async def first_seen_is_new(factory: LayerFactory, url: str, unique: str, text: str) -> None:
    """A new process on the session `<unique>-host` gets first a message published now: every
    PUBACK of the one before reached the broker, which holds nothing back for it."""
    async with (
        Channel(factory(url, instance=f"{unique}-host")) as channel,
        channel.subscribe(unique, group="g", consumer="c") as group,
    ):
        marker_id = await publish(channel, unique, text)
        (first_seen,) = await take(group, 1)
        assert first_seen.id == marker_id
        assert await first_seen.ack()


async def test_broker_restart_reconnects_resubscribes_and_keeps_group_messages(
    mqtt_layer_factory: LayerFactory, mosquitto: Mosquitto, unique: str
) -> None:
    layer = mqtt_layer(
        mqtt_layer_factory,
        mosquitto.url,
        instance=f"{unique}-host",
        timeout=2.0,
        max_reconnect_delay=0.2,
    )
    observer = ConnectionObserver()
    async with (
        Channel(layer, ack_timeout=60, observer=observer) as channel,
        channel.subscribe(f"{unique}.live") as live,
        channel.subscribe(unique, group="g", consumer="c") as group,
    ):
        await publish(channel, f"{unique}.live", "before")
        assert [e.data for e in await take(live, 1)] == ["before"]
        pending_id = await publish(channel, unique, "in flight")
        (pending,) = await take(group, 1)
        assert pending.id == pending_id

        await anyio.to_thread.run_sync(mosquitto.stop)  # SIGTERM: Mosquitto saves the session
        assert (mosquitto.directory / "mosquitto.db").exists(), "the broker kept no sessions"
        with anyio.fail_after(2), pytest.raises(LayerUnavailable):
            await channel.publish(f"{unique}.live", "while down")
        await anyio.to_thread.run_sync(mosquitto.start)
        with anyio.fail_after(TIMEOUT):
            await layer.wait_connected()

        with anyio.fail_after(TIMEOUT):  # told it may have missed messages meanwhile
            (gap,) = await live.next_batch()
        assert isinstance(gap, Gap) and gap.reason == "reconnected"
        await publish(channel, f"{unique}.live", "after")
        assert [e.data for e in await take(live, 1)] == ["after"]  # resubscribed
        assert observer.reconnects == ["mqtt"] and observer.errors  # reported for the metrics
        # The broker resent the unacked message to the group session: it is matched to the
        # pending one, not handed out a second time; the next message is the new one.
        next_id = await publish(channel, unique, "after restart")
        (following,) = await take(group, 1)
        assert (following.id, following.deliveries) == (next_id, 1)
        assert await pending.ack() and await following.ack()
    await first_seen_is_new(mqtt_layer_factory, mosquitto.url, unique, "marker")


async def test_a_resent_packet_is_matched_to_the_one_held_here(
    mqtt_layer_factory: LayerFactory, mosquitto: Mosquitto, unique: str
) -> None:
    """A broker restart: the session gets the partly acked packet again (DUP). Its acked
    messages are not handed out again, its unacked one stays the pending entry it was; acking
    it sends the PUBACK."""
    layer = mqtt_layer(
        mqtt_layer_factory, mosquitto.url, instance=f"{unique}-host", max_reconnect_delay=0.2
    )
    async with (
        Channel(layer, ack_timeout=60) as channel,
        channel.subscribe(unique, group="g", consumer="c") as group,
    ):
        ids = await channel.publish_messages([make_message(unique, n) for n in range(5)])
        events = await take(group, 5)
        for event in events[:2] + events[3:]:
            assert await event.ack()

        await anyio.to_thread.run_sync(mosquitto.stop)  # SIGTERM: Mosquitto saves the session
        await anyio.to_thread.run_sync(mosquitto.start)
        with anyio.fail_after(TIMEOUT):
            await layer.wait_connected()  # the resent packet came before the SUBACK

        info = await channel.group_info(unique, "g")
        assert (info.pending, info.oldest_unacked_id) == (1, ids[2])
        assert await channel.nack(unique, "g", [ids[2]]) == ([ids[2]], [])
        (redelivered,) = await take(group, 1)
        assert (redelivered.id, redelivered.deliveries) == (ids[2], 2)
        marker_id = await publish(channel, unique, "marker")
        (marker,) = await take(group, 1)  # none of the acked ones came first
        assert (marker.id, marker.deliveries) == (marker_id, 1)
        assert await redelivered.ack() and await marker.ack()
    await first_seen_is_new(mqtt_layer_factory, mosquitto.url, unique, "second marker")


async def test_broker_crash_loses_its_state_but_not_what_this_process_holds(
    mqtt_layer_factory: LayerFactory, mosquitto: Mosquitto, unique: str
) -> None:
    """SIGKILL: Mosquitto loses what it had not saved, the session too. A group message already
    handed to this process stays pending here and is redelivered after `ack_timeout`."""
    layer = mqtt_layer(
        mqtt_layer_factory, mosquitto.url, instance=f"{unique}-host", max_reconnect_delay=0.2
    )
    async with (
        Channel(layer, ack_timeout=0.5) as channel,
        channel.subscribe(unique, group="g", consumer="c") as group,
    ):
        held_id = await publish(channel, unique, "held here")
        (first,) = await take(group, 1)
        await anyio.to_thread.run_sync(lambda: mosquitto.stop(signal.SIGKILL))
        await anyio.to_thread.run_sync(mosquitto.start)
        with anyio.fail_after(TIMEOUT):
            await layer.wait_connected()
        (again,) = await take(group, 1)
        assert (first.id, again.id, again.deliveries) == (held_id, held_id, 2)
        assert await again.ack()
        # The group session is back (a new one: the broker forgot the old) and gets new messages.
        next_id = await publish(channel, unique, "after the crash")
        (following,) = await take(group, 1)
        assert (following.id, following.deliveries) == (next_id, 1)
        assert await following.ack()


async def test_a_publish_whose_connection_ends_fails_at_once(
    mqtt_layer_factory: LayerFactory, mosquitto: Mosquitto, unique: str
) -> None:
    """A batch waiting for its PUBACKs when the broker goes away gets LayerUnavailable when the
    connection ends, not after the layer's timeout (a minute here)."""
    layer = mqtt_layer(mqtt_layer_factory, mosquitto.url, timeout=60, max_reconnect_delay=0.2)
    async with running(layer, RecordingSink()):
        assert len(await layer.publish([make_message(unique, 0)])) == 1
        mosquitto.pause()  # the PUBLISHes reach its socket, no PUBACK comes back
        failures: list[BaseException] = []

        async def in_flight() -> None:
            try:
                await layer.publish([make_message(unique, n) for n in range(50)])
            except LayerUnavailable as exc:
                failures.append(exc)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(in_flight)
                await anyio.wait_all_tasks_blocked()
                assert not failures  # still waiting for its PUBACKs
                await anyio.to_thread.run_sync(lambda: mosquitto.stop(signal.SIGKILL))
        assert len(failures) == 1 and "closed the connection" in str(failures[0])
        with pytest.raises(LayerUnavailable):  # and the next one at once
            await layer.publish([make_message(unique, 1)])


async def test_a_publish_without_its_pubacks_fails_after_the_timeout(
    mqtt_layer_factory: LayerFactory, mosquitto: Mosquitto, unique: str
) -> None:
    """No PUBACK, no success: the batch fails after `timeout`; the PUBACKs that come later are
    ignored and the connection goes on publishing."""
    layer = mqtt_layer(mqtt_layer_factory, mosquitto.url, timeout=0.5)
    sink = RecordingSink()
    async with running(layer, sink):
        await layer.subscribe([unique], [])
        mosquitto.pause()
        try:
            with (
                anyio.fail_after(TIMEOUT),
                pytest.raises(LayerUnavailable, match="did not acknowledge a publish"),
            ):
                await layer.publish([make_message(unique, n) for n in range(5)])
        finally:
            mosquitto.resume()
        with anyio.fail_after(TIMEOUT):
            (after,) = await layer.publish([make_message(unique, "after")])
        await sink.until(lambda: after in [e.id for e in sink.events])
        assert [e.data for e in sink.events] == [0, 1, 2, 3, 4, "after"]  # in order, once each
