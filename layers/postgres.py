"""`postgresql://`: messages in a table, live delivery by LISTEN/NOTIFY, groups in tables (asyncpg).

Design decisions:

- Ids come from one bigint sequence, taken under a transaction-level advisory lock that is held
  until commit, so ids become visible in id order: a reader that has seen id N never later finds a
  committed id below N. A bigserial alone is not enough (two publishers can commit 11 before 10,
  and a reader resuming "after 11" would miss 10 for good). The price: publishes are serialised
  through their commit across every process, so the disk's flush time bounds the publish rate; a
  batch is one transaction and amortises it. `?synchronous_commit=off` in the URL (passed to the
  server) lifts that bound about tenfold and keeps the order, but a server crash can then lose the
  last fraction of a second of accepted publishes. The sequence must keep CACHE 1, or sessions
  would hand out ids out of order.
- NOTIFY carries only the newest id of a publish, never the message, so NOTIFY's 8,000-byte
  payload limit does not limit messages. One listener connection per process wakes one reader task
  that reads `id > last_seen` from the table, filtered to what this process subscribes to. After
  the listener reconnects the same read delivers whatever was committed while it was away.
- Live delivery trails the commit by that read; the core drops replayed events that arrive live
  after the replay (see `ChannelLayer.replay`).
- A publish (one message or a batch) is one round trip: a plpgsql function takes the lock,
  inserts and notifies. Pooled connections keep no session state, so their reset on release, a
  second round trip, is skipped.
- History bounds are applied by readers (the newest `history_size` per channel; `expires_at` is
  set at publish from the publisher's `history_ttl`), so a background cleanup can delete late
  without being in the publish path. Each deletion records the channel's highest deleted id,
  which keeps gap detection exact after rows are gone.
- Consumer groups are rows: a cursor per group, advanced under FOR UPDATE on the group row, and a
  pending row per delivered message, taken over with FOR UPDATE SKIP LOCKED. Consumers in several
  processes share a group and it survives restarts. A pending message whose row the history bound
  already deleted is dropped when claimed, as Redis Streams does.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg  # type: ignore[import-untyped]
from anyio.abc import TaskStatus

from ._supervisor import Supervisor
from .base import Capabilities, ChannelLayer, ConsumerInfo, GroupInfo, Replay, Sink
from .errors import LayerConfigurationError, LayerUnavailable, UnknownGroup
from .event import Event, Message
from .urls import split_options

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # bump when the schema or a function changes; migration re-runs it all
_LOCK_CLASS = 0x67617465  # first key of every advisory lock this layer takes ("gate")
_READ_BATCH = 500
_EXPIRE_BATCH = 5000
# Anonymous group consumers get a new name per connection; forget those long gone. A live one
# claims at least every few seconds, which keeps it fresh.
_FORGET_CONSUMERS_AFTER = 3600.0
_MIN_RETRY, _MAX_RETRY = 0.1, 2.0  # seconds between reads of new messages that failed
_CLEANUP_AFTER_PUBLISHES = 1000  # run the cleanup early when this process publishes a lot
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,29}")
_URL_OPTIONS = (
    "table_prefix",
    "pool_size",
    "connect_timeout",
    "cleanup_interval",
    "application_name",
)
_RELEASED = "released"  # notification "released <channel>": a consumer gave its messages back

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


def _schema(p: str, publish_lock: int) -> str:
    """The tables and functions; every statement is idempotent."""
    return f"""
CREATE TABLE IF NOT EXISTS {p}schema (version integer NOT NULL);

CREATE SEQUENCE IF NOT EXISTS {p}message_ids AS bigint CACHE 1;

CREATE TABLE IF NOT EXISTS {p}messages (
    id bigint PRIMARY KEY,
    channel text COLLATE "C" NOT NULL,
    event text NOT NULL,
    data text NOT NULL,
    published_at double precision NOT NULL,
    expires_at double precision
);
CREATE INDEX IF NOT EXISTS {p}messages_by_channel ON {p}messages (channel, id);
CREATE INDEX IF NOT EXISTS {p}messages_by_expiry ON {p}messages (expires_at)
    WHERE expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS {p}trimmed (
    channel text COLLATE "C" PRIMARY KEY,
    max_deleted_id bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS {p}groups (
    channel text COLLATE "C" NOT NULL,
    group_name text NOT NULL,
    last_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, group_name)
);

