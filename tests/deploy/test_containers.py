"""The Dockerfile and docker-compose.yml, checked without a Docker engine (there is none here).

The Dockerfile goes through hadolint and through BuildKit's own parser (the `dockerfile` package)
for the checks that matter here: the final stage runs as a non-root user, has a HEALTHCHECK, gets
no build tools and starts gunicorn with the gateway's config. The compose file goes through
`docker-compose config`, which validates it against the Compose schema and resolves variables,
and then its wiring is checked. Building the image and starting the stack stay unchecked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
BROKERS = ("redis", "postgres", "mosquitto", "nats")


def tool(name: str) -> str:
    """The path of a command-line tool; skip (locally) or fail (in CI) without it.

    The virtualenv's own bin directory comes first: CI runs `.venv/bin/python -m pytest` without
    activating it, and hadolint comes from a dev dependency."""
    path = shutil.which(
        name,
        path=os.pathsep.join(
            [str(Path(sys.executable).parent), os.defpath, os.environ.get("PATH", "")]
        ),
    )
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def final_stage() -> list[Any]:
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    starts = [i for i, command in enumerate(commands) if command.cmd == "FROM"]
    assert len(starts) == 2, "a build stage and a final stage"
    return list(commands[starts[-1] :])


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_final_stage_is_slim_non_root_and_healthchecked() -> None:
    stage = final_stage()
    by_name = {command.cmd: command for command in stage}
    assert by_name["FROM"].value[0].endswith("-slim")
    user = by_name["USER"].value[0].split(":")[0]
    assert user not in ("0", "root")
    assert "HEALTHCHECK" in by_name
    assert "/healthz" in " ".join(by_name["HEALTHCHECK"].value)
    assert by_name["CMD"].value == ("gunicorn", "--config", "python:app.gunicorn_conf")
    assert (ROOT / "app" / "gunicorn_conf.py").is_file()
    for command in stage:
        if command.cmd == "RUN":
            assert not any(word in command.value[0] for word in ("apt-get", "gcc", "pip ")), (
                f"the final stage installs something: {command.original}"
            )
        if command.cmd == "COPY":
            assert command.flags == ("--from=build",), "the final stage copies only the build"


def test_image_sources_exist() -> None:
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "COPY" and not command.flags:
            for source in command.value[:-1]:
                assert (ROOT / source).exists(), source


def compose_config(**env: str) -> dict[str, Any]:
    result = subprocess.run(
        [tool("docker-compose"), "--file", "docker-compose.yml", "config"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_compose_file_is_valid_and_wired() -> None:
    config = compose_config()
    services = config["services"]
    assert set(services) == {"gateway", *BROKERS}
    gateway = services["gateway"]
    assert gateway["environment"]["GATEWAY_LAYER"] == "redis+streams://redis:6379/0"
    assert {broker: gateway["depends_on"][broker]["condition"] for broker in BROKERS} == {
        broker: "service_healthy" for broker in BROKERS
    }
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
    assert any(port["target"] == 8000 and port["published"] for port in gateway["ports"])
    assert gateway["read_only"] is True
    # the container outlives the drain: compose waits stop_grace_period before SIGKILL
    grace = float(gateway["environment"]["GATEWAY_SHUTDOWN_GRACE_SECONDS"])
    assert float(gateway["stop_grace_period"].rstrip("s")) > grace


def test_compose_nats_runs_jetstream_on_its_volume_with_a_health_endpoint() -> None:
    nats = compose_config()["services"]["nats"]
    command = nats["command"]
    assert "-js" in command
    store = command[command.index("-sd") + 1]
    # docker-compose 1.x prints volumes as "source:target:mode", 2.x as mappings
    targets = [v.split(":")[1] if isinstance(v, str) else v["target"] for v in nats["volumes"]]
    assert store in targets
    monitor = command[command.index("-m") + 1]
    assert f"http://127.0.0.1:{monitor}/healthz" in " ".join(nats["healthcheck"]["test"])


@pytest.mark.parametrize(
    "layer",
    [
        "postgresql://gateway:gateway@postgres:5432/gateway",
        "mqtt://mosquitto:1883",
        "nats://nats:4222",
    ],
)
def test_compose_switches_layer_by_variable(layer: str) -> None:
    gateway = compose_config(GATEWAY_LAYER=layer)["services"]["gateway"]
    assert gateway["environment"]["GATEWAY_LAYER"] == layer
