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
  second round trip, is skipped. Up to two publish calls are in flight at once
  (`publish_calls`): while one commits, the next waits at the server for the lock, instead of
  being sent only once the first one's reply made it through a busy event loop. Publishes in
  calls in flight together take their ids in the order the server grants the lock. A keyed
  publish checks and writes its idempotency keys (table `<prefix>idempotency_keys`) in the same
  function call, under the same lock; the cleanup deletes expired keys.
- History bounds are applied by readers (the newest `history_size` per channel; `expires_at` is
  set at publish from the publisher's `history_ttl`), so a background cleanup can delete late
  without being in the publish path. Each deletion records the channel's highest deleted id,
  which keeps gap detection exact after rows are gone.
- Control messages (`ChannelLayer.broadcast`): see `layers._postgres_broadcast`.
- Consumer groups are rows: see `layers._postgres_groups`. The SQL is in `layers._postgres_sql`,
  the pool, migration and error mapping in `layers._postgres`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg  # type: ignore[import-untyped]
from anyio.abc import TaskStatus

from ._idempotency import DEFAULT_TTL, Replayed, fingerprint, keyed, reused
from ._postgres import event_of, parse_id
from ._postgres_broadcast import BROADCAST, PostgresBroadcasts
from ._postgres_groups import PostgresGroups
from ._postgres_sql import GROUP_NOTICE, RELEASED, Statements, like, lock_key
from ._supervisor import Supervisor
from .base import Capabilities, GroupNotice, Replay, Sink
from .errors import LayerConfigurationError, LayerUnavailable
from .event import Message
from .urls import split_options

logger = logging.getLogger(__name__)

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


class PostgresLayer(PostgresBroadcasts, PostgresGroups):
    """Cross-process channels with history and consumer groups on PostgreSQL."""

    scheme = "postgresql"
    capabilities = Capabilities(cross_process=True, history=True, groups=True, idempotency=True)
    # A publish waits on the commit, and the lock orders ids: while one commits, the next call is
    # already at the server, waiting for the lock. With one call at a time the event loop sat
    # idle through each commit (about a tenth of the time); more than two split the publishes
    # into smaller calls, each costing the gateway as much CPU as a large one (S1: 1, 2 and 4
    # calls at 0.88, 0.97 and 0.98 of a core busy, and 66, 70 and 74 µs of CPU per publish).
    publish_calls = 2

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
        idempotency_ttl: float = DEFAULT_TTL,
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
        self.idempotency_ttl = idempotency_ttl
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
        self._publish_lock = lock_key(table_prefix, "publish")
        self._sql = Statements(table_prefix)
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
        self._arrived: list[tuple[int, int]] = []  # control messages notified, not read yet
        self._progress: anyio.Event | None = None  # made by a waiter, set when `_last_seen` moves
        self._broadcast_wakeup = anyio.Event()
        self._unread_broadcasts = 0
        self._held_newest = 0

    # -- lifetime --------------------------------------------------------------------------------

    async def run(self, sink: Sink, *, task_status: TaskStatus[None]) -> None:
        self._sink = sink
        self._supervisor = Supervisor(f"{self._where} (listener)", sink, logger)
        fatal: LayerConfigurationError | None = None
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._deliver, sink)
                tasks.start_soon(self._clean_up_periodically)
                tasks.start_soon(self._receive_broadcasts, sink)
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
                self._moved()
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
        if kind == RELEASED:
            if self._sink is not None:
                self._sink.wake(argument, released=True)
        elif kind == GROUP_NOTICE:
            notice = GroupNotice.decode(argument)
            if notice is not None and self._sink is not None:
                self._sink.group_notice(notice)
        elif kind == BROADCAST:
            self._broadcast_arrived(argument)
        elif kind.isdigit():
            self._advance(int(kind))

    def _advance(self, newest: int) -> None:
        if self._unread_broadcasts:  # a control message notified before these goes first
            self._held_newest = max(self._held_newest, newest)
            return
        if newest > self._newest:
            self._newest = newest
            self._wakeup.set()

    async def _max_id(self, connection: Any) -> int:
        with self._unavailable():
            newest: int = await connection.fetchval(self._sql.max_id)
        return newest

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
                    self._advance(await self._max_id(connection))
            except (LayerUnavailable, TimeoutError):
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
                    sink.deliver(event_of(row))
                self._last_seen = rows[-1]["id"] if len(rows) == _READ_BATCH else newest
            else:
                self._last_seen = newest
            self._moved()

    def _moved(self) -> None:
        """`_last_seen` moved: wake whoever waits for it (`_handed_on_up_to`)."""
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.set()

    async def _handed_on_up_to(self, newest: int) -> None:
        """Until every message up to `newest` was handed to the sink."""
        while self._last_seen < newest:
            if self._progress is None:
                self._progress = anyio.Event()
            await self._progress.wait()

    async def subscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        """Effective at once: the one LISTEN covers every channel; this only widens the read."""
        self._channels.update(channels)
        for pattern in patterns:
            self._likes[pattern] = like(pattern)

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
        keys = keyed(messages)
        async with self._connection() as connection:
            ids: list[int] = await connection.fetchval(
                self._sql.publish_keyed if keys else self._sql.publish,
                [m.channel for m in messages],
                [m.event for m in messages],
                [m.raw.decode() for m in messages],
                [m.published_at for m in messages],
                [m.published_at + ttl if ttl else None for m in messages],
                *(self._key_args(messages) if keys else ()),
            )
        if keys:
            return self._keyed_ids(ids, messages)
        self._dirty.update(m.channel for m in messages)
        self._published_since_cleanup += len(messages)
        if self._published_since_cleanup >= _CLEANUP_AFTER_PUBLISHES:
            self._cleanup_due.set()
        return [str(id) for id in ids]

    def _key_args(self, messages: Sequence[Message]) -> tuple[list[str | None], list[str], float]:
        return (
            [m.idempotency_key for m in messages],
            [fingerprint(m) if m.idempotency_key is not None else "" for m in messages],
            self.idempotency_ttl,
        )

    def _keyed_ids(self, ids: list[int], messages: Sequence[Message]) -> list[str]:
        """`{p}publish`'s reply to a keyed call: negated ids were recorded, `{0, i, id}` is a
        mismatch on message i."""
        if ids[0] == 0:
            raise reused(messages[ids[1] - 1], str(ids[2]))
        fresh = [m for m, id in zip(messages, ids, strict=True) if id > 0]
        self._dirty.update(m.channel for m in fresh)
        self._published_since_cleanup += len(fresh)
        return [Replayed(str(-id)) if id < 0 else str(id) for id in ids]

    # -- history ---------------------------------------------------------------------------------

    async def replay(
        self,
        channels: Collection[str],
        patterns: Collection[str],
        *,
        after: str | None,
        limit: int | None,
    ) -> Replay:
        names, likes = list(channels), [like(p) for p in patterns]
        now, size, sql = time.time(), self.history_size, self._sql
        gap, reason = False, "evicted"
        async with (
            self._connection() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            if after is None:
                rows = await connection.fetch(sql.retained_last, 0, names, likes, size, now, limit)
            else:
                position = parse_id(after)
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
        events = sorted((event_of(row) for row in rows), key=lambda event: int(event.id))
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
        hour with nothing pending, and expired idempotency keys, are deleted too.
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
                await connection.execute(self._sql.expire_keys, time.time())
                await self._forget_broadcasts(connection)
        except BaseException:
            self._dirty |= dirty
            raise
        return deleted
