"""The layer contract: every test runs against every layer in `CONTRACT_LAYERS`.

A test that needs a capability a layer lacks by design is skipped for that layer, and the layer is
checked to refuse the capability with `CapabilityNotSupported` instead.
"""

from __future__ import annotations

import re
import threading

import anyio
import anyio.lowlevel
import pytest

from layers import (
    CapabilityNotSupported,
    Channel,
    ChannelLayer,
    ChannelObserver,
    Event,
    Gap,
    InvalidArgument,
    Item,
    SubscriberOverflow,
    Subscription,
    UnknownGroup,
)
from layers.base import GroupNotice
from tests.conftest import eventually
from tests.layers.conftest import OpenChannel

pytestmark = pytest.mark.anyio

TIMEOUT = 15


async def take(subscription: Subscription, count: int) -> list[Item]:
    """The next `count` items, bounded in time."""
    items: list[Item] = []
    with anyio.fail_after(TIMEOUT):
        while len(items) < count:
            items.extend(await subscription.next_batch())
    assert len(items) == count, items
    return items


async def events(subscription: Subscription, count: int) -> list[Event]:
    items = await take(subscription, count)
    assert all(isinstance(item, Event) for item in items), items
    return [item for item in items if isinstance(item, Event)]


def data_of(items: list[Item]) -> list[object]:
    return [item.data for item in items if isinstance(item, Event)]


def core_only(channel: Channel) -> None:
    """Behaviour of the core alone (backpressure): tested on the memory layer, not per broker."""
    if channel.layer.scheme != "memory":
        pytest.skip("the core's behaviour, whatever the layer: tested on memory://")


def need(channel: Channel, capability: str) -> None:
    if not getattr(channel.capabilities, capability):
        pytest.skip(f"{channel.layer.scheme}:// has no {capability} by design")


# -- publish and subscribe --


