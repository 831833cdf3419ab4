"""What is particular to `nats://`: the stream it keeps, its URL, gaps, and a server restart."""

from __future__ import annotations

import contextlib
import signal

import anyio
import pytest
from nats.aio.msg import Msg

from layers import (
    Channel,
    Event,
    Gap,
    LayerConfigurationError,
    LayerUnavailable,
    Subscription,
    create_layer,
    make_message,
)
from layers._nats import stream_sequence
from layers.nats_jetstream import NatsJetStreamLayer
from tests.fixtures_nats import NatsServer

pytestmark = [pytest.mark.anyio, pytest.mark.layer_quirk]

TIMEOUT = 15


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _events(subscription: Subscription, count: int) -> list[Event]:
    items: list[Event] = []
    with anyio.fail_after(TIMEOUT):
        while len(items) < count:
            for item in await subscription.next_batch():
                assert isinstance(item, Event), item
                items.append(item)
    return items


async def _add_stream(url: str, **config: object) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(**config)
    finally:
        await nc.close()


async def _stream_config(url: str, name: str) -> object:
    import nats

    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(name)).config
    finally:
        await nc.close()


def test_url_takes_a_seed_list_and_refuses_unknown_options() -> None:
    layer = create_layer("nats://u:p@h1:4222,h2,h3:4223/?stream=S&subject_prefix=a.b&replicas=3")
    assert isinstance(layer, NatsJetStreamLayer)
    assert layer.servers == ["nats://u:p@h1:4222", "nats://u:p@h2:4222", "nats://u:p@h3:4223"]
    assert (layer.stream, layer.prefix, layer.replicas) == ("S", "a.b", 3)
    assert layer.where == "NATS at h1:4222,h2:4222,h3:4223"  # no password in messages
    tls = create_layer("tls://h1:4222")
    assert isinstance(tls, NatsJetStreamLayer) and tls.servers == ["tls://h1:4222"]
    for bad, named in (
        ("nats://h?stram=x", "unknown nats:// URL option stram; use stream, subject_prefix"),
        ("nats://h?stream=a.b", "invalid stream name 'a.b'"),
        ("nats://h?subject_prefix=a..b", "invalid subject_prefix 'a..b'"),
        ("nats://h?replicas=three", "invalid nats:// URL option"),
    ):
        with pytest.raises(LayerConfigurationError) as refused:
            create_layer(bad)
        assert named in refused.value.detail


def test_the_stream_sequence_is_read_from_either_form_of_reply_subject() -> None:
    from nats.aio.msg import Msg

    from layers._nats import stream_sequence

    short = "$JS.ACK.S.live.1.42.7.1700000000000000000.0"
    long = "$JS.ACK.hub.ACCOUNTHASH.S.live.1.43.8.1700000000000000000.0.token"
    assert stream_sequence(Msg(_client=None, reply=short)) == 42  # type: ignore[arg-type]
    assert stream_sequence(Msg(_client=None, reply=long)) == 43  # type: ignore[arg-type]


def test_patterns_become_the_narrowest_subject_filters() -> None:
    layer = NatsJetStreamLayer("nats://h", subject_prefix="gw")
    assert layer._filters(["a.b"], ["chat.rooms.*", "chat.rooms.x?", "*"]) == ["gw.>"]
    assert layer._filters(["a.b", "chat.x"], ["chat.rooms.*", "chat.r?"]) == [
        "gw.a.b",
        "gw.chat.>",
    ]
    assert layer._filters(["chat.rooms.1"], ["chat.rooms.*"]) == ["gw.chat.rooms.>"]


async def test_an_existing_stream_with_other_settings_is_refused(
    nats_url: str, nats_stream: tuple[str, str]
) -> None:
    stream, prefix = nats_stream
    await _add_stream(nats_url, name=stream, subjects=[f"{prefix}.other.>"], storage="memory")
    layer = create_layer(nats_url, stream=stream, subject_prefix=prefix)
    with pytest.raises(LayerConfigurationError) as refused:
        async with Channel(layer):
            pass
    detail = refused.value.detail
    assert f"the NATS stream {stream!r} exists with subjects" in detail
    assert "storage" in detail
    assert f"nats stream rm {stream}" in detail and "?stream=" in detail


