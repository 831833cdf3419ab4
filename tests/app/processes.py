"""Gateway processes: any server command in a subprocess, and `python -m app` on a layer for the
cross-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import httpx

from tests.app.conftest import free_port
from tests.sse import SSEStream

ROOT = Path(__file__).resolve().parents[2]


class GatewayProcess:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    async def wait_ready(self) -> None:
        await wait_serving(self.url, self.process, self.log, "/readyz")

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10)

    @asynccontextmanager
    async def sse(self, path: str) -> AsyncIterator[SSEStream]:
        async with self.client() as http, http.stream("GET", path) as response:
            assert response.status_code == 200, await response.aread()
            yield SSEStream(response)


@contextmanager
def gateway_process(
    layer: str, log: Path, *, port: int | None = None, **env: str
) -> Iterator[GatewayProcess]:
    """A gateway process, stopped with SIGTERM (its graceful drain) when the block ends.

    `port` restarts a gateway where a stopped one listened; `env` adds or overrides settings.
    """
    port = port or free_port()
    environment = {
        **os.environ,
        "GATEWAY_LAYER": layer,
        "GATEWAY_PORT": str(port),
        "GATEWAY_SHUTDOWN_GRACE_SECONDS": "1",
        **env,
    }
    with running([sys.executable, "-m", "app"], log, environment) as process:
        yield GatewayProcess(process, f"http://127.0.0.1:{port}", log)


@contextmanager
def running(argv: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A server command in a subprocess writing to `log`, terminated when the block ends."""
    with log.open("wb") as output:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=output, stderr=output)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def output(log: Path) -> str:
    return log.read_text()


async def wait_serving(
    url: str, process: subprocess.Popen[bytes], log: Path, path: str = "/healthz"
) -> None:
    """Until `path` answers 200 (the process must not exit meanwhile)."""
    with anyio.fail_after(30):
        async with httpx.AsyncClient(base_url=url, timeout=2) as http:
            while True:
                assert process.poll() is None, output(log)
                try:
                    if (await http.get(path)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)  # the port opens with no event to await
