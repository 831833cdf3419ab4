"""Request ids: taken from a sane `X-Request-ID`, made otherwise, returned on every response."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.logs import REQUEST_ID, RequestIdFilter
from app.main import create_app
from app.settings import Settings
from tests.app.conftest import RunningGateway, free_port
from tests.app.processes import output, running, wait_serving
from tests.app.test_auth import SECRET, token
from tests.conftest import eventually

pytestmark = pytest.mark.anyio


async def test_request_id_is_echoed_or_made(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        given = await http.get("/healthz", headers={"X-Request-ID": "lb-1234.abc"})
        made = await http.get("/healthz", headers={"X-Request-ID": "not ok!" * 30})
        error = await http.post("/channels/bad name/publish", json={"data": 1})
    assert given.headers["x-request-id"] == "lb-1234.abc"
    assert len(made.headers["x-request-id"]) == 16
    assert error.status_code == 422 and len(error.headers["x-request-id"]) == 16


def test_records_carry_the_request_id() -> None:
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "hello", None, None)
    token = REQUEST_ID.set("abc")
    try:
        assert RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    assert record.request_id == "abc"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "argv",
    [["-m", "app"], ["-m", "uvicorn", "app.main:app", "--port", "{port}", "--log-level", "info"]],
    ids=["python-m-app", "plain-uvicorn"],
)
async def test_no_token_reaches_the_log(argv: list[str], tmp_path: Path) -> None:
    port = free_port()
    secret_token = token(subscribe=["*"], publish=["*"])
    env = {
        **os.environ,
        "GATEWAY_PORT": str(port),
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_ACCESS_LOG": "true",
        "GATEWAY_LOG_LEVEL": "info",
    }
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, *(part.format(port=port) for part in argv)]
    with running(command, log, env) as process, anyio.fail_after(30):
        await wait_serving(url, process, log)
        query = f"access_token={secret_token}"
        async with (
            connect(f"ws://127.0.0.1:{port}/ws?{query}") as ws,
            httpx.AsyncClient(base_url=url, timeout=5) as http,
        ):
            await ws.send('{"op": "subscribe", "channels": ["c"]}')
            assert orjson.loads(await ws.recv())["type"] == "ok"
            async with http.stream("GET", f"/channels/c/events?{query}") as stream:
                assert stream.status_code == 200
            await http.get(f"/channels/c/history?{query}&after=x")
            await http.get(f"/nowhere?channel=a&token={secret_token}")
        async with connect(f"ws://127.0.0.1:{port}/ws?access_token=not.a.token") as refused:
            with pytest.raises(ConnectionClosed):
                while True:
                    await refused.recv()
        # the access log line of the SSE stream is written when it ends
        await eventually(lambda: "/channels/c/events?access_token=[redacted]" in output(log))
    text = output(log)
    assert secret_token not in text
    assert "not.a.token" not in text
    assert "/ws?access_token=[redacted]" in text


async def test_an_unexpected_error_answers_500_with_request_id_and_cors() -> None:
    app = create_app(Settings(cors_origins=["https://app.example"]))

    @app.get("/broken")
    async def broken() -> None:
        raise RuntimeError("a defect")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        reply = await http.get(
            "/broken", headers={"Origin": "https://app.example", "X-Request-ID": "req-500"}
        )
    assert reply.status_code == 500
    assert reply.headers["x-request-id"] == "req-500"
    assert reply.headers["access-control-allow-origin"] == "https://app.example"
