"""Concurrent publishes on every layer in `CONTRACT_LAYERS`: each caller gets its own ids, in its
order, every message is delivered once; on cross-process layers they share layer calls."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from layers import Channel, Event, InvalidArgument, Message, make_message
from tests.conftest import LayerFactory
from tests.layers.conftest import OpenChannel

pytestmark = pytest.mark.anyio

TIMEOUT = 20
CALLERS = 40


async def test_concurrent_publishes_get_their_own_ids_in_order(
    open_channel: OpenChannel, unique: str
) -> None:
    channel_name = f"{unique}.gc"
    async with open_channel() as channel:
        layer_calls: list[int] = []
        publish = channel.layer.publish

        async def counted(messages: Sequence[Message]) -> list[str]:
            layer_calls.append(len(messages))
            return await publish(messages)

        channel.layer.publish = counted  # type: ignore[method-assign]
        if channel._group_commit is not None:
            channel._group_commit._publish = counted
        replies: dict[int, list[str]] = {}
        received: list[Event] = []
        sizes = [1 + caller % 3 for caller in range(CALLERS)]
        with anyio.fail_after(TIMEOUT):
            async with channel.subscribe(channel_name) as subscription:

                async def caller(index: int) -> None:
                    messages = [
                        make_message(channel_name, {"caller": index, "n": n})
                        for n in range(sizes[index])
                    ]
                    replies[index] = await channel.publish_messages(messages)

                async with anyio.create_task_group() as tasks:
                    for index in range(CALLERS):
                        tasks.start_soon(caller, index)
                while len(received) < sum(sizes):
                    for event in await subscription.next_batch():
                        assert isinstance(event, Event)
                        received.append(event)
    ids = [i for reply in replies.values() for i in reply]
    assert len(set(ids)) == len(ids) == sum(sizes)
    by_id = {event.id: event.data for event in received}
    assert set(by_id) == set(ids)
    for index, reply in replies.items():
        assert [by_id[i] for i in reply] == [{"caller": index, "n": n} for n in range(sizes[index])]
    position = {event.id: place for place, event in enumerate(received)}
    for reply in replies.values():
        assert [position[i] for i in reply] == sorted(position[i] for i in reply)
    if channel.layer.capabilities.cross_process:
        assert len(layer_calls) <= CALLERS // 4  # they shared round trips
    assert sum(layer_calls) == sum(sizes)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_message_the_layer_refuses_fails_only_its_own_publish(
    nats_layer_factory: LayerFactory, unique: str
) -> None:
    """nats:// refuses a message past the server's max_payload; the publishes grouped with it
    still get their ids."""
    async with Channel(nats_layer_factory()) as channel:
        outcomes: dict[int, object] = {}

        async def caller(index: int, data: object) -> None:
            try:
                outcomes[index] = await channel.publish(f"{unique}.big", data)
            except InvalidArgument as exc:
                outcomes[index] = exc

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tasks:
                for index in range(10):
                    data = "x" * 2_000_000 if index == 5 else index
                    tasks.start_soon(caller, index, data)
    assert isinstance(outcomes.pop(5), InvalidArgument)
    assert all(isinstance(value, str) for value in outcomes.values()), outcomes
    assert len(set(outcomes.values())) == 9


@pytest.mark.parametrize("calls", [1, 2])
async def test_calls_in_flight_are_bounded_and_groups_still_share_them(calls: int) -> None:
    """`GroupCommit(calls=n)` keeps up to n layer calls in flight; what arrives meanwhile waits
    and shares the next free call, and every caller gets its own ids."""
    from layers._group_commit import GroupCommit

    in_flight: list[int] = []
    most = 0
    sizes: list[int] = []
    release, bound_reached = anyio.Event(), anyio.Event()
    issued = iter(range(1_000_000))

    async def publish(messages: Sequence[Message]) -> list[str]:
        nonlocal most
        in_flight.append(len(messages))
        most = max(most, len(in_flight))
        sizes.append(len(messages))
        if len(in_flight) == calls:
            bound_reached.set()
        await release.wait()
        in_flight.pop()
        return [str(next(issued)) for _ in messages]

    commit = GroupCommit(publish, calls=calls)
    replies: dict[int, list[str]] = {}

    async def caller(index: int) -> None:
        replies[index] = await commit.publish([make_message("gc.unit", index)])

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tasks:
            await tasks.start(commit.run)
            async with anyio.create_task_group() as callers:
                for index in range(20):
                    callers.start_soon(caller, index)
                await bound_reached.wait()
                await anyio.sleep(0.05)  # a call past the bound would have started by now
                assert len(in_flight) == calls
                release.set()
            tasks.cancel_scope.cancel()
    assert most == calls
    assert sum(sizes) == 20 and len(sizes) <= calls + 1
    ids = [i for reply in replies.values() for i in reply]
    assert sorted(replies) == list(range(20)) and len(set(ids)) == 20
