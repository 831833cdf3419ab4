"""The layer contract below the `Channel` core (`layers.base.ChannelLayer`), for every layer in
`CONTRACT_LAYERS`: each layer is driven directly, with a recording `Sink`.

What the core relies on: every live message reaches the sink exactly once and in order; a
subscription is in effect once `subscribe` returned; `replay` and live delivery together leave
nothing out (an event may be in both, the core drops the second); after the broker connection is
cut, the layer reconnects by itself, restores its subscriptions and says so (`reconnected`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from layers import ChannelLayer, make_message
from tests.conftest import LayerFactory
from tests.fixtures_postgres import POSTGRES_URL, execute
from tests.fixtures_redis import REDIS_URL
from tests.layers.recording import RecordingSink

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def running(layer: ChannelLayer) -> AsyncIterator[RecordingSink]:
    sink = RecordingSink()
    async with anyio.create_task_group() as tasks:
        await tasks.start(layer.run, sink)
        try:
            yield sink
        finally:
            tasks.cancel_scope.cancel()


async def nothing_more(sink: RecordingSink, seen: int, seconds: float = 0.3) -> None:
    await anyio.sleep(seconds)  # a duplicate would come within a read or two: give it the time
    assert len(sink.events) == seen, sink.events[seen:]


async def test_every_live_message_arrives_once_and_in_order(
    make_layer: LayerFactory, unique: str
) -> None:
    layer = make_layer()
    async with running(layer) as sink:
        # A channel that a pattern also matches: still one delivery per message.
        await layer.subscribe([f"{unique}.a", f"{unique}.p.both"], [f"{unique}.p.*"])
        names = [f"{unique}.a", f"{unique}.p.both", f"{unique}.p.x"]
        ids = await layer.publish([make_message(names[n % 3], n) for n in range(30)])
        for n in range(30, 40):  # single publishes too, right after one another
            ids += await layer.publish([make_message(names[n % 3], n)])
        events = await sink.wait_for(40)
        await nothing_more(sink, 40)
    assert [event.id for event in events] == ids
    assert [event.data for event in events] == list(range(40))
    assert [event.channel for event in events] == [names[n % 3] for n in range(40)]


async def test_a_subscription_is_in_effect_when_subscribe_returns(
    make_layer: LayerFactory, unique: str
) -> None:
    layer = make_layer()
    async with running(layer) as sink:
        for n in range(5):  # each time a new channel, published to at once
            await layer.subscribe([f"{unique}.{n}"], [])
            await layer.publish([make_message(f"{unique}.{n}", n)])
        events = await sink.wait_for(5)
        await layer.subscribe([], [f"{unique}.late.*"])
        await layer.publish([make_message(f"{unique}.late.x", "late")])
        late = await sink.wait_for(6)
    assert [event.data for event in events] == list(range(5))
    assert late[-1].data == "late"


async def test_replay_and_live_delivery_leave_nothing_out(
    make_layer: LayerFactory, unique: str
) -> None:
    layer = make_layer()
    if not layer.capabilities.history:
        pytest.skip(f"{layer.scheme}:// keeps no history by design")
    async with running(layer) as sink:
        before = await layer.publish([make_message(unique, n) for n in range(4)])
        await layer.subscribe([unique], [])
        after = await layer.publish([make_message(unique, n) for n in range(4, 7)])
        replay = await layer.replay([unique], [], after=before[0], limit=None)
        # The memory layer hands every publish to the sink (the core routes): count ours only.
        await sink.wait_until(lambda: set(after) <= {event.id for event in sink.events})
    replayed = [event.id for event in replay.events]
    live = [event.id for event in sink.events if event.id in after]
    assert not replay.gap
    assert replayed == (before + after)[1 : 1 + len(replayed)]  # in order, from after the cursor
    assert set(before[1:]) <= set(replayed)  # published before subscribing: only replay has them
    assert live == after  # published after: live delivery has them all, in order


# -- reconnecting ---------------------------------------------------------------------------------


async def cut_redis(layer: Any) -> None:
    import redis.asyncio

    async with redis.asyncio.Redis.from_url(REDIS_URL) as admin:
        for client in await admin.client_list():
            if client["name"] == layer.client_name:  # this layer instance's, and only those
                await admin.client_kill_filter(_id=client["id"])


async def cut_postgres(layer: Any) -> None:
    await execute(
        POSTGRES_URL,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        layer.listener_application_name,
    )


async def cut_mqtt(layer: Any) -> None:
    """Take the listener's session over: the broker disconnects the layer's connection."""
    import aiomqtt

    listener = layer._client._client
    intruder = aiomqtt.Client(listener.host, listener.port, identifier=listener._client_id.decode())
    async with intruder:
        pass


CUTS: dict[str, Callable[[Any], Awaitable[None]]] = {
    "redis": cut_redis,
    "redis+streams": cut_redis,
    "postgresql": cut_postgres,
    "mqtt": cut_mqtt,
}


async def test_a_cut_connection_comes_back_with_its_subscriptions(
    make_layer: LayerFactory, unique: str
) -> None:
    layer = make_layer()
    if layer.scheme not in CUTS:
        pytest.skip(f"{layer.scheme}:// has no broker connection to cut")
    async with running(layer) as sink:
        await layer.subscribe([unique], [f"{unique}.p.*"])
        await layer.publish([make_message(unique, "before")])
        await sink.wait_for(1)
        await CUTS[layer.scheme](layer)
        await sink.wait_reconnected()
        ids = await layer.publish([make_message(unique, "after")])
        ids += await layer.publish([make_message(f"{unique}.p.x", "pattern after")])
        events = await sink.wait_for(3)
        await nothing_more(sink, len(sink.events))
    assert [event.id for event in events[-2:]] == ids
    assert len({event.id for event in sink.events}) == len(sink.events)  # no duplicates
