"""What only the Redis layers do: connections, keys, ids, cross-process delivery and faults.

The contract suite covers the behaviour every layer shares. Everything here runs against a real
Redis: the test database (TEST_REDIS_URL) or a throwaway redis-server this file starts and stops.
Fault tests kill only the connections of their own layer instance, found by its client name.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio
from anyio.streams.text import TextReceiveStream

from layers import (
    CapabilityNotSupported,
    Channel,
    ChannelObserver,
    Gap,
    LayerUnavailable,
    create_layer,
    make_message,
)
from layers._redis import RedisLayer, driver_url, parse_id
from layers.redis_pubsub import RedisPubSubLayer
from layers.redis_streams import READ_COUNT, RedisStreamsLayer
from tests.conftest import LayerFactory
from tests.fixtures_redis import ThrowawayRedis
from tests.layers.test_contract import TIMEOUT, data_of, events, take

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
BOTH = ["redis_pubsub_layer_factory", "redis_streams_layer_factory"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py is asyncio only


@pytest.fixture(params=BOTH, ids=["pubsub", "streams"])
def redis_layer_factory(request: pytest.FixtureRequest) -> LayerFactory:
    factory: LayerFactory = request.getfixturevalue(request.param)
    return factory


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, protocol=2)
    yield client
    await client.aclose()


class Reconnects(ChannelObserver):
    """Lets a test wait until the layer has its broker connection back."""

    def __init__(self) -> None:
        self.count = 0
        self.next = anyio.Event()

    def reconnected(self, scheme: str) -> None:
        self.count += 1
        self.next.set()
        self.next = anyio.Event()


async def kill_connections(admin: redis.asyncio.Redis, layer: RedisLayer) -> int:
    """CLIENT KILL every connection of this layer instance, and only those."""
    killed = 0
    for client in await admin.client_list():
        if client["name"] == layer.client_name:
            killed += int(await admin.client_kill_filter(_id=client["id"]))
    return killed


async def nothing_more(subscription: Any, seconds: float = 0.3) -> None:
    with anyio.move_on_after(seconds):
        extra = await subscription.next_batch()
        pytest.fail(f"unexpected delivery: {extra}")


# -- configuration ---------------------------------------------------------------------------------


def test_urls_options_and_factory() -> None:
    assert driver_url("redis+streams://h:1/2") == "redis://h:1/2"
    assert driver_url("rediss+streams://u:p@h/0") == "rediss://u:p@h/0"
    assert driver_url("redis://h/0?key_prefix=x:&protocol=2") == "redis://h/0?protocol=2"
    assert RedisPubSubLayer("redis://h/0?key_prefix=app:").keys.prefix == "app:"
    assert RedisPubSubLayer("redis://h/0", key_prefix="lib:").keys.prefix == "lib:"
    assert isinstance(create_layer("redis://127.0.0.1/0"), RedisPubSubLayer)
    streams = create_layer("redis+streams://127.0.0.1/0", history_size=5, history_ttl=60)
    assert isinstance(streams, RedisStreamsLayer)
    assert (streams.history_size, streams.history_ttl) == (5, 60)
    with pytest.raises(TypeError):
        RedisStreamsLayer("redis+streams://127.0.0.1/0", histroy_size=5)  # type: ignore[call-arg]


async def test_unreachable_redis_is_a_clear_error_without_the_password() -> None:
    """The layer starts without its broker (readiness red) and names it, secrets masked."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for url in (
        f"redis+streams://:s3cret@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password=s3cret",
    ):
        with anyio.fail_after(TIMEOUT):
            async with Channel(create_layer(url)) as channel:
                for call in (channel.ping(), channel.publish("c", 1)):
                    with pytest.raises(LayerUnavailable) as raised:
                        await call
                    assert f"127.0.0.1:{port}" in raised.value.detail
                    assert "s3cret" not in raised.value.detail


async def test_channel_names_are_keys_as_they_are(
    redis_streams_layer_factory: LayerFactory, redis_prefix: str, admin: redis.asyncio.Redis
) -> None:
    async with Channel(redis_streams_layer_factory()) as channel:
        for name in ("Room", "room", "a:b@c.d", "seq"):
            await channel.publish(name, name)
        for name in ("Room", "room", "a:b@c.d", "seq"):
            assert await admin.type(f"{redis_prefix}{name}") == b"stream"
            assert data_of(list((await channel.history(name)).events)) == [name]