CREATE TABLE IF NOT EXISTS {p}consumers (
    channel text COLLATE "C" NOT NULL,
    group_name text NOT NULL,
    consumer text NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, group_name, consumer)
);

CREATE TABLE IF NOT EXISTS {p}pending (
    channel text COLLATE "C" NOT NULL,
    group_name text NOT NULL,
    message_id bigint NOT NULL,
    consumer text NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT now(),
    deliveries integer NOT NULL DEFAULT 1,
    PRIMARY KEY (channel, group_name, message_id)
);

CREATE OR REPLACE FUNCTION {p}publish(
    channels text[], events text[], payloads text[],
    published double precision[], expires double precision[]
) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    -- Held until commit, so ids become visible in the order they are taken.
    PERFORM pg_advisory_xact_lock({_LOCK_CLASS}, {publish_lock});
    FOR i IN 1 .. cardinality(channels) LOOP
        ids[i] := nextval('{p}message_ids');
    END LOOP;
    INSERT INTO {p}messages (id, channel, event, data, published_at, expires_at)
        SELECT * FROM unnest(ids, channels, events, payloads, published, expires);
    -- The id, not the message: NOTIFY payloads are limited to 8,000 bytes.
    PERFORM pg_notify('{p}messages', ids[cardinality(ids)]::text);
    RETURN ids;
END $$;

CREATE OR REPLACE FUNCTION {p}touch_consumer(ch text, grp text, who text)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO {p}consumers (channel, group_name, consumer) VALUES (ch, grp, who)
    ON CONFLICT (channel, group_name, consumer) DO UPDATE SET seen_at = now();
$$;

CREATE OR REPLACE FUNCTION {p}group_read(ch text, grp text, who text, n integer)
RETURNS SETOF {p}messages LANGUAGE plpgsql AS $$
DECLARE
    after_id bigint;
    ids bigint[];
BEGIN
    -- Every live message wakes every consumer of its channel: find out whether there is
    -- anything to read before taking (and so writing) the lock on the group row.
    SELECT g.last_id INTO after_id FROM {p}groups g WHERE g.channel = ch AND g.group_name = grp;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', MESSAGE = 'unknown consumer group';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM {p}messages m WHERE m.channel = ch AND m.id > after_id) THEN
        RETURN;
    END IF;
    -- The lock makes each new message go to exactly one consumer, whichever process it is in;
    -- ids are visible in order, so "id > cursor" skips nothing.
    SELECT g.last_id INTO after_id FROM {p}groups g
        WHERE g.channel = ch AND g.group_name = grp FOR UPDATE;
    SELECT array_agg(m.id ORDER BY m.id) INTO ids FROM (
        SELECT m.id FROM {p}messages m WHERE m.channel = ch AND m.id > after_id
        ORDER BY m.id LIMIT n
    ) m;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    UPDATE {p}groups g SET last_id = ids[cardinality(ids)]
        WHERE g.channel = ch AND g.group_name = grp;
    PERFORM {p}touch_consumer(ch, grp, who);
    INSERT INTO {p}pending (channel, group_name, message_id, consumer)
        SELECT ch, grp, unnest(ids), who;
    RETURN QUERY SELECT m.* FROM {p}messages m WHERE m.id = ANY(ids) ORDER BY m.id;
END $$;

