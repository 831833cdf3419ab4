"""A real gateway (uvicorn on a free port, in a thread) and HTTP/SSE clients for it."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from app.main import create_app
from app.settings import Settings
from tests.sse import SSEStream

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RunningGateway:
    def __init__(self, server: uvicorn.Server, app: Any, port: int) -> None:
        self.server = server
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/ws"

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway

    def client(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10, **options)

    @asynccontextmanager
    async def sse(
        self, path: str, client: httpx.AsyncClient | None = None, **options: Any
    ) -> AsyncIterator[SSEStream]:
        async with client or self.client() as http, http.stream("GET", path, **options) as response:
            assert response.status_code == 200, await response.aread()
            yield SSEStream(response)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve(**settings: Any) -> Iterator[RunningGateway]:
    """Run the gateway in a thread until the block ends."""
    port = free_port()
    app = create_app(Settings(port=port, **settings))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.01)
    try:
        yield RunningGateway(server, app, port)
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def serve_without(middleware: type, **settings: Any) -> Iterator[RunningGateway]:
    """`serve`, without one of the app's middlewares (a fast path: its requests then go
    through FastAPI's router, the routes themselves)."""
    with serve(**settings) as running:
        app = running.app
        app.user_middleware = [m for m in app.user_middleware if m.cls is not middleware]
        app.middleware_stack = app.build_middleware_stack()
        yield running


Serve = Callable[..., AbstractContextManager[RunningGateway]]


@pytest.fixture
def gateway() -> Iterator[RunningGateway]:
    with serve(keepalive_seconds=0.5) as running:
        yield running


class Records(logging.Handler):
    """The records a logger lets through (after its filters), for checking what the server logs."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def server_log() -> Iterator[list[logging.LogRecord]]:
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "app")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