# -- Pub/Sub ---------------------------------------------------------------------------------------


async def test_pubsub_has_one_listening_and_one_publishing_connection(
    redis_pubsub_layer_factory: LayerFactory, admin: redis.asyncio.Redis, unique: str
) -> None:
    layer = redis_pubsub_layer_factory()
    async with (
        Channel(layer) as channel,
        channel.subscribe(f"{unique}.a", f"{unique}.b") as first,
        channel.subscribe(patterns=[f"{unique}.p.*", f"{unique}.q?"]) as second,
    ):
        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(channel.publish, f"{unique}.{'ab'[n % 2]}", n)
        assert len(await take(first, 20)) == 20
        await channel.publish(f"{unique}.p.1", "p")
        assert data_of(await take(second, 1)) == ["p"]
        names = [c["name"] for c in await admin.client_list()]
        assert names.count(layer.client_name) == 2


async def test_pubsub_subscription_changes_lose_no_other_messages(
    redis_pubsub_layer_factory: LayerFactory, unique: str
) -> None:
    steady = f"{unique}.steady"
    async with (
        Channel(redis_pubsub_layer_factory()) as channel,
        Channel(redis_pubsub_layer_factory()) as elsewhere,
        channel.subscribe(steady, max_backlog=1000) as sub,
    ):

        async def churn() -> None:
            for n in range(30):
                async with channel.subscribe(f"{unique}.c{n}", patterns=[f"{unique}.x{n}.*"]):
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(churn)
            for n in range(300):
                await elsewhere.publish(steady, n)
        assert data_of(await take(sub, 300)) == list(range(300))


async def test_pubsub_refuses_history_and_groups_naming_streams(
    redis_pubsub_layer_factory: LayerFactory, unique: str
) -> None:
    async with Channel(redis_pubsub_layer_factory()) as channel:
        with pytest.raises(CapabilityNotSupported, match=r"redis\+streams://"):
            await channel.history(unique)
        with pytest.raises(CapabilityNotSupported, match=r"redis\+streams://"):
            async with channel.subscribe(unique, group="g"):
                pass


# -- Streams ---------------------------------------------------------------------------------------


async def test_publish_is_one_round_trip(
    redis_layer_factory: LayerFactory, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    from redis.asyncio.connection import AbstractConnection

    sent: list[bytes] = []  # the name of each command sent, on any connection
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, command: Any, *args: Any, **kwargs: Any) -> None:
        packed = command if isinstance(command, bytes) else b"".join(command)
        sent.append(packed.split(b"\r\n")[2])  # *<n>, $<length>, then the command's name
        await original(self, command, *args, **kwargs)

    async with Channel(redis_layer_factory()) as channel:
        await channel.publish(unique, "loads the script")
        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
        await channel.publish(f"{unique}.one", 1)
        batch = [make_message(f"{unique}.{n % 3}", n) for n in range(50)]
        assert len(await channel.publish_messages(batch)) == 50
    # what the listener reads with aside (Streams: a new stream is announced to it)
    assert [name for name in sent if name not in (b"XREAD", b"CLIENT")] == [b"EVALSHA"] * 2


async def test_first_subscribe_replays_nothing_old(
    redis_streams_layer_factory: LayerFactory, unique: str
) -> None:
    async with Channel(redis_streams_layer_factory()) as channel:
        for n in range(3):
            await channel.publish(unique, f"old {n}")
        async with channel.subscribe(unique, patterns=[f"{unique}*"]) as sub:
            await channel.publish(unique, "new")
            assert data_of(await take(sub, 1)) == ["new"]
            await nothing_more(sub)


