"""Idempotent publish in the library, on every layer in `CONTRACT_LAYERS`: a key publishes once
within the layer's `idempotency_ttl`, a replay answers the first id as a `Replayed`, another body
with the key is refused, and a layer that cannot keep keys refuses keyed publishes."""

from __future__ import annotations

import time

import anyio
import pytest

from layers import (
    CapabilityNotSupported,
    Channel,
    Event,
    IdempotencyKeyReused,
    InvalidArgument,
    Replayed,
    Subscription,
    make_message,
)
from layers.sync import SyncChannel
from tests.layers.conftest import OpenChannel

pytestmark = pytest.mark.anyio

TIMEOUT = 15
SENTINEL = "sentinel"


def keeps_keys(channel: Channel) -> None:
    if not channel.capabilities.idempotency:
        pytest.skip(f"{channel.layer.scheme}:// keeps no idempotency keys by design")


async def published(subscription: Subscription, channel: Channel, name: str) -> list[Event]:
    """Every event on `name` up to a sentinel published now: what the publishes before it sent."""
    await channel.publish(name, SENTINEL, event=SENTINEL)
    events: list[Event] = []
    with anyio.fail_after(TIMEOUT):
        while True:
            for item in await subscription.next_batch():
                assert isinstance(item, Event), item
                if item.event == SENTINEL:
                    return events
                events.append(item)


async def test_a_key_publishes_once_and_a_retry_answers_the_first_id(
    open_channel: OpenChannel, unique: str
) -> None:
    name = f"{unique}.orders"
    async with open_channel() as channel:
        keeps_keys(channel)
        async with channel.subscribe(name) as subscription:
            first = await channel.publish(name, {"n": 1}, idempotency_key="order-1")
            again = await channel.publish(name, {"n": 1}, idempotency_key="order-1")
            other = await channel.publish(f"{unique}.other", {"n": 1}, idempotency_key="order-1")
            events = await published(subscription, channel, name)
    assert not isinstance(first, Replayed)
    assert isinstance(again, Replayed) and again == first
    assert not isinstance(other, Replayed) and other != first  # keys are scoped to a channel
    assert [(e.id, e.data) for e in events] == [(first, {"n": 1})]


async def test_the_key_with_another_body_is_refused_and_publishes_nothing(
    open_channel: OpenChannel, unique: str
) -> None:
    name = f"{unique}.orders"
    async with open_channel() as channel:
        keeps_keys(channel)
        async with channel.subscribe(name) as subscription:
            first = await channel.publish(name, {"n": 1}, idempotency_key="k")
            with pytest.raises(IdempotencyKeyReused, match=first):
                await channel.publish(name, {"n": 2}, idempotency_key="k")
            with pytest.raises(IdempotencyKeyReused):
                await channel.publish(name, {"n": 1}, event="other", idempotency_key="k")
            events = await published(subscription, channel, name)
    assert [e.id for e in events] == [first]


async def test_concurrent_duplicates_publish_once(open_channel: OpenChannel, unique: str) -> None:
    name = f"{unique}.orders"
    ids: list[str] = []
    async with open_channel() as channel:
        keeps_keys(channel)
        async with channel.subscribe(name) as subscription:

            async def publish() -> None:
                ids.append(await channel.publish(name, "once", idempotency_key="same"))

            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tasks:
                    for _ in range(20):
                        tasks.start_soon(publish)
            events = await published(subscription, channel, name)
    assert len(set(ids)) == 1 and len(ids) == 20
    assert sum(not isinstance(i, Replayed) for i in ids) == 1
    assert [e.id for e in events] == ids[:1]


async def test_a_batch_replays_what_it_published_and_publishes_what_is_new(
    open_channel: OpenChannel, unique: str
) -> None:
    name = f"{unique}.orders"
    async with open_channel() as channel:
        keeps_keys(channel)
        async with channel.subscribe(name) as subscription:
            first = await channel.publish_messages(
                [make_message(name, 1, idempotency_key="a"), make_message(name, 2)]
            )
            second = await channel.publish_messages(
                [
                    make_message(name, 1, idempotency_key="a"),
                    make_message(name, 3, idempotency_key="b"),
                ]
            )
            with pytest.raises(InvalidArgument, match=r"messages\[1\] repeats"):
                await channel.publish_messages([make_message(name, 4, idempotency_key="c")] * 2)
            events = await published(subscription, channel, name)
    assert isinstance(second[0], Replayed) and second[0] == first[0]
    assert not isinstance(second[1], Replayed)
    assert [e.data for e in events] == [1, 2, 3]


async def test_a_batch_with_a_reused_key_publishes_nothing(
    open_channel: OpenChannel, unique: str
) -> None:
    name = f"{unique}.orders"
    async with open_channel() as channel:
        keeps_keys(channel)
        if channel.layer.scheme == "nats":
            pytest.skip("nats:// publishes a batch message by message; it cannot undo the first")
        async with channel.subscribe(name) as subscription:
            await channel.publish(name, 1, idempotency_key="a")
            with pytest.raises(IdempotencyKeyReused, match=r"'a'"):
                await channel.publish_messages(
                    [
                        make_message(name, 2, idempotency_key="new"),
                        make_message(name, 3, idempotency_key="a"),
                    ]
                )
            events = await published(subscription, channel, name)
    assert [e.data for e in events] == [1]


async def test_a_key_is_forgotten_after_the_ttl(open_channel: OpenChannel, unique: str) -> None:
    name = f"{unique}.orders"
    ttl = 1.0
    async with open_channel(idempotency_ttl=ttl) as channel:
        keeps_keys(channel)
        started = time.monotonic()
        first = await channel.publish(name, "x", idempotency_key="k")
        assert isinstance(await channel.publish(name, "x", idempotency_key="k"), Replayed)
        with anyio.fail_after(ttl + 10):
            while True:
                again = await channel.publish(name, "x", idempotency_key="k")
                if not isinstance(again, Replayed):
                    break
                await anyio.sleep(0.1)  # the broker forgets the key: no event to await
    assert time.monotonic() - started >= ttl * 0.9
    assert again != first


async def test_bad_keys_are_refused_naming_the_rule(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel:
        for key in ("", "k" * 201, "caf\u00e9", "tab\there", "nul\x00", "del\x7f"):
            with pytest.raises(InvalidArgument, match="1-200 printable ASCII characters"):
                await channel.publish(f"{unique}.x", 1, idempotency_key=key)
        if channel.capabilities.idempotency:
            await channel.publish(f"{unique}.x", 1, idempotency_key="k" * 200)
            await channel.publish(f"{unique}.x", 1, idempotency_key=" ~!#$%&'()*+,-./:;<=>?@[]")


async def test_a_layer_without_a_key_record_refuses_keyed_publishes(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel() as channel:
        if channel.capabilities.idempotency:
            pytest.skip(f"{channel.layer.scheme}:// keeps idempotency keys")
        with pytest.raises(CapabilityNotSupported, match=r"redis\+streams://.*nats://"):
            await channel.publish(f"{unique}.x", 1, idempotency_key="k")
        assert await channel.publish(f"{unique}.x", 1)  # unkeyed publishes go on


async def test_sync_channel_passes_the_key() -> None:
    with SyncChannel("memory://") as channel:
        first = channel.publish("orders", 1, idempotency_key="k")
        again = channel.publish("orders", 1, idempotency_key="k")
    assert isinstance(again, Replayed) and again == first
