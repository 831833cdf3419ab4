from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.app.conftest import RunningGateway, serve


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the load client is written on asyncio protocols


@pytest.fixture
def gateway() -> Iterator[RunningGateway]:
    with serve() as running:
        yield running
