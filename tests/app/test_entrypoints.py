"""`app.main:app` is the ASGI application: the usual commands of FastAPI users all serve it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import free_port
from tests.app.processes import ROOT, running, wait_serving

pytestmark = pytest.mark.anyio

COMMANDS = {
    "uvicorn": ["-m", "uvicorn", "app.main:app", "--port", "{port}"],
    "gunicorn": ["-m", "gunicorn", "-c", "app/gunicorn_conf.py", "app.main:app"],
    "fastapi": ["-m", "fastapi", "run", "app/main.py", "--host", "127.0.0.1", "--port", "{port}"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
async def test_each_usual_command_serves_the_app(command: str, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "GATEWAY_PORT": str(port), "GATEWAY_LAYER": "memory://"}
    argv = [sys.executable, *(part.format(port=port) for part in COMMANDS[command])]
    url = f"http://127.0.0.1:{port}"
    with running(argv, log, env) as process:
        await wait_serving(url, process, log)
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            assert (await http.get("/readyz")).json()["layer"] == "memory"


def test_importing_the_app_contacts_no_broker() -> None:
    # a broker that does not exist: building the app must not try it (the lifespan connects)
    env = {**os.environ, "GATEWAY_LAYER": "redis://127.0.0.1:9/0"}
    script = "import app.main, fastapi; assert isinstance(app.main.app, fastapi.FastAPI)"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr.decode()
