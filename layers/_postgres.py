"""Plumbing of the PostgreSQL layer: the pool, the schema migration, and asyncpg's errors.

`PostgresConnections` is what the layer (`layers.postgres`) and its groups
(`layers._postgres_groups`) share: borrowed connections run inside `_unavailable`, the one place
asyncpg's exceptions become `LayerUnavailable`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from ._postgres_sql import LOCK_CLASS, SCHEMA_VERSION, Statements, lock_key, schema
from .base import ChannelLayer, Sink
from .errors import LayerConfigurationError, LayerUnavailable
from .event import Event

# What "the server cannot be reached right now" looks like through asyncpg.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    TimeoutError,
    asyncpg.InterfaceError,  # e.g. the connection is closed
    # The protocol's state machine after a connection was terminated mid-operation, e.g.
    # "cannot switch to state 12; another operation (2) is in progress".
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up, terminated
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
)


class PostgresConnections(ChannelLayer):
    """The connection half of `PostgresLayer` (which sets these attributes)."""

    url: str
    table_prefix: str
    pool_size: int
    connect_timeout: float
    application_name: str
    _where: str
    _sql: Statements
    _publish_lock: int
    _sink: Sink | None
    _pool: Any

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """The one place asyncpg's exceptions become the library's: `LayerUnavailable` (503).

        Every call into asyncpg runs inside it (`_connection` wraps each borrowed connection).
        `NoDataFoundError` passes: it is the group functions' own answer, see `_known_group`.
        """
        try:
            yield
        except asyncpg.NoDataFoundError:
            raise
        except _UNAVAILABLE as exc:
            raise LayerUnavailable(
                f"{self._where} is unavailable ({type(exc).__name__}: {exc}); "
                "check that the server is running, then retry"
            ) from exc
        except asyncpg.PostgresError as exc:  # e.g. a deadlock or serialization failure
            raise LayerUnavailable(
                f"{self._where} refused a statement ({type(exc).__name__}: {exc}); retry"
            ) from exc

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        pool = self._pool
        if pool is None:
            if self._sink is not None:  # running, but the server was never reached yet
                raise LayerUnavailable(
                    f"{self._where} is not reachable yet; check that the server is running"
                )
            raise LayerUnavailable(
                "the postgresql:// layer is not running; use it inside 'async with Channel(layer)'"
            )
        with self._unavailable():
            async with pool.acquire() as connection:
                yield connection

    async def _open_pool(self) -> Any:
        try:
            with self._unavailable():
                return await asyncpg.create_pool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=self.connect_timeout,
                    reset=keep_session,
                    server_settings={"application_name": self.application_name},
                )
        except LayerUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, asyncpg.PostgresError) and not isinstance(cause, _UNAVAILABLE):
                # A wrong database, user or password: retrying cannot help.
                raise LayerConfigurationError(
                    f"cannot open {self._where}: {cause}; check the postgresql:// URL"
                ) from None
            raise

    async def _migrate(self) -> None:
        p = self.table_prefix
        async with self._connection() as connection, connection.transaction():
            # Several processes may start at once; CREATE ... IF NOT EXISTS alone races.
            await connection.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", LOCK_CLASS, lock_key(p, "migrate")
            )
            version = 0
            if await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{p}schema"):
                version = await connection.fetchval(
                    f"SELECT coalesce(max(version), 0) FROM {p}schema"
                )
            if version > SCHEMA_VERSION:
                raise LayerConfigurationError(
                    f"the tables {p}* have schema version {version}, newer than this gateway's "
                    f"{SCHEMA_VERSION}; upgrade the gateway or use another table_prefix"
                )
            if version < SCHEMA_VERSION:
                await connection.execute(schema(p, self._publish_lock))
                await connection.execute(
                    f"DELETE FROM {p}schema; INSERT INTO {p}schema VALUES ({SCHEMA_VERSION})"
                )

    def _report_error(self, error: BaseException) -> None:
        if self._sink is not None:
            self._sink.layer_error(error)


async def keep_session(connection: Any) -> None:
    """Pool reset hook: nothing to undo (no SET, LISTEN or session locks on pooled connections)."""


def event_of(row: Any) -> Event:
    return Event(
        row["channel"], str(row["id"]), row["data"].encode(), row["event"], row["published_at"]
    )


def parse_id(id: str) -> int | None:
    """The position of an id this layer issued: canonical decimal, so "007" is not 7."""
    if not (id.isascii() and id.isdigit()) or len(id) > 18 or str(int(id)) != id:
        return None
    return int(id)
