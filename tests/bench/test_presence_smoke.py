"""The presence benchmark (`python -m bench.presence`) runs end to end at a small size: two
gateway processes on redis://, a few subscribers. No timing assertions."""

from __future__ import annotations

import argparse

import pytest

from bench.presence import idle_cost, scale

pytestmark = pytest.mark.anyio


async def test_presence_scenario_counts_every_subscriber(redis_url: str) -> None:
    args = argparse.Namespace(
        subscribers=40, idle=20, queries=5, ttl=1.5, seconds=1.0, redis_url=redis_url
    )
    record = await scale(args)
    assert record["subscribers"] == 40
    assert record["query_p99_ms"] > 0
    assert record["control_messages_per_heartbeat"] >= 1  # one heartbeat per process, at least
    idle = await idle_cost(args)
    assert {"cpu_pct_with_heartbeats", "cpu_pct_without_heartbeats"} <= set(idle)
