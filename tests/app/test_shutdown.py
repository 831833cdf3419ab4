"""Graceful shutdown of a real server process, under `python -m app` and under gunicorn.

Each test starts the gateway as a child process, holds an SSE stream and a WebSocket group
consumer open, sends SIGTERM and checks what an operator relies on: streams end at once with a
reconnect hint (SSE `retry:`, WebSocket close 1001) rather than after the grace period, the
process exits cleanly, and every log line is JSON.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.app.conftest import free_port
from tests.sse import SSEEvent, SSEStream

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
GRACE = 30  # far longer than any wait below: a drain that waited for it would fail the test
SERVERS = {
    "uvicorn": [sys.executable, "-m", "app"],
    "gunicorn": [sys.executable, "-m", "gunicorn", "-c", "app/gunicorn_conf.py"],
}


@contextmanager
def gateway_process(
    command: list[str], log: Path, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    environment = {
        **os.environ,
        "GATEWAY_PORT": str(port),
        "GATEWAY_LAYER": "memory://",
        "GATEWAY_SHUTDOWN_GRACE_SECONDS": str(GRACE),
        "GATEWAY_LOG_FORMAT": "json",
        **env,
    }
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=stderr, stderr=subprocess.STDOUT
        )
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    with anyio.fail_after(30):
        async with httpx.AsyncClient(base_url=url, timeout=2) as http:
            while True:
                assert process.poll() is None, output(log)
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)  # the port opens with no event to await


def output(log: Path) -> str:
    return log.read_text()


def metric(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


@pytest.mark.parametrize("server", list(SERVERS))
async def test_sigterm_ends_streams_with_a_reconnect_hint_and_exits(
    server: str, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with gateway_process(SERVERS[server], log, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)) as (
        process,
        url,
    ):
        await wait_ready(process, url, log)
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as http,
            http.stream("GET", "/channels/news/events") as response,
            connect(url.replace("http", "ws") + "/ws") as ws,
            connect(url.replace("http", "ws") + "/ws") as idle_ws,  # never subscribes
        ):
            assert response.status_code == 200
            stream = SSEStream(response)
            with anyio.fail_after(10):
                await ws.send('{"op": "subscribe", "channels": ["jobs"], "group": "g"}')
                assert orjson.loads(await ws.recv())["type"] == "ok"
                await http.post("/channels/news/publish", json={"data": "hello"})
                await http.post("/channels/jobs/publish", json={"data": "work"})
                assert (await stream.next()).json["data"] == "hello"
                assert orjson.loads(await ws.recv())["data"] == "work"  # left unacked

            scrape = (await http.get("/metrics")).text  # summed over workers under gunicorn
            assert metric(scrape, "gateway_messages_published_total", 'layer="memory"') == 2
            assert metric(scrape, "gateway_subscribers_active", 'transport="sse"') == 1
            assert metric(scrape, "gateway_subscribers_active", 'transport="ws"') == 2

            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                rest = [event async for event in _until_closed(stream)]
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                with pytest.raises(ConnectionClosed) as idle_closed:
                    await idle_ws.recv()
            assert rest == []
            assert stream.parser.retry is not None and stream.parser.retry <= 1000
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert idle_closed.value.rcvd is not None and idle_closed.value.rcvd.code == 1001

        with anyio.fail_after(15):
            while process.poll() is None:  # noqa: ASYNC110 - a child's exit has no event here
                await anyio.sleep(0.05)
        drained_in = time.monotonic() - started
    # uvicorn alone re-raises the signal once shut down, as a process without handlers would end
    assert process.returncode in (0, -signal.SIGTERM), output(log)
    assert drained_in < GRACE / 2, f"shutdown took {drained_in:.1f} s: it waited for the grace"

    records = [orjson.loads(line) for line in output(log).splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message", "request_id"} <= r.keys() for r in records)
    assert any(r["message"].startswith("draining") for r in records)
    assert any(r["request_id"] for r in records)  # uvicorn's WebSocket records, inside a request


async def test_gunicorn_workers_share_the_layer_and_add_up_their_metrics(
    redis_url: str, unique: str, tmp_path: Path
) -> None:
    """Two workers on Redis: a stream on one sees publishes taken by either, and one scrape of
    `/metrics` sums both workers' counters (PROMETHEUS_MULTIPROC_DIR)."""
    log = tmp_path / "server.log"
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        "GATEWAY_LAYER": redis_url,
        "GATEWAY_WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    with gateway_process(SERVERS["gunicorn"], log, **env) as (process, url):
        await wait_ready(process, url, log)
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as http,
            http.stream("GET", f"/channels/{unique}/events") as response,
        ):
            stream = SSEStream(response)
            for number in range(6):
                # a new connection each time, so the kernel hands them to either worker
                async with httpx.AsyncClient(base_url=url, timeout=10) as publisher:
                    reply = await publisher.post(
                        f"/channels/{unique}/publish", json={"data": number}
                    )
                    assert reply.status_code == 200, reply.text
            with anyio.fail_after(10):
                received = [(await stream.next()).json["data"] for _ in range(6)]
            assert received == list(range(6))
            scrape = (await http.get("/metrics")).text
            assert metric(scrape, "gateway_messages_published_total", 'layer="redis"') == 6
            assert metric(scrape, "gateway_messages_delivered_total", 'transport="sse"') == 6
            assert metric(scrape, "gateway_subscribers_active", 'transport="sse"') == 1
            assert len(list(metrics_dir.glob("*.db"))) >= 2  # both workers wrote their values

            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                assert [event async for event in _until_closed(stream)] == []
        with anyio.fail_after(15):
            while process.poll() is None:  # noqa: ASYNC110 - a child's exit has no event here
                await anyio.sleep(0.05)
    assert process.returncode == 0, output(log)


async def _until_closed(stream: SSEStream) -> AsyncIterator[SSEEvent]:
    """The stream's remaining events, until the server ends it."""
    try:
        while True:
            yield await stream.next()
    except (StopAsyncIteration, httpx.RemoteProtocolError):
        return


@pytest.mark.parametrize(
    ("command", "env"),
    [
        pytest.param(SERVERS["gunicorn"], {"GATEWAY_WORKERS": "2"}, id="GATEWAY_WORKERS=2"),
        pytest.param([*SERVERS["gunicorn"], "--workers", "3"], {}, id="gunicorn --workers 3"),
        pytest.param(SERVERS["uvicorn"], {"GATEWAY_WORKERS": "2"}, id="python -m app"),
    ],
)
def test_memory_layer_refuses_several_workers(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "GATEWAY_LAYER": "memory://", "GATEWAY_PORT": str(free_port()), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "memory://" in result.stderr
    for layer in ("redis://", "redis+streams://", "postgresql://", "mqtt://"):
        assert layer in result.stderr
