"""`postgresql://` quirks: what the contract suite cannot see from the outside.

Several layer instances on one database stand for several gateway processes. Connection loss is
real: `pg_terminate_backend` on this test's own listener (found by its application_name), and a
TCP proxy in front of the server for an outage, so the shared server is never restarted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from layers import Channel, Event, LayerConfigurationError, LayerUnavailable, make_message
from layers._postgres_sql import like as _like
from layers.postgres import PostgresLayer
from tests.fixtures_postgres import drop_tables, execute
from tests.layers.recording import RecordingSink
from tests.layers.test_contract import events

pytestmark = [pytest.mark.anyio, pytest.mark.layer_quirk]

TIMEOUT = 15
Factory = Callable[..., PostgresLayer]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg is asyncio-only


@pytest.fixture
def factory(postgres_layer_factory: Factory) -> Factory:
    return postgres_layer_factory


async def listener_pids(url: str, layer: PostgresLayer) -> list[int]:
    rows = await execute(
        url,
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
        layer.listener_application_name,
    )
    return [row["pid"] for row in rows]


async def kill_listener(url: str, layer: PostgresLayer) -> int:
    """Terminate this layer's listener backend (only this test's own) and wait until it is gone."""
    (pid,) = await listener_pids(url, layer)
    rows = await execute(url, "SELECT pg_terminate_backend($1) AS done", pid)
    assert rows[0]["done"]
    with anyio.fail_after(TIMEOUT):
        # The server's own bookkeeping: there is no event to wait on, so poll it.
        while await execute(url, "SELECT 1 FROM pg_stat_activity WHERE pid = $1", pid):  # noqa: ASYNC110
            await anyio.sleep(0.02)
    return int(pid)


# -- schema ----------------------------------------------------------------------------------------


async def test_migration_is_idempotent_when_processes_start_together(
    postgres_url: str, unique: str
) -> None:
    prefix = f"{unique}_"
    layers = [PostgresLayer(postgres_url, table_prefix=prefix, pool_size=2) for _ in range(3)]
    sinks = [RecordingSink() for _ in layers]
    try:
        async with anyio.create_task_group() as running:
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as starting:
                    for layer, sink in zip(layers, sinks, strict=True):
                        starting.start_soon(running.start, layer.run, sink)
            rows = await execute(postgres_url, f"SELECT version FROM {prefix}schema")
            assert len(rows) == 1
            await layers[1].subscribe([f"{unique}.x"], [])
            (message_id,) = await layers[0].publish([make_message(f"{unique}.x", "hello")])
            (event,) = await sinks[1].wait_for(1)
            assert (event.id, event.data) == (message_id, "hello")
            # a restart finds the schema in place
            again = PostgresLayer(postgres_url, table_prefix=prefix, pool_size=1)
            with anyio.fail_after(TIMEOUT):
                await running.start(again.run, RecordingSink())
            assert len(await execute(postgres_url, f"SELECT version FROM {prefix}schema")) == 1
            running.cancel_scope.cancel()
    finally:
        await drop_tables(postgres_url, prefix)


# -- live delivery ---------------------------------------------------------------------------------


async def test_payload_past_the_notify_limit_is_delivered(factory: Factory, unique: str) -> None:
    big = {"blob": "x" * 100_000, "nested": [{"n": n, "text": "é" * 50} for n in range(100)]}
    async with (
        Channel(factory()) as sender,
        Channel(factory()) as receiver,
        receiver.subscribe(unique) as sub,
    ):
        message_id = await sender.publish(unique, big)
        batch = await sender.publish_messages([make_message(unique, [n, big]) for n in range(3)])
        received = await events(sub, 4)
    assert [e.id for e in received] == [message_id, *batch]
    assert received[0].data == big
    assert [e.data for e in received[1:]] == [[n, big] for n in range(3)]


async def test_listener_killed_then_messages_committed_meanwhile_are_delivered(
    factory: Factory, postgres_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Channel(factory()) as sender, Channel(factory()) as receiver:
        layer = receiver.layer
        assert isinstance(layer, PostgresLayer)
        async with receiver.subscribe(unique, max_backlog=1000) as sub:
            await sender.publish(unique, "before")
            assert [e.data for e in await events(sub, 1)] == ["before"]

            # Hold the reconnection until the messages below are committed, so they certainly
            # fall in the gap: their NOTIFY went to nobody.
            reconnecting, go_on = anyio.Event(), anyio.Event()
            connect = layer._connect_listener

            async def held_connect() -> Any:
                reconnecting.set()
                await go_on.wait()
                return await connect()

            monkeypatch.setattr(layer, "_connect_listener", held_connect)
            old_pid = await kill_listener(postgres_url, layer)
            with anyio.fail_after(TIMEOUT):
                await reconnecting.wait()
            ids = await sender.publish_messages([make_message(unique, n) for n in range(50)])
            with pytest.raises(LayerUnavailable, match="listener"):
                await receiver.ping()
            go_on.set()

            received = await events(sub, 50)
            assert [e.data for e in received] == list(range(50))
            assert [e.id for e in received] == ids
            assert layer.listener_reconnects == 1
            assert (await listener_pids(postgres_url, layer)) != [old_pid]
            await receiver.ping()
            await sender.publish(unique, "after")
            assert [e.data for e in await events(sub, 1)] == ["after"]


async def test_listener_killed_while_messages_stream_loses_nothing(
    factory: Factory, postgres_url: str, unique: str
) -> None:
    async with Channel(factory()) as sender, Channel(factory()) as receiver:
        layer = receiver.layer
        assert isinstance(layer, PostgresLayer)
        async with receiver.subscribe(unique, max_backlog=1000) as sub:
            ids: list[str] = []
            halfway = anyio.Event()

            async def publish_steadily() -> None:
                for n in range(200):
                    ids.append(await sender.publish(unique, n))
                    if n == 60:
                        halfway.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_steadily)
                with anyio.fail_after(TIMEOUT):
                    await halfway.wait()
                await kill_listener(postgres_url, layer)
                received = await events(sub, 200)
        assert [e.data for e in received] == list(range(200))
        assert [e.id for e in received] == ids
        assert layer.listener_reconnects == 1


async def test_a_message_whose_notification_went_astray_arrives_with_the_keepalive(
    postgres_url: str, unique: str
) -> None:
    prefix = f"{unique}_"  # tables of its own: no other publisher's NOTIFY may wake the reader
    layer = PostgresLayer(postgres_url, table_prefix=prefix, pool_size=1, keepalive_interval=0.2)
    try:
        async with Channel(layer) as channel, channel.subscribe(unique) as sub:
            await execute(
                postgres_url,
                f"INSERT INTO {prefix}messages (id, channel, event, data, published_at) "
                f"VALUES (nextval('{prefix}message_ids'), $1, 'message', '\"quiet\"', 0)",
                unique,
            )
            (event,) = await events(sub, 1)
        assert event.data == "quiet"
    finally:
        await drop_tables(postgres_url, prefix)


class TcpProxy:
    """A port in front of PostgreSQL: `stop()` is the server going away, `start()` its return."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.writes_to_server = 0
        self._task_group: anyio.abc.TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()

    async def start(self, task_group: anyio.abc.TaskGroup | None = None) -> None:
        """Listen (again, on the same port after `stop`)."""
        self._task_group = task_group = task_group or self._task_group
        assert task_group is not None
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self.port = listener.extra(SocketAttribute.local_port)
        self._scope, self._stopped = anyio.CancelScope(), anyio.Event()
        task_group.start_soon(self._serve, listener, self._scope, self._stopped)

    async def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        with anyio.fail_after(TIMEOUT):
            await self._stopped.wait()

    async def _serve(
        self,
        listener: anyio.abc.Listener[anyio.abc.SocketStream],
        scope: anyio.CancelScope,
        stopped: anyio.Event,
    ) -> None:
        try:
            with scope:
                async with listener:
                    await listener.serve(self._forward)
        finally:
            stopped.set()

    async def _forward(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            try:
                server = await anyio.connect_tcp(*self.target)
            except OSError:
                return
            async with server, anyio.create_task_group() as pipes:
                pipes.start_soon(self._pipe, client, server, pipes.cancel_scope, True)
                pipes.start_soon(self._pipe, server, client, pipes.cancel_scope, False)

    async def _pipe(
        self,
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        scope: anyio.CancelScope,
        to_server: bool,
    ) -> None:
        try:
            async for chunk in source:
                if to_server:
                    self.writes_to_server += 1
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        scope.cancel()


def through(url: str, port: int) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    async with anyio.create_task_group() as tg:
        await proxy.start(tg)
        yield proxy, through(url, proxy.port)
        tg.cancel_scope.cancel()


async def test_outage_fails_publishes_fast_then_recovers_without_loss(
    factory: Factory, postgres_url: str, unique: str
) -> None:
    async with proxied(postgres_url) as (proxy, url):
        layer = PostgresLayer(url, pool_size=2, connect_timeout=2)
        async with (
            Channel(factory()) as direct,
            Channel(layer) as channel,
            channel.subscribe(unique, max_backlog=1000) as sub,
        ):
            await channel.publish(unique, "up")
            assert [e.data for e in await events(sub, 1)] == ["up"]

            await proxy.stop()
            with anyio.fail_after(5), pytest.raises(LayerUnavailable) as failure:
                await channel.publish(unique, "down")
            assert f"127.0.0.1:{proxy.port}" in failure.value.detail
            with pytest.raises(LayerUnavailable):
                await channel.ping()
            during = await direct.publish_messages([make_message(unique, n) for n in range(20)])

            await proxy.start()
            with anyio.fail_after(TIMEOUT):
                while True:  # no event says the server is back: retry as a client would
                    try:
                        back = await channel.publish(unique, "back")
                        break
                    except LayerUnavailable:
                        await anyio.sleep(0.05)
            received = await events(sub, 21)
    assert [e.id for e in received] == [*during, back]
    assert [e.data for e in received] == [*range(20), "back"]
    assert layer.listener_reconnects >= 1


async def test_unreachable_server_or_missing_database_is_a_clear_error(postgres_url: str) -> None:
    """An unreachable server does not stop the layer (it connects when the server is back);
    calls name it. A missing database cannot heal by itself: the layer does not start."""
    with anyio.fail_after(TIMEOUT):
        async with Channel(PostgresLayer("postgresql://postgres@127.0.0.1:1/x")) as channel:
            for call in (channel.ping(), channel.publish("c", 1)):
                with pytest.raises(LayerUnavailable, match=r"127\.0\.0\.1:1\b"):
                    await call
    missing = urlunsplit(urlsplit(postgres_url)._replace(path="/no_such_gateway_db"))
    with anyio.fail_after(TIMEOUT), pytest.raises(LayerConfigurationError, match="does not exist"):
        async with Channel(PostgresLayer(missing)):
            pass


async def test_options_come_from_the_url_and_the_rest_goes_to_the_driver() -> None:
    layer = PostgresLayer(
        "postgresql://u@db/gw?table_prefix=gw2_&pool_size=3&sslmode=disable&connect_timeout=1.5"
    )
    assert (layer.table_prefix, layer.pool_size, layer.connect_timeout) == ("gw2_", 3, 1.5)
    assert layer.url == "postgresql://u@db/gw?sslmode=disable"
    assert PostgresLayer("postgresql://db/gw?pool_size=3", pool_size=7).pool_size == 7
    for bad in ("pool_size=many", "pool_size=0", "table_prefix=Drop;Table"):
        with pytest.raises(LayerConfigurationError):
            PostgresLayer(f"postgresql://db/gw?{bad}")


async def test_a_publish_is_one_round_trip_single_or_batch(postgres_url: str, unique: str) -> None:
    async with proxied(postgres_url) as (proxy, url):
        # One pooled connection, so prepared statements are warm after the first publish.
        layer = PostgresLayer(url, pool_size=1, cleanup_interval=3600)
        async with Channel(layer) as channel:
            await channel.publish(unique, "warm up")
            await channel.publish_messages([make_message(unique, n) for n in range(2)])
            before = proxy.writes_to_server
            await channel.publish(unique, "one")
            assert proxy.writes_to_server - before == 1
            before = proxy.writes_to_server
            await channel.publish_messages([make_message(unique, n) for n in range(100)])
            assert proxy.writes_to_server - before == 1
        await execute(postgres_url, "DELETE FROM gateway_messages WHERE channel = $1", unique)


# -- history ---------------------------------------------------------------------------------------


async def test_trimming_keeps_gap_detection_exact(
    factory: Factory, postgres_url: str, unique: str
) -> None:
    a, b = f"{unique}.a", f"{unique}.b"
    async with Channel(factory(history_size=5, cleanup_interval=3600)) as channel:
        layer = channel.layer
        assert isinstance(layer, PostgresLayer)
        ids = await channel.publish_messages([make_message(a, n) for n in range(10)])
        (b_id,) = await channel.publish_messages([make_message(b, "b")])

        async def check() -> None:
            assert [e.data for e in (await channel.history(a)).events] == [5, 6, 7, 8, 9]
            exact = await channel.history(a, after=ids[4])
            assert not exact.gap and [e.id for e in exact.events] == ids[5:]
            lost = await channel.history(a, after=ids[3])
            assert lost.gap and lost.reason == "evicted" and [e.id for e in lost.events] == ids[5:]
            both = await layer.replay([a, b], [], after=ids[3], limit=None)
            assert both.gap and [e.id for e in both.events] == [*ids[5:], b_id]
            pattern = await layer.replay([], [f"{unique}.*"], after=ids[3], limit=None)
            assert pattern.gap and [e.id for e in pattern.events] == [*ids[5:], b_id]
            untouched = await layer.replay([b], [f"{unique}.?x"], after=ids[0], limit=None)
            assert not untouched.gap and [e.id for e in untouched.events] == [b_id]

        await check()  # evicted by the readers' bound, rows still there
        assert await layer.clean_up() == 5
        rows = await execute(
            postgres_url, "SELECT count(*) AS n FROM gateway_messages WHERE channel = $1", a
        )
        assert rows[0]["n"] == 5
        await check()  # rows deleted: the trimmed table keeps the answers the same
        assert await layer.clean_up() == 0


async def test_each_trim_starts_where_the_last_one_ended(
    factory: Factory, postgres_url: str, unique: str
) -> None:
    """A trim records its edge (`trimmed_to`); the next deletes only rows above it, so it never
    walks the index over the rows deleted before (dead until a vacuum)."""
    async with Channel(factory(history_size=5, cleanup_interval=3600)) as channel:
        layer = channel.layer
        assert isinstance(layer, PostgresLayer)

        async def bounds() -> tuple[int, int, int]:
            row = (
                await execute(
                    postgres_url,
                    "SELECT t.trimmed_to, t.max_deleted_id, (SELECT count(*) FROM "
                    "gateway_messages m WHERE m.channel = $1) AS n FROM gateway_trimmed t "
                    "WHERE t.channel = $1",
                    unique,
                )
            )[0]
            return row["trimmed_to"], row["max_deleted_id"], row["n"]

        first = await channel.publish_messages([make_message(unique, n) for n in range(10)])
        assert await layer.clean_up() == 5
        assert await bounds() == (int(first[4]), int(first[4]), 5)
        second = await channel.publish_messages([make_message(unique, n) for n in range(10, 17)])
        assert await layer.clean_up() == 7
        assert await bounds() == (int(second[1]), int(second[1]), 5)
        assert [e.data for e in (await channel.history(unique)).events] == list(range(12, 17))
        gap = await channel.history(unique, after=first[9])
        assert gap.gap and [e.id for e in gap.events] == second[2:]


async def test_the_expiry_cleanup_reads_its_index_on_a_table_without_statistics(
    postgres_url: str, unique: str
) -> None:
    """Without statistics (a new table; no autovacuum yet), a plain `LIMIT` is planned as a
    sequential scan, which reads every row (and every dead one) each cleanup when no row has an
    expiry."""
    prefix = f"{unique}_"
    layer = PostgresLayer(postgres_url, table_prefix=prefix, pool_size=1)
    try:
        async with Channel(layer) as channel:
            await channel.publish(unique, "creates the tables")
        # A table as large as a busy one, none of whose rows expires (ids below the sequence's)
        await execute(
            postgres_url,
            f"INSERT INTO {prefix}messages (id, channel, event, data, published_at) "
            "SELECT -n, $1, 'message', '1', 0 FROM generate_series(1, 1000000) AS n",
            unique,
        )
        statement = layer._sql.expire.replace("$1", "0").replace("$2", "1000")
        plan = "\n".join(r[0] for r in await execute(postgres_url, f"EXPLAIN {statement}"))
        assert f"Index Scan on {prefix}messages_by_expiry" in plan or (
            f"Index Scan using {prefix}messages_by_expiry" in plan
        )
    finally:
        await drop_tables(postgres_url, prefix)


async def test_expired_rows_are_deleted_and_reported_as_a_gap(
    factory: Factory, unique: str
) -> None:
    async with Channel(factory(history_ttl=0.2, cleanup_interval=3600)) as channel:
        layer = channel.layer
        assert isinstance(layer, PostgresLayer)
        first = await channel.publish(unique, "old")
        await channel.publish(unique, "older still")
        await anyio.sleep(0.4)  # nothing to await: expiry is the passing of time itself
        assert await layer.clean_up() >= 2
        kept = await channel.history(unique, after=first)
        assert kept.gap and kept.events == []
        newest = await channel.publish(unique, "new")
        assert [e.id for e in (await channel.history(unique)).events] == [newest]


async def test_unknown_or_foreign_ids_replay_everything_with_a_gap(
    factory: Factory, unique: str
) -> None:
    async with Channel(factory()) as channel:
        ids = [await channel.publish(unique, n) for n in range(3)]
        for foreign in ("not-an-id", "1-2", str(10**17), "-1", ""):
            replay = await channel.history(unique, after=foreign)
            assert replay.gap and replay.reason == "unknown_id", foreign
            assert [e.id for e in replay.events] == ids


async def test_underscore_and_percent_in_patterns_are_literal(
    factory: Factory, unique: str
) -> None:
    assert _like("a_b%c\\*d?") == "a\\_b\\%c\\\\%d_"
    names = [f"{unique}.a_b", f"{unique}.axb", f"{unique}.a_b.c", f"{unique}.ab"]
    async with Channel(factory()) as channel:
        async with (
            channel.subscribe(patterns=[f"{unique}.a_*"]) as underscore,
            channel.subscribe(patterns=[f"{unique}.a?b"]) as one_char,
        ):
            ids = [await channel.publish(name, name) for name in names]
            assert [e.data for e in await events(underscore, 2)] == [names[0], names[2]]
            assert [e.data for e in await events(one_char, 2)] == [names[0], names[1]]
        replay = await channel.layer.replay([], [f"{unique}.a_*"], after=None, limit=None)
        assert [e.id for e in replay.events] == [ids[0], ids[2]]
        replay = await channel.layer.replay([], [f"{unique}.a_"], after=None, limit=None)
        assert replay.events == []


# -- consumer groups -------------------------------------------------------------------------------


async def test_groups_survive_a_layer_restart(factory: Factory, unique: str) -> None:
    async with (
        Channel(factory()) as first,
        first.subscribe(unique, group="g", consumer="c1") as sub,
    ):
        unacked = await first.publish(unique, "unacked")
        (event,) = await events(sub, 1)
        assert event.id == unacked
    async with Channel(factory()) as publisher_only:  # while no consumer runs
        while_down = await publisher_only.publish(unique, "while down")

    async with Channel(factory(), ack_timeout=0.3) as restarted:
        info = await restarted.group_info(unique, "g")
        assert info.pending == 1 and info.oldest_unacked_id == unacked
        assert [c.name for c in info.consumers] == ["c1"]
        async with restarted.subscribe(unique, group="g", consumer="c2") as sub:
            deliveries: dict[str, int | None] = {}
            with anyio.fail_after(TIMEOUT):
                while len(deliveries) < 2:
                    for item in await sub.next_batch():
                        assert isinstance(item, Event)
                        deliveries.setdefault(item.id, item.deliveries)
                        await item.ack()  # at once: the ack timeout here is short
            assert deliveries == {unacked: 2, while_down: 1}
        info = await restarted.group_info(unique, "g")
        assert info.pending == 0
        assert {c.name: c.pending for c in info.consumers} == {"c1": 0, "c2": 0}


async def test_consumers_in_two_processes_never_get_the_same_message(
    factory: Factory, unique: str
) -> None:
    async with Channel(factory()) as one, Channel(factory()) as two:
        async with (
            one.subscribe(unique, group="g", consumer="one", max_backlog=10) as first,
            two.subscribe(unique, group="g", consumer="two", max_backlog=10) as second,
        ):
            ids = []
            for start in range(0, 300, 30):
                ids += await one.publish_messages(
                    [make_message(unique, n) for n in range(start, start + 30)]
                )
            seen: dict[str, list[str]] = {"one": [], "two": []}
            all_taken = anyio.Event()

            async def drain(name: str, sub: Any) -> None:
                while True:
                    for item in await sub.next_batch():
                        assert isinstance(item, Event) and item.deliveries == 1
                        seen[name].append(item.id)
                        assert await item.ack()
                        if len(seen["one"]) + len(seen["two"]) == len(ids):
                            all_taken.set()

            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain, "one", first)
                    tg.start_soon(drain, "two", second)
                    await all_taken.wait()
                    tg.cancel_scope.cancel()
        assert not set(seen["one"]) & set(seen["two"])
        assert sorted(seen["one"] + seen["two"], key=int) == ids


