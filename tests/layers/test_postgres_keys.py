"""PostgreSQL's record of idempotency keys: written in the publish's own round trip, in a table
under the layer's prefix, and deleted by the cleanup once expired."""

from __future__ import annotations

import anyio
import pytest

from layers import Channel, LayerUnavailable, Replayed
from layers.postgres import PostgresLayer
from tests.fixtures_postgres import execute
from tests.layers.test_postgres import TIMEOUT, Factory, proxied

pytestmark = [pytest.mark.anyio, pytest.mark.layer_quirk]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg is asyncio-only


async def keys_of(url: str, channel: str) -> list[str]:
    rows = await execute(
        url, "SELECT key FROM gateway_idempotency_keys WHERE channel = $1 ORDER BY key", channel
    )
    return [row["key"] for row in rows]


async def test_a_keyed_publish_is_one_round_trip(postgres_url: str, unique: str) -> None:
    async with proxied(postgres_url) as (proxy, url):
        layer = PostgresLayer(url, pool_size=1, cleanup_interval=3600)
        async with Channel(layer) as channel:
            await channel.publish(unique, "warm up", idempotency_key="warm")
            before = proxy.writes_to_server
            await channel.publish(unique, "one", idempotency_key="one")
            assert proxy.writes_to_server - before == 1
            before = proxy.writes_to_server
            assert isinstance(await channel.publish(unique, "one", idempotency_key="one"), Replayed)
            assert proxy.writes_to_server - before == 1
    assert await keys_of(postgres_url, unique) == ["one", "warm"]
    await execute(postgres_url, "DELETE FROM gateway_messages WHERE channel = $1", unique)
    await execute(postgres_url, "DELETE FROM gateway_idempotency_keys WHERE channel = $1", unique)


async def test_concurrent_keyed_publishes_share_a_round_trip(
    postgres_url: str, unique: str
) -> None:
    """The first publish goes at once, those arriving meanwhile in one call, each key once."""
    async with proxied(postgres_url) as (proxy, url):
        layer = PostgresLayer(url, pool_size=4, cleanup_interval=3600)
        async with Channel(layer) as channel:
            await channel.publish(unique, "warm up", idempotency_key="warm")
            ids: dict[int, str] = {}

            async def publish(n: int) -> None:
                ids[n] = await channel.publish(unique, n % 5, idempotency_key=f"k{n % 5}")

            before = proxy.writes_to_server
            async with anyio.create_task_group() as tasks:
                for n in range(30):
                    tasks.start_soon(publish, n)
            assert proxy.writes_to_server - before == 2
    assert sorted(ids) == list(range(30))
    first_of_key: dict[str, str] = {}
    for n in sorted(ids):  # in order of arrival: the first of each key publishes
        first = first_of_key.setdefault(f"k{n % 5}", ids[n])
        assert ids[n] == first and isinstance(ids[n], Replayed) == (n >= 5)
    assert len(set(first_of_key.values())) == 5
    assert await keys_of(postgres_url, unique) == ["k0", "k1", "k2", "k3", "k4", "warm"]
    await execute(postgres_url, "DELETE FROM gateway_messages WHERE channel = $1", unique)
    await execute(postgres_url, "DELETE FROM gateway_idempotency_keys WHERE channel = $1", unique)


async def test_keyed_publishes_sharing_a_call_fail_together_in_an_outage_and_retry_once(
    postgres_url: str, unique: str
) -> None:
    async with proxied(postgres_url) as (proxy, url):
        layer = PostgresLayer(url, pool_size=2, connect_timeout=2, cleanup_interval=3600)
        async with Channel(layer) as channel:
            before = await channel.publish(unique, "before", idempotency_key="before")
            await proxy.stop()
            failures: list[BaseException] = []

            async def publish(n: int) -> None:
                try:
                    await channel.publish(unique, n, idempotency_key=f"k{n}")
                except LayerUnavailable as exc:
                    failures.append(exc)

            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tasks:
                    for n in range(10):
                        tasks.start_soon(publish, n)
            assert len(failures) == 10
            await proxy.start()
            with anyio.fail_after(TIMEOUT):
                while True:  # no event says the server is back: retry as a client would
                    try:
                        again = await channel.publish(unique, "before", idempotency_key="before")
                        break
                    except LayerUnavailable:
                        await anyio.sleep(0.05)
            assert isinstance(again, Replayed) and again == before
            ids = [await channel.publish(unique, n, idempotency_key=f"k{n}") for n in range(10)]
            assert not any(isinstance(id, Replayed) for id in ids)
            replays = [await channel.publish(unique, n, idempotency_key=f"k{n}") for n in range(10)]
            assert replays == ids and all(isinstance(id, Replayed) for id in replays)
    rows = await execute(
        postgres_url, "SELECT data FROM gateway_messages WHERE channel = $1 ORDER BY id", unique
    )
    assert [row["data"] for row in rows] == ['"before"', *(str(n) for n in range(10))]
    await execute(postgres_url, "DELETE FROM gateway_messages WHERE channel = $1", unique)
    await execute(postgres_url, "DELETE FROM gateway_idempotency_keys WHERE channel = $1", unique)


async def test_expired_keys_are_deleted_by_the_cleanup(
    postgres_layer_factory: Factory, postgres_url: str, unique: str
) -> None:
    layer = postgres_layer_factory(idempotency_ttl=0.2, cleanup_interval=3600)
    async with Channel(layer) as channel:
        first = await channel.publish(unique, "x", idempotency_key="k")
        assert await keys_of(postgres_url, unique) == ["k"]
        await anyio.sleep(0.4)  # nothing to await: expiry is the passing of time itself
        await layer.clean_up()
        assert await keys_of(postgres_url, unique) == []
        again = await channel.publish(unique, "x", idempotency_key="k")
        assert not isinstance(again, Replayed) and again != first
        assert await keys_of(postgres_url, unique) == ["k"]
