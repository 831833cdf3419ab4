"""S1L: S1 on each cross-process layer against S1 on memory://, measured in pairs.

S1 measures every target once, one after another, over about two minutes. On a shared machine
whose speed drifts within minutes (this one's ran the raw-ASGI floor at 38,000 and at 23,000
requests/s an hour apart), a layer measured late in that sequence is compared with a memory://
run from another minute. Here each layer runs right after a memory:// run, `ROUNDS` times (a
fresh gateway process each run), and its ratio is the median of the pairs' ratios, so a busy
moment weighs on one pair, not on one side.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Awaitable, Callable
from typing import Any

from bench import servers

Record = dict[str, Any]
ROUNDS = 3


async def run(
    layers: dict[str, str],
    throughput: Callable[..., Any],
    prepare: Callable[[str], Awaitable[None]],
    stamp: Callable[[Record], Record],
    emit: Callable[[Record], None],
    seconds: float,
) -> None:
    """`layers`: scheme -> layer URL; `prepare(url)` runs before each run on it."""
    for scheme, url in layers.items():
        for round_ in range(ROUNDS):
            for target, layer in (("memory", "memory://"), (scheme, url)):
                try:
                    await prepare(layer)
                    with servers.gateway(layer=layer) as server:
                        await asyncio.sleep(0.5)
                        result = await throughput(server, seconds)
                except Exception as exc:
                    reason = f"failed: {exc!r}"[:300]
                    emit(stamp({"scenario": "S1L", "target": scheme, "not_run": reason}))
                    return
                fields = {"scenario": "S1L", "target": target, "layer": scheme, "round": round_}
                emit(stamp({**fields, **result}))


def markdown(records: list[Record]) -> list[str]:
    """One row per layer: the medians of its runs and of its pairs' ratios."""
    runs = [r for r in records if r.get("scenario") == "S1L" and "not_run" not in r]
    if not runs:
        return []
    lines = [
        "**S1L publish throughput on each cross-process layer, in pairs with memory://** "
        f"({ROUNDS} pairs per layer, each layer's run right after a memory:// run; ratio: the "
        "median of the pairs' ratios; target: at least 0.8x)",
        "",
        "| layer | memory:// requests/s | layer requests/s | ratio | the pairs' ratios | "
        "server CPU µs/request memory:// | layer | load avg |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    by_run = {(r["layer"], r["round"], r["target"]): r for r in runs}
    for layer in dict.fromkeys(r["layer"] for r in runs):
        rounds = sorted({r["round"] for r in runs if r["layer"] == layer})
        pairs = [
            (by_run[layer, round_, "memory"], by_run[layer, round_, layer])
            for round_ in rounds
            if (layer, round_, "memory") in by_run and (layer, round_, layer) in by_run
        ]
        if not pairs:
            continue
        ratios = [mine["requests_per_s"] / base["requests_per_s"] for base, mine in pairs]
        lines.append(
            f"| {layer} | {statistics.median(b['requests_per_s'] for b, _ in pairs):,.1f} | "
            f"{statistics.median(m['requests_per_s'] for _, m in pairs):,.1f} | "
            f"{statistics.median(ratios):.2f}x | "
            f"{', '.join(f'{ratio:.2f}' for ratio in ratios)} | "
            f"{statistics.median(b['server_cpu_us_per_request'] for b, _ in pairs):,.1f} | "
            f"{statistics.median(m['server_cpu_us_per_request'] for _, m in pairs):,.1f} | "
            f"{pairs[-1][1]['loadavg']} |"
        )
    return [*lines, ""]
