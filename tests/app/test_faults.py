"""Broker faults against real gateway processes (`python -m app`), on every cross-process layer.

- A broker down at start-up: the gateway starts, `/readyz` answers 503, requests get 503 naming
  the broker with every secret of its URL masked, and the gateway connects once the broker is up.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from tests.app.processes import GatewayProcess, gateway_process
from tests.fixtures_mqtt import Mosquitto
from tests.fixtures_redis import THROWAWAY_PORTS, ThrowawayRedis, _port_is_free

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
    ],
    ids=["redis", "redis+streams", "postgresql", "mqtt"],
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


async def test_the_gateway_connects_when_mqtt_comes_up_after_it(
    tmp_path: Path, unique: str
) -> None:
    broker = Mosquitto(tmp_path)  # its port is chosen, nothing listens there yet
    url = f"{broker.url}/?topic_prefix=gwtest/{unique}/&session_expiry=60"
    with gateway_process(url, tmp_path / "gateway.log") as process:
        await started(process)
        async with process.client() as http:
            assert (await http.get("/readyz")).status_code == 503
        broker.start()
        try:
            await wait_ready(process)
            await serves_a_message(process, unique)
        finally:
            broker.stop()
    assert_clean_log(process)


async def test_the_gateway_connects_when_redis_comes_up_after_it(
    tmp_path: Path, redis_prefix: str, unique: str
) -> None:
    port = next((p for p in THROWAWAY_PORTS if _port_is_free(p)), None)
    if port is None:
        pytest.fail(f"no free port for a throwaway redis-server in {THROWAWAY_PORTS}")
    server = ThrowawayRedis(port)
    url = f"redis+streams://127.0.0.1:{port}/0?key_prefix={redis_prefix}"
    with gateway_process(url, tmp_path / "gateway.log") as process:
        await started(process)
        async with process.client() as http:
            assert (await http.get("/readyz")).status_code == 503
        server.start()
        try:
            await wait_ready(process)
            await serves_a_message(process, unique)
        finally:
            server.stop()
    assert_clean_log(process)
