"""`Channel.publish_nowait` on every layer in `CONTRACT_LAYERS` (memory under asyncio and trio):
queued, published in order in batches, flushed on close, failures logged and counted."""

from __future__ import annotations

import logging

import anyio
import pytest

from layers import (
    Channel,
    ChannelClosed,
    ChannelObserver,
    Event,
    InMemoryChannelLayer,
    InvalidArgument,
    InvalidPayload,
    LayerUnavailable,
    PublishQueueFull,
    Subscription,
    _publish_queue,
)
from layers.redis_streams import RedisStreamsLayer
from tests.conftest import LayerFactory
from tests.fixtures_redis import ThrowawayRedis
from tests.layers.conftest import OpenChannel

pytestmark = pytest.mark.anyio

TIMEOUT = 15


class Counting(ChannelObserver):
    def __init__(self) -> None:
        self.publish_calls: list[int] = []
        self.failures: list[tuple[int, BaseException]] = []

    def published(self, count: int, seconds: float) -> None:
        self.publish_calls.append(count)

    def publish_failed(self, count: int, error: BaseException) -> None:
        self.failures.append((count, error))


async def events(subscription: Subscription, count: int) -> list[Event]:
    received: list[Event] = []
    with anyio.fail_after(TIMEOUT):
        while len(received) < count:
            for item in await subscription.next_batch():
                assert isinstance(item, Event), item
                received.append(item)
    assert len(received) == count
    return received


async def test_queued_messages_are_published_in_order_in_batches(
    open_channel: OpenChannel, unique: str
) -> None:
    observer = Counting()
    async with (
        open_channel(observer=observer, max_backlog=1000) as channel,
        channel.subscribe(f"{unique}.a", f"{unique}.b") as subscription,
    ):
        for n in range(300):
            assert channel.publish_nowait(f"{unique}.{'ab'[n % 2]}", n, event="tick") is None
        assert observer.publish_calls == []  # nothing awaited yet: all of it is queued
        received = await events(subscription, 300)
    assert sorted(event.data for event in received) == list(range(300))
    for name in "ab":
        mine = [event.data for event in received if event.channel == f"{unique}.{name}"]
        assert mine == sorted(mine)
    assert {event.event for event in received} == {"tick"}
    assert sum(observer.publish_calls) == 300
    assert max(observer.publish_calls) > 1  # queued messages share layer calls
    assert max(observer.publish_calls) <= _publish_queue.QUEUED_PUBLISH_BATCH
    assert channel.publish_failures == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_long_queue_does_not_overflow_subscribers_that_keep_up(unique: str) -> None:
    """The queue goes out a batch at a time, and subscribers run between batches."""
    async with (
        Channel(InMemoryChannelLayer(), max_backlog=1000) as channel,
        channel.subscribe(unique) as subscription,
    ):
        for n in range(3000):
            channel.publish_nowait(unique, n)
        received = await events(subscription, 3000)  # a Gap among them would fail here
    assert [event.data for event in received] == list(range(3000))


async def test_flush_waits_for_what_was_queued(open_channel: OpenChannel, unique: str) -> None:
    observer = Counting()
    async with open_channel(observer=observer, history_size=100) as channel:
        for n in range(20):
            channel.publish_nowait(unique, n)
        with anyio.fail_after(TIMEOUT):
            await channel.flush()
        assert sum(observer.publish_calls) == 20
        if channel.capabilities.history:
            replay = await channel.history(unique)
            assert [event.data for event in replay.events] == list(range(20))
        with anyio.fail_after(TIMEOUT):
            await channel.flush()  # nothing queued: returns at once