async def test_ids_are_ordered_across_channels_and_delivered_in_that_order(
    redis_streams_layer_factory: LayerFactory, unique: str
) -> None:
    """Batches that create streams matching a pattern, and reads Redis cuts off at READ_COUNT,
    still reach a multi-channel subscriber in one global id order."""
    names = [f"{unique}.a", f"{unique}.b", f"{unique}.p.1", f"{unique}.p.2"]
    async with (
        Channel(redis_streams_layer_factory(history_size=5000)) as channel,
        channel.subscribe(*names[:2], patterns=[f"{unique}.p.*"], max_backlog=10000) as sub,
    ):
        batch = [make_message(names[n % 4], n) for n in range(8)]
        ids = await channel.publish_messages(batch)
        big = [make_message(names[n % 3 if n < 2000 else 3], n) for n in range(8, 2600)]
        ids += await channel.publish_messages(big)
        received = await events(sub, 2600)
    assert [e.data for e in received] == list(range(2600))
    assert [e.id for e in received] == ids
    parsed = [parse_id(id) for id in ids]
    assert parsed == sorted(parsed) and len(set(parsed)) == len(parsed)
    assert READ_COUNT < 2000  # the big batch did get cut off


async def test_pattern_follows_channels_created_later_in_another_process(
    redis_streams_layer_factory: LayerFactory, unique: str
) -> None:
    async with (
        Channel(redis_streams_layer_factory()) as channel,
        Channel(redis_streams_layer_factory()) as elsewhere,
        channel.subscribe(patterns=[f"{unique}.u.*"]) as sub,
    ):
        for n in range(20):
            await elsewhere.publish(f"{unique}.u.{n % 5}", n)
        await elsewhere.publish(f"{unique}.other", "no")
        assert data_of(await take(sub, 20)) == list(range(20))


async def test_resume_from_an_id_this_redis_never_issued(
    redis_streams_layer_factory: LayerFactory, unique: str
) -> None:
    async with Channel(redis_streams_layer_factory()) as channel:
        await channel.publish(unique, "kept")
        replay = await channel.history(unique, after="99999999999999-0")
    assert replay.gap and replay.reason == "unknown_id"
    assert data_of(list(replay.events)) == ["kept"]


async def test_group_and_its_pending_messages_survive_a_gateway_restart(
    redis_streams_layer_factory: LayerFactory, unique: str
) -> None:
    async with (
        Channel(redis_streams_layer_factory()) as first,
        first.subscribe(unique, group="g", consumer="c1") as sub,
    ):
        message_id = await first.publish(unique, "unacked")
        (event,) = await events(sub, 1)
    async with Channel(redis_streams_layer_factory(), ack_timeout=0.5) as second:
        info = await second.group_info(unique, "g")
        assert info.pending == 1 and info.oldest_unacked_id == message_id
        assert [(c.name, c.pending) for c in info.consumers] == [("c1", 1)]
        await second.publish(unique, "while down")
        async with second.subscribe(unique, group="g", consumer="c2") as sub:
            received: list[tuple[object, int | None]] = []
            while len(received) < 2:
                (event,) = await events(sub, 1)
                assert await event.ack()  # at once, or it would time out and come again
                received.append((event.data, event.deliveries))
        assert sorted(received, key=str) == [("unacked", 2), ("while down", 1)]
        assert (await second.group_info(unique, "g")).pending == 0


async def test_history_ttl_expires_streams_but_never_a_group(
    redis_streams_layer_factory: LayerFactory, redis_prefix: str, admin: redis.asyncio.Redis
) -> None:
    async with Channel(redis_streams_layer_factory(history_ttl=60)) as channel:
        await channel.publish("plain", 1)
        async with channel.subscribe("grouped", group="g"):
            await channel.publish("grouped", 1)
        assert 0 < await admin.pttl(f"{redis_prefix}plain") <= 60_000
        assert await admin.pttl(f"{redis_prefix}grouped") == -1


async def test_pending_entry_trimmed_away_is_not_redelivered(
    redis_streams_layer_factory: LayerFactory, unique: str
) -> None:
    async with Channel(redis_streams_layer_factory(history_size=2), ack_timeout=0.2) as channel:
        async with channel.subscribe(unique, group="g", consumer="c1") as sub:
            await channel.publish(unique, "trimmed")
            await events(sub, 1)
        for n in range(3):
            await channel.publish(unique, n)
        async with channel.subscribe(unique, group="g", consumer="c2") as sub:
            received = await events(sub, 2)
            assert [(e.data, e.deliveries) for e in received] == [(1, 1), (2, 1)]
            for event in received:
                assert await event.ack()
            await nothing_more(sub, 0.6)  # several claim rounds: "trimmed" never comes back