async def test_an_existing_stream_takes_the_new_history_limits(
    nats_url: str, nats_stream: tuple[str, str]
) -> None:
    stream, prefix = nats_stream
    async with Channel(create_layer(nats_url, stream=stream, subject_prefix=prefix)):
        pass
    url = f"{nats_url}?max_bytes=1000000"
    layer = create_layer(url, stream=stream, subject_prefix=prefix, history_size=7, history_ttl=60)
    async with Channel(layer):
        config = await _stream_config(nats_url, stream)
    assert config.max_msgs_per_subject == 7  # type: ignore[attr-defined]
    assert config.max_age == 60  # type: ignore[attr-defined]
    assert config.max_bytes == 1_000_000  # type: ignore[attr-defined]


async def test_replicas_beyond_one_server_are_refused_with_the_fix(
    nats_url: str, nats_stream: tuple[str, str]
) -> None:
    stream, prefix = nats_stream
    layer = create_layer(f"{nats_url}?replicas=3", stream=stream, subject_prefix=prefix)
    with pytest.raises(LayerConfigurationError) as refused:
        async with Channel(layer):
            pass
    assert "replicas" in refused.value.detail


async def test_a_trimmed_busy_channel_gives_a_gap_and_a_quiet_one_none(
    nats_url: str, nats_stream: tuple[str, str], unique: str
) -> None:
    stream, prefix = nats_stream
    layer = create_layer(nats_url, stream=stream, subject_prefix=prefix, history_size=3)
    async with Channel(layer) as channel:
        start = await channel.publish(f"{unique}.quiet", "q0")
        quiet = await channel.publish(f"{unique}.quiet", "q1")
        for n in range(10):
            await channel.publish(f"{unique}.busy", n)
        busy = await channel.history(f"{unique}.busy", after=start)
        assert busy.gap and busy.reason == "evicted"
        assert [e.data for e in busy.events] == [7, 8, 9]
        calm = await channel.history(f"{unique}.quiet", after=start)
        assert not calm.gap and [e.id for e in calm.events] == [quiet]
        async with channel.subscribe(
            f"{unique}.quiet", patterns=[f"{unique}.b*"], last_event_id=start
        ) as sub:
            items = await sub.next_batch()
    assert isinstance(items[0], Gap) and items[0].reason == "evicted"
    assert [i.data for i in items if isinstance(i, Event)] == ["q1", 7, 8, 9]


async def until_answering(channel: Channel) -> None:
    """Wait until the layer reaches its server again (the client reconnects on its own
    schedule)."""
    with anyio.fail_after(TIMEOUT):
        while True:
            try:
                await channel.ping()
                return
            except LayerUnavailable:
                await anyio.sleep(0.1)


async def test_ping_and_publish_fail_while_no_server_answers_then_recover(
    nats_server: NatsServer, nats_names: tuple[str, str], unique: str
) -> None:
    stream, prefix = nats_names
    url = f"{nats_server.url}?publish_timeout=1"
    async with Channel(create_layer(url, stream=stream, subject_prefix=prefix)) as channel:
        await channel.ping()
        nats_server.stop(signal.SIGKILL)
        with anyio.fail_after(TIMEOUT):
            with pytest.raises(LayerUnavailable):
                while True:
                    await channel.ping()
                    await anyio.sleep(0.05)  # until the client notices the server is gone
            with pytest.raises(LayerUnavailable):
                await channel.publish(unique, "nobody hears")
        nats_server.start()
        await until_answering(channel)
        with anyio.fail_after(TIMEOUT):
            assert await channel.publish(unique, "back")


