"""PostgreSQL fixtures: the server from TEST_POSTGRES_URL, its test database, and layer factories.

The database is created when missing. Other test runs may share it, so tests use unique channel
names (and unique table prefixes where they need their own tables), and remove their rows after.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import LayerFactory, require_service

POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/gateway_test"
)
# The tables whose rows belong to a channel, then every other table of a prefix.
CHANNEL_TABLES = ("messages", "trimmed", "groups", "consumers", "pending", "idempotency_keys")
TABLES = (*CHANNEL_TABLES, "broadcasts", "schema")

T = TypeVar("T")


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on its own loop in a worker thread, away from the tests' event loop."""

    async def main() -> T:
        return await make()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


async def _ensure_database(url: str) -> bool:
    import asyncpg  # type: ignore[import-untyped]

    try:
        connection = await asyncpg.connect(url, timeout=5)
    except asyncpg.InvalidCatalogNameError:
        parts = urlsplit(url)
        database = parts.path.lstrip("/")
        admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")), timeout=5)
        try:
            await admin.execute(f'CREATE DATABASE "{database}"')
        except asyncpg.DuplicateDatabaseError:
            pass  # another test run created it first
        finally:
            await admin.close()
        return await _ensure_database(url)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return False
    await connection.close()
    return True


async def execute(url: str, sql: str, *args: Any) -> Any:
    """One statement on a fresh connection; returns `fetch` rows."""
    import asyncpg

    connection = await asyncpg.connect(url, timeout=5)
    try:
        return await connection.fetch(sql, *args)
    finally:
        await connection.close()


async def drop_tables(url: str, prefix: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url, timeout=5)
    try:
        await connection.execute(
            "".join(
                f"DROP FUNCTION IF EXISTS {prefix}{function};"
                for function in (
                    "publish",
                    "publish_keyed",
                    "group_read",
                    "group_claim",
                    "touch_consumer",
                )
            )
            + "".join(f"DROP TABLE IF EXISTS {prefix}{table};" for table in TABLES)
            + f"DROP SEQUENCE IF EXISTS {prefix}message_ids;"
        )
    finally:
        await connection.close()


async def forget_channels(url: str, name_prefix: str, table_prefix: str = "gateway_") -> None:
    """Delete every row of channels starting with `name_prefix` (a test's `unique`)."""
    import asyncpg

    connection = await asyncpg.connect(url, timeout=5)
    try:
        if await connection.fetchval("SELECT to_regclass($1)", f"{table_prefix}schema"):
            for table in CHANNEL_TABLES:
                await connection.execute(
                    f"DELETE FROM {table_prefix}{table} WHERE channel LIKE $1 || '%'", name_prefix
                )
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test database's URL; skips (fails under CI=true) when PostgreSQL is not running."""
    require_service("PostgreSQL", run_sync(lambda: _ensure_database(POSTGRES_URL)), POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture
def postgres_layer_factory(postgres_url: str, unique: str) -> Iterator[LayerFactory]:
    from layers.postgres import PostgresLayer

    def factory(**options: Any) -> PostgresLayer:
        options.setdefault("pool_size", 4)  # the server is shared with other test runs
        return PostgresLayer(postgres_url, **options)

    yield factory
    run_sync(lambda: forget_channels(postgres_url, unique))
