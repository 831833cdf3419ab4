"""MQTT fixtures: the shared Mosquitto, layers on it, and throwaway brokers for fault tests.

The shared broker comes from `TEST_MQTT_URL` (default `mqtt://127.0.0.1:1883`). Every layer built
here gets its own topic prefix and short-lived sessions, so concurrent runs against one persistent
broker neither see each other's messages nor leave sessions behind for long.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from layers import ChannelLayer, create_layer
from tests.conftest import LayerFactory, require_service

MQTT_URL = os.environ.get("TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
THROWAWAY_PORTS = range(18901, 18910)
SESSION_EXPIRY = 60  # seconds a test's group sessions outlive it on the shared broker


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mqtt_url() -> str:
    parts = urlsplit(MQTT_URL)
    require_service(
        "Mosquitto", _accepts(parts.hostname or "127.0.0.1", parts.port or 1883), MQTT_URL
    )
    return MQTT_URL


@pytest.fixture
def mqtt_layer_factory(mqtt_url: str, unique: str) -> LayerFactory:
    """Builds `MQTTLayer`s through `create_layer`, each test under its own topic prefix."""

    def make(url: str = mqtt_url, **options: Any) -> ChannelLayer:
        options.setdefault("topic_prefix", f"gwtest/{unique}/")
        options.setdefault("session_expiry", SESSION_EXPIRY)
        return create_layer(url, **options)

    return make


class Mosquitto:
    """A Mosquitto of a test's own, with persistence, that the test stops and starts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        config = directory / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {directory}/\n"
            f"log_dest file {directory}/mosquitto.log\n"
            # Started as root, Mosquitto switches to the 'mosquitto' user, which cannot write to
            # the test's directory: it would run without its log and, silently, without
            # persistence. Naming the current user keeps it as it is.
            f"user {getpass.getuser()}\n"
        )
        self._config = config

    def start(self) -> None:
        assert self._process is None, "already running"
        with open(self.directory / "stderr.log", "ab") as stderr:
            self._process = subprocess.Popen(
                ["mosquitto", "-c", str(self._config)], stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + 10
        # Nothing to wait on but the port: poll it briefly.
        while not _accepts("127.0.0.1", self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = "".join(
                    path.read_text(errors="replace")
                    for path in (self.directory / "stderr.log", self.directory / "mosquitto.log")
                    if path.exists()
                )
                self.stop()
                pytest.fail(f"mosquitto did not start on port {self.port}:\n{log}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM makes Mosquitto save its sessions first; SIGKILL loses what it has not saved."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGCONT)


def _free_port() -> int:
    for port in THROWAWAY_PORTS:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto does
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail(f"no free port for a test broker in {THROWAWAY_PORTS}")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running throwaway broker; stopped at the end of the test."""
    require_service("the mosquitto binary", shutil.which("mosquitto") is not None, "PATH")
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
