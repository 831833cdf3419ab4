"""The scenarios. Each measures the gateway and its baseline minutes apart in the same run.

The load (this process: subscribers and publisher on one event loop) runs on CPU 1, each server on
CPU 0. Every record carries the load average when it was taken, since the machine is shared.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import resource
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import idempotency, pairs, servers, workers
from bench.groups import G1Config, g1
from bench.load import Subscribers, connect, post_request, publish_at_rate, publish_flood
from bench.servers import Server

HOST = "127.0.0.1"
LOAD_CPU = 1
WRK_SCRIPT = Path(__file__).with_name("publish.lua")
WARMUP_SECONDS = 1.0  # of load before S1's measurement


@dataclass
class Config:
    subscribers: int = 1000
    rates: list[int] = field(default_factory=lambda: [10, 25, 50, 100, 200])
    step_seconds: float = 5.0
    idle: int = 10_000
    storm: int = 1000
    throughput_seconds: float = 5.0
    scenarios: list[str] = field(default_factory=lambda: ["S1", "S2", "S3", "S4", "S5"])
    redis_url: str = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
    nats_url: str = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")
    postgres_url: str = os.environ.get(
        "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/gateway_test"
    )
    mqtt_url: str = os.environ.get("BENCH_MQTT_URL", "mqtt://127.0.0.1:1883")
    g1: G1Config = field(default_factory=G1Config)


Record = dict[str, Any]


def pin_load() -> None:
    """Put the load on CPU 1 and allow enough file descriptors for 10,000 connections."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {LOAD_CPU})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 30_000 if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def load_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def measured(server: Server) -> Iterator[dict[str, float]]:
    """Wall time, server CPU and load CPU over the block."""
    out: dict[str, float] = {}
    wall, server_cpu, client_cpu = time.monotonic(), server.cpu_seconds(), load_cpu()
    yield out
    out["wall"] = time.monotonic() - wall
    out["server_cpu"] = server.cpu_seconds() - server_cpu
    out["load_cpu"] = load_cpu() - client_cpu


def stamp(record: Record) -> Record:
    record["loadavg"] = round(os.getloadavg()[0], 2)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


# -- S1: publish throughput --------------------------------------------------------------------


async def throughput(server: Server, seconds: float, script: Path | None = None) -> Record:
    """Publishes per second over `seconds`, after `WARMUP_SECONDS` of the same load unmeasured
    (a fresh server's first requests pay for its lazy start: imports, caches, memory)."""
    path = "/channels/s1/publish"
    tool = "wrk" if shutil.which("wrk") else "asyncio"

    async def load(duration: float) -> tuple[int, int]:
        if tool == "wrk":
            return await _wrk(server.port, path, duration, script or WRK_SCRIPT)
        return await publish_flood(HOST, server.port, path, duration=duration)

    await load(WARMUP_SECONDS)
    with measured(server) as m:
        requests, failed = await load(seconds)
    return {
        "requests_per_s": round(requests / m["wall"], 1),
        "failed": failed,
        "tool": tool,
        "server_cpu_us_per_request": round(m["server_cpu"] * 1e6 / max(requests, 1), 1),
    }


