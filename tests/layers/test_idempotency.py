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
    Message,
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


async def test_concurrent_keyed_and_unkeyed_publishes_each_get_their_own_answer(
    open_channel: OpenChannel, unique: str
) -> None:
    """Concurrent callers, some repeating one another's keys, some with no key, some with a batch:
    each key publishes once and each caller hears its own ids, its repeats replayed."""
    name = f"{unique}.orders"
    answers: dict[int, list[str]] = {}

    def call(n: int) -> list[Message]:
        keyed, unkeyed = (
            make_message(name, n % 3, idempotency_key=f"k{n % 3}"),
            make_message(name, -n),
        )
        return [keyed] if n % 2 else [unkeyed] if n % 4 else [keyed, unkeyed]

    calls = [call(n) for n in range(24)]
    async with open_channel() as channel:
        keeps_keys(channel)
        async with channel.subscribe(name) as subscription:

            async def publish(n: int) -> None:
                answers[n] = await channel.publish_messages(calls[n])

            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tasks:
                    for n in range(len(calls)):
                        tasks.start_soon(publish, n)
            events = await published(subscription, channel, name)
    by_id = {e.id: e.data for e in events}
    ids_of_key: dict[str, set[str]] = {}
    for n, call in enumerate(calls):
        assert len(answers[n]) == len(call)
        for message, id in zip(call, answers[n], strict=True):
            assert by_id[id] == int(message.raw)
            if message.idempotency_key is None:
                assert not isinstance(id, Replayed)
            else:
                ids_of_key.setdefault(message.idempotency_key, set()).add(id)
    assert {key: len(ids) for key, ids in ids_of_key.items()} == {"k0": 1, "k1": 1, "k2": 1}
    fresh = [id for ids in answers.values() for id in ids if not isinstance(id, Replayed)]
    assert sorted(fresh) == sorted(e.id for e in events)  # each published once, nothing more
    assert len(events) == 3 + sum(1 for n in range(24) if n % 2 == 0)


async def test_concurrent_publishes_of_one_key_with_two_bodies_publish_one_and_refuse_the_other(
    open_channel: OpenChannel, unique: str
) -> None:
    """The refused caller's whole batch publishes nothing; the callers beside it publish."""
    name = f"{unique}.orders"
    outcomes: dict[str, list[str] | IdempotencyKeyReused] = {}
    calls = {  # where publishes share a layer call, the first goes alone and the others together
        "unkeyed": [make_message(name, 4)],
        "first": [make_message(name, 1, idempotency_key="k")],
        "other body": [
            make_message(name, 2, idempotency_key="fresh"),
            make_message(name, 3, idempotency_key="k"),
        ],
        "other key": [make_message(name, 5, idempotency_key="k5")],
    }
    async with open_channel() as channel:
        keeps_keys(channel)
        if channel.layer.scheme == "nats":
            pytest.skip("nats:// publishes a batch message by message; it cannot undo the first")
        async with channel.subscribe(name) as subscription:

            async def publish(label: str) -> None:
                try:
                    outcomes[label] = await channel.publish_messages(calls[label])
                except IdempotencyKeyReused as exc:
                    outcomes[label] = exc

            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tasks:
                    for label in calls:
                        tasks.start_soon(publish, label)
            events = await published(subscription, channel, name)
    refused = [label for label in ("first", "other body") if isinstance(outcomes[label], Exception)]
    assert len(refused) == 1, outcomes
    kept = 1 if refused == ["other body"] else 3
    assert sorted(e.data for e in events) == sorted([kept, 4, 5] + ([] if kept == 1 else [2]))
    for label in ("unkeyed", "other key"):
        assert isinstance(outcomes[label], list)


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
