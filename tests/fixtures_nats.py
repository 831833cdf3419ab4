"""NATS fixtures: the shared JetStream server, layers on it, and throwaway servers and clusters.

The shared server comes from `TEST_NATS_URL` (default `nats://127.0.0.1:4222`). Every layer built
here gets a stream and a subject prefix of its own, and the stream is deleted when the test ends,
so tests (and other runs against the same server) never see each other's messages.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from layers import create_layer
from tests.conftest import LayerFactory, require_service

NATS_URL = os.environ.get("TEST_NATS_URL", "nats://127.0.0.1:4222")


@cache
def jetstream_reachable(url: str) -> bool:
    """Whether a NATS server with JetStream enabled answers at `url` (its INFO line says)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), 1) as s:
            s.settimeout(1)
            line = s.makefile("rb").readline()
    except OSError:
        return False
    if not line.startswith(b"INFO "):
        return False
    return bool(json.loads(line[5:]).get("jetstream"))


@pytest.fixture
def nats_url() -> str:
    require_service("NATS with JetStream", jetstream_reachable(NATS_URL), NATS_URL)
    return NATS_URL


@pytest.fixture
def nats_names(unique: str) -> tuple[str, str]:
    """(stream, subject prefix) for this test alone."""
    return f"T{unique}", f"t.{unique}"


@pytest.fixture
def nats_stream(nats_url: str, nats_names: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """The test's stream and prefix on the shared server; the stream is deleted afterwards."""
    yield nats_names
    asyncio.run(delete_stream(nats_url, nats_names[0]))


async def delete_stream(url: str, stream: str) -> None:
    import nats
    import nats.js.errors

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        await nc.jetstream().delete_stream(stream)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


@pytest.fixture
def nats_layer_factory(nats_url: str, nats_stream: tuple[str, str]) -> LayerFactory:
    """Builds `NatsJetStreamLayer`s through `create_layer`, as the gateway does."""
    stream, prefix = nats_stream
    return functools.partial(create_layer, nats_url, stream=stream, subject_prefix=prefix)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class NatsServer:
    """A nats-server of a test's own, with JetStream on file storage in `directory`.

    `stop` and `start` again keep its ports and its store, as a restarted server would.
    """

    def __init__(self, directory: Path, name: str = "n1") -> None:
        self.directory = directory
        self.name = name
        self.port = free_port()
        self.monitor_port = free_port()
        self.cluster_port: int | None = None
        self.routes: list[int] = []
        self.cluster_name: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [
            shutil.which("nats-server") or "nats-server",
            *("-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)),
            *("-js", "-sd", str(self.directory / "store"), "-n", self.name),
            *("-l", str(self.directory / "server.log")),
        ]
        if self.cluster_port is not None:
            command += [
                *("--cluster_name", self.cluster_name or "gwtest"),
                *("--cluster", f"nats://127.0.0.1:{self.cluster_port}"),
                *("--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)),
            ]
        return command

    def start(self, *, wait: bool = True) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if wait:
            self.wait_healthy()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1
            ) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def wait_healthy(self, within: float = 20) -> None:
        deadline = time.monotonic() + within
        # Nothing to wait on but the monitoring endpoint: poll it briefly.
        while not self.healthy():
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.directory / "server.log"
                text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                pytest.fail(f"nats-server {self.name} did not become healthy:\n{text}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _need_binary() -> None:
    require_service("the nats-server binary", shutil.which("nats-server") is not None, "PATH")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A running throwaway JetStream server; stopped at the end of the test."""
    _need_binary()
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three JetStream servers routed into one cluster, all running and healthy."""
    _need_binary()
    nodes = [NatsServer(tmp_path / f"n{i}", name=f"n{i}") for i in (1, 2, 3)]
    for node in nodes:
        node.cluster_port = free_port()
        node.cluster_name = f"gwtest-{tmp_path.name[-12:]}"
    for node in nodes:
        node.routes = [other.cluster_port for other in nodes if other is not node]  # type: ignore[misc]
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_healthy()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
