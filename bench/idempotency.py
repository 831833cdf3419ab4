"""S1K: S1 with a fresh `Idempotency-Key` on every request against S1 without keys, per layer.

Each layer runs both in turn, `ROUNDS` times (a fresh gateway process each run), and the table
compares the medians, so a busy moment of the machine weighs on one run, not on one side: the
cost ratio (server CPU per request, keyed / unkeyed) compares like with like. Layers get their
own stream, table prefix or key prefix, apart from the other scenarios'.
`BENCH_S1K_LAYERS=postgresql,redis` runs only those layers (default: all of them).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import servers

Record = dict[str, Any]
ROUNDS = 3
KEYED_SCRIPT = Path(__file__).with_name("publish_keyed.lua")
POSTGRES_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres?table_prefix=bench_keys_"
)


def layers(redis_url: str, nats_url: str) -> dict[str, tuple[str, str | None]]:
    """scheme -> (layer URL, None if it can run here, else why not)."""
    redis = None if importlib.util.find_spec("redis") else "pip install -e '.[redis]'"
    postgres = None if importlib.util.find_spec("asyncpg") else "pip install -e '.[postgres]'"
    nats = None if importlib.util.find_spec("nats") else "pip install -e '.[nats]'"
    return {
        "memory": ("memory://", None),
        "redis": (f"{redis_url}?key_prefix=bench-keys:", redis),
        "redis+streams": (
            redis_url.replace("redis://", "redis+streams://", 1) + "?key_prefix=bench-keys:",
            redis,
        ),
        "postgresql": (POSTGRES_URL, postgres),
        "nats": (f"{nats_url}?stream=BENCHKEYS&subject_prefix=benchkeys", nats),
    }


async def run(
    redis_url: str,
    nats_url: str,
    throughput: Callable[..., Any],
    stamp: Callable[[Record], Record],
    emit: Callable[[Record], None],
    seconds: float,
) -> None:
    if not shutil.which("wrk"):
        emit(stamp({"scenario": "S1K", "target": "all", "not_run": "needs wrk"}))
        return
    chosen = [name for name in os.environ.get("BENCH_S1K_LAYERS", "").split(",") if name]
    for scheme, (url, missing) in layers(redis_url, nats_url).items():
        if chosen and scheme not in chosen:
            continue
        if missing is not None:
            emit(stamp({"scenario": "S1K", "target": scheme, "not_run": missing}))
            continue
        for keyed in (False, True) * ROUNDS:
            try:
                with servers.gateway(layer=url) as server:
                    await asyncio.sleep(0.5)
                    script = KEYED_SCRIPT if keyed else None
                    result = await throughput(server, seconds, script=script)
            except Exception as exc:
                reason = f"failed: {exc!r}"[:300]
                emit(stamp({"scenario": "S1K", "target": scheme, "not_run": reason}))
                break
            emit(stamp({"scenario": "S1K", "target": scheme, "keyed": keyed, **result}))


def markdown(records: list[Record]) -> list[str]:
    """The S1K table: each layer's keyed run against its unkeyed one."""
    runs = [r for r in records if r.get("scenario") == "S1K" and "not_run" not in r]
    plain, keyed = (
        _medians([r for r in runs if not r["keyed"]]),
        _medians([r for r in runs if r["keyed"]]),
    )
    if not keyed:
        return []
    lines = [
        "**S1K publish with a fresh Idempotency-Key per request** (medians of the runs; ratios: "
        "keyed / unkeyed, same layer; target: CPU cost at most 1.25x)",
        "",
        "| layer | requests/s unkeyed | keyed | throughput ratio | server CPU µs/request "
        "unkeyed | keyed | cost ratio | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, k in keyed.items():
        p = plain.get(target)
        if p is None:
            continue
        lines.append(
            f"| {target} | {p['requests_per_s']:,.1f} | {k['requests_per_s']:,.1f} | "
            f"{k['requests_per_s'] / p['requests_per_s']:.2f}x | "
            f"{p['server_cpu_us_per_request']:,.1f} | {k['server_cpu_us_per_request']:,.1f} | "
            f"{k['server_cpu_us_per_request'] / p['server_cpu_us_per_request']:.2f}x | "
            f"{k['loadavg']} |"
        )
    return [*lines, ""]


def _medians(runs: list[Record]) -> dict[str, Record]:
    """Per layer: the median requests/s and CPU per request of its runs, and the last load."""
    out: dict[str, Record] = {}
    for target in dict.fromkeys(r["target"] for r in runs):
        mine = [r for r in runs if r["target"] == target]
        out[target] = {
            "requests_per_s": statistics.median(r["requests_per_s"] for r in mine),
            "server_cpu_us_per_request": statistics.median(
                r["server_cpu_us_per_request"] for r in mine
            ),
            "loadavg": mine[-1]["loadavg"],
        }
    return out
