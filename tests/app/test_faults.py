"""Broker faults against real gateway processes (`python -m app`), on every cross-process layer.

- The fault matrix: while two publishers and a subscriber are in flight, the gateway's broker
  connections are cut from the broker's side (Redis `CLIENT KILL`, PostgreSQL
  `pg_terminate_backend`, a Mosquitto restart, a nats-server killed and started again). Every
  answer is 200 or 503, never a 500; the log has no traceback; the subscriber resumes with nothing
  lost where the layer keeps history, and is told of a gap where it does not; `/readyz` is red
  while the broker is away (where that lasts long enough to see) and green after. A layer joins
  the matrix with one line in `FAULTS`.
- A broker down at start-up: the gateway starts, `/readyz` answers 503, requests get 503 naming
  the broker with every secret of its URL masked, and the gateway connects once the broker is up.
"""

from __future__ import annotations

import functools
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest

from tests.app.processes import GatewayProcess, gateway_process
from tests.fixtures_mqtt import Mosquitto
from tests.fixtures_nats import NatsServer
from tests.fixtures_postgres import execute, forget_channels
from tests.fixtures_redis import THROWAWAY_PORTS, ThrowawayRedis, _port_is_free
from tests.sse import SSEEvent, SSEStream

pytestmark = pytest.mark.anyio

TIMEOUT = 20
SECRET = "s3cret-in-the-url"


@contextmanager
def closed_port() -> Iterator[int]:
    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        yield probe.getsockname()[1]


async def started(process: GatewayProcess) -> None:
    """Wait until the process answers HTTP at all (whatever its readiness)."""
    with anyio.fail_after(TIMEOUT):
        async with process.client() as http:
            while True:
                assert process.process.poll() is None, process.log.read_text()
                try:
                    await http.get("/healthz")
                    return
                except httpx.TransportError:
                    await anyio.sleep(0.1)  # the port opens with no event to await


def assert_clean_log(process: GatewayProcess) -> None:
    log = process.log.read_text()
    assert "Traceback" not in log, log
    assert SECRET not in log, log


@pytest.mark.parametrize(
    "url",
    [
        "redis://:{secret}@127.0.0.1:{port}/0",
        "redis+streams://127.0.0.1:{port}/0?password={secret}",
        "postgresql://gw:{secret}@127.0.0.1:{port}/gw?sslpassword={secret}",
        "mqtt://gw:{secret}@127.0.0.1:{port}",
        "nats://gw:{secret}@127.0.0.1:{port}",
    ],
    ids=["redis", "redis+streams", "postgresql", "mqtt", "nats"],
)
async def test_a_broker_down_at_start_up_is_a_503_without_secrets(
    url: str, tmp_path: Path, unique: str
) -> None:
    with (
        closed_port() as port,
        gateway_process(url.format(secret=SECRET, port=port), tmp_path / "gateway.log") as process,
    ):
        await started(process)
        async with process.client() as http:
            ready = await http.get("/readyz")
            publish = await http.post(f"/channels/{unique}/publish", json={"data": 1})
            async with http.stream("GET", f"/channels/{unique}/events") as events:
                # PostgreSQL subscribes locally (its one LISTEN covers every channel), so a
                # stream may open: it is delivered to from the table once the server is back.
                assert events.status_code in (200, 503)
        for reply in (ready, publish):
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"] == "layer_unavailable", reply.text
            assert f"127.0.0.1:{port}" in reply.json()["detail"]
            assert SECRET not in reply.text
    assert_clean_log(process)