async def test_subscriber_receives_published_event(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel, channel.subscribe(f"{unique}.room") as sub:
        message_id = await channel.publish(f"{unique}.room", {"text": "hi"}, event="chat")
        (event,) = await events(sub, 1)
    assert event.channel == f"{unique}.room"
    assert event.id == message_id
    assert event.event == "chat"
    assert event.data == {"text": "hi"}
    assert event.published_at > 0
    for forbidden in "\r\n\0":
        assert forbidden not in event.id


async def test_default_event_type_is_message(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel, channel.subscribe(unique) as sub:
        await channel.publish(unique, [1, "two", None])
        (event,) = await events(sub, 1)
    assert event.event == "message"
    assert event.data == [1, "two", None]


async def test_thousand_messages_arrive_in_order_without_loss(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel(max_backlog=2000) as channel, channel.subscribe(unique) as sub:
        ids = [await channel.publish(unique, n) for n in range(1000)]
        received = await events(sub, 1000)
    assert [e.data for e in received] == list(range(1000))
    assert [e.id for e in received] == ids
    assert len(set(ids)) == 1000


async def test_batch_publish_keeps_order(open_channel: OpenChannel, unique: str) -> None:
    from layers import make_message

    async with open_channel() as channel, channel.subscribe(f"{unique}.a", f"{unique}.b") as sub:
        batch = [make_message(f"{unique}.{'ab'[n % 2]}", n) for n in range(10)]
        ids = await channel.publish_messages(batch)
        received = await events(sub, 10)
    assert len(ids) == 10
    assert sorted(e.data for e in received) == list(range(10))
    for name in ("a", "b"):
        in_channel = [e.data for e in received if e.channel == f"{unique}.{name}"]
        assert in_channel == sorted(in_channel)


async def test_every_subscriber_gets_every_event(open_channel: OpenChannel, unique: str) -> None:
    async with (
        open_channel() as channel,
        channel.subscribe(unique) as first,
        channel.subscribe(unique) as second,
    ):
        await channel.publish(unique, "x")
        assert data_of(await take(first, 1)) == ["x"]
        assert data_of(await take(second, 1)) == ["x"]


async def test_several_channels_in_one_subscription(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel, channel.subscribe(f"{unique}.a", f"{unique}.b") as sub:
        await channel.publish(f"{unique}.a", 1)
        await channel.publish(f"{unique}.other", 2)
        await channel.publish(f"{unique}.b", 3)
        received = await events(sub, 2)
    assert {(e.channel, e.data) for e in received} == {(f"{unique}.a", 1), (f"{unique}.b", 3)}


async def test_patterns_follow_glob_rules(open_channel: OpenChannel, unique: str) -> None:
    async with (
        open_channel() as channel,
        channel.subscribe(patterns=[f"{unique}.chat.*", f"{unique}.r?"]) as sub,
    ):
        for name in ("chat.a", "chatx", "chat.a.b", "r1", "r12", "news"):
            await channel.publish(f"{unique}.{name}", name)
        await channel.publish(f"{unique}.chat.end", "end")
        received = await events(sub, 4)
    assert [e.data for e in received] == ["chat.a", "chat.a.b", "r1", "end"]


async def test_channel_and_matching_pattern_deliver_once(
    open_channel: OpenChannel, unique: str
) -> None:
    async with (
        open_channel() as channel,
        channel.subscribe(f"{unique}.a", patterns=[f"{unique}.*", f"{unique}.?"]) as sub,
    ):
        await channel.publish(f"{unique}.a", 1)
        await channel.publish(f"{unique}.b", 2)
        received = await events(sub, 2)
        with anyio.move_on_after(0.3):
            extra = await sub.next_batch()
            pytest.fail(f"duplicate delivery: {extra}")
    assert [e.data for e in received] == [1, 2]


async def test_invalid_names_are_refused(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        for bad in ("", "a..b", ".a", "a.", "a b", "x" * 201, "a/b", "é", "a*"):
            with pytest.raises(InvalidArgument):
                await channel.publish(bad, 1)
        for bad_pattern in ("a..*", "a[b]", ""):
            with pytest.raises(InvalidArgument):
                async with channel.subscribe(patterns=[bad_pattern]):
                    pass
        with pytest.raises(InvalidArgument):
            await channel.publish("ok", 1, event="bad\ntype")
        with pytest.raises(InvalidArgument):
            await channel.publish("ok", {1, 2})
        assert channel.subscriber_count == 0


async def test_publish_from_another_thread(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel, channel.subscribe(unique) as sub:
        result: list[str] = []
        thread = threading.Thread(
            target=lambda: result.append(channel.publish_threadsafe(unique, "from thread"))
        )
        thread.start()
        (event,) = await events(sub, 1)
        await anyio.to_thread.run_sync(thread.join)
    assert event.data == "from thread"
    assert result == [event.id]


# -- cleanup --


async def test_subscription_cleans_up_on_exit_and_on_cancel(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel() as channel:
        async with channel.subscribe(unique, patterns=[f"{unique}.*"]):
            assert channel.subscriber_count == 1
        assert channel.subscriber_count == 0
        assert not channel._router.exact and not channel._router.patterns
        await eventually(lambda: not channel._refs)  # the broker is told in the background

        with anyio.move_on_after(0.2):
            async with channel.subscribe(unique) as sub:
                await sub.next_batch()  # blocks until cancelled
        assert channel.subscriber_count == 0
        await eventually(lambda: not channel._refs)
        # the layer still delivers to new subscribers after the cleanup
        async with channel.subscribe(unique) as again:
            await channel.publish(unique, "after")
            assert data_of(await take(again, 1)) == ["after"]


async def test_unsubscribe_part_of_a_subscription(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel, channel.subscribe(f"{unique}.a", f"{unique}.b") as sub:
        await sub.remove([f"{unique}.a"])
        await channel.publish(f"{unique}.a", "gone")
        await channel.publish(f"{unique}.b", "kept")
        assert data_of(await take(sub, 1)) == ["kept"]
        await sub.add(patterns=[f"{unique}.c*"])
        await channel.publish(f"{unique}.cc", "added")
        assert data_of(await take(sub, 1)) == ["added"]


async def test_closing_the_channel_ends_subscriptions(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel() as channel, channel.subscribe(unique) as sub:
        channel.close_subscriptions()
        received = [item async for item in sub]
    assert received == []


# -- backpressure --


async def _flood(channel: Channel, name: str, count: int) -> None:
    """Publish `count` messages and wait until this process has routed all of them."""
    async with channel.subscribe(name, max_backlog=count + 10) as witness:
        for n in range(count):
            await channel.publish(name, n)
        await take(witness, count)


async def test_drop_oldest_keeps_newest_and_signals_gap(
    open_channel: OpenChannel, unique: str
) -> None:
    async with (
        open_channel() as channel,
        channel.subscribe(unique, max_backlog=3, backlog_policy="drop_oldest") as sub,
    ):
        core_only(channel)
        await _flood(channel, unique, 10)
        items = await sub.next_batch()
    assert isinstance(items[0], Gap) and items[0].reason == "dropped" and items[0].dropped == 7
    assert data_of(items) == [7, 8, 9]
    assert sub.dropped == 7


async def test_drop_newest_keeps_oldest_and_signals_gap(
    open_channel: OpenChannel, unique: str
) -> None:
    async with (
        open_channel() as channel,
        channel.subscribe(unique, max_backlog=3, backlog_policy="drop_newest") as sub,
    ):
        core_only(channel)
        await _flood(channel, unique, 10)
        items = await sub.next_batch()
        assert data_of(items) == [0, 1, 2]
        assert isinstance(items[-1], Gap) and items[-1].dropped == 7
        await channel.publish(unique, "later")
        assert data_of(await take(sub, 1)) == ["later"]


async def test_disconnect_policy_ends_the_lagging_subscriber_only(
    open_channel: OpenChannel, unique: str
) -> None:
    async with (
        open_channel() as channel,
        channel.subscribe(unique, max_backlog=3, backlog_policy="disconnect") as slow,
        channel.subscribe(unique, max_backlog=100) as fast,
    ):
        core_only(channel)
        await _flood(channel, unique, 10)
        assert data_of(await take(fast, 10)) == list(range(10))
        with pytest.raises(SubscriberOverflow):
            while True:
                await slow.next_batch()


# -- history and resume --


async def test_history_is_oldest_first_with_after_and_limit(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel() as channel:
        if not channel.capabilities.history:
            with pytest.raises(CapabilityNotSupported):
                await channel.history(unique)
            return
        ids = [await channel.publish(unique, n) for n in range(5)]
        await channel.publish(f"{unique}.other", "x")
        everything = await channel.history(unique)
        assert [e.data for e in everything.events] == [0, 1, 2, 3, 4]
        assert not everything.gap
        after = await channel.history(unique, after=ids[1], limit=2)
        assert [e.id for e in after.events] == ids[2:4]
        last = await channel.history(unique, limit=2)
        assert [e.data for e in last.events] == [3, 4]


async def test_history_is_bounded_by_size(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel(history_size=3) as channel:
        need(channel, "history")
        ids = [await channel.publish(unique, n) for n in range(10)]
        kept = await channel.history(unique)
        # approximate trimming (Redis) may keep a few more, never fewer
        assert [e.data for e in kept.events][-3:] == [7, 8, 9]
        assert len(kept.events) < 10
        resumed = await channel.history(unique, after=ids[0])
        assert resumed.gap


async def test_history_expires_by_ttl(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel(history_ttl=1) as channel:
        need(channel, "history")
        await channel.publish(unique, "old")
        await anyio.sleep(1.6)  # nothing to await: expiry is the passing of time itself
        await channel.publish(unique, "new")
        kept = await channel.history(unique)
    assert [e.data for e in kept.events] == ["new"]


async def test_resume_replays_then_goes_live_without_gap_or_duplicate(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel(max_backlog=5000) as channel:
        need(channel, "history")
        ids = [await channel.publish(unique, n) for n in range(20)]

        async def keep_publishing() -> None:
            for n in range(20, 220):
                await channel.publish(unique, n)
                if n % 10 == 0:
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_publishing)
            async with channel.subscribe(unique, last_event_id=ids[9]) as sub:
                received = await events(sub, 210)
    assert [e.data for e in received] == list(range(10, 220))


async def test_resume_across_channels_and_patterns_with_one_id(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel() as channel:
        need(channel, "history")
        names = [f"{unique}.a", f"{unique}.p.1", f"{unique}.b", f"{unique}.p.2"]
        ids = [await channel.publish(name, n) for n, name in enumerate(names * 2)]
        async with channel.subscribe(
            f"{unique}.a", f"{unique}.b", patterns=[f"{unique}.p.*"], last_event_id=ids[3]
        ) as sub:
            replayed = await events(sub, 4)
            await channel.publish(f"{unique}.p.3", "live")
            live = await events(sub, 1)
    assert [e.data for e in replayed] == [4, 5, 6, 7]
    assert [e.id for e in replayed] == ids[4:]
    assert live[0].data == "live"


async def test_resume_from_evicted_id_signals_gap_then_remaining(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel(history_size=5) as channel:
        need(channel, "history")
        ids = [await channel.publish(unique, n) for n in range(30)]
        async with channel.subscribe(unique, last_event_id=ids[0]) as sub:
            items = await sub.next_batch()
    assert isinstance(items[0], Gap)
    assert items[0].reason == "evicted" and items[0].last_event_id == ids[0]
    assert data_of(items)[-5:] == [25, 26, 27, 28, 29]


async def test_resume_from_unknown_id_signals_gap(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel:
        need(channel, "history")
        await channel.publish(unique, "kept")
        async with channel.subscribe(unique, last_event_id="not-an-id") as sub:
            items = await sub.next_batch()
    assert isinstance(items[0], Gap) and items[0].reason == "unknown_id"


def _future(id: str) -> str:
    """An id of the same form as `id`, far past it: one no layer has issued yet."""
    head, digits = re.fullmatch(r"(.*?)(\d+)", id).groups()  # type: ignore[union-attr]
    return f"{head}{int(digits) + 10**6}"


OUT_OF_RANGE_IDS = [
    "0-99999999999999999999999",
    "99999999999999999999999-0",
    "9" * 5000,
    "1-" + "9" * 5000,
    "²-1",
    "1-²",
    "007",
    "-",
    "",
]


async def test_ids_out_of_range_or_from_the_future_are_unknown_ids(
    open_channel: OpenChannel, unique: str
) -> None:
    """Every history layer answers the same: a gap `unknown_id`, then what it retains; never an
    error from the broker (which the gateway would show as 503)."""
    async with open_channel() as channel:
        need(channel, "history")
        kept = await channel.publish(unique, "kept")
        for after in [*OUT_OF_RANGE_IDS, _future(kept)]:
            replay = await channel.history(unique, after=after)
            assert (replay.gap, replay.reason) == (True, "unknown_id"), after
            assert [event.id for event in replay.events] == [kept], after
            async with channel.subscribe(unique, last_event_id=after) as sub:
                gap, event = await take(sub, 2)
                assert isinstance(gap, Gap) and gap.reason == "unknown_id", after
                assert isinstance(event, Event) and event.id == kept


async def test_acks_of_ids_out_of_range_are_unknown(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel:
        need(channel, "groups")
        async with channel.subscribe(unique, group="g", consumer="c") as sub:
            await channel.publish(unique, 1)
            (event,) = await events(sub, 1)
            strange = [*OUT_OF_RANGE_IDS, _future(event.id)]
            acked, unknown = await channel.ack(unique, "g", [*strange, event.id])
    assert acked == [event.id]
    assert unknown == list(dict.fromkeys(strange))


async def test_history_n_on_fresh_connect(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel:
        if not channel.capabilities.history:
            with pytest.raises(CapabilityNotSupported):
                async with channel.subscribe(unique, history=3):
                    pass
            return
        for n in range(6):
            await channel.publish(unique, n)
        async with channel.subscribe(unique, history=3) as sub:
            assert data_of(await take(sub, 3)) == [3, 4, 5]


async def test_resume_without_history_is_live_after_a_gap(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel() as channel:
        if channel.capabilities.history:
            pytest.skip("applies to layers without history")
        async with channel.subscribe(unique, last_event_id="anything") as sub:
            (gap,) = await take(sub, 1)
            assert isinstance(gap, Gap) and gap.reason == "no_history"
            await channel.publish(unique, "live")
            assert data_of(await take(sub, 1)) == ["live"]


# -- consumer groups --


async def test_group_consumers_compete_for_messages(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel(ack_timeout=30) as channel:
        if not channel.capabilities.groups:
            with pytest.raises(CapabilityNotSupported):
                async with channel.subscribe(unique, group="g", consumer="c1"):
                    pass
            return
        async with (
            channel.subscribe(unique, group="g", consumer="c1", max_backlog=5) as first,
            channel.subscribe(unique, group="g", consumer="c2", max_backlog=5) as second,
        ):
            for n in range(10):
                await channel.publish(unique, n)
            got: list[Event] = []
            with anyio.fail_after(TIMEOUT):
                while len(got) < 10:
                    for sub in (first, second):
                        with anyio.move_on_after(0.05):
                            batch = await sub.next_batch()
                            got += [e for e in batch if isinstance(e, Event)]
                            for event in batch:
                                assert isinstance(event, Event)
                                assert event.deliveries == 1 and event.group == "g"
                                assert await event.ack()
        assert sorted(e.data for e in got) == list(range(10))
        info = await channel.group_info(unique, "g")
        assert info.pending == 0
        assert {c.name for c in info.consumers} >= {"c1", "c2"}


async def test_group_starts_at_new_messages_and_survives_consumer(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel() as channel:
        need(channel, "groups")
        await channel.publish(unique, "before the group")
        async with channel.subscribe(unique, group="g", consumer="c1") as sub:
            await channel.publish(unique, "first")
            (event,) = await events(sub, 1)
            assert event.data == "first"
            assert await event.ack()
        await channel.publish(unique, "while nobody listens")
        async with channel.subscribe(unique, group="g", consumer="c2") as sub:
            (event,) = await events(sub, 1)
            assert event.data == "while nobody listens"


async def test_unacked_message_is_redelivered_then_dead_lettered(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel(ack_timeout=0.3, max_deliveries=2) as channel:
        need(channel, "groups")
        async with (
            channel.subscribe(f"{unique}.dead") as dead,
            channel.subscribe(unique, group="g", consumer="c1") as sub,
        ):
            message_id = await channel.publish(unique, "never acked")
            first, second = await events(sub, 2)
            assert (first.id, first.deliveries) == (message_id, 1)
            assert (second.id, second.deliveries) == (message_id, 2)
            (letter,) = await events(dead, 1)
        assert letter.channel == f"{unique}.dead"
        assert letter.data["group"] == "g"
        assert letter.data["deliveries"] == 2
        assert letter.data["message"]["id"] == message_id
        assert letter.data["message"]["data"] == "never acked"
        info = await channel.group_info(unique, "g")
        assert info.pending == 0


async def test_redelivery_goes_to_another_live_consumer(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel(ack_timeout=0.3) as channel:
        need(channel, "groups")
        async with channel.subscribe(unique, group="g", consumer="gone") as leaving:
            message_id = await channel.publish(unique, "orphan")
            (first,) = await events(leaving, 1)
            assert first.id == message_id
        async with channel.subscribe(unique, group="g", consumer="stays") as staying:
            (again,) = await events(staying, 1)
            assert again.id == message_id and again.deliveries == 2
            assert await again.ack()


async def test_consumers_named_by_the_core_are_forgotten_when_they_leave(
    open_channel: OpenChannel, unique: str
) -> None:
    """A group connect without a consumer name gets one for that connection; it must not stay
    listed forever (300 connects listed 300 consumers). What it left unacked is not lost."""
    async with open_channel(ack_timeout=0.3) as channel:
        need(channel, "groups")
        async with channel.subscribe(unique, group="g", consumer="named"):
            pass
        for _ in range(5):
            async with channel.subscribe(unique, group="g"):
                pass
        async with channel.subscribe(unique, group="g") as leaving:
            message_id = await channel.publish(unique, "left unacked")
            (first,) = await events(leaving, 1)
            assert first.id == message_id
        info = await channel.group_info(unique, "g")
        assert [c.name for c in info.consumers] == ["named"]
        assert info.pending == 1
        async with channel.subscribe(unique, group="g", consumer="named") as staying:
            (again,) = await events(staying, 1)
            assert (again.id, again.deliveries) == (message_id, 2)
            assert await again.ack()
        info = await channel.group_info(unique, "g")
        assert ([c.name for c in info.consumers], info.pending) == (["named"], 0)


async def test_closing_with_release_hands_unacked_messages_over_at_once(
    open_channel: OpenChannel, unique: str
) -> None:
    """Graceful shutdown: the consumer's unacked messages go to the group now, not after the
    ack timeout, so a browser that reconnects elsewhere gets them back at once."""
    async with open_channel(ack_timeout=60) as channel:
        need(channel, "groups")
        if type(channel.layer).group_release is ChannelLayer.group_release:
            pytest.skip(f"{channel.layer.scheme}:// keeps the default: released messages wait")
        async with channel.subscribe(unique, group="g", consumer="leaving") as leaving:
            message_id = await channel.publish(unique, "in flight")
            (first,) = await events(leaving, 1)
            assert first.id == message_id
            channel.close_subscriptions(release=True)
            with anyio.fail_after(TIMEOUT):
                assert [item async for item in leaving] == []  # the stream ended
        async with channel.subscribe(unique, group="g", consumer="elsewhere") as taking_over:
            with anyio.fail_after(5):  # far below the 60 s ack timeout
                (again,) = await events(taking_over, 1)
            assert (again.id, again.deliveries) == (message_id, 2)
            assert await again.ack()


class RecordingObserver(ChannelObserver):
    def __init__(self) -> None:
        self.redeliveries: list[tuple[str, str, int]] = []
        self.dead_letters: list[tuple[str, str]] = []

    def redelivered(self, channel: str, group: str, count: int) -> None:
        self.redeliveries.append((channel, group, count))

    def dead_lettered(self, channel: str, group: str) -> None:
        self.dead_letters.append((channel, group))


async def test_observer_counts_redeliveries_and_dead_letters(
    open_channel: OpenChannel, unique: str
) -> None:
    observer = RecordingObserver()
    async with open_channel(ack_timeout=0.3, max_deliveries=2, observer=observer) as channel:
        need(channel, "groups")
        async with (
            channel.subscribe(f"{unique}.dead") as dead,
            channel.subscribe(unique, group="g", consumer="c1") as sub,
        ):
            await channel.publish(unique, "never acked")
            await events(sub, 2)
            await events(dead, 1)
    assert observer.redeliveries == [(unique, "g", 1)]
    assert observer.dead_letters == [(unique, "g")]


async def test_acks_report_unknown_ids_and_unknown_groups(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel() as channel:
        need(channel, "groups")
        with pytest.raises(UnknownGroup):
            await channel.group_info(unique, "nobody")
        with pytest.raises(UnknownGroup):
            await channel.ack(unique, "nobody", ["1"])
        async with channel.subscribe(unique, group="g", consumer="c") as sub:
            await channel.publish(unique, 1)
            (event,) = await events(sub, 1)
            info = await channel.group_info(unique, "g")
            assert info.pending == 1 and info.oldest_unacked_id == event.id
            acked, unknown = await channel.ack(unique, "g", [event.id, "0-1", event.id])
            assert acked == [event.id] and unknown == ["0-1"]
            acked, unknown = await channel.ack(unique, "g", [event.id])
            assert acked == [] and unknown == [event.id]


async def test_group_subscription_arguments_are_checked(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel() as channel:
        need(channel, "groups")
        for kwargs in (
            {"patterns": ["a.*"]},
            {"last_event_id": "1"},
        ):
            with pytest.raises(InvalidArgument):
                async with channel.subscribe(unique, group="g", **kwargs):  # type: ignore[arg-type]
                    pass
        with pytest.raises(InvalidArgument):
            async with channel.subscribe(unique, group="bad group"):
                pass
        assert channel.subscriber_count == 0


# -- consumer groups as work queues: prefetch, nack, extend, start, delete --


async def drain(subscription: Subscription, within: float = 0.3) -> list[Event]:
    """Whatever arrives until nothing has for `within` seconds."""
    got: list[Event] = []
    while True:
        with anyio.move_on_after(within) as waited:
            got += [e for e in await subscription.next_batch() if isinstance(e, Event)]
        if waited.cancelled_caught:
            return got


async def test_a_stalled_consumer_holds_no_more_than_its_prefetch(
    open_channel: OpenChannel, unique: str
) -> None:
    """The bug: the pump filled a consumer's whole backlog, so whoever read first took all."""
    async with open_channel(ack_timeout=60, prefetch=3) as channel:
        need(channel, "groups")
        async with (
            channel.subscribe(unique, group="g", consumer="stalled") as stalled,
            channel.subscribe(unique, group="g", consumer="worker") as worker,
        ):
            for n in range(20):
                await channel.publish(unique, n)
            held = await events(stalled, 3)
            done: list[Event] = []
            with anyio.fail_after(TIMEOUT):
                while len(done) < 17:
                    for event in [e for e in await worker.next_batch() if isinstance(e, Event)]:
                        assert await event.ack()
                        done.append(event)
            assert await drain(stalled) == []  # nothing past its prefetch
            assert sorted(e.data for e in held + done) == list(range(20))
            info = await channel.group_info(unique, "g")
            by_name = {c.name: c for c in info.consumers}
            assert (by_name["stalled"].in_flight, by_name["stalled"].prefetch) == (3, 3)
            assert by_name["worker"].in_flight == 0
            for event in held:
                assert await event.ack()


async def test_two_idle_consumers_share_a_burst(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel(ack_timeout=60) as channel:
        need(channel, "groups")
        async with (
            channel.subscribe(unique, group="g", consumer="a", prefetch=5) as a,
            channel.subscribe(unique, group="g", consumer="b", prefetch=5) as b,
        ):
            for n in range(20):
                await channel.publish(unique, n)
            got = {"a": await events(a, 5), "b": await events(b, 5)}
            assert await drain(a) == [] and await drain(b) == []
            for held in got.values():
                for event in held:
                    assert await event.ack()
            got["a"] += await events(a, 5)  # acks free the slots: the rest follows
            got["b"] += await events(b, 5)
        assert sorted(e.data for held in got.values() for e in held) == list(range(20))


async def test_an_ack_through_the_channel_lets_the_next_message_follow_at_once(
    open_channel: OpenChannel, unique: str
) -> None:
    """Not at the next claim tick (the ack timeout is 60 s): at once."""
    async with open_channel(ack_timeout=60) as channel:
        need(channel, "groups")
        async with channel.subscribe(unique, group="g", consumer="c", prefetch=1) as sub:
            for n in range(3):
                await channel.publish(unique, n)
            for n in range(3):
                with anyio.fail_after(2):
                    (event,) = await events(sub, 1)
                assert event.data == n
                assert await drain(sub, 0.1) == []
                assert await channel.ack(unique, "g", [event.id]) == ([event.id], [])


async def test_prefetch_is_checked(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel:
        need(channel, "groups")
        for prefetch in (0, 1001):
            with pytest.raises(InvalidArgument, match="prefetch"):
                async with channel.subscribe(unique, group="g", prefetch=prefetch):
                    pass
        with pytest.raises(InvalidArgument, match="group"):
            async with channel.subscribe(unique, prefetch=5):
                pass


async def test_nack_redelivers_to_the_group_with_deliveries_counted(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel(ack_timeout=60, max_deliveries=2) as channel:
        need(channel, "groups")
        async with (
            channel.subscribe(f"{unique}.dead") as dead,
            channel.subscribe(unique, group="g", consumer="c", prefetch=1) as sub,
        ):
            message_id = await channel.publish(unique, "try again")
            (first,) = await events(sub, 1)
            assert await channel.nack(unique, "g", [first.id, "0-1"]) == ([first.id], ["0-1"])
            with anyio.fail_after(5):  # far below the ack timeout
                (second,) = await events(sub, 1)
            assert (second.id, second.deliveries) == (message_id, 2)
            assert await channel.nack(unique, "g", [second.id]) == ([second.id], [])
            (letter,) = await events(dead, 1)  # past max_deliveries, as after a timeout
            assert letter.data["message"]["id"] == message_id
            assert letter.data["deliveries"] == 2
            await eventually_pending(channel, unique, 0)
        with pytest.raises(UnknownGroup):
            await channel.nack(unique, "nobody", ["1"])


async def test_a_release_seen_before_its_settle_notice_is_claimed_once_there_is_room(
    open_channel: OpenChannel, unique: str
) -> None:
    # Across processes the layer's release can reach a consumer before the notice that settles
    # the nacked message, while its slot is still taken: the claim must wait for the slot, not
    # for the claim timer.
    async with open_channel(ack_timeout=60) as channel:
        need(channel, "groups")
        async with channel.subscribe(unique, group="g", consumer="c", prefetch=1) as sub:
            message_id = await channel.publish(unique, "again")
            (first,) = await events(sub, 1)
            assert await channel.layer.group_nack(unique, "g", [first.id]) == [first.id]
            await anyio.sleep(0.3)  # the release is seen with no slot free
            # what the notice from the process that nacked does when it arrives
            channel._router.group_notice(GroupNotice(unique, "g", "settled", (first.id,)))
            with anyio.fail_after(2):  # the claim timer would take 5 s (`layers._groups`)
                (second,) = await events(sub, 1)
            assert (second.id, second.deliveries) == (message_id, 2)


async def eventually_pending(channel: Channel, name: str, pending: int) -> None:
    with anyio.fail_after(TIMEOUT):
        while (await channel.group_info(name, "g")).pending != pending:  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def test_nack_with_a_delay_redelivers_after_it(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel(ack_timeout=60) as channel:
        need(channel, "groups")
        async with channel.subscribe(unique, group="g", consumer="c", prefetch=1) as sub:
            message_id = await channel.publish(unique, "later")
            following = await channel.publish(unique, "next")
            (first,) = await events(sub, 1)
            nacked_at = anyio.current_time()
            assert await channel.nack(unique, "g", [first.id], delay=1.0) == ([first.id], [])
            (other,) = await events(sub, 1)  # the slot is free at once
            assert other.id == following and await other.ack()
            with anyio.fail_after(TIMEOUT):
                (again,) = await events(sub, 1)
            assert anyio.current_time() - nacked_at >= 0.9
            assert (again.id, again.deliveries) == (message_id, 2)
            assert await again.ack()
        with pytest.raises(InvalidArgument, match="delay"):
            await channel.nack(unique, "g", [message_id], delay=-1)


async def test_extend_restarts_the_ack_timeout(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel(ack_timeout=0.8) as channel:
        need(channel, "groups")
        async with channel.subscribe(unique, group="g", consumer="c") as sub:
            message_id = await channel.publish(unique, "long job")
            (event,) = await events(sub, 1)
            for _ in range(4):  # 1.6 s in all, twice the ack timeout
                await anyio.sleep(0.4)
                assert await channel.extend(unique, "g", [event.id, "0-1"]) == (
                    [event.id],
                    ["0-1"],
                )
            assert await drain(sub, 0.05) == []  # not redelivered while extended
            with anyio.fail_after(TIMEOUT):  # no more extends: redelivered after the timeout
                (again,) = await events(sub, 1)
            assert (again.id, again.deliveries) == (message_id, 2)
            assert await again.ack()
            assert await channel.extend(unique, "g", [message_id]) == ([], [message_id])
        with pytest.raises(UnknownGroup):
            await channel.extend(unique, "nobody", ["1"])


async def test_a_new_group_starts_where_start_says(open_channel: OpenChannel, unique: str) -> None:
    async with open_channel() as channel:
        need(channel, "groups")
        if not channel.capabilities.history:
            with pytest.raises(CapabilityNotSupported):
                async with channel.subscribe(unique, group="g", start="earliest"):
                    pass
            return
        first = await channel.publish(unique, "one")
        await channel.publish(unique, "two")
        async with channel.subscribe(unique, group="all", start="earliest") as sub:
            assert data_of(await take(sub, 2)) == ["one", "two"]
        async with channel.subscribe(unique, group="after", start=first) as sub:
            assert data_of(await take(sub, 1)) == ["two"]
        async with channel.subscribe(unique, group="new") as sub:
            await channel.publish(unique, "three")
            assert data_of(await take(sub, 1)) == ["three"]
        # only when the group is created: an existing group goes on where it was
        async with channel.subscribe(unique, group="new", start="earliest") as sub:
            assert await drain(sub) == []


async def test_a_deleted_group_is_gone_and_starts_afresh(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel(ack_timeout=60) as channel:
        need(channel, "groups")
        with pytest.raises(UnknownGroup):
            await channel.delete_group(unique, "g")
        async with channel.subscribe(unique, group="g", consumer="c") as sub:
            await channel.publish(unique, "pending")
            await events(sub, 1)
            await channel.delete_group(unique, "g")
            with anyio.fail_after(TIMEOUT), pytest.raises(UnknownGroup, match="deleted"):
                await sub.next_batch()
        with pytest.raises(UnknownGroup):
            await channel.group_info(unique, "g")
        await channel.publish(unique, "while deleted")
        async with channel.subscribe(unique, group="g", consumer="c") as sub:
            info = await channel.group_info(unique, "g")
            assert info.pending == 0
            await channel.publish(unique, "afresh")
            (event,) = await events(sub, 1)
            assert (event.data, event.deliveries) == ("afresh", 1)
            assert await event.ack()


async def test_layers_without_groups_refuse_every_group_operation(
    open_channel: OpenChannel, unique: str
) -> None:
    async with open_channel() as channel:
        if channel.capabilities.groups:
            pytest.skip(f"{channel.layer.scheme}:// has groups")
        for call in (
            channel.nack(unique, "g", ["1"]),
            channel.extend(unique, "g", ["1"]),
            channel.delete_group(unique, "g"),
        ):
            with pytest.raises(CapabilityNotSupported):
                await call