async def test_a_server_killed_mid_stream_loses_nothing(
    nats_server: NatsServer, nats_names: tuple[str, str], unique: str
) -> None:
    """JetStream keeps its file storage: every accepted message reaches the live subscriber
    exactly once, in order, across the restart, and is in the history."""
    stream, prefix = nats_names
    url = f"{nats_server.url}?publish_timeout=0.3"
    accepted: list[tuple[str, int]] = []
    async with (
        Channel(create_layer(url, stream=stream, subject_prefix=prefix)) as channel,
        channel.subscribe(unique, max_backlog=10_000) as sub,
    ):

        async def publish(numbers: range) -> None:
            for n in numbers:
                # LayerUnavailable (a 503): the publisher knows it was not taken.
                with contextlib.suppress(LayerUnavailable):
                    accepted.append((await channel.publish(unique, n), n))

        await publish(range(100))
        nats_server.stop(signal.SIGKILL)
        await publish(range(100, 103))  # refused while the server is down
        nats_server.start()
        await until_answering(channel)
        await publish(range(110, 200))
        received = await _events(sub, len(accepted))
        with anyio.move_on_after(0.5):
            extra = await sub.next_batch()
            pytest.fail(f"delivered twice: {extra}")
        history = await channel.history(unique)
    assert [(e.id, e.data) for e in received] == accepted
    assert [(e.id, e.data) for e in history.events] == accepted
    assert len(accepted) >= 190  # only what was published while the server was down is missing


async def test_start_up_without_a_server_starts_and_answers_unavailable() -> None:
    layer = create_layer("nats://127.0.0.1:1,127.0.0.1:2?connect_timeout=0.5")
    with anyio.fail_after(TIMEOUT):
        async with Channel(layer) as channel:
            for call in (channel.ping(), channel.publish("a", 1), channel.history("a")):
                with pytest.raises(LayerUnavailable) as refused:
                    await call
                assert "NATS at 127.0.0.1:1,127.0.0.1:2" in refused.value.detail


async def _publish_raw(url: str, subject: str, payload: bytes) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(subject, payload)
    finally:
        await nc.close()


async def test_messages_the_gateway_did_not_write_are_skipped(
    nats_url: str, nats_stream: tuple[str, str], unique: str
) -> None:
    stream, prefix = nats_stream
    async with (
        Channel(create_layer(nats_url, stream=stream, subject_prefix=prefix)) as channel,
        channel.subscribe(unique) as live,
        channel.subscribe(unique, group="g", consumer="c") as worker,
    ):
        await _publish_raw(nats_url, f"{prefix}.{unique}", b"not the gateway's")
        kept = await channel.publish(unique, "ours")
        assert [e.id for e in await _events(live, 1)] == [kept]
        (work,) = await _events(worker, 1)
        assert work.id == kept and await work.ack()
        history = await channel.history(unique)
    assert [e.id for e in history.events] == [kept]


async def test_a_group_whose_consumer_vanished_is_created_again(
    nats_url: str, nats_stream: tuple[str, str], unique: str
) -> None:
    import nats

    stream, prefix = nats_stream
    layer = create_layer(nats_url, stream=stream, subject_prefix=prefix)
    async with Channel(layer) as channel, channel.subscribe(unique, group="g", consumer="c") as sub:
        nc = await nats.connect(nats_url)
        try:
            (consumer,) = [
                c.name for c in await nc.jetstream().consumers_info(stream) if c.config.durable_name
            ]
            await nc.jetstream().delete_consumer(stream, consumer)
        finally:
            await nc.close()
        with anyio.fail_after(TIMEOUT):
            while True:  # the pump notices at its next pull and creates the group again
                message_id = await channel.publish(unique, "after")
                with anyio.move_on_after(0.5):
                    (event,) = await _events(sub, 1)
                    break
        assert event.data == "after"
        assert int(event.id) >= int(message_id)