CREATE OR REPLACE FUNCTION {p}group_claim(
    ch text, grp text, who text, min_idle double precision, n integer
) RETURNS TABLE (
    claimed_id bigint, claimed_deliveries integer, claimed_event text, claimed_data text,
    claimed_published_at double precision
) LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    PERFORM 1 FROM {p}groups g WHERE g.channel = ch AND g.group_name = grp;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', MESSAGE = 'unknown consumer group';
    END IF;
    PERFORM {p}touch_consumer(ch, grp, who);
    -- SKIP LOCKED: consumers claiming at the same moment take different messages.
    SELECT array_agg(s.message_id) INTO ids FROM (
        SELECT p.message_id FROM {p}pending p
        WHERE p.channel = ch AND p.group_name = grp
          AND p.delivered_at <= now() - make_interval(secs => min_idle)
        ORDER BY p.message_id LIMIT n
        FOR UPDATE SKIP LOCKED
    ) s;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    -- The history bound deleted these: they can never be delivered again.
    DELETE FROM {p}pending p
        WHERE p.channel = ch AND p.group_name = grp AND p.message_id = ANY(ids)
          AND NOT EXISTS (SELECT 1 FROM {p}messages m WHERE m.id = p.message_id);
    RETURN QUERY
    UPDATE {p}pending p
        SET consumer = who, delivered_at = now(), deliveries = p.deliveries + 1
        FROM {p}messages m
        WHERE p.channel = ch AND p.group_name = grp AND p.message_id = ANY(ids)
          AND m.id = p.message_id
        RETURNING p.message_id, p.deliveries, m.event, m.data, m.published_at;