async def test_racing_reads_and_claims_hand_out_each_message_once(
    factory: Factory, postgres_url: str, unique: str
) -> None:
    async with Channel(factory()) as one, Channel(factory()) as two:
        layers = [one.layer, two.layer]
        await one.layer.group_join(unique, "g", "c0")
        ids = await one.publish_messages([make_message(unique, n) for n in range(200)])
        taken: list[str] = []

        async def read(layer: Any, consumer: str) -> None:
            while batch := await layer.group_read(unique, "g", consumer, 7):
                taken.extend(e.id for e in batch)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for n in range(8):
                    tg.start_soon(read, layers[n % 2], f"c{n}")
        assert sorted(taken, key=int) == ids

        await execute(
            postgres_url,
            "UPDATE gateway_pending SET delivered_at = now() - interval '1 hour' "
            "WHERE channel = $1",
            unique,
        )
        claimed: list[Event] = []

        async def claim(layer: Any, consumer: str) -> None:
            while batch := await layer.group_claim(unique, "g", consumer, 60.0, 7):
                claimed.extend(batch)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for n in range(8):
                    tg.start_soon(claim, layers[n % 2], f"c{n}")
        assert sorted((e.id for e in claimed), key=int) == ids
        assert {e.deliveries for e in claimed} == {2}


