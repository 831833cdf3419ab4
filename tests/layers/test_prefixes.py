"""Two layers on one broker under different prefixes (Redis keys, PostgreSQL tables, MQTT topics)
see nothing of each other, not even through a `*` pattern. The prefix comes in the URL, as the
gateway configures a layer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from layers import Channel, ChannelLayer, Event, create_layer
from tests.fixtures_postgres import drop_tables

pytestmark = pytest.mark.anyio

TIMEOUT = 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["redis", "redis+streams", "postgresql", "mqtt"])
async def layer_under(
    request: pytest.FixtureRequest, unique: str
) -> AsyncIterator[Callable[[str], ChannelLayer]]:
    """Builds a layer on the scheme's test broker under the prefix named by a suffix."""
    scheme: str = request.param
    cleanups: list[str] = []
    if scheme.startswith("redis"):
        base = request.getfixturevalue("redis_url").replace("redis://", f"{scheme}://", 1)
        request.getfixturevalue("redis_prefix")  # its keys are removed after the test

        def make(suffix: str) -> ChannelLayer:
            return create_layer(f"{base}?key_prefix=gwtest:{unique}:{suffix}:")

    elif scheme == "postgresql":
        base = request.getfixturevalue("postgres_url")

        def make(suffix: str) -> ChannelLayer:
            cleanups.append(f"{unique}_{suffix}_")
            return create_layer(f"{base}?table_prefix={unique}_{suffix}_&pool_size=2")

    else:
        base = request.getfixturevalue("mqtt_url")

        def make(suffix: str) -> ChannelLayer:
            return create_layer(
                f"{base}/?topic_prefix=gwtest/{unique}/{suffix}/&session_expiry=60"
                f"&instance={unique}-{suffix}"
            )

    yield make
    for prefix in cleanups:
        await drop_tables(request.getfixturevalue("postgres_url"), prefix)


async def test_a_star_subscriber_sees_nothing_under_another_prefix(
    layer_under: Callable[[str], ChannelLayer], unique: str
) -> None:
    async with (
        Channel(layer_under("a")) as first,
        Channel(layer_under("b")) as second,
        second.subscribe("news", patterns=["*"]) as everything,
    ):
        with anyio.fail_after(TIMEOUT):
            await first.publish("news", "from a")
            await first.publish(f"{unique}.x", "from a")
            own = await second.publish("news", "from b")
            received: list[Event] = []
            while not any(event.id == own for event in received):
                batch = await everything.next_batch()
                received += [item for item in batch if isinstance(item, Event)]
    assert [event.data for event in received] == ["from b"]


async def test_a_pattern_publish_stays_under_its_prefix(
    layer_under: Callable[[str], ChannelLayer], unique: str
) -> None:
    async with (
        Channel(layer_under("a")) as first,
        Channel(layer_under("b")) as second,
        second.subscribe("news", patterns=["*"]) as everything,
    ):
        with anyio.fail_after(TIMEOUT):
            await first.publish_pattern("*", "from a")
            own = await second.publish_pattern("*", "from b")
            received: list[Event] = []
            while not any(event.id == own for event in received):
                batch = await everything.next_batch()
                received += [item for item in batch if isinstance(item, Event)]
        with anyio.move_on_after(0.5):  # time for a stray one from the other prefix
            while True:
                batch = await everything.next_batch()
                received += [item for item in batch if isinstance(item, Event)]
    assert [event.data for event in received] == ["from b"]
