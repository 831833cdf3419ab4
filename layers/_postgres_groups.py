"""Consumer groups on PostgreSQL: a cursor row per group, a row per pending message.

Design decisions (the SQL is in `layers._postgres_sql`):

- A group's cursor is advanced under FOR UPDATE on the group row, so each new message goes to
  exactly one consumer whichever process it is in; ids are visible in order, so "id > cursor"
  skips nothing.
- A pending row per delivered message is taken over with FOR UPDATE SKIP LOCKED, so consumers
  claiming at the same moment take different messages. Consumers in several processes share a
  group, any process can ack any message, and the group survives restarts.
- A pending message whose row the history bound already deleted is dropped when claimed, as
  Redis Streams does. Consumers the core named for one subscription are deleted when they
  leave; consumers idle for an hour with nothing pending are forgotten by the cleanup.
- A nack sets a pending row's delivery time to '-infinity' (claimable by any claim), an extend to
  now. Acks, nacks, extends and deletions are announced with NOTIFY ("group <notice>"), so the
  pumps of every process settle their in-flight counts at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import asyncpg  # type: ignore[import-untyped]

from ._postgres import PostgresConnections, event_of, parse_id
from .base import ConsumerInfo, GroupInfo, GroupNotice
from .errors import UnknownGroup
from .event import Event


class PostgresGroups(PostgresConnections):
    """The consumer-group half of `PostgresLayer`."""

    @contextmanager
    def _known_group(self, channel: str, group: str) -> Iterator[None]:
        try:
            yield
        except asyncpg.NoDataFoundError:
            raise UnknownGroup.named(channel, group) from None

    async def group_join(
        self, channel: str, group: str, consumer: str, *, start: str | None = None
    ) -> None:
        position = None if start is None else 0 if start == "earliest" else parse_id(start) or 0
        async with self._connection() as connection, connection.transaction():
            await connection.execute(self._sql.create_group, channel, group, position)
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
        return [event_of(row).redelivered(group, 1) for row in rows]

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
        return await self._pending_ids(self._sql.ack, channel, group, ids)

    async def group_nack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        return await self._pending_ids(self._sql.nack, channel, group, ids)

    async def group_extend(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        return await self._pending_ids(self._sql.extend, channel, group, ids)

    async def _pending_ids(
        self, statement: str, channel: str, group: str, ids: Sequence[str]
    ) -> list[str]:
        """Run an ack, nack or extend over the pending rows of `ids`; the ids it found."""
        numbers = {number: id for id in ids if (number := parse_id(id)) is not None}
        async with self._connection() as connection:
            rows = await connection.fetch(statement, channel, group, list(numbers))
            if not rows and not await connection.fetchval(self._sql.group_exists, channel, group):
                raise UnknownGroup.named(channel, group)
        done = {numbers[row["message_id"]] for row in rows}
        return [id for id in ids if id in done]

    async def group_delete(self, channel: str, group: str) -> None:
        async with self._connection() as connection:
            if await connection.fetchval(self._sql.delete_group, channel, group) is None:
                raise UnknownGroup.named(channel, group)

    async def group_notify(self, notice: GroupNotice) -> None:
        async with self._connection() as connection:
            for text in notice.encode():
                await connection.execute(self._sql.notify, text)

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