async def test_release_wakes_consumers_in_another_process(factory: Factory, unique: str) -> None:
    async with (
        Channel(factory(), ack_timeout=60) as leaving_process,
        Channel(factory(), ack_timeout=60) as staying_process,
        AsyncExitStack() as leaving_group,
    ):
        leaving = await leaving_group.enter_async_context(
            leaving_process.subscribe(unique, group="g", consumer="leaves")
        )
        message_id = await leaving_process.publish(unique, "in flight")
        (first,) = await events(leaving, 1)
        assert first.id == message_id
        async with staying_process.subscribe(unique, group="g", consumer="stays") as staying:
            leaving_process.close_subscriptions(release=True)
            with anyio.fail_after(TIMEOUT):
                assert [item async for item in leaving] == []
                await leaving_group.aclose()  # leaves the group, releasing what it held
            # Far below the 60 s ack timeout and the 5 s claim timer of "stays": the release
            # reached the other process by NOTIFY.
            with anyio.fail_after(2):
                (again,) = await events(staying, 1)
            assert (again.id, again.deliveries) == (message_id, 2)
            assert await again.ack()


async def test_consumers_long_gone_with_nothing_pending_are_forgotten(
    factory: Factory, postgres_url: str, unique: str
) -> None:
    async with Channel(factory(cleanup_interval=3600)) as channel:
        layer = channel.layer
        assert isinstance(layer, PostgresLayer)
        for consumer in ("idle", "holding", "fresh"):
            await layer.group_join(unique, "g", consumer)
        await channel.publish(unique, "held")
        assert len(await layer.group_read(unique, "g", "holding", 1)) == 1
        await execute(
            postgres_url,
            "UPDATE gateway_consumers SET seen_at = now() - interval '2 hours' "
            "WHERE channel = $1 AND consumer <> 'fresh'",
            unique,
        )
        await layer.clean_up()
        info = await layer.group_info(unique, "g")
        assert {c.name: c.pending for c in info.consumers} == {"holding": 1, "fresh": 0}


async def test_pending_message_whose_row_was_trimmed_is_dropped_on_claim(
    factory: Factory, unique: str
) -> None:
    async with Channel(factory(history_size=2, cleanup_interval=3600)) as channel:
        layer = channel.layer
        assert isinstance(layer, PostgresLayer)
        await layer.group_join(unique, "g", "c")
        await channel.publish(unique, "lost")
        (lost,) = await layer.group_read(unique, "g", "c", 10)
        await channel.publish_messages([make_message(unique, n) for n in range(3)])
        assert await layer.clean_up() == 2
        assert (await layer.group_info(unique, "g")).pending == 1
        assert await layer.group_claim(unique, "g", "c", 0.0, 10) == []
        info = await layer.group_info(unique, "g")
        assert info.pending == 0 and info.oldest_unacked_id is None
        fresh = await layer.group_read(unique, "g", "c", 10)
        assert [e.data for e in fresh] == [1, 2]  # 0 was trimmed before the group read it
        assert await layer.group_ack(unique, "g", [lost.id, *(e.id for e in fresh)]) == [
            e.id for e in fresh
        ]
