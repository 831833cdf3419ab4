"""The benchmark tools work end to end against a real gateway: a few subscribers, one second.

No timing assertions: speed is measured by `python -m bench`, never by a unit test.
"""

from __future__ import annotations

import os

import anyio
import pytest

from bench import servers, workers
from bench.groups import G1Config, work_queue
from bench.load import Subscribers, publish_at_rate
from bench.report import markdown
from bench.run import Config, broker_layers, fanout_step, storm
from bench.servers import Server
from layers import create_layer
from tests.app.conftest import RunningGateway, serve
from tests.fixtures_postgres import drop_tables

pytestmark = pytest.mark.anyio


class InThread(Server):
    """The `gateway` fixture's server, measured like a bench server (it runs in this process)."""

    def __init__(self, running: RunningGateway) -> None:
        super().__init__("gateway", [], {}, running.port)
        self._pid = os.getpid()

    @property
    def pid(self) -> int:
        return self._pid


async def test_fanout_step_counts_every_event_without_loss(gateway: RunningGateway) -> None:
    server = InThread(gateway)
    subscribers = Subscribers("127.0.0.1", gateway.port, "/channels/smoke/events")
    with anyio.fail_after(30):
        try:
            await subscribers.open(20, sample_every=2, within=10)
            record = await fanout_step(server, subscribers, "/channels/smoke/publish", 20, 1.0, 0)
        finally:
            subscribers.close()
    assert record["published"] == 20
    assert record["deliveries"] == 20 * 20
    assert record["drained"]
    assert (record["missing"], record["extra"], record["sample_lost"]) == (0, 0, 0)
    assert record["sample_duplicates"] == 0
    assert record["p99_ms"] is not None
    table = markdown([{"scenario": "S2", "target": "gateway", "loadavg": 0.0, **record}])
    assert "| 20 | gateway | " in table


async def test_resume_storm_gets_every_missed_message(gateway: RunningGateway) -> None:
    with anyio.fail_after(60):
        record = await storm(InThread(gateway), clients=10, behind=5, live_rate=5)
    assert record["complete"], record
    assert record["complete_clients"] == 10
    assert record["sample_lost"] == record["sample_duplicates"] == 0


async def test_open_loop_publisher_reports_the_ids(gateway: RunningGateway) -> None:
    with anyio.fail_after(30):
        result = await publish_at_rate(
            "127.0.0.1", gateway.port, "/channels/smoke/publish", rate=50, duration=0.2, first_seq=0
        )
    assert result.ok == result.sent == 10
    assert len(set(result.ids)) == 10


def test_broker_layers_are_every_cross_process_layer_nats_with_a_stream_of_its_own() -> None:
    layers = broker_layers(Config(nats_url="nats://127.0.0.1:4222"))
    assert set(layers) == {"redis+streams", "redis", "nats", "postgresql", "mqtt"}
    url, missing = layers["nats"]
    assert missing is None  # the dev extra installs nats-py
    layer = create_layer(url)
    assert (layer.scheme, getattr(layer, "stream", None)) == ("nats", "BENCH")


async def test_work_queue_acks_every_message_once_across_two_gateways(
    redis_url: str, redis_prefix: str, unique: str
) -> None:
    """G1 in small: two gateways on one Redis (in this process), four consumers, 60 messages."""
    layer = redis_url.replace("redis://", "redis+streams://", 1) + f"?key_prefix={redis_prefix}"
    config = G1Config(messages=60, prefetch=3, within=30)
    with serve(layer=layer) as first, serve(layer=layer) as second:
        with anyio.fail_after(60):
            # One stream each first: FastAPI prepares a route at its first request, and four at
            # once on two fresh apps in one process can race there (a pydantic warning, an error
            # under this suite's filterwarnings).
            for gateway in (first, second):
                async with gateway.sse(f"/channels/{unique}.warm/events"):
                    pass
            record = await work_queue([first.url, second.url], config, unique)
    assert record["complete"], record
    assert (record["acked"], record["acked_once"], record["lost"]) == (60, 60, 0)
    assert record["acked_twice_or_more"] == record["ack_failures"] == 0
    assert record["min_per_consumer"] > 0  # every consumer got work
    table = markdown([{"scenario": "G1", "target": "redis+streams", "loadavg": 0.0, **record}])
    assert "| redis+streams | 60 | 4 / 2 | 3 |" in table


async def test_litestar_peer_serves_the_gateway_routes_and_frames() -> None:
    pytest.importorskip("litestar", reason="the Litestar peer needs the bench extra")
    with servers.litestar() as server:
        subscribers = Subscribers("127.0.0.1", server.port, "/channels/smoke/events")
        with anyio.fail_after(30):
            try:
                await subscribers.open(5, sample_every=1, within=10)
                path = "/channels/smoke/publish"
                record = await fanout_step(server, subscribers, path, 20, 0.5, 0)
            finally:
                subscribers.close()
    assert record["published"] == 10
    assert record["deliveries"] == 5 * 10
    assert (record["missing"], record["sample_lost"], record["sample_duplicates"]) == (0, 0, 0)


async def test_two_gunicorn_workers_serve_publishes_and_streams(
    redis_url: str, redis_prefix: str
) -> None:
    """SW in small: gunicorn with two workers on Redis Streams, its CPU counted over both."""
    layer = redis_url.replace("redis://", "redis+streams://", 1) + f"?key_prefix={redis_prefix}"
    with servers.gunicorn(layer, workers=2, cpus="0,1") as server:
        with anyio.fail_after(60):
            await workers.ready(server)
            assert len(server.pids()) == 3  # the master and its two workers
            subscribers = Subscribers("127.0.0.1", server.port, "/channels/sw/events")
            try:
                await subscribers.open(6, sample_every=1, within=10)
                record = await fanout_step(server, subscribers, "/channels/sw/publish", 20, 0.5, 0)
            finally:
                subscribers.close()
    assert record["deliveries"] == 6 * record["published"] > 0
    assert (record["missing"], record["sample_lost"], record["sample_duplicates"]) == (0, 0, 0)
    assert record["server_cpu_pct"] > 0
    sw = {"scenario": "SW", "target": "cpus 0,1", "workers": 2, "measure": "S2", "loadavg": 0.0}
    assert "| cpus 0,1 | 2 | S2 20 msg/s |" in markdown([{**sw, **record}])


async def test_layer_pairs_measure_each_layer_right_after_memory(
    postgres_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S1L in small: one pair on postgresql://, its tables vacuumed first, and its table row."""
    from bench import pairs
    from bench.run import throughput, vacuum

    monkeypatch.setattr(pairs, "ROUNDS", 1)
    prefix = f"bench_{unique}_"[:30]
    layer = f"{postgres_url}?table_prefix={prefix}"
    records: list[dict[str, object]] = []
    with anyio.fail_after(60):
        await pairs.run({"postgresql": layer}, throughput, vacuum, lambda r: r, records.append, 1)
        await vacuum(layer)  # its tables exist now: VACUUM runs outside a transaction
        await drop_tables(postgres_url, prefix)
    assert [(r["target"], r["layer"], r["round"]) for r in records] == [
        ("memory", "postgresql", 0),
        ("postgresql", "postgresql", 0),
    ]
    assert all(float(r["requests_per_s"]) > 0 and r["failed"] == 0 for r in records)
    records = [{**r, "loadavg": 0.0} for r in records]
    ratio = float(records[1]["requests_per_s"]) / float(records[0]["requests_per_s"])
    assert f"| {ratio:.2f}x | {ratio:.2f} |" in markdown(records)
