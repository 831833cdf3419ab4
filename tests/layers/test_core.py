"""Regressions in the `Channel` core, reproduced on the in-memory layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from layers import (
    Capabilities,
    Channel,
    Event,
    Gap,
    InMemoryChannelLayer,
    LayerUnavailable,
    Message,
)

pytestmark = pytest.mark.anyio

TIMEOUT = 15


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


async def test_an_error_in_the_channel_block_is_not_wrapped_in_an_exception_group() -> None:
    with anyio.fail_after(TIMEOUT), pytest.raises(LookupError):
        async with Channel(InMemoryChannelLayer()):
            raise LookupError("raised by the application")


class FailingLayer(InMemoryChannelLayer):
    async def run(self, sink: object, *, task_status: object) -> None:
        raise LayerUnavailable("broker down")


async def test_a_layer_that_cannot_start_raises_its_own_error() -> None:
    with anyio.fail_after(TIMEOUT), pytest.raises(LayerUnavailable, match="broker down"):
        async with Channel(FailingLayer()):
            pass


class SlowDeadLetters(InMemoryChannelLayer):
    """Holds every publish to a dead-letter channel until `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.at_gate = anyio.Event()
        self.gate = anyio.Event()
        self.dead_letters = 0

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        if any(m.channel.endswith(".dead") for m in messages):
            self.at_gate.set()
            await self.gate.wait()
            self.dead_letters += 1
        return await super().publish(messages)


async def test_leaving_a_group_lets_a_dead_lettering_in_progress_finish() -> None:
    """A consumer leaving while its pump had published a dead letter but not yet acked the
    message left it pending, to be dead-lettered a second time."""
    layer = SlowDeadLetters()
    async with Channel(layer, ack_timeout=0.05, max_deliveries=1) as channel:
        async with anyio.create_task_group() as tasks:

            async def open_the_gate_once_all_wait() -> None:
                await anyio.wait_all_tasks_blocked()
                layer.gate.set()

            with anyio.fail_after(TIMEOUT):
                async with channel.subscribe("jobs", group="g", consumer="c") as sub:
                    await channel.publish("jobs", "never acked")
                    (event,) = await sub.next_batch()
                    assert isinstance(event, Event)
                    # Timed out past max_deliveries: the pump dead-letters it, held at the gate
                    # while the subscription ends.
                    await layer.at_gate.wait()
                    tasks.start_soon(open_the_gate_once_all_wait)
        info = await channel.group_info("jobs", "g")
    assert (info.pending, layer.dead_letters) == (0, 1)


async def test_wake_ends_a_wait_with_an_empty_batch() -> None:
    with anyio.fail_after(TIMEOUT):
        async with Channel(InMemoryChannelLayer()) as channel, channel.subscribe("c") as sub:
            batches: list[list[object]] = []

            async def wait() -> None:
                batches.append(list(await sub.next_batch()))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                sub.wake()
            assert batches == [[]]


async def test_wake_with_events_queued_returns_them_and_no_extra_empty_batch() -> None:
    with anyio.fail_after(TIMEOUT):
        async with Channel(InMemoryChannelLayer()) as channel, channel.subscribe("c") as sub:
            sub.wake()
            await channel.publish("c", 1)
            assert [event.data for event in await sub.next_batch()] == [1]  # type: ignore[union-attr]
            await channel.publish("c", 2)
            assert [event.data for event in await sub.next_batch()] == [2]  # type: ignore[union-attr]


class ForgetfulLayer(InMemoryChannelLayer):
    """A layer without history whose broker connection the test drops and restores."""

    capabilities = Capabilities(cross_process=True, history=False, groups=False)


@pytest.mark.parametrize("layer_class", [ForgetfulLayer, InMemoryChannelLayer])
async def test_a_reconnect_without_history_tells_live_subscribers_of_a_gap(
    layer_class: type[InMemoryChannelLayer],
) -> None:
    layer = layer_class()
    async with (
        Channel(layer) as channel,
        channel.subscribe("a") as exact,
        channel.subscribe(patterns=["a*"]) as pattern,
    ):
        await channel.publish("a", 1)
        assert layer._sink is not None
        layer._sink.reconnected()
        await channel.publish("a", 2)
        with anyio.fail_after(TIMEOUT):
            batches = [await exact.next_batch(), await pattern.next_batch()]
    for batch in batches:
        gaps = [item.reason for item in batch if isinstance(item, Gap)]
        assert [item.data for item in batch if isinstance(item, Event)] == [1, 2]
        assert gaps == ([] if layer.capabilities.history else ["reconnected"])


class TrailingLayer(InMemoryChannelLayer):
    """Live delivery trails the publish until the test lets it go, as a broker listener's read
    trails the commit: replayed events then still arrive live afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.trailing: list[Event] = []
        self.sink: Any = None

    async def run(self, sink: Any, *, task_status: Any) -> None:
        self.sink = sink
        layer = self

        class Deferring:
            def deliver(self, event: Event) -> None:
                layer.trailing.append(event)

            def __getattr__(self, name: str) -> Any:
                return getattr(sink, name)

        await super().run(Deferring(), task_status=task_status)  # type: ignore[arg-type]

    def catch_up(self) -> None:
        trailing, self.trailing = self.trailing, []
        for event in trailing:
            self.sink.deliver(event)


async def test_replayed_events_that_arrive_live_afterwards_are_dropped() -> None:
    layer = TrailingLayer()
    async with Channel(layer) as channel:
        ids = [await channel.publish("c", n) for n in range(3)]
        layer.catch_up()
        for n in (3, 4):  # not delivered live yet when the subscriber resumes
            await channel.publish("c", n)
        async with channel.subscribe("c", last_event_id=ids[0]) as sub:
            with anyio.fail_after(TIMEOUT):
                replayed = await sub.next_batch()
            layer.catch_up()  # 3 and 4 arrive live, after the replay that had them
            await channel.publish("c", 5)
            layer.catch_up()
            with anyio.fail_after(TIMEOUT):
                live = await sub.next_batch()
    assert [item.data for item in replayed if isinstance(item, Event)] == [1, 2, 3, 4]
    assert [item.data for item in live if isinstance(item, Event)] == [5]
