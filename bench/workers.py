"""SW: the gateway under gunicorn on Redis Streams, with one worker and with two: S1 and S2 each.

This machine has two cores and the load needs one of them, so two placements are measured:

- `cpu 0`: the server's processes share CPU 0, the load has CPU 1. Two workers get no more CPU
  than one: this shows what a second worker costs (two listeners, every event read twice from
  Redis) when there is no core for it.
- `cpus 0,1`: the server may use both cores and the load runs on CPU 1 too, competing with the
  second worker: this is the most two workers can show here, and an under-estimate of what they
  give on a machine with a core to spare for the load.

Ratios are to one worker in the same placement, measured minutes apart.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from bench import servers
from bench.servers import Server

Record = dict[str, Any]
PLACEMENTS = {"cpu 0": "0", "cpus 0,1": "0,1"}


async def ready(server: Server, within: float = 30.0) -> None:
    """Until `/readyz` has answered 200 ten times running: gunicorn's master listens before its
    workers have imported the app and connected to the broker."""
    deadline = time.monotonic() + within
    streak = 0
    while streak < 10:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} was not ready within {within:g} s")
        try:
            status = await asyncio.to_thread(_status, f"http://127.0.0.1:{server.port}/readyz")
        except OSError:
            status = 0
        streak = streak + 1 if status == 200 else 0
        await asyncio.sleep(0.1)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def run(
    redis_url: str,
    throughput: Callable[..., Any],
    fanout: Callable[..., Any],
    stamp: Callable[[Record], Record],
    emit: Callable[[Record], None],
    seconds: float,
) -> None:
    layer = redis_url.replace("redis://", "redis+streams://", 1)
    for placement, cpus in PLACEMENTS.items():
        for workers in (1, 2):
            fields = {"scenario": "SW", "target": placement, "workers": workers}
            try:
                with servers.gunicorn(f"{layer}?key_prefix=bench-sw:", workers, cpus) as server:
                    await ready(server)
                    result = await throughput(server, seconds)
                    emit(stamp({**fields, "measure": "S1", **result}))
                    channel = f"sw-{workers}-{int(time.time())}"
                    await fanout(server, channel, _tagged(emit, stamp, {**fields, "measure": "S2"}))
            except Exception as exc:
                emit(stamp({**fields, "not_run": f"failed: {exc!r}"[:300]}))


def _tagged(
    emit: Callable[[Record], None], stamp: Callable[[Record], Record], fields: Record
) -> Callable[[Record], None]:
    return lambda record: emit(stamp({**fields, **record}))


def markdown(records: list[Record]) -> list[str]:
    runs = [r for r in records if r.get("scenario") == "SW" and "not_run" not in r]
    if not runs:
        return []
    from bench.run import sustained

    one = {(r["target"], r["measure"], r.get("rate")): r for r in runs if r["workers"] == 1}
    lines = [
        "**SW gunicorn workers on redis+streams** (`GATEWAY_WORKERS` 1 and 2; ratio: two workers "
        "/ one, same placement; `cpu 0`: the server on one core; `cpus 0,1`: the server on both, "
        "the load sharing CPU 1)",
        "",
        "| placement | workers | measure | requests/s or deliveries/s | ratio | p99 ms | "
        "server CPU | sustained | load avg |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in runs:
        base = one.get((r["target"], r["measure"], r.get("rate")), {})
        if r["measure"] == "S1":
            value, reference = r["requests_per_s"], base.get("requests_per_s")
            what, p99, cpu, ok = "S1 publish", "-", f"{r['server_cpu_us_per_request']} µs/req", "-"
        else:
            value, reference = r["deliveries_per_s"], base.get("deliveries_per_s")
            what, p99 = f"S2 {r['rate']} msg/s", f"{r['p99_ms']}"
            cpu, ok = f"{r['server_cpu_pct']}%", "yes" if sustained(r) else "no"
        ratio = f"{value / reference:.2f}x" if reference else "-"
        lines.append(
            f"| {r['target']} | {r['workers']} | {what} | {value:,.1f} | {ratio} | {p99} | "
            f"{cpu} | {ok} | {r['loadavg']} |"
        )
    return [*lines, ""]