async def _stored(url: str, stream: str) -> list[tuple[str, object, str]]:
    """Every message of the stream: (id, data, Nats-Msg-Id), oldest first."""
    import nats
    import nats.js.errors

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        last = (await js.stream_info(stream)).state.last_seq
        out = []
        for seq in range(1, last + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await js.get_msg(stream, seq)
                event = Event.from_wire(str(seq), msg.data or b"")
                out.append((event.id, event.data, (msg.headers or {}).get("Nats-Msg-Id", "")))
        return out
    finally:
        await nc.close()


async def test_batches_of_two_processes_get_the_ids_of_their_own_messages(
    nats_url: str, nats_stream: tuple[str, str], unique: str
) -> None:
    """Batches of two processes on one stream, at once: each publisher gets the sequences of
    what it sent, from its own PubAcks."""
    stream, prefix = nats_stream
    replies: dict[str, list[tuple[str, object]]] = {"a": [], "b": []}
    async with (
        Channel(create_layer(nats_url, stream=stream, subject_prefix=prefix)) as one,
        Channel(create_layer(nats_url, stream=stream, subject_prefix=prefix)) as two,
    ):

        async def publisher(channel: Channel, name: str, caller: int) -> None:
            for n in range(20):
                data = [{"p": name, "c": caller, "n": n, "i": i} for i in range(1 + n % 3)]
                ids = await channel.publish_messages(
                    [make_message(f"{unique}.{name}", d) for d in data]
                )
                replies[name] += zip(ids, data, strict=True)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tasks:
                for caller in range(8):
                    tasks.start_soon(publisher, one, "a", caller)
                    tasks.start_soon(publisher, two, "b", caller)
    stored = await _stored(nats_url, stream)
    by_id = {id: data for id, data, _ in stored}
    assert len(by_id) == len(stored) == len(replies["a"]) + len(replies["b"])
    for name in ("a", "b"):
        assert [by_id[id] for id, _ in replies[name]] == [data for _, data in replies[name]]
    msg_ids = [msg_id for _, _, msg_id in stored]
    assert all(msg_ids) and len(set(msg_ids)) == len(msg_ids)


async def _consumers(url: str, stream: str) -> int:
    """How many consumers the stream has on the server.

    From the stream's state: listing them (`consumers_info`) fails in nats-py when one is deleted
    while the server lists them (its entry comes back null).
    """
    import nats

    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(stream)).state.consumer_count
    finally:
        await nc.close()


async def _until_consumers(url: str, stream: str, count: int) -> None:
    with anyio.fail_after(TIMEOUT):
        while True:
            if await _consumers(url, stream) == count:
                return
            await anyio.sleep(0.02)  # the core unsubscribes from the layer in the background


async def test_a_process_that_only_publishes_reads_nothing_of_the_stream(
    nats_url: str, nats_stream: tuple[str, str], unique: str
) -> None:
    """No subscription, no live consumer: neither the publishing process nor another idle one
    is sent the stream's messages, and batches are answered by their PubAcks alone."""
    stream, prefix = nats_stream
    publisher = create_layer(nats_url, stream=stream, subject_prefix=prefix)
    idle = create_layer(nats_url, stream=stream, subject_prefix=prefix)
    assert isinstance(publisher, NatsJetStreamLayer) and isinstance(idle, NatsJetStreamLayer)
    async with Channel(publisher) as channel, Channel(idle):
        received = idle._client().stats["in_msgs"]
        before = await channel.publish(unique, "before")
        messages = [make_message(unique, n) for n in range(5)]
        with anyio.fail_after(TIMEOUT):
            ids = await channel.publish_messages(messages)
        after = await channel.publish(unique, "after")
        await idle._client().flush()
        assert await _consumers(nats_url, stream) == 0
        assert idle._client().stats["in_msgs"] == received
    stored = await _stored(nats_url, stream)
    assert [(id, data) for id, data, _ in stored] == [
        (before, "before"),
        *zip(ids, range(5), strict=True),
        (after, "after"),
    ]


