"""Two gateway processes on a three-node JetStream cluster with a replicated stream: one node
stops mid-stream and comes back, and no message is lost, repeated or reordered.

The node stopped is the one both gateways are connected to and the stream's leader, so the
failover takes reconnecting both gateways and electing a new leader. The figures go to
`test-artifacts/nats-cluster-failover.json`.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest

from layers import Channel, create_layer
from tests.app.processes import GatewayProcess, gateway_process
from tests.fixtures_nats import NatsServer
from tests.sse import SSEParser

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
PUBLISH_EVERY = 0.02  # seconds between publishes: 50 msg/s
BEFORE, OUTAGE, AFTER = 1.5, 6.0, 2.0  # seconds of publishing around the node's outage


def gateway_connections(node: NatsServer) -> int:
    """How many gateway processes are connected to `node` (its monitoring endpoint says)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/connz", timeout=2) as reply:
        connections = json.load(reply)["connections"] or []
    return sum(1 for c in connections if c.get("name", "").startswith("channels-gateway:"))


async def stream_leader(node: NatsServer, stream: str) -> str | None:
    import nats

    nc = await nats.connect(node.url)
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    return info.cluster.leader if info.cluster else None


@dataclass
class Publisher:
    accepted: list[tuple[str, int]] = field(default_factory=list)  # (id, n) answered 200
    refused: list[int] = field(default_factory=list)  # n answered 503
    during_outage: list[int] = field(default_factory=list)  # n published while the node was down
    longest: float = 0.0  # seconds the slowest publish took
    outage: bool = False
    stop: bool = False
    n: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)

    async def run(self, gateways: tuple[GatewayProcess, GatewayProcess], channel: str) -> None:
        """Publish in turn through both gateways until told to stop."""
        clients = [g.client() for g in gateways]
        try:
            while not self.stop:
                n, self.n = self.n, self.n + 1
                started = time.monotonic()
                reply = await clients[n % 2].post(f"/channels/{channel}/publish", json={"data": n})
                self.longest = max(self.longest, time.monotonic() - started)
                assert reply.status_code in (200, 503), reply.text
                if self.outage:
                    self.during_outage.append(n)
                if reply.status_code == 200:
                    self.accepted.append((reply.json()["id"], n))
                else:
                    assert reply.json()["error"] == "layer_unavailable", reply.text
                    self.refused.append(n)
                await anyio.sleep(PUBLISH_EVERY)
        finally:
            for client in clients:
                await client.aclose()
            self.done.set()


@dataclass
class EventSource:
    """A browser's `EventSource`: reconnects (to either gateway) with `Last-Event-ID`."""

    received: list[tuple[str, int]] = field(default_factory=list)
    reconnects: int = 0
    last_id: str = "0"  # resume from the start of the (new) stream on the first connect

    async def run(self, gateways: tuple[GatewayProcess, GatewayProcess], channel: str) -> None:
        turn = 1
        while True:
            gateway = gateways[turn % 2]
            try:
                async with (
                    httpx.AsyncClient(base_url=gateway.url, timeout=None) as http,
                    http.stream(
                        "GET",
                        f"/channels/{channel}/events",
                        headers={"Last-Event-ID": self.last_id},
                    ) as response,
                ):
                    if response.status_code == 200:
                        parser = SSEParser()
                        async for text in response.aiter_text():
                            for event in parser.feed(text):
                                if event.type == "message":
                                    self.received.append((event.last_event_id, event.json["data"]))
                                    self.last_id = event.last_event_id
                                else:
                                    assert event.type != "gap", event
            except httpx.TransportError:
                pass
            self.reconnects += 1
            turn += 1
            await anyio.sleep(0.2)  # the retry: hint EventSource would honour