# -- several processes -----------------------------------------------------------------------------

CHILD = """
import sys, anyio
from layers import Channel, create_layer

async def main(url: str, prefix: str) -> None:
    async with Channel(create_layer(url, key_prefix=prefix)) as channel:
        async with channel.subscribe("to-child") as sub:
            print("ready", flush=True)
            async for event in sub:
                await channel.publish("to-parent", {"echo": event.data})
                return

anyio.run(main, sys.argv[1], sys.argv[2])
"""


async def test_two_processes_deliver_each_others_messages(
    redis_layer_factory: LayerFactory,
) -> None:
    layer = redis_layer_factory()
    assert isinstance(layer, RedisLayer)
    async with Channel(layer) as channel, channel.subscribe("to-parent") as replies:
        command = [sys.executable, "-c", CHILD, layer.url, layer.keys.prefix]
        async with await anyio.open_process(command, cwd=REPO) as child:
            assert child.stdout is not None
            output = ""
            with anyio.fail_after(TIMEOUT):
                async for chunk in TextReceiveStream(child.stdout):
                    output += chunk
                    if "ready" in output:
                        break
            await channel.publish("to-child", "hello")
            (reply,) = await events(replies, 1)
            with anyio.fail_after(TIMEOUT):
                assert await child.wait() == 0
    assert reply.data == {"echo": "hello"}


# -- faults ----------------------------------------------------------------------------------------


@asynccontextmanager
async def watched(layer: RedisLayer) -> AsyncIterator[tuple[Channel, Reconnects]]:
    observer = Reconnects()
    async with Channel(layer, observer=observer) as channel:
        yield channel, observer


async def test_killed_connections_come_back_and_subscriptions_stay_open(
    redis_layer_factory: LayerFactory, admin: redis.asyncio.Redis, unique: str
) -> None:
    layer = redis_layer_factory()
    assert isinstance(layer, RedisLayer)
    streams = isinstance(layer, RedisStreamsLayer)
    async with (
        watched(layer) as (channel, observer),
        Channel(redis_layer_factory()) as elsewhere,
        channel.subscribe(f"{unique}.x", patterns=[f"{unique}.p.*"]) as sub,
    ):
        await channel.publish(f"{unique}.x", "before")
        assert data_of(await take(sub, 1)) == ["before"]
        reconnected = observer.next
        assert await kill_connections(admin, layer) >= 2
        if streams:
            # Published while the listener is away: Streams delivers it once it is back.
            await elsewhere.publish(f"{unique}.x", "meanwhile")
        with anyio.fail_after(TIMEOUT):
            await reconnected.wait()
        # The publishing connection was killed too: the layer replaces it without an error.
        await channel.publish(f"{unique}.x", "after")
        await channel.publish(f"{unique}.p.1", "pattern after")
        expected = ["meanwhile"] if streams else []
        items = await take(sub, len(expected) + 2 + (not streams))
        if not streams:  # Pub/Sub may have missed messages: the subscriber is told
            assert isinstance(items[0], Gap) and items[0].reason == "reconnected"
        assert data_of(items) == [*expected, "after", "pattern after"]
        assert observer.count == 1


