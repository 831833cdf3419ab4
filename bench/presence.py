"""`python -m bench.presence`: presence at scale, on two gateway processes sharing one layer.

S6 opens `--subscribers` SSE connections to one channel, half on each of two gateway processes
(`redis://` by default, the layer whose control channel a Redis client can watch), then measures:

- how long until both processes count them all, and the time to answer `GET .../presence`
  (p50 and p99 of `--queries` requests, each listing 1,000 clients);
- the broker traffic of the heartbeats: messages and bytes on the layer's control channel per
  heartbeat interval, with every subscriber idle (watched with a Redis SUBSCRIBE);
- the CPU the heartbeats cost one idle gateway holding `--idle` connections: its CPU over
  `--seconds` with heartbeats every `--ttl / 3` seconds and keepalives out of the way, against
  the same process with a TTL so long that no heartbeat falls in the window.

Results go to stdout as JSON lines (and `--out`, default bench/results/presence.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as redis

from bench import servers
from bench.load import Subscribers
from bench.run import HOST, measured, percentile, pin_load, stamp

CHANNEL = "presence"


async def counted(port: int, count: int, within: float) -> float:
    """Seconds until the gateway on `port` counts `count` subscribers of the channel."""
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=30) as http:
        async with asyncio.timeout(within):
            while True:
                reply = await http.get(f"/channels/{CHANNEL}/presence")
                if reply.json()["subscribers"] >= count:
                    break
                await asyncio.sleep(0.1)
    return time.perf_counter() - started


async def query_times(port: int, queries: int) -> list[float]:
    times = []
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=30) as http:
        for _ in range(queries):
            started = time.perf_counter()
            reply = await http.get(f"/channels/{CHANNEL}/presence")
            times.append(time.perf_counter() - started)
            assert reply.status_code == 200, reply.text
    return times


async def control_traffic(url: str, prefix: str, seconds: float) -> tuple[int, int]:
    """(messages, bytes) on the layer's control channel over `seconds`."""
    client = redis.Redis.from_url(url)
    messages = size = 0
    async with client.pubsub() as pubsub:
        await pubsub.subscribe(f"{prefix}#broadcast")
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            if message is not None:
                messages += 1
                size += len(message["data"])
    await client.aclose()
    return messages, size


async def scale(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"bench-presence:{uuid.uuid4().hex[:8]}:"
    layer = f"{args.redis_url}?key_prefix={prefix}"
    settings = {"presence_ttl_seconds": str(args.ttl), "keepalive_seconds": "600"}
    with servers.gateway(layer, **settings) as first, servers.gateway(layer, **settings) as second:
        groups = [Subscribers(HOST, s.port, f"/channels/{CHANNEL}/events") for s in (first, second)]
        try:
            half = args.subscribers // 2
            opened = await asyncio.gather(*(g.open(half, sample_every=half + 1) for g in groups))
            total = 2 * half
            converged = await asyncio.gather(
                *(counted(s.port, total, within=120) for s in (first, second))
            )
            times = await query_times(first.port, args.queries)
            interval = args.ttl / 3
            with measured(first) as m:
                messages, size = await control_traffic(args.redis_url, prefix, 3 * interval)
            return {
                "scenario": "S6",
                "layer": "redis",
                "subscribers": total,
                "processes": 2,
                "connect_all_s": round(max(opened), 2),
                "counted_everywhere_s": round(max(converged), 2),
                "query_p50_ms": round(1000 * (percentile(times, 0.5) or 0), 2),
                "query_p99_ms": round(1000 * (percentile(times, 0.99) or 0), 2),
                "heartbeat_interval_s": interval,
                "control_messages_per_heartbeat": round(messages / 3, 2),
                "control_bytes_per_heartbeat": round(size / 3),
                "idle_cpu_pct_while_watched": round(100 * m["server_cpu"] / m["wall"], 2),
            }
        finally:
            for group in groups:
                group.close()


async def idle_cost(args: argparse.Namespace) -> dict[str, Any]:
    """CPU of one idle gateway with `--idle` connections, with and without heartbeats."""
    out: dict[str, Any] = {"scenario": "S6-idle", "connections": args.idle}
    for name, ttl in (("with_heartbeats", args.ttl), ("without_heartbeats", 86400.0)):
        prefix = f"bench-presence:{uuid.uuid4().hex[:8]}:"
        layer = f"{args.redis_url}?key_prefix={prefix}"
        settings = {"presence_ttl_seconds": str(ttl), "keepalive_seconds": "600"}
        with servers.gateway(layer, **settings) as server:
            subscribers = Subscribers(HOST, server.port, f"/channels/{CHANNEL}/events")
            try:
                await subscribers.open(args.idle, sample_every=args.idle + 1, concurrency=1000)
                await asyncio.sleep(2.0)
                with measured(server) as m:
                    await asyncio.sleep(args.seconds)
                out[f"cpu_pct_{name}"] = round(100 * m["server_cpu"] / m["wall"], 2)
            finally:
                subscribers.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.presence", description=__doc__)
    parser.add_argument("--subscribers", type=int, default=5000)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("results") / "presence.jsonl"
    )
    args = parser.parse_args()
    pin_load()

    async def both() -> list[dict[str, Any]]:
        return [stamp(await scale(args)), stamp(await idle_cost(args))]

    records = asyncio.run(both())
    lines = b"".join(orjson.dumps(record) + b"\n" for record in records)
    args.out.write_bytes(lines)
    print(lines.decode(), end="")


if __name__ == "__main__":
    main()