async def wait_ready(process: GatewayProcess) -> None:
    with anyio.fail_after(TIMEOUT):
        async with process.client() as http:
            while (await http.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                await anyio.sleep(0.1)  # the layer connects on its own timer: nothing to await


async def serves_a_message(process: GatewayProcess, channel: str) -> None:
    async with process.client() as http, process.sse(f"/channels/{channel}/events") as sse:
        with anyio.fail_after(TIMEOUT):
            reply = await http.post(f"/channels/{channel}/publish", json={"data": "up"})
            assert reply.status_code == 200, reply.text
            event = await sse.next()
    assert event.json["data"] == "up"


async def connects_once_up(
    url: str, start: Callable[[], None], stop: Callable[[], None], tmp_path: Path, unique: str
) -> None:
    """A gateway started before its broker: 503 until `start()`, then it connects and serves."""
    with gateway_process(url, tmp_path / "gateway.log") as process:
        await started(process)
        async with process.client() as http:
            assert (await http.get("/readyz")).status_code == 503
        await anyio.to_thread.run_sync(start)
        try:
            await wait_ready(process)
            await serves_a_message(process, unique)
        finally:
            stop()
    assert_clean_log(process)


async def test_the_gateway_connects_when_mqtt_comes_up_after_it(
    tmp_path: Path, unique: str
) -> None:
    broker = Mosquitto(tmp_path)  # its port is chosen, nothing listens there yet
    url = f"{broker.url}/?topic_prefix=gwtest/{unique}/&session_expiry=60"
    await connects_once_up(url, broker.start, broker.stop, tmp_path, unique)


async def test_the_gateway_connects_when_redis_comes_up_after_it(
    tmp_path: Path, redis_prefix: str, unique: str
) -> None:
    port = next((p for p in THROWAWAY_PORTS if _port_is_free(p)), None)
    if port is None:
        pytest.fail(f"no free port for a throwaway redis-server in {THROWAWAY_PORTS}")
    server = ThrowawayRedis(port)
    url = f"redis+streams://127.0.0.1:{port}/0?key_prefix={redis_prefix}"
    await connects_once_up(url, server.start, server.stop, tmp_path, unique)


async def test_the_gateway_connects_when_nats_comes_up_after_it(
    tmp_path: Path, unique: str
) -> None:
    server = NatsServer(tmp_path / "nats")  # its port is chosen, nothing listens there yet
    url = f"{server.url}/?stream=S{unique}&subject_prefix={unique}&connect_timeout=0.5"
    await connects_once_up(url, server.start, server.stop, tmp_path, unique)


# -- the fault matrix -----------------------------------------------------------------------------


@dataclass
class Fault:
    """A gateway's layer URL, whether the layer keeps history, and how to cut its connections."""

    url: str
    history: bool
    cut: Callable[[], Awaitable[None]]
    red_while_cut: bool = False  # the outage lasts long enough for /readyz to show it


FaultCase = Callable[[pytest.FixtureRequest, str], AbstractAsyncContextManager[Fault]]


@asynccontextmanager
async def redis_fault(
    request: pytest.FixtureRequest, unique: str, scheme: str
) -> AsyncIterator[Fault]:
    """A throwaway Redis whose every client but the killer's is killed (CLIENT KILL)."""
    import redis.asyncio

    server: ThrowawayRedis = request.getfixturevalue("throwaway_redis")
    url = server.url.replace("redis://", f"{scheme}://", 1)
    async with redis.asyncio.Redis(port=server.port) as admin:

        async def cut() -> None:
            for kind in ("normal", "pubsub"):
                await admin.client_kill_filter(_type=kind, skipme=True)

        yield Fault(f"{url}?key_prefix={unique}:", scheme == "redis+streams", cut)


@asynccontextmanager
async def postgres_fault(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Fault]:
    """The shared PostgreSQL; the gateway's backends (found by application name) terminated."""
    base = request.getfixturevalue("postgres_url")
    name = f"gwfault-{unique}"

    async def cut() -> None:
        await execute(
            base,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1",
            f"{name}:%",
        )

    yield Fault(f"{base}?application_name={name}", True, cut)
    await forget_channels(base, unique)


@asynccontextmanager
async def mqtt_fault(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Fault]:
    """A throwaway Mosquitto, restarted."""
    broker: Mosquitto = request.getfixturevalue("mosquitto")

    async def cut() -> None:
        await anyio.to_thread.run_sync(broker.stop)
        await anyio.sleep(0.3)  # long enough for /readyz to see it
        await anyio.to_thread.run_sync(broker.start)

    url = f"{broker.url}/?topic_prefix=gwtest/{unique}/&session_expiry=60"
    yield Fault(url, False, cut, red_while_cut=True)


@asynccontextmanager
async def nats_fault(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Fault]:
    """A throwaway nats-server with JetStream on file storage, killed and started again."""
    server: NatsServer = request.getfixturevalue("nats_server")

    async def cut() -> None:
        await anyio.to_thread.run_sync(functools.partial(server.stop, signal.SIGKILL))
        await anyio.sleep(0.3)  # long enough for /readyz to see it
        await anyio.to_thread.run_sync(server.start)

    url = f"{server.url}/?stream=F{unique}&subject_prefix={unique}"
    yield Fault(url, True, cut, red_while_cut=True)


FAULTS: dict[str, FaultCase] = {
    "redis": lambda request, unique: redis_fault(request, unique, "redis"),
    "redis+streams": lambda request, unique: redis_fault(request, unique, "redis+streams"),
    "postgresql": postgres_fault,
    "mqtt": mqtt_fault,
    "nats": nats_fault,
}

PUBLISHES = 60  # per publisher
CUT_AFTER = (15, 40)  # publishes of the first publisher after which the connections are cut


@dataclass
class Subscriber:
    """An SSE subscriber that reconnects with Last-Event-ID, as EventSource does."""

    process: GatewayProcess
    path: str
    messages: list[SSEEvent] = field(default_factory=list)
    gaps: list[object] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    connected: anyio.Event = field(default_factory=anyio.Event)

    async def run(self) -> None:
        while True:
            headers = {"Last-Event-ID": self.messages[-1].last_event_id} if self.messages else {}
            try:
                async with (
                    self.process.client() as http,
                    http.stream("GET", self.path, headers=headers) as response,
                ):
                    self.statuses.append(response.status_code)
                    if response.status_code == 200:
                        self.connected.set()
                        async for event in SSEStream(response):
                            if event.type == "gap":
                                self.gaps.append(event.json)
                            elif event.type == "message":
                                self.messages.append(event)
            except (httpx.HTTPError, StopAsyncIteration):
                pass
            await anyio.sleep(0.1)  # as EventSource's retry

    def data(self, channel: str) -> list[object]:
        return [e.json["data"] for e in self.messages if e.json["channel"] == channel]


@pytest.fixture(params=list(FAULTS))
async def fault(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Fault]:
    async with FAULTS[request.param](request, unique) as case:
        yield case


async def test_cut_broker_connections_give_503s_and_recover(
    fault: Fault, tmp_path: Path, unique: str
) -> None:
    channels = [f"{unique}.a", f"{unique}.b"]
    statuses: list[int] = []
    readiness: list[int] = []
    accepted: dict[str, list[int]] = {channel: [] for channel in channels}
    cuts_done = anyio.Event()

    async def publish(http: httpx.AsyncClient, channel: str, cuts: tuple[int, ...]) -> None:
        for n in range(PUBLISHES):
            if n in cuts:
                await fault.cut()
            try:
                reply = await http.post(f"/channels/{channel}/publish", json={"data": n})
            except httpx.HTTPError as exc:  # never: the gateway answers even without a broker
                pytest.fail(f"publish {n} got no answer: {exc!r}")
            statuses.append(reply.status_code)
            if reply.status_code == 200:
                accepted[channel].append(n)
            await anyio.sleep(0.01)
        if cuts:
            cuts_done.set()

    async def watch_readiness(http: httpx.AsyncClient) -> None:
        while True:
            readiness.append((await http.get("/readyz")).status_code)
            await anyio.sleep(0.05)

    with gateway_process(fault.url, tmp_path / "gateway.log") as process:
        await process.wait_ready()
        query = "&".join(f"channel={c}" for c in channels)
        subscriber = Subscriber(process, f"/events?{query}")
        async with (
            process.client() as http,
            process.client() as other,
            process.client() as watcher,
            anyio.create_task_group() as tasks,
        ):
            tasks.start_soon(subscriber.run)
            with anyio.fail_after(TIMEOUT):
                await subscriber.connected.wait()
            tasks.start_soon(watch_readiness, watcher)
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as publishers:
                    publishers.start_soon(publish, http, channels[0], CUT_AFTER)
                    publishers.start_soon(publish, other, channels[1], ())
                await wait_ready(process)
                # A last message on each channel once all is well again: when it is in, so is
                # everything the subscriber will ever get.
                for channel in channels:
                    reply = await http.post(f"/channels/{channel}/publish", json={"data": "end"})
                    assert reply.status_code == 200, reply.text
                    accepted[channel].append("end")  # type: ignore[arg-type]
                while not all(subscriber.data(c)[-1:] == ["end"] for c in channels):  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # the stream is read in its own task
            tasks.cancel_scope.cancel()

    assert set(statuses) <= {200, 503}, statuses
    assert set(subscriber.statuses) <= {200, 503}, subscriber.statuses
    assert set(readiness) <= {200, 503} and readiness[-1] == 200, readiness
    if fault.red_while_cut:
        assert 503 in readiness
    for channel in channels:
        received = subscriber.data(channel)
        assert len(received) == len(set(received)), f"duplicates on {channel}: {received}"
        assert received == sorted(received, key=lambda d: PUBLISHES if d == "end" else d)
        if fault.history:  # resumed with nothing lost (a 503 may still have been published)
            assert set(accepted[channel]) <= set(received), (channel, accepted, received)
        elif not set(accepted[channel]) <= set(received):
            assert subscriber.gaps, "messages were lost and the subscriber was not told"
    assert_clean_log(process)