async def test_closing_the_channel_flushes_the_queue(
    open_channel: OpenChannel, make_layer: LayerFactory, unique: str
) -> None:
    observer = Counting()
    with anyio.fail_after(TIMEOUT):
        async with open_channel(observer=observer, history_size=100) as channel:
            for n in range(50):
                channel.publish_nowait(unique, n)
    assert sum(observer.publish_calls) == 50
    assert channel.publish_failures == 0
    if channel.capabilities.history and channel.capabilities.cross_process:
        async with Channel(make_layer()) as reader:  # the broker has them
            replay = await reader.history(unique)
        assert [event.data for event in replay.events] == list(range(50))


async def test_what_close_could_not_flush_is_counted_and_logged(
    open_channel: OpenChannel,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(_publish_queue, "FLUSH_ON_CLOSE_SECONDS", 0)
    observer = Counting()
    with caplog.at_level(logging.ERROR, logger="layers.core"), anyio.fail_after(TIMEOUT):
        async with open_channel(observer=observer) as channel:
            for n in range(250):
                channel.publish_nowait(unique, n)
    # Each message was either accepted by the layer or reported: none is silently lost. (How
    # many the layer took before the close gave up depends on its speed.)
    assert sum(observer.publish_calls) + channel.publish_failures == 250
    assert channel.publish_failures == sum(count for count, _ in observer.failures)
    assert all(isinstance(error, ChannelClosed) for _, error in observer.failures)
    logged = [r for r in caplog.records if "not published" in r.getMessage()]
    assert bool(logged) == bool(channel.publish_failures)


async def test_full_queue_is_refused_clearly(open_channel: OpenChannel, unique: str) -> None:
    async with (
        open_channel(max_queued_publishes=5) as channel,
        channel.subscribe(unique) as subscription,
    ):
        for n in range(5):
            channel.publish_nowait(unique, n)
        with pytest.raises(PublishQueueFull, match="max_queued_publishes"):
            channel.publish_nowait(unique, 5)
        assert [event.data for event in await events(subscription, 5)] == list(range(5))
        channel.publish_nowait(unique, 6)  # room again once the queue drained
        assert [event.data for event in await events(subscription, 1)] == [6]


async def test_bad_input_is_refused_at_the_call(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel:
        with pytest.raises(InvalidArgument):
            channel.publish_nowait("bad name!", 1)
        with pytest.raises(InvalidPayload):
            channel.publish_nowait(unique, {1, 2})
        with pytest.raises(InvalidArgument):
            channel.publish_nowait(unique, 1, event="bad\ntype")
    with pytest.raises(ChannelClosed):
        channel.publish_nowait(unique, 1)


@pytest.mark.layer_quirk
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_publish_failing_during_an_outage_is_logged_and_counted(
    throwaway_redis: ThrowawayRedis, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A real broker outage (a private redis-server stopped) after the messages were queued."""
    observer = Counting()
    layer = RedisStreamsLayer(throwaway_redis.url.replace("redis://", "redis+streams://"))
    with caplog.at_level(logging.ERROR, logger="layers.core"):
        async with Channel(layer, observer=observer) as channel:
            channel.publish_nowait(unique, "before")
            with anyio.fail_after(TIMEOUT):
                await channel.flush()
            throwaway_redis.stop()
            for n in range(3):
                channel.publish_nowait(unique, n)
            with anyio.fail_after(TIMEOUT):
                await channel.flush()
            assert channel.publish_failures == 3
            throwaway_redis.start()
            with anyio.fail_after(TIMEOUT):
                while True:  # the layer reconnects by itself; publish_nowait works again
                    failures = channel.publish_failures
                    channel.publish_nowait(unique, "after")
                    await channel.flush()
                    if channel.publish_failures == failures:
                        break
                    await anyio.sleep(0.1)  # the reconnect has no event to await here
    assert sum(count for count, _ in observer.failures) >= 3
    assert all(isinstance(error, LayerUnavailable) for _, error in observer.failures)
    assert observer.failures[0][0] == 3  # the three queued together failed together
    assert any(
        "not published" in r.getMessage() and unique in r.getMessage() for r in caplog.records
    )