END $$;
"""


class PostgresLayer(ChannelLayer):
    """Cross-process channels with history and consumer groups on PostgreSQL."""

    scheme = "postgresql"
    capabilities = Capabilities(cross_process=True, history=True, groups=True)

    def __init__(
        self,
        url: str,
        *,
        history_size: int = 1000,
        history_ttl: float | None = None,
        table_prefix: str | None = None,
        pool_size: int | None = None,
        connect_timeout: float | None = None,
        cleanup_interval: float | None = None,
        keepalive_interval: float = 10.0,
        application_name: str | None = None,
    ) -> None:
        """`url` is `postgresql://[user[:password]@]host[:port]/database[?option=value&...]`.

        Options missing from the arguments are read from the URL query, since the gateway only
        passes the URL: `table_prefix` (default `gateway_`), `pool_size` (10 connections, plus
        the listener), `connect_timeout` (5 s), `cleanup_interval` (5 s) and `application_name`.
        Other query parameters (`sslmode`, ...) go to asyncpg.
        """
        url, query = split_options(url, _URL_OPTIONS, driver=None)
        try:
            if table_prefix is None:
                table_prefix = query.get("table_prefix", "gateway_")
            if pool_size is None:
                pool_size = int(query.get("pool_size", 10))
            if connect_timeout is None:
                connect_timeout = float(query.get("connect_timeout", 5.0))
            if cleanup_interval is None:
                cleanup_interval = float(query.get("cleanup_interval", 5.0))
        except ValueError as exc:
            raise LayerConfigurationError(f"invalid postgresql:// URL option: {exc}") from None
        if application_name is None:
            application_name = query.get("application_name", "channels-gateway")
        if pool_size < 1:
            raise LayerConfigurationError("pool_size must be at least 1")
        if not _PREFIX.fullmatch(table_prefix):
            raise LayerConfigurationError(
                f"invalid table_prefix {table_prefix!r}: use 1-30 lowercase letters, digits and "
                "'_', starting with a letter or '_'"
            )
        if history_size < 1:
            raise LayerConfigurationError("history_size must be at least 1")
        self.url = url
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.table_prefix = table_prefix
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.cleanup_interval = cleanup_interval
        self.keepalive_interval = keepalive_interval
        # One name per instance, so an operator (or a test) can tell this process's connections
        # apart in pg_stat_activity.
        self.application_name = f"{application_name}:{uuid.uuid4().hex[:8]}"
        self.listener_application_name = f"{self.application_name}:listener"
        parts = urlsplit(url)
        self._where = f"PostgreSQL at {parts.hostname or 'localhost'}:{parts.port or 5432}"
        self._notify_channel = f"{table_prefix}messages"
        self._publish_lock = _lock_key(table_prefix, "publish")
        self._sql = _Statements(table_prefix)
        self._sink: Sink | None = None
        self._pool: Any = None
        self._listener: Any = None
        self._listening = False
        self._supervisor: Supervisor | None = None
        self._migrated = False
        self._positioned = False  # the reader's position was set on a first connection
        self._channels: set[str] = set()
        self._likes: dict[str, str] = {}  # subscribed glob pattern -> its LIKE pattern
        self._last_seen = 0  # every message up to this id was handed to the sink (or skipped)
        self._newest = 0  # the newest id known to be committed
        self._wakeup = anyio.Event()
        self._dirty: set[str] = set()  # channels published to since the last cleanup
        self._published_since_cleanup = 0
        self._cleanup_due = anyio.Event()

    # -- lifetime --------------------------------------------------------------------------------

    async def run(self, sink: Sink, *, task_status: TaskStatus[None]) -> None:
        self._sink = sink
        self._supervisor = Supervisor(f"{self._where} (listener)", sink, logger)
        fatal: LayerConfigurationError | None = None
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._deliver, sink)
                tasks.start_soon(self._clean_up_periodically)
                try:
                    await self._supervisor.run(self._listen, task_status=task_status)
                except LayerConfigurationError as exc:  # raised as it is, not in a group
                    fatal = exc
                    tasks.cancel_scope.cancel()
        finally:
            self._sink = None
            with anyio.CancelScope(shield=True):
                await self._close()
        if fatal is not None:
            raise fatal

    @property
    def listener_reconnects(self) -> int:
        return self._supervisor.reconnects if self._supervisor is not None else 0

    async def _listen(self, ready: Callable[[], None]) -> None:
        """One listener connection's life (see `layers._supervisor`); the pool and the schema are
        made on the first connection that succeeds."""
        if self._pool is None:
            self._pool = await self._open_pool()
        if not self._migrated:
            await self._migrate()
            self._migrated = True
        connection = await self._connect_listener()
        try:
            # LISTEN is active: whatever was committed before this read is covered by it,
            # whatever comes after will be notified.
            newest = await self._max_id(connection)
            if self._positioned:
                self._advance(newest)  # the reader delivers what was committed meanwhile
            else:
                self._last_seen = self._newest = newest  # live delivery starts now
                self._positioned = True
            self._listener = connection
            self._listening = True
            ready()
            await self._until_lost(connection)
            raise LayerUnavailable(f"{self._where}: the listener connection was lost")
        finally:
            self._listening = False
            self._listener = None
            connection.terminate()

    async def _open_pool(self) -> Any:
        try:
            with self._unavailable():
                return await asyncpg.create_pool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=self.connect_timeout,
                    reset=_keep_session,
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

    async def _close(self) -> None:
        self._listening = False
        listener, self._listener = self._listener, None
        pool, self._pool = self._pool, None
        if listener is not None:
            listener.terminate()  # LISTEN state dies with it; nothing to flush
        if pool is not None:
            with anyio.move_on_after(5) as closing:
                await pool.close()  # waits for borrowed connections to come back
            if closing.cancelled_caught:
                pool.terminate()

    async def _migrate(self) -> None:
        p = self.table_prefix
        async with self._connection() as connection, connection.transaction():
            # Several processes may start at once; CREATE ... IF NOT EXISTS alone races.
            await connection.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", _LOCK_CLASS, _lock_key(p, "migrate")
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
                await connection.execute(_schema(p, self._publish_lock))
                await connection.execute(
                    f"DELETE FROM {p}schema; INSERT INTO {p}schema VALUES ({SCHEMA_VERSION})"
                )

    # -- connections and errors ------------------------------------------------------------------

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

    # -- live delivery ---------------------------------------------------------------------------

    async def _connect_listener(self) -> Any:
        with self._unavailable():
            connection = await asyncpg.connect(
                self.url,
                timeout=self.connect_timeout,
                server_settings={"application_name": self.listener_application_name},
            )
            try:
                await connection.add_listener(self._notify_channel, self._on_notify)
            except BaseException:
                connection.terminate()
                raise
        return connection

    def _on_notify(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        kind, _, argument = payload.partition(" ")
        if kind == _RELEASED:
            if self._sink is not None:
                self._sink.wake(argument, released=True)
        elif kind.isdigit():
            self._advance(int(kind))

    def _advance(self, newest: int) -> None:
        if newest > self._newest:
            self._newest = newest
            self._wakeup.set()

    async def _max_id(self, connection: Any) -> int:
        with self._unavailable():
            newest: int = await connection.fetchval(self._sql.max_id)
        return newest

    def _report_error(self, error: BaseException) -> None:
        if self._sink is not None:
            self._sink.layer_error(error)

    async def _until_lost(self, connection: Any) -> None:
        lost = anyio.Event()
        connection.add_termination_listener(lambda _: lost.set())
        if connection.is_closed():
            return
        while True:
            with anyio.move_on_after(self.keepalive_interval):
                await lost.wait()
                return
            # A peer that vanished without closing the socket sends no termination: ask. Asking
            # for the newest id also delivers anything whose notification went astray.
            try:
                with anyio.fail_after(self.connect_timeout):
                    self._advance(await connection.fetchval(self._sql.max_id))
            except (*_UNAVAILABLE, asyncpg.PostgresError):
                return

    async def _deliver(self, sink: Sink) -> None:
        """Hand every committed message of a subscribed channel to the sink, in id order, once."""
        delay = _MIN_RETRY
        while True:
            if self._last_seen >= self._newest:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                continue
            try:
                await self._read_up_to(self._newest, sink)
                delay = _MIN_RETRY
            except LayerUnavailable as exc:
                logger.warning("reading new messages failed: %s", exc.detail)
                self._report_error(exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY)

    async def _read_up_to(self, newest: int, sink: Sink) -> None:
        # `newest` was notified before this read is sent, so a channel subscribed after that
        # cannot hold an id up to `newest` that it still expects live: skipping it is safe.
        channels, likes = list(self._channels), list(self._likes.values())
        while self._last_seen < newest:
            if channels or likes:
                async with self._connection() as connection:
                    rows = await connection.fetch(
                        self._sql.read_new, self._last_seen, newest, channels, likes, _READ_BATCH
                    )
                for row in rows:
                    sink.deliver(_event(row))
                self._last_seen = rows[-1]["id"] if len(rows) == _READ_BATCH else newest
            else:
                self._last_seen = newest

    async def subscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        """Effective at once: the one LISTEN covers every channel; this only widens the read."""
        self._channels.update(channels)
        for pattern in patterns:
            self._likes[pattern] = _like(pattern)

    async def unsubscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        self._channels.difference_update(channels)
        for pattern in patterns:
            self._likes.pop(pattern, None)

    async def ping(self) -> None:
        async with self._connection() as connection:
            await connection.fetchval("SELECT 1")
        if not self._listening:
            raise LayerUnavailable(f"{self._where}: the listener connection is reconnecting")

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        ttl = self.history_ttl
        async with self._connection() as connection:
            ids: list[int] = await connection.fetchval(
                self._sql.publish,
                [m.channel for m in messages],
                [m.event for m in messages],
                [m.raw.decode() for m in messages],
                [m.published_at for m in messages],
                [m.published_at + ttl if ttl else None for m in messages],
            )
        self._dirty.update(m.channel for m in messages)
        self._published_since_cleanup += len(messages)
        if self._published_since_cleanup >= _CLEANUP_AFTER_PUBLISHES:
            self._cleanup_due.set()
        return [str(id) for id in ids]

    # -- history ---------------------------------------------------------------------------------

    async def replay(
        self,
        channels: Collection[str],
        patterns: Collection[str],
        *,
        after: str | None,
        limit: int | None,
    ) -> Replay:
        names, likes = list(channels), [_like(p) for p in patterns]
        now, size, sql = time.time(), self.history_size, self._sql
        gap, reason = False, "evicted"
        async with (
            self._connection() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            if after is None:
                rows = await connection.fetch(sql.retained_last, 0, names, likes, size, now, limit)
            else:
                position = _parse_id(after)
                if position is not None and position > await connection.fetchval(sql.last_issued):
                    position = None  # an id this database never issued (was it recreated?)
                if position is None:
                    gap, reason, position = True, "unknown_id", 0
                rows = await connection.fetch(
                    sql.retained_after, position, names, likes, size, now, limit
                )
                if not gap:
                    gap = await connection.fetchval(
                        sql.evicted_after, position, names, likes, size, now
                    )
        events = sorted((_event(row) for row in rows), key=lambda event: int(event.id))
        return Replay(events, gap=gap, reason=reason if gap else None)

    async def _clean_up_periodically(self) -> None:
        while True:
            with anyio.move_on_after(self.cleanup_interval):
                await self._cleanup_due.wait()
            self._cleanup_due = anyio.Event()
            try:
                await self.clean_up()
            except LayerUnavailable as exc:
                logger.warning("history cleanup failed: %s", exc.detail)
                self._report_error(exc)

    async def clean_up(self) -> int:
        """Delete what the history bounds evicted; return how many rows went.

        A background task runs this every `cleanup_interval` seconds. Readers already leave out
        evicted messages, so running it late only costs disk space. Size is enforced on the
        channels this process published to; expiry on every channel. Group consumers idle for an
        hour with nothing pending are forgotten too.
        """
        dirty, self._dirty = self._dirty, set()
        self._published_since_cleanup = 0
        deleted = 0
        try:
            async with self._connection() as connection:
                if dirty:
                    trimmed: int = await connection.fetchval(
                        self._sql.trim_to_size, sorted(dirty), self.history_size
                    )
                    deleted += trimmed
                while True:
                    expired: int = await connection.fetchval(
                        self._sql.expire, time.time(), _EXPIRE_BATCH
                    )
                    deleted += expired
                    if expired < _EXPIRE_BATCH:
                        break
                await connection.execute(self._sql.forget_consumers, _FORGET_CONSUMERS_AFTER)
        except BaseException:
            self._dirty |= dirty
            raise
        return deleted

    # -- consumer groups -------------------------------------------------------------------------

    @contextmanager
    def _known_group(self, channel: str, group: str) -> Iterator[None]:
        try:
            yield
        except asyncpg.NoDataFoundError:
            raise UnknownGroup.named(channel, group) from None

    async def group_join(self, channel: str, group: str, consumer: str) -> None:
        async with self._connection() as connection, connection.transaction():
            await connection.execute(self._sql.create_group, channel, group)
            await connection.execute(self._sql.touch_consumer, channel, group, consumer)

    async def group_leave(
        self, channel: str, group: str, consumer: str, *, forget: bool = False
    ) -> None:
        async with self._connection() as connection:
            await connection.execute(
                self._sql.forget if forget else self._sql.leave, channel, group, consumer
            )

    async def group_release(self, channel: str, group: str, consumer: str) -> None:
        """Make the consumer's unacked messages claimable now, and wake every process's pumps."""
        async with self._connection() as connection:
            await connection.execute(self._sql.release, channel, group, consumer)
        if self._sink is not None:  # the notification wakes the others; no need to wait for ours
            self._sink.wake(channel, released=True)

    async def group_read(self, channel: str, group: str, consumer: str, count: int) -> list[Event]:
        with self._known_group(channel, group):
            async with self._connection() as connection:
                rows = await connection.fetch(self._sql.group_read, channel, group, consumer, count)
        return [_event(row).redelivered(group, 1) for row in rows]

    async def group_claim(
        self, channel: str, group: str, consumer: str, min_idle: float, count: int
    ) -> list[Event]:
        with self._known_group(channel, group):
            async with self._connection() as connection:
                rows = await connection.fetch(
                    self._sql.group_claim, channel, group, consumer, min_idle, count
                )
        return [
            Event(
                channel,
                str(row["claimed_id"]),
                row["claimed_data"].encode(),
                row["claimed_event"],
                row["claimed_published_at"],
            ).redelivered(group, row["claimed_deliveries"])
            for row in sorted(rows, key=lambda row: row["claimed_id"])
        ]

    async def group_ack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        numbers = {number: id for id in ids if (number := _parse_id(id)) is not None}
        async with self._connection() as connection:
            acked = await connection.fetch(self._sql.ack, channel, group, list(numbers))
            if not acked and not await connection.fetchval(self._sql.group_exists, channel, group):
                raise UnknownGroup.named(channel, group)
        done = {numbers[row["message_id"]] for row in acked}
        return [id for id in ids if id in done]

    async def group_info(self, channel: str, group: str) -> GroupInfo:
        async with (
            self._connection() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            summary = await connection.fetchrow(self._sql.group_summary, channel, group)
            if not summary["found"]:
                raise UnknownGroup.named(channel, group)
            consumers = await connection.fetch(self._sql.group_consumers, channel, group)
        published_at = summary["oldest_published_at"]
        return GroupInfo(
            channel=channel,
            group=group,
            pending=summary["pending"],
            consumers=[
                ConsumerInfo(row["consumer"], row["pending"], round(row["idle"], 3))
                for row in consumers
            ],
            oldest_unacked_id=(
                str(summary["oldest_id"]) if summary["oldest_id"] is not None else None
            ),
            oldest_unacked_age_seconds=(
                round(time.time() - published_at, 3) if published_at is not None else None
            ),
        )


class _Statements:
    """The SQL of one table prefix, built once."""

    def __init__(self, p: str) -> None:
        subscribed = "(m.channel = ANY($2::text[]) OR m.channel LIKE ANY($3::text[]))"
        self.publish = f"SELECT {p}publish($1, $2, $3, $4, $5)"
        self.max_id = f"SELECT coalesce(max(id), 0) FROM {p}messages"
        self.last_issued = (
            f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {p}message_ids"
        )
        self.read_new = f"""
            SELECT m.id, m.channel, m.event, m.data, m.published_at FROM {p}messages m
            WHERE m.id > $1 AND m.id <= $2
              AND (m.channel = ANY($3::text[]) OR m.channel LIKE ANY($4::text[]))
            ORDER BY m.id LIMIT $5"""
        # A message is retained while fewer than history_size newer ones share its channel and
        # it has not expired. Counting only rows after the cursor gives the same rank, since
        # every newer row is after the cursor too.
        candidates = f"""
            SELECT m.id, m.channel, m.event, m.data, m.published_at, m.expires_at,
                   row_number() OVER (PARTITION BY m.channel ORDER BY m.id DESC) AS recency
            FROM {p}messages m WHERE m.id > $1 AND {subscribed}"""
        retained = "c.recency <= $4 AND (c.expires_at IS NULL OR c.expires_at > $5)"
        select_retained = f"""
            SELECT c.id, c.channel, c.event, c.data, c.published_at FROM ({candidates}) c
            WHERE {retained}"""
        self.retained_after = f"{select_retained} ORDER BY c.id LIMIT $6"
        self.retained_last = f"{select_retained} ORDER BY c.id DESC LIMIT $6"  # with $1 = 0
        self.evicted_after = f"""
            SELECT EXISTS (SELECT 1 FROM ({candidates}) c WHERE NOT ({retained}))
                OR EXISTS (
                    SELECT 1 FROM {p}trimmed m WHERE m.max_deleted_id > $1 AND {subscribed})"""
        # Each deletion notes the channel's highest deleted id, in the same statement.
        note_trimmed = f"""
            noted AS (
                INSERT INTO {p}trimmed AS t (channel, max_deleted_id)
                SELECT channel, max(id) FROM gone GROUP BY channel
                ON CONFLICT (channel)
                DO UPDATE SET max_deleted_id = greatest(t.max_deleted_id, excluded.max_deleted_id)
            )"""
        self.trim_to_size = f"""
            WITH edges AS (
                SELECT c.name, e.id FROM unnest($1::text[]) AS c(name)
                CROSS JOIN LATERAL (
                    SELECT m.id FROM {p}messages m WHERE m.channel = c.name
                    ORDER BY m.id DESC OFFSET $2 LIMIT 1
                ) AS e
            ), gone AS (
                DELETE FROM {p}messages m USING edges
                WHERE m.channel = edges.name AND m.id <= edges.id
                RETURNING m.channel, m.id
            ), {note_trimmed}
            SELECT count(*) FROM gone"""
        self.expire = f"""
            WITH gone AS (
                DELETE FROM {p}messages WHERE id IN (
                    SELECT id FROM {p}messages WHERE expires_at <= $1 LIMIT $2
                    FOR UPDATE SKIP LOCKED
                )
                RETURNING channel, id
            ), {note_trimmed}
            SELECT count(*) FROM gone"""
        # A new group starts after the newest committed message: ids are visible in order, so
        # everything committed later has a higher id.
        self.create_group = f"""
            INSERT INTO {p}groups (channel, group_name, last_id)
            VALUES ($1, $2, (SELECT coalesce(max(id), 0) FROM {p}messages))
            ON CONFLICT (channel, group_name) DO NOTHING"""
        self.touch_consumer = f"SELECT {p}touch_consumer($1, $2, $3)"
        self.forget_consumers = f"""
            DELETE FROM {p}consumers c
            WHERE c.seen_at < now() - make_interval(secs => $1)
              AND NOT EXISTS (
                  SELECT 1 FROM {p}pending p WHERE p.channel = c.channel
                      AND p.group_name = c.group_name AND p.consumer = c.consumer)"""
        self.leave = f"""
            UPDATE {p}consumers SET seen_at = now()
            WHERE channel = $1 AND group_name = $2 AND consumer = $3"""
        # Its pending rows stay: the group's other consumers claim them after the ack timeout.
        self.forget = f"""
            DELETE FROM {p}consumers WHERE channel = $1 AND group_name = $2 AND consumer = $3"""
        self.release = f"""
            WITH released AS (
                UPDATE {p}pending SET delivered_at = '-infinity'
                WHERE channel = $1 AND group_name = $2 AND consumer = $3
                RETURNING 1
            )
            SELECT pg_notify('{p}messages', '{_RELEASED} ' || $1)
            WHERE EXISTS (SELECT 1 FROM released)"""
        self.group_read = f"SELECT * FROM {p}group_read($1, $2, $3, $4)"
        self.group_claim = f"SELECT * FROM {p}group_claim($1, $2, $3, $4, $5)"
        self.group_exists = (
            f"SELECT EXISTS (SELECT 1 FROM {p}groups WHERE channel = $1 AND group_name = $2)"
        )
        self.ack = f"""
            DELETE FROM {p}pending
            WHERE channel = $1 AND group_name = $2 AND message_id = ANY($3::bigint[])
            RETURNING message_id"""
        self.group_summary = f"""
            SELECT
                EXISTS (SELECT 1 FROM {p}groups WHERE channel = $1 AND group_name = $2) AS found,
                (SELECT count(*) FROM {p}pending WHERE channel = $1 AND group_name = $2)
                    AS pending,
                oldest.message_id AS oldest_id,
                m.published_at AS oldest_published_at
            FROM (SELECT 1) AS one
            LEFT JOIN LATERAL (
                SELECT message_id FROM {p}pending WHERE channel = $1 AND group_name = $2
                ORDER BY message_id LIMIT 1
            ) AS oldest ON true
            LEFT JOIN {p}messages m ON m.id = oldest.message_id"""
        self.group_consumers = f"""
            SELECT c.consumer,
                   (SELECT count(*) FROM {p}pending p WHERE p.channel = c.channel
                       AND p.group_name = c.group_name AND p.consumer = c.consumer) AS pending,
                   extract(epoch FROM now() - c.seen_at)::double precision AS idle
            FROM {p}consumers c WHERE c.channel = $1 AND c.group_name = $2
            ORDER BY c.consumer"""


async def _keep_session(connection: Any) -> None:
    """Pool reset hook: nothing to undo (no SET, LISTEN or session locks on pooled connections)."""


def _event(row: Any) -> Event:
    return Event(
        row["channel"], str(row["id"]), row["data"].encode(), row["event"], row["published_at"]
    )


def _parse_id(id: str) -> int | None:
    """The position of an id this layer issued: canonical decimal, so "007" is not 7."""
    if not (id.isascii() and id.isdigit()) or len(id) > 18 or str(int(id)) != id:
        return None
    return int(id)


def _like(pattern: str) -> str:
    """A glob (`*` any run, `?` one character) as a LIKE pattern; `_` and `%` stay literal."""
    out = []
    for char in pattern:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "\\%_":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def _lock_key(prefix: str, purpose: str) -> int:
    """A stable signed 32-bit advisory lock key per table prefix and purpose."""
    key = zlib.crc32(f"{prefix}:{purpose}".encode())
    return key - (1 << 32) if key >= (1 << 31) else key