async def test_each_first_subscribe_gets_all_published_after_it_while_publishes_race(
    nats_url: str, nats_stream: tuple[str, str], unique: str
) -> None:
    """Another process publishes without a pause while this one subscribes, unsubscribes (which
    deletes the live consumer) and subscribes again: each time, the events are a run of
    consecutive publishes that starts no later than the first publish begun once `subscribe`
    returned, in order, none twice."""
    stream, prefix = nats_stream
    accepted: list[str] = []
    begun = 0

    async def publish(channel: Channel) -> None:
        nonlocal begun
        while True:
            begun += 1
            accepted.append(await channel.publish(unique, begun - 1))

    async with (
        Channel(create_layer(nats_url, stream=stream, subject_prefix=prefix)) as publisher,
        Channel(create_layer(nats_url, stream=stream, subject_prefix=prefix)) as subscriber,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(publish, publisher)
        for _ in range(5):
            async with subscriber.subscribe(unique, max_backlog=100_000) as sub:
                first_after = begun
                assert await _consumers(nats_url, stream) == 1
                received: list[Event] = []
                while not received or received[-1].data < first_after + 20:
                    received += await _events(sub, 1)
            start = received[0].data
            assert start <= first_after
            assert [e.data for e in received] == list(range(start, start + len(received)))
            # the newest may arrive before its publisher had the PubAck
            assert all(e.id == accepted[e.data] for e in received if e.data < len(accepted))
            await _until_consumers(nats_url, stream, 0)
        tasks.cancel_scope.cancel()


async def test_a_resume_as_the_first_subscription_hands_off_without_loss_or_duplicates(
    nats_url: str, nats_stream: tuple[str, str], unique: str
) -> None:
    """Resuming with `Last-Event-ID` starts the live consumer and replays at once, while another
    process publishes: round after round, each resuming from the last event of the one before,
    the events add up to every publish, in order, once."""
    stream, prefix = nats_stream
    # every publish stays in the history: a resume finds no gap
    layers = [
        create_layer(nats_url, stream=stream, subject_prefix=prefix, history_size=1_000_000)
        for _ in range(2)
    ]
    accepted: list[tuple[str, int]] = []

    async def publish(channel: Channel) -> None:
        for n in range(1_000_000):
            accepted.append((await channel.publish(unique, n), n))

    async with (
        Channel(layers[0]) as publisher,
        Channel(layers[1]) as subscriber,
        anyio.create_task_group() as tasks,
    ):
        first = await publisher.publish(unique, "first")
        tasks.start_soon(publish, publisher)
        received: list[Event] = []
        for _ in range(5):
            resume_from = received[-1].id if received else first
            async with subscriber.subscribe(
                unique, last_event_id=resume_from, max_backlog=100_000
            ) as sub:
                goal = len(received) + 30
                while len(received) < goal:
                    received += await _events(sub, 1)
            await _until_consumers(nats_url, stream, 0)
        tasks.cancel_scope.cancel()
    assert [e.data for e in received] == list(range(len(received)))
    assert all(e.id == accepted[e.data][0] for e in received if e.data < len(accepted))


async def test_subscribes_cancelled_at_any_point_leave_a_consumer_exactly_while_subscribed(
    nats_url: str, nats_stream: tuple[str, str], unique: str
) -> None:
    stream, prefix = nats_stream
    layer = create_layer(nats_url, stream=stream, subject_prefix=prefix)
    assert isinstance(layer, NatsJetStreamLayer)
    async with Channel(layer):
        for step in range(30):
            with anyio.move_on_after(step * 0.0002):
                await layer.subscribe([unique], [])
            subscribed = unique in layer._channels
            assert (layer._live is not None) == subscribed
            assert await _consumers(nats_url, stream) == int(subscribed)
            await layer.unsubscribe([unique], [])
            assert layer._live is None
            assert await _consumers(nats_url, stream) == 0


async def test_a_server_restarted_while_subscribed_resumes_after_the_last_sequence(
    nats_server: NatsServer, nats_names: tuple[str, str], unique: str
) -> None:
    """The live consumer, started after older messages, is recreated from where it started
    (nothing old is read again), then from the last sequence delivered (nothing lost)."""
    stream, prefix = nats_names
    layer = create_layer(nats_server.url, stream=stream, subject_prefix=prefix)
    assert isinstance(layer, NatsJetStreamLayer)
    seen: list[int] = []
    on_live = layer._on_live

    async def spy(msg: Msg) -> None:
        seen.append(stream_sequence(msg))
        await on_live(msg)

    layer._on_live = spy  # type: ignore[method-assign]

    async def restart() -> None:
        nats_server.stop(signal.SIGKILL)
        nats_server.start()
        await until_answering(channel)

    async def publish_all(numbers: range) -> list[str]:
        with anyio.fail_after(TIMEOUT):
            return [await channel.publish(unique, n) for n in numbers]

    async with Channel(layer) as channel:
        old = await publish_all(range(20))
        async with channel.subscribe(unique) as sub:
            await restart()
            ids = await publish_all(range(20, 25))
            assert [e.id for e in await _events(sub, 5)] == ids
            await restart()
            ids += await publish_all(range(25, 30))
            received = await _events(sub, 5)
            with anyio.move_on_after(0.5):
                extra = await sub.next_batch()
                pytest.fail(f"delivered twice: {extra}")
    assert [e.id for e in received] == ids[5:]
    assert min(seen) > int(old[-1])  # the stream was never read from its start again