async def restarted_redis_case(
    make: Callable[[str], RedisLayer], server: ThrowawayRedis, unique: str
) -> None:
    layer = make(server.url)
    streams = isinstance(layer, RedisStreamsLayer)
    async with watched(layer) as (channel, observer), channel.subscribe(unique) as sub:
        before = await channel.publish(unique, "before")
        assert data_of(await take(sub, 1)) == ["before"]
        reconnected = observer.next
        server.stop()
        with pytest.raises(LayerUnavailable):
            await channel.publish(unique, "refused")
        with pytest.raises(LayerUnavailable):
            await channel.ping()
        await nothing_more(sub)  # the subscription is still open, and quiet
        server.start()
        if streams:
            with anyio.fail_after(TIMEOUT):
                while True:  # as soon as Redis takes it, likely before the listener is back
                    try:
                        first_after = await channel.publish(unique, "after restart")
                        break
                    except LayerUnavailable:
                        await anyio.sleep(0.02)
            # Published before the listener reconnected, Streams still delivers it.
            with anyio.fail_after(TIMEOUT):
                await reconnected.wait()
            assert parse_id(first_after) > parse_id(before)  # type: ignore[operator]
        else:
            with anyio.fail_after(TIMEOUT):
                await reconnected.wait()
            await channel.publish(unique, "after restart")
        await channel.ping()  # readiness is green again
        await channel.publish(unique, "later")
        if streams:  # Streams caught up: nothing was lost
            assert data_of(await take(sub, 2)) == ["after restart", "later"]
        else:  # Pub/Sub cannot know what it missed: the subscriber is told it may have
            gap, *rest = await take(sub, 3)
            assert isinstance(gap, Gap) and gap.reason == "reconnected"
            assert data_of(rest) == ["after restart", "later"]


async def test_pubsub_survives_a_redis_restart(
    throwaway_redis: ThrowawayRedis, unique: str
) -> None:
    await restarted_redis_case(RedisPubSubLayer, throwaway_redis, unique)


async def test_streams_survive_a_redis_restart(
    throwaway_redis: ThrowawayRedis, unique: str
) -> None:
    def make(url: str) -> RedisLayer:
        return RedisStreamsLayer(url.replace("redis://", "redis+streams://"))

    await restarted_redis_case(make, throwaway_redis, unique)


async def test_a_frozen_redis_fails_each_call_within_the_command_timeout(
    throwaway_redis: ThrowawayRedis, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    """A broker that keeps its connections open and answers nothing (stopped, or a network that
    drops everything): publishes and pings fail in about the timeout, connecting again included,
    each call at most once; publishing recovers by itself once it answers again."""
    import os
    import signal
    import time

    import layers._redis

    monkeypatch.setattr(layers._redis, "COMMAND_TIMEOUT", 0.5)
    assert throwaway_redis.process is not None
    pid = throwaway_redis.process.pid
    async with Channel(RedisPubSubLayer(throwaway_redis.url)) as channel:
        await channel.publish(unique, "before")
        os.kill(pid, signal.SIGSTOP)
        try:
            for wave in ("sent on the open connection", "sent after connecting again"):
                failures: list[BaseException] = []

                async def fails(call: Callable[[], Any], failures: list[BaseException]) -> None:
                    try:
                        await call()
                    except LayerUnavailable as exc:
                        failures.append(exc)

                started = time.monotonic()
                with anyio.fail_after(5):
                    async with anyio.create_task_group() as tg:
                        for n in range(4):
                            tg.start_soon(fails, lambda n=n: channel.publish(unique, n), failures)
                            tg.start_soon(fails, channel.ping, failures)
                assert len(failures) == 8, wave
                assert time.monotonic() - started < 2.5, wave  # not one timeout after another
        finally:
            os.kill(pid, signal.SIGCONT)
        with anyio.fail_after(TIMEOUT):
            while True:
                try:
                    await channel.publish(unique, "after")
                    break
                except LayerUnavailable:
                    await anyio.sleep(0.05)


async def test_group_consumer_survives_a_redis_restart(
    throwaway_redis: ThrowawayRedis, unique: str
) -> None:
    url = throwaway_redis.url.replace("redis://", "redis+streams://")
    async with (
        watched(RedisStreamsLayer(url)) as (channel, observer),
        channel.subscribe(unique, group="g", consumer="c") as workers,
    ):
        await channel.publish(unique, "first")
        (event,) = await events(workers, 1)
        assert await event.ack()
        reconnected = observer.next
        throwaway_redis.stop()
        throwaway_redis.start()  # empty: the group is gone
        with anyio.fail_after(TIMEOUT):
            await reconnected.wait()
        await channel.publish(unique, "second")
        (event,) = await events(workers, 1)
        assert (event.data, event.deliveries) == ("second", 1)
        assert await event.ack()