async def test_a_node_stops_and_returns_with_nothing_lost_repeated_or_reordered(
    nats_cluster: list[NatsServer], nats_names: tuple[str, str], unique: str, tmp_path: Path
) -> None:
    stream, prefix = nats_names
    options = f"stream={stream}&subject_prefix={prefix}&replicas=3"
    everyone = ",".join(f"127.0.0.1:{node.port}" for node in nats_cluster)
    async with Channel(create_layer(f"nats://{everyone}?{options}")):
        pass  # the replicated stream now exists: find the node that leads it
    leader = await stream_leader(nats_cluster[0], stream)
    first_node = next(node for node in nats_cluster if node.name == leader)
    nodes = [first_node, *(node for node in nats_cluster if node is not first_node)]
    # `randomize=false`: both gateways reach the first seed first, the node this test stops,
    # which also leads the stream: the failover includes electing a new stream leader.
    seeds = ",".join(f"127.0.0.1:{node.port}" for node in nodes)
    url = f"nats://{seeds}?{options}&randomize=false"
    channel = f"{unique}.orders"
    publisher, source = Publisher(), EventSource()
    with ExitStack() as stack:
        gateways = (
            stack.enter_context(gateway_process(url, tmp_path / "g1.log")),
            stack.enter_context(gateway_process(url, tmp_path / "g2.log")),
        )
        for gateway in gateways:
            await gateway.wait_ready()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(source.run, gateways, channel)
            tasks.start_soon(publisher.run, gateways, channel)
            await anyio.sleep(BEFORE)
            assert gateway_connections(first_node) == 2
            assert await stream_leader(first_node, stream) == first_node.name
            publisher.outage = True
            first_node.stop(signal.SIGKILL)
            stopped = time.monotonic()
            await anyio.sleep(OUTAGE)
            first_node.start(wait=False)
            await anyio.to_thread.run_sync(first_node.wait_healthy)
            publisher.outage = False
            back = time.monotonic() - stopped
            await anyio.sleep(AFTER)
            publisher.stop = True  # the publish in flight finishes: its reply is recorded
            with anyio.fail_after(15):
                await publisher.done.wait()
            tasks.cancel_scope.cancel()
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(source.run, gateways, channel)
                while len(source.received) < len(publisher.accepted) + len(publisher.refused):
                    if {id for id, _ in source.received} >= {id for id, _ in publisher.accepted}:
                        await anyio.sleep(1)  # a refused publish may still show up: let it
                        break
                    await anyio.sleep(0.05)  # the subscriber runs in its own task
                tasks.cancel_scope.cancel()
        async with gateways[0].client() as http:
            reply = await http.get(f"/channels/{channel}/history", params={"limit": 1000})
            history = [(e["id"], e["data"]) for e in reply.json()["messages"]]

    ids = [id for id, _ in source.received]
    assert [int(id) for id in ids] == sorted({int(id) for id in ids}), "repeated or reordered"
    delivered = dict(source.received)
    for id, n in publisher.accepted:
        assert delivered.get(id) == n, f"accepted message {n} (id {id}) was not delivered"
    refused_delivered = set(delivered.values()) & set(publisher.refused)
    assert set(delivered.values()) <= {n for _, n in publisher.accepted} | refused_delivered
    assert history == source.received
    figures = {
        "published": publisher.n,
        "accepted": len(publisher.accepted),
        "refused_503": len(publisher.refused),
        "refused_but_stored": len(refused_delivered),
        "published_during_outage": len(publisher.during_outage),
        "accepted_during_outage": len(set(publisher.during_outage) - set(publisher.refused)),
        "longest_publish_seconds": round(publisher.longest, 3),
        "node_back_after_seconds": round(back, 2),
        "subscriber_reconnects": source.reconnects,
        "lost": 0,
        "duplicates": 0,
    }
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "nats-cluster-failover.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    assert publisher.accepted and publisher.during_outage
    if os.environ.get("NATS_CLUSTER_STRICT"):
        assert not publisher.refused


async def test_with_no_server_answering_the_api_says_503_and_recovers_by_itself(
    nats_cluster: list[NatsServer], nats_names: tuple[str, str], unique: str, tmp_path: Path
) -> None:
    stream, prefix = nats_names
    seeds = ",".join(f"127.0.0.1:{node.port}" for node in nats_cluster)
    url = f"nats://{seeds}?stream={stream}&subject_prefix={prefix}&replicas=3&publish_timeout=1"
    channel = f"{unique}.jobs"
    with gateway_process(url, tmp_path / "gateway.log") as gateway:
        await gateway.wait_ready()
        async with gateway.client() as http:
            with anyio.fail_after(30):
                first = await http.post(f"/channels/{channel}/publish", json={"data": 1})
                assert first.status_code == 200, first.text
                for node in nats_cluster:
                    node.stop(signal.SIGKILL)
                while (await http.get("/readyz")).status_code != 503:  # noqa: ASYNC110
                    await anyio.sleep(0.1)  # until the client notices: no event to await
                for method, path, body in (
                    ("POST", f"/channels/{channel}/publish", {"data": 2}),
                    ("POST", "/publish", {"messages": [{"channel": channel, "data": 3}]}),
                    ("GET", f"/channels/{channel}/history", None),
                    ("GET", f"/channels/{channel}/groups/g", None),
                    ("POST", f"/channels/{channel}/groups/g/ack", {"ids": [first.json()["id"]]}),
                ):
                    reply = await http.request(method, path, json=body)
                    assert reply.status_code == 503, (path, reply.text)
                    assert reply.json()["error"] == "layer_unavailable", reply.text
                for node in nats_cluster:
                    node.start(wait=False)
                for node in nats_cluster:
                    await anyio.to_thread.run_sync(node.wait_healthy)
                while (await http.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                    await anyio.sleep(0.1)  # the client reconnects on its own schedule
                while (
                    again := await http.post(f"/channels/{channel}/publish", json={"data": 4})
                ).status_code != 200:
                    assert again.status_code == 503, again.text
                    await anyio.sleep(0.2)  # the stream's leader is being elected
                history = await http.get(f"/channels/{channel}/history")
    assert [m["data"] for m in history.json()["messages"]] == [1, 4]
