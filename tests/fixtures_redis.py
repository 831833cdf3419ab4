"""Redis fixtures: layer factories on the test database, admin access, a throwaway server.

Every test gets its own key prefix, so tests (and other people's runs against the same Redis) never
see each other's channels, and its keys are deleted afterwards.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import pytest

from layers import create_layer
from tests.conftest import LayerFactory, require_service

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
THROWAWAY_PORTS = range(6391, 6400)


@cache
def redis_reachable(url: str) -> bool:
    import redis

    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", redis_reachable(REDIS_URL), REDIS_URL)
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str, unique: str) -> Iterator[str]:
    """A key prefix for this test alone; its keys are removed when the test ends."""
    import redis

    prefix = f"gwtest:{unique}:"
    yield prefix
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def redis_pubsub_layer_factory(redis_url: str, redis_prefix: str) -> LayerFactory:
    """Builds layers through `create_layer`, as the gateway does, under the test's key prefix."""
    return functools.partial(create_layer, redis_url, key_prefix=redis_prefix)


@pytest.fixture
def redis_streams_layer_factory(redis_url: str, redis_prefix: str) -> LayerFactory:
    url = redis_url.replace("redis://", "redis+streams://", 1)
    return functools.partial(create_layer, url, key_prefix=redis_prefix)


@dataclass
class ThrowawayRedis:
    """A private redis-server that a test may stop and start again on the same port."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        # Another run may grab the port first: only our own process id counts as started.
        while _server_pid(self.port) != self.process.pid:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


def _server_pid(port: int) -> int | None:
    import redis

    try:
        with redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=1) as client:
            return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError):
        return None


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As redis-server binds: a port left in TIME_WAIT by an earlier run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def _throwaway() -> Iterator[ThrowawayRedis]:
    for port in THROWAWAY_PORTS:
        if not _port_is_free(port):
            continue
        server = ThrowawayRedis(port)
        try:
            server.start()
        except RuntimeError:  # taken meanwhile by someone else's test: try the next port
            server.stop()
            continue
        try:
            yield server
        finally:
            server.stop()
        return
    pytest.fail(f"no free port for a throwaway redis-server in {THROWAWAY_PORTS}")


@pytest.fixture
def throwaway_redis() -> Iterator[ThrowawayRedis]:
    """A redis-server of our own (ports 6391-6399), stopped at the end of the test."""
    if not _which("redis-server"):
        require_service("redis-server binary", False, "PATH")
    with _throwaway() as server:
        yield server


def _which(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None