async def _wrk(port: int, path: str, seconds: float, script: Path) -> tuple[int, int]:
    process = await asyncio.create_subprocess_exec(
        "taskset", "-c", str(LOAD_CPU),
        "wrk", "-t1", "-c64", f"-d{seconds:g}s", "-s", str(script),
        f"http://{HOST}:{port}{path}",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output = (await process.communicate())[0].decode()
    requests = failed = 0
    for line in output.splitlines():
        words = line.split()
        if "requests in" in line:
            requests = int(words[0])
        elif line.strip().startswith("Non-2xx"):
            failed += int(words[-1])
        elif line.strip().startswith("Socket errors"):
            failed += sum(int(w.strip(",")) for w in words if w.strip(",").isdigit())
    return requests - failed, failed


# -- S2 / S4: fan-out at fixed rates -----------------------------------------------------------


async def fanout(
    server: Server, config: Config, channel: str, emit: Callable[[Record], None]
) -> None:
    """`config.subscribers` on one channel; one step per rate, the connections kept throughout."""
    subscribers = Subscribers(HOST, server.port, f"/channels/{channel}/events")
    path = f"/channels/{channel}/publish"
    try:
        await subscribers.open(config.subscribers)
        seq = 0
        for rate in config.rates:
            record = await fanout_step(server, subscribers, path, rate, config.step_seconds, seq)
            seq += record["sent"]
            emit(record)
    finally:
        subscribers.close()


async def fanout_step(
    server: Server, subscribers: Subscribers, path: str, rate: int, seconds: float, first_seq: int
) -> Record:
    before = subscribers.counts()
    sampled = [c for c in subscribers.connections if c.sample]
    seen = [len(c.seqs) for c in sampled]
    for connection in sampled:
        del connection.latencies[:]
    with measured(server) as m:
        published = await publish_at_rate(
            HOST, server.port, path, rate=rate, duration=seconds, first_seq=first_seq
        )
        publish_seconds = published.seconds
        drained = await subscribers.wait_for([b + published.ok for b in before], within=5.0)
    received = [after - b for after, b in zip(subscribers.counts(), before, strict=True)]
    deliveries = sum(received)
    expected = published.ok * len(received)
    duplicates = lost = 0
    for connection, start in zip(sampled, seen, strict=True):
        seqs = connection.seqs[start:]
        duplicates += len(seqs) - len(set(seqs))
        lost += len(set(range(first_seq, first_seq + published.ok)) - set(seqs))
    latencies = [x for c in sampled for x in c.latencies]
    return {
        "rate": rate,
        "sent": published.sent,
        "published": published.ok,
        "publish_failed": published.sent - published.ok,
        "offered_rate": round((published.sent - 1) / max(publish_seconds, 1e-9), 1),
        "deliveries": deliveries,
        "deliveries_per_s": round(deliveries / m["wall"], 1),
        "missing": max(0, expected - deliveries),
        "extra": max(0, deliveries - expected),
        "sample_lost": lost,
        "sample_duplicates": duplicates,
        "drained": drained,
        "p50_ms": _ms(percentile(latencies, 0.50)),
        "p99_ms": _ms(percentile(latencies, 0.99)),
        "max_ms": _ms(max(latencies, default=None)),
        "server_cpu_pct": round(100 * m["server_cpu"] / m["wall"], 1),
        "server_cpu_us_per_delivery": round(m["server_cpu"] * 1e6 / max(deliveries, 1), 2),
        "load_cpu_pct": round(100 * m["load_cpu"] / m["wall"], 1),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def sustained(record: Record) -> bool:
    return bool(
        record["drained"]
        and record["missing"] == 0
        and record["sample_lost"] == 0
        and record["sample_duplicates"] == 0
        and record["publish_failed"] == 0
        and record["p99_ms"] is not None
        and record["p99_ms"] <= 1000
    )


# -- S3: idle connections ----------------------------------------------------------------------


async def idle(server: Server, count: int, keepalive: float) -> Record:
    await asyncio.sleep(0.5)
    rss_before = server.rss_bytes()
    subscribers = Subscribers(HOST, server.port, "/channels/idle/events")
    try:
        seconds = await subscribers.open(count, sample_every=count + 1, concurrency=1000)
        await asyncio.sleep(1.0)
        rss_after = server.rss_bytes()
        frames = [c.frames for c in subscribers.connections]
        with measured(server) as m:
            await asyncio.sleep(keepalive * 2.2)
        kept = sum(
            1
            for c, f in zip(subscribers.connections, frames, strict=True)
            if c.frames > f and not c.closed
        )
        connect_times = [c.connect_seconds for c in subscribers.connections]
        return {
            "connections": count,
            "connect_all_s": round(seconds, 2),
            "connect_p99_ms": _ms(percentile(connect_times, 0.99)),
            "rss_per_connection_kib": round((rss_after - rss_before) / count / 1024, 2),
            "rss_mib": round(rss_after / 2**20, 1),
            "keepalive_received": kept,
            "idle_cpu_pct": round(100 * m["server_cpu"] / m["wall"], 1),
        }
    finally:
        subscribers.close()


# -- S5: resume storm --------------------------------------------------------------------------


async def storm(server: Server, clients: int, behind: int = 100, live_rate: int = 20) -> Record:
    """`clients` reconnect at once with a Last-Event-ID `behind` messages back, while live
    messages keep coming; each must get every message after its id exactly once."""
    channel = "storm"
    path = f"/channels/{channel}/publish"
    (connection,) = await connect(HOST, server.port, 1)
    ids = []
    for seq in range(2 * behind):
        body = b'{"data":{"seq":%d,"t":%.6f}}' % (seq, time.time())
        status, reply = await connection.request(post_request(HOST, server.port, path, body))
        assert status == 200, reply
        ids.append(str(orjson.loads(reply)["id"]))
    assert connection.transport is not None
    connection.transport.close()
    resume_from = ids[behind - 1]
    subscribers = Subscribers(HOST, server.port, f"/channels/{channel}/events")
    live_seconds = 3.0
    try:
        with measured(server) as m:
            started = time.monotonic()
            opened, live = await asyncio.gather(
                subscribers.open(clients, sample_every=10, last_event_id=resume_from),
                publish_at_rate(
                    HOST, server.port, path, rate=live_rate, duration=live_seconds,
                    first_seq=2 * behind,
                ),
            )  # fmt: skip
            expected = behind + live.ok
            complete = await subscribers.wait_for([expected] * clients, within=30.0)
            seconds = time.monotonic() - started
        counts = subscribers.counts()
        sampled = [c for c in subscribers.connections if c.sample]
        wanted = set(range(behind, 2 * behind + live.ok))
        lost = sum(len(wanted - set(c.seqs)) for c in sampled)
        duplicates = sum(len(c.seqs) - len(set(c.seqs)) for c in sampled)
        return {
            "clients": clients,
            "behind": behind,
            "live_published": live.ok,
            "connect_all_s": round(opened, 2),
            "complete_clients": sum(1 for n in counts if n == expected),
            "complete": complete and all(n == expected for n in counts),
            "missing": sum(max(0, expected - n) for n in counts),
            "extra": sum(max(0, n - expected) for n in counts),
            "sample_lost": lost,
            "sample_duplicates": duplicates,
            "seconds_to_complete": round(seconds - live_seconds, 2),
            "server_cpu_s": round(m["server_cpu"], 2),
        }
    finally:
        subscribers.close()


# -- the run -----------------------------------------------------------------------------------


def broker_layers(config: Config) -> dict[str, tuple[str, str | None]]:
    """The cross-process layers S1 and S4 run the gateway on: scheme -> (layer URL, None if it
    can run here, else why not)."""
    out: dict[str, tuple[str, str | None]] = {}
    for scheme in ("redis+streams", "redis"):
        missing = None if importlib.util.find_spec("redis") else "pip install -e '.[redis]'"
        out[scheme] = (config.redis_url.replace("redis://", f"{scheme}://", 1), missing)
    missing = None if importlib.util.find_spec("nats") else "pip install -e '.[nats]'"
    out["nats"] = (f"{config.nats_url}?stream=BENCH&subject_prefix=bench", missing)
    missing = None if importlib.util.find_spec("asyncpg") else "pip install -e '.[postgres]'"
    out["postgresql"] = (f"{config.postgres_url}?table_prefix=bench_", missing)
    missing = None if importlib.util.find_spec("aiomqtt") else "pip install -e '.[mqtt]'"
    out["mqtt"] = (f"{config.mqtt_url}?topic_prefix=bench/", missing)
    return out


async def vacuum(layer_url: str) -> None:
    """VACUUM a postgresql:// layer's message tables before a scenario runs on them.

    A server with autovacuum (PostgreSQL's default) does this by itself; one without it, like
    this machine's, keeps every row trimmed by earlier runs as a dead tuple, and each run would
    measure the ones before it.
    """
    if not layer_url.startswith("postgresql://"):
        return
    import asyncpg  # type: ignore[import-untyped]

    url, _, query = layer_url.partition("?")
    prefix = dict(urllib.parse.parse_qsl(query)).get("table_prefix", "gateway_")
    connection = await asyncpg.connect(url)
    try:
        for table in ("messages", "trimmed", "idempotency_keys"):
            if await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", prefix + table):
                await connection.execute(f"VACUUM {prefix}{table}")
    finally:
        await connection.close()


async def run(config: Config, emit: Callable[[Record], None]) -> None:
    pin_load()
    targets: list[tuple[str, Callable[..., Server]]] = [
        ("gateway", servers.gateway),
        ("baseline", servers.baseline),
    ]
    litestar_missing = servers.litestar_available()
    if litestar_missing is None:
        targets.append(("litestar", servers.litestar))
    else:
        emit(stamp({"scenario": "all", "target": "litestar", "not_run": litestar_missing}))
    nchan_missing = servers.nchan_available()
    if nchan_missing is None:
        targets.append(("nchan", servers.nchan))
    else:
        emit(stamp({"scenario": "all", "target": "nchan", "not_run": nchan_missing}))

    def info(server: Server) -> Record:
        return {"libraries": server.libraries()} if server.name != "nchan" else {}

    def emitter(fields: Record) -> Callable[[Record], None]:
        return lambda record: emit(stamp({**fields, **record}))

    @contextmanager
    def attempt(scenario: str, target: str) -> Iterator[None]:
        """A target that fails a scenario is recorded as such; the run goes on."""
        try:
            yield
        except Exception as exc:
            reason = f"failed: {exc!r}"[:300]
            emit(stamp({"scenario": scenario, "target": target, "not_run": reason}))

    layers = broker_layers(config)
    for scheme, (_, missing) in layers.items():
        if missing is not None and {"S1", "S1L", "S4"} & set(config.scenarios):
            emit(stamp({"scenario": "S1,S1L,S4", "target": scheme, "not_run": missing}))
    runnable = {scheme: url for scheme, (url, missing) in layers.items() if missing is None}

    if "S1" in config.scenarios:
        s1_targets = [
            *targets,
            *(
                (scheme, functools.partial(servers.gateway, layer=url))
                for scheme, url in runnable.items()
            ),
        ]
        for name, make in s1_targets:
            await vacuum(runnable.get(name, ""))
            with attempt("S1", name), make() as server:
                await asyncio.sleep(0.5)
                result = await throughput(server, config.throughput_seconds)
                emit(stamp({"scenario": "S1", "target": name, **info(server), **result}))

    if "S1L" in config.scenarios:
        await pairs.run(runnable, throughput, vacuum, stamp, emit, config.throughput_seconds)

    if "S1K" in config.scenarios:
        await idempotency.run(
            config.redis_url, config.nats_url, throughput, stamp, emit, config.throughput_seconds
        )

    if "S2" in config.scenarios:
        for name, make in targets:
            with attempt("S2", name), make() as server:
                fields = {"scenario": "S2", "target": name, **info(server)}
                await fanout(server, config, "s2", emitter(fields))

    if "S3" in config.scenarios:
        keepalive = 2
        for name, make in targets:
            if name == "nchan":
                server = servers.nchan(keepalive_seconds=keepalive)
            else:
                server = make(keepalive_seconds=str(keepalive))
            with attempt("S3", name), server:
                result = await idle(server, config.idle, keepalive)
                emit(stamp({"scenario": "S3", "target": name, **result}))

    if "S4" in config.scenarios:
        for scheme, url in runnable.items():
            await vacuum(url)
            with attempt("S4", scheme), servers.gateway(layer=url) as server:
                fields = {"scenario": "S4", "target": scheme}
                await fanout(server, config, f"s4-{int(time.time())}", emitter(fields))

    if "SW" in config.scenarios:
        await workers.run(
            config.redis_url,
            throughput,
            lambda server, channel, out: fanout(server, config, channel, out),
            stamp,
            emit,
            config.throughput_seconds,
        )

    if "G1" in config.scenarios:
        group_layers = {
            "redis+streams": config.redis_url.replace("redis://", "redis+streams://", 1)
            + f"?key_prefix=bench-g1-{int(time.time())}:",
            "postgresql": f"{config.postgres_url}?table_prefix=bench_",
        }
        with attempt("G1", "gateway"):
            await g1(group_layers, config.g1, lambda record: emit(stamp(record)))

    if "S5" in config.scenarios:
        for name, make in targets:
            if name in ("nchan", "litestar"):
                continue  # nchan ids are its own "time:tag" form; Litestar channels cannot resume
            with attempt("S5", name), make() as server:
                result = await storm(server, config.storm)
                emit(stamp({"scenario": "S5", "target": name, **result}))
