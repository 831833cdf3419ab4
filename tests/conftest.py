"""Shared fixtures: the list of layers the contract suite runs over, and service URLs.

Services come from environment variables (defaults are this machine's). A service that does not
answer skips its tests locally and fails them under CI=true.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import anyio
import pytest

from layers import ChannelLayer, InMemoryChannelLayer

pytest_plugins = [
    "tests.fixtures_mqtt",
    "tests.fixtures_nats",
    "tests.fixtures_postgres",
    "tests.fixtures_redis",
]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_service(name: str, reachable: bool, url: str) -> None:
    """Skip (locally) or fail (in CI) when a broker the test needs is not running."""
    if reachable:
        return
    message = f"{name} is not reachable at {url}; start it or set the URL variable"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


LayerFactory = Callable[..., ChannelLayer]

# (fixture that builds the layer, anyio backends it runs under). Later layers add themselves here.
CONTRACT_LAYERS = [
    pytest.param(("memory_layer_factory", "asyncio"), id="memory-asyncio"),
    pytest.param(("memory_layer_factory", "trio"), id="memory-trio"),
    pytest.param(("mqtt_layer_factory", "asyncio"), id="mqtt-asyncio"),
    pytest.param(("redis_pubsub_layer_factory", "asyncio"), id="redis-asyncio"),
    pytest.param(("redis_streams_layer_factory", "asyncio"), id="redis-streams-asyncio"),
    pytest.param(("postgres_layer_factory", "asyncio"), id="postgres-asyncio"),
    pytest.param(("nats_layer_factory", "asyncio"), id="nats-asyncio"),
]


@pytest.fixture
def memory_layer_factory() -> LayerFactory:
    return InMemoryChannelLayer


@pytest.fixture
def unique() -> str:
    """A name prefix no other test (or earlier run against a persistent broker) has used."""
    return f"t{uuid.uuid4().hex[:12]}"


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until `check()` holds, for state another process or thread changes with no event to
    await (a server noticing a disconnect); bounded by `within` seconds."""
    with anyio.fail_after(within):
        while not check():  # noqa: ASYNC110 - nothing to await: the state is outside this task
            await anyio.sleep(0.02)
