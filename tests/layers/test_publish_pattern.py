"""`Channel.publish_pattern` on every layer in `CONTRACT_LAYERS`, published by one `Channel` and
received by another on the same broker (one `Channel` on memory://, which is one process)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from layers import Channel, Event, InvalidArgument, Subscription
from layers._broadcast import PatternEvent
from tests.layers.conftest import OpenChannel
from tests.layers.test_contract import events, need

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def two_channels(open_channel: OpenChannel) -> AsyncIterator[tuple[Channel, Channel]]:
    """A publishing and a receiving `Channel` (the same one on memory://)."""
    async with open_channel() as publisher:
        if not publisher.capabilities.cross_process:
            yield publisher, publisher
            return
        async with open_channel() as receiver:
            yield publisher, receiver


async def test_reaches_matching_channels_and_wider_patterns_once(
    open_channel: OpenChannel, unique: str
) -> None:
    async with (
        two_channels(open_channel) as (publisher, receiver),
        receiver.subscribe(
            f"{unique}.rooms.a", f"{unique}.rooms.b", patterns=[f"{unique}.rooms.*"]
        ) as rooms,
        receiver.subscribe(f"{unique}.other") as other,
        receiver.subscribe(patterns=[f"{unique}.*"]) as wider,
        receiver.subscribe(f"{unique}.d", patterns=[f"{unique}.rooms.a*"]) as narrower,
    ):
        first = await publisher.publish_pattern(f"{unique}.rooms.*", {"n": 1}, event="news")
        # Control messages keep their order: the second one shows the first was not delivered.
        second = await publisher.publish_pattern(f"{unique}.*", {"n": 2})
        got = {
            name: await events(sub, count)
            for name, sub, count in (
                ("rooms", rooms, 2),
                ("other", other, 1),
                ("wider", wider, 2),
                ("narrower", narrower, 1),
            )
        }
    assert [e.data for e in got["rooms"]] == [{"n": 1}, {"n": 2}]
    assert [e.data for e in got["wider"]] == [{"n": 1}, {"n": 2}]
    assert [e.data for e in got["other"]] == [{"n": 2}]
    assert [e.data for e in got["narrower"]] == [{"n": 2}]
    one, two = got["rooms"]
    assert isinstance(one, PatternEvent)
    assert (one.channel, one.id, one.event) == (f"{unique}.rooms.*", first, "news")
    assert (two.channel, two.id, two.event) == (f"{unique}.*", second, "message")
    assert b'"pattern":true' in one.envelope()
    assert not one.sse_frame().startswith(b"id:") and b"\nid:" not in one.sse_frame()


async def test_kept_in_no_history_and_not_replayed(open_channel: OpenChannel, unique: str) -> None:
    async with two_channels(open_channel) as (publisher, receiver):
        need(receiver, "history")
        channel = f"{unique}.room"
        before = await publisher.publish(channel, "before")
        async with receiver.subscribe(channel) as live:
            await publisher.publish_pattern(f"{unique}.*", "to the pattern")
            after = await publisher.publish(channel, "after")
            received: list[object] = []
            with anyio.fail_after(15):
                while not {"after", "to the pattern"} <= set(map(str, received)):
                    # (PostgreSQL's live delivery may still bring what came just before)
                    batch = await live.next_batch()
                    received += [e.data for e in batch if isinstance(e, Event)]
        history = await receiver.history(channel)
        assert [e.id for e in history.events] == [before, after]
        async with receiver.subscribe(channel, last_event_id=before) as resumed:
            (replayed,) = await events(resumed, 1)
        assert (replayed.id, replayed.data) == (after, "after")


async def test_a_star_subscriber_never_sees_the_carrier(
    open_channel: OpenChannel, unique: str
) -> None:
    token = {"token": unique}
    async with (
        two_channels(open_channel) as (publisher, receiver),
        receiver.subscribe(patterns=["*"]) as everything,
    ):
        await publisher.publish_pattern(f"{unique}.nothing.here.*", token)
        await publisher.publish_pattern(f"{unique}.last", "last")
        received: list[Event] = []
        with anyio.fail_after(15):
            while not any(e.data == "last" for e in received):
                received += [i for i in await everything.next_batch() if isinstance(i, Event)]
    carrying = [e for e in received if e.data == token]
    assert len(carrying) == 1
    assert isinstance(carrying[0], PatternEvent)
    assert all(isinstance(e, PatternEvent) for e in received if e.channel.startswith(unique))


async def test_bad_input_is_refused(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel:
        with pytest.raises(InvalidArgument):
            await channel.publish_pattern(f"{unique}.a b", 1)
        with pytest.raises(InvalidArgument):
            await channel.publish_pattern(f"{unique}.*", 1, event="bad event")


async def test_no_consumer_group_gets_it(open_channel: OpenChannel, unique: str) -> None:
    async with two_channels(open_channel) as (publisher, receiver):
        need(receiver, "groups")
        channel = f"{unique}.jobs"
        async with (
            receiver.subscribe(channel, group="workers") as worker,
            receiver.subscribe(channel) as live,
        ):
            await publisher.publish_pattern(f"{unique}.*", "broadcast")
            (seen,) = await events(live, 1)
            assert isinstance(seen, PatternEvent)
            await publisher.publish(channel, "job")
            (job,) = await events(worker, 1)
            assert job.data == "job"
            assert await _nothing_more(worker)


async def _nothing_more(subscription: Subscription) -> bool:
    with anyio.move_on_after(0.3):
        await subscription.next_batch()
        return False
    return True
