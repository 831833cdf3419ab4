"""Control messages of the PostgreSQL layer (`ChannelLayer.broadcast`).

A control message is a row of the UNLOGGED table `<prefix>broadcasts` and a notification
`broadcast <row id>` on the layer's NOTIFY channel (a payload is limited to 8,000 bytes, a control
message is not). Each process's listener hears the notification and one task reads the rows, in
id order. Rows are not kept: the layer's cleanup deletes those older than `KEEP_SECONDS`, and
being UNLOGGED they cost no WAL. The table is no channel's, so no history, replay, group or
pattern subscription ever reads it.

Control messages and messages keep their notification order, though different tasks read them: a
control message waits until the messages notified before it are handed on, and messages notified
after it wait until it is (`_advance` holds them while one is unread). So a publish, a pattern
publish and a publish again reach every process in that order.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from ._postgres import PostgresConnections
from ._postgres_sql import LOCK_CLASS, lock_key
from .base import Sink
from .errors import LayerUnavailable

logger = logging.getLogger(__name__)

BROADCAST = "broadcast"  # notification "broadcast <id>": a control message in <prefix>broadcasts
KEEP_SECONDS = 60.0  # how long a control message's row is kept for a listener to read it


class PostgresBroadcasts(PostgresConnections):
    """The control-message half of `PostgresLayer`."""

    _arrived: list[tuple[int, int]]  # (row id, newest message id notified before it)
    _newest: int
    _last_seen: int
    _broadcast_wakeup: anyio.Event
    _wakeup: anyio.Event  # the message reader's
    _unread_broadcasts: int  # notified, not handed on yet
    _held_newest: int  # the newest message id notified meanwhile

    def _advance(self, newest: int) -> None: ...  # the message reader's (`PostgresLayer`)

    async def _handed_on_up_to(self, newest: int) -> None: ...  # the same, once it read `newest`

    def _broadcasts_handed_on(self, count: int) -> None:
        self._unread_broadcasts -= count
        if not self._unread_broadcasts and self._held_newest:
            held, self._held_newest = self._held_newest, 0
            self._advance(held)

    def _broadcast_statements(self) -> tuple[str, str, str]:
        p = self.table_prefix
        send = f"""
            WITH row AS (INSERT INTO {p}broadcasts (blob) VALUES ($1) RETURNING id)
            SELECT pg_notify('{p}messages', '{BROADCAST} ' || row.id) FROM row"""
        read = f"SELECT id, blob FROM {p}broadcasts WHERE id = ANY($1::bigint[])"
        forget = f"""DELETE FROM {p}broadcasts
            WHERE created_at < now() - make_interval(secs => {KEEP_SECONDS})"""
        return send, read, forget

    async def _migrate(self) -> None:
        await super()._migrate()
        p = self.table_prefix
        async with self._connection() as connection, connection.transaction():
            await connection.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", LOCK_CLASS, lock_key(p, "migrate")
            )
            await connection.execute(
                f"""CREATE UNLOGGED TABLE IF NOT EXISTS {p}broadcasts (
                    id bigserial PRIMARY KEY,
                    blob bytea NOT NULL,
                    created_at timestamptz NOT NULL DEFAULT now()
                )"""
            )

    async def broadcast(self, blob: bytes) -> None:
        async with self._connection() as connection:
            await connection.execute(self._broadcast_statements()[0], blob)

    def _broadcast_arrived(self, argument: str) -> None:
        """From the listener: the row of a control message was committed."""
        if argument.isdigit():
            # messages held behind an earlier control message were notified before this one too
            self._arrived.append((int(argument), max(self._newest, self._held_newest)))
            self._unread_broadcasts += 1
            self._broadcast_wakeup.set()

    async def _receive_broadcasts(self, sink: Sink) -> None:
        """Read each notified control message and hand it to the sink."""
        read = self._broadcast_statements()[1]
        while True:
            await self._broadcast_wakeup.wait()
            self._broadcast_wakeup = anyio.Event()
            arrived, self._arrived = self._arrived, []
            ids = [id for id, _ in arrived]
            try:
                async with self._connection() as connection:
                    blobs = {row["id"]: row["blob"] for row in await connection.fetch(read, ids)}
            except LayerUnavailable as exc:  # live only: those are lost, as in a disconnection
                logger.warning("reading %d control messages failed: %s", len(ids), exc.detail)
                sink.layer_error(exc)
                self._broadcasts_handed_on(len(ids))
                continue
            for id, before in arrived:  # each after the messages notified before it, in turn
                self._release(before)
                await self._handed_on_up_to(before)
                if id in blobs:
                    sink.broadcast(blobs[id])
                self._broadcasts_handed_on(1)

    def _release(self, newest: int) -> None:
        """Let the message reader hand on up to `newest`, notified before the control message
        going next, though messages are held while one is unread."""
        if newest > self._newest:
            self._newest = newest
            self._wakeup.set()

    async def _forget_broadcasts(self, connection: Any) -> None:
        """Part of the layer's cleanup: rows every listener had time to read."""
        await connection.execute(self._broadcast_statements()[2])
