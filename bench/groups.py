"""G1: a consumer group as a work queue, across gateway processes.

Two gateway processes on one layer, consumers spread over both (SSE, `?group=&consumer=`), a
burst of messages published through the first process; each consumer acks every message through
its own process after a short random delay (the work). Measured: messages acked per second from
the first publish to the last ack, how the work was shared (acks per consumer), and that every
message was acked exactly once with none lost (ack replies are checked, not assumed).

The gateways retain twice the burst (`GATEWAY_HISTORY_SIZE`): a group reads the channel's
history, so messages the history bound trims before the group read them are lost to it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from bench import servers
from bench.load import HttpConnection, connect, post_request

Record = dict[str, Any]
HOST = "127.0.0.1"
PUBLISH_BATCH = 100  # messages per POST /publish


@dataclass
class G1Config:
    messages: int = 10_000
    consumers: int = 4
    processes: int = 2
    prefetch: int = 10
    work_ms: tuple[float, float] = (0.0, 5.0)  # each message's random work before its ack
    within: float = 120.0  # seconds for the whole run, at most


@dataclass
class _Consumer:
    name: str
    url: str
    acked: Counter[int] = field(default_factory=Counter)  # seq -> acks that acked it
    deliveries: int = 0
    ack_failures: int = 0


async def work_queue(urls: list[str], config: G1Config, channel: str) -> Record:
    """Run G1 against gateways already serving at `urls` (one per process)."""
    consumers = [
        _Consumer(f"c{n}", urls[n % len(urls)]) for n in range(config.consumers)
    ]  # c0, c2 on the first process, c1, c3 on the second
    done = asyncio.Event()
    total = config.messages
    acked_total = 0

    async def consume(consumer: _Consumer, ready: asyncio.Event) -> None:
        nonlocal acked_total
        path = (
            f"/channels/{channel}/events?group=workers&consumer={consumer.name}"
            f"&prefetch={config.prefetch}"
        )
        port = int(consumer.url.rsplit(":", 1)[1])
        # Acks on raw keep-alive connections (bench.load): httpx would cost the client more CPU
        # per ack than the gateway spends on it. One connection per message it may hold.
        ackers = await connect(HOST, port, config.prefetch)
        ack_path = f"/channels/{channel}/groups/workers/ack"
        async with (
            httpx.AsyncClient(base_url=consumer.url, timeout=30) as http,
            http.stream("GET", path) as stream,
        ):
            if stream.status_code != 200:
                raise RuntimeError(
                    f"{consumer.name}: {stream.status_code} {await stream.aread()!r}"
                )
            ready.set()
            working: set[asyncio.Task[None]] = set()
            turn = 0

            async def work_and_ack(message_id: str, seq: int, acker: HttpConnection) -> None:
                nonlocal acked_total
                await asyncio.sleep(random.uniform(*config.work_ms) / 1000)
                body = orjson.dumps({"ids": [message_id]})
                status, reply = await acker.request(post_request(HOST, port, ack_path, body))
                if status == 200 and orjson.loads(reply)["acked"] == 1:
                    consumer.acked[seq] += 1
                    acked_total += 1
                    if acked_total >= total:
                        done.set()
                else:
                    consumer.ack_failures += 1

            message_id = ""
            try:
                async for line in stream.aiter_lines():
                    if line.startswith("id: "):
                        message_id = line[4:]
                    elif line.startswith("data: ") and message_id:
                        consumer.deliveries += 1
                        seq = orjson.loads(line[6:])["data"]["seq"]
                        turn += 1
                        acker = ackers[turn % len(ackers)]
                        task = asyncio.create_task(work_and_ack(message_id, seq, acker))
                        working.add(task)
                        task.add_done_callback(working.discard)
                        message_id = ""
            finally:
                for acker in ackers:
                    if acker.transport is not None:
                        acker.transport.close()

    async def publish(http: httpx.AsyncClient) -> None:
        for start in range(0, total, PUBLISH_BATCH):
            batch = [
                {"channel": channel, "data": {"seq": seq}}
                for seq in range(start, min(start + PUBLISH_BATCH, total))
            ]
            reply = await http.post("/publish", json={"messages": batch})
            reply.raise_for_status()

    readies = [asyncio.Event() for _ in consumers]
    tasks = [
        asyncio.create_task(consume(c, ready)) for c, ready in zip(consumers, readies, strict=True)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
        await asyncio.sleep(0.5)  # every consumer has joined the group
        async with httpx.AsyncClient(base_url=urls[0], timeout=30) as http:
            started = time.monotonic()
            await publish(http)
            published_s = time.monotonic() - started
            try:
                await asyncio.wait_for(done.wait(), config.within)
                complete = True
            except TimeoutError:
                complete = False
            seconds = time.monotonic() - started
            await asyncio.sleep(0.5)  # a duplicate delivery would show up now
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome  # a consumer failed: no figures from a broken run
    acks: Counter[int] = Counter()
    for consumer in consumers:
        acks.update(consumer.acked)
    per_consumer = {c.name: sum(c.acked.values()) for c in consumers}
    return {
        "messages": total,
        "consumers": len(consumers),
        "processes": len(urls),
        "prefetch": config.prefetch,
        "work_ms": list(config.work_ms),
        "complete": complete,
        "acked": sum(acks.values()),
        "acked_per_s": round(sum(acks.values()) / seconds, 1),
        "publish_s": round(published_s, 2),
        "seconds": round(seconds, 2),
        "per_consumer": per_consumer,
        "min_per_consumer": min(per_consumer.values()),
        "max_per_consumer": max(per_consumer.values()),
        "acked_once": sum(1 for n in acks.values() if n == 1),
        "acked_twice_or_more": sum(1 for n in acks.values() if n > 1),
        "lost": sum(1 for seq in range(total) if acks[seq] == 0),
        "deliveries": sum(c.deliveries for c in consumers),
        "ack_failures": sum(c.ack_failures for c in consumers),
    }


async def g1(layers: dict[str, str], config: G1Config, emit: Callable[[Record], None]) -> None:
    """One G1 run per layer (scheme -> URL), on `config.processes` gateways each."""
    for scheme, url in layers.items():
        with ExitStack() as stack:
            gateways = [
                stack.enter_context(
                    servers.gateway(layer=url, history_size=str(2 * config.messages))
                )
                for _ in range(config.processes)
            ]
            await asyncio.sleep(0.5)
            channel = f"g1-{int(time.time() * 1000)}"
            urls = [f"http://{HOST}:{gateway.port}" for gateway in gateways]
            emit({"scenario": "G1", "target": scheme, **await work_queue(urls, config, channel)})


def markdown(records: list[Record]) -> list[str]:
    rows = [r for r in records if r.get("scenario") == "G1" and "not_run" not in r]
    if not rows:
        return []
    lines = [
        "**G1 consumer group as a work queue** (consumers across gateway processes, each message "
        "acked after a random delay)",
        "",
        "| layer | messages | consumers / processes | prefetch | acked/s | min-max per consumer "
        "| acked once | acked twice | lost | redeliveries | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['messages']} | {r['consumers']} / {r['processes']} | "
            f"{r['prefetch']} | {r['acked_per_s']} | {r['min_per_consumer']}-"
            f"{r['max_per_consumer']} | {r['acked_once']} | {r['acked_twice_or_more']} | "
            f"{r['lost']} | {r['deliveries'] - r['messages']} | {r['loadavg']} |"
        )
    lines.append("")
    return lines
