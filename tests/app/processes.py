"""Gateway processes (`python -m app` in a subprocess) for the cross-process tests."""

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
        with anyio.fail_after(30):
            async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
                while True:
                    assert self.process.poll() is None, self.log.read_text()
                    try:
                        if (await http.get("/readyz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.1)  # the port opens with no event to await

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
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield GatewayProcess(process, f"http://127.0.0.1:{port}", log)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
