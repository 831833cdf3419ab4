from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from layers import Channel
from tests.conftest import CONTRACT_LAYERS, LayerFactory


@pytest.fixture(params=CONTRACT_LAYERS)
def layer_case(request: pytest.FixtureRequest) -> tuple[str, str]:
    case: tuple[str, str] = request.param
    return case


@pytest.fixture
def anyio_backend(layer_case: tuple[str, str]) -> str:
    return layer_case[1]


@pytest.fixture
def make_layer(layer_case: tuple[str, str], request: pytest.FixtureRequest) -> LayerFactory:
    factory: LayerFactory = request.getfixturevalue(layer_case[0])
    return factory


OpenChannel = Callable[..., AbstractAsyncContextManager[Channel]]


@pytest.fixture
def open_channel(make_layer: LayerFactory) -> OpenChannel:
    """`async with open_channel(history_size=5, max_backlog=10) as channel:`."""

    @asynccontextmanager
    async def opener(**options: Any) -> AsyncIterator[Channel]:
        layer_options = {
            key: options.pop(key)
            for key in ("history_size", "history_ttl", "idempotency_ttl")
            if key in options
        }
        async with Channel(make_layer(**layer_options), **options) as channel:
            yield channel

    return opener
