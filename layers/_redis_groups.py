"""Consumer groups on Redis Streams: XREADGROUP, XAUTOCLAIM, XACK, XPENDING.

Design decisions:

- Redis keeps the state: which entries each group has delivered, to whom, how often and since
  when. A gateway restart loses nothing, and delivery counts are right whichever process
  delivered before. Streams holding a group are made persistent (`PERSIST`), so the history TTL
  never expires a group with its pending entries.
- Claiming is one Lua call: XAUTOCLAIM raises the delivery counts, the same script reads them back
  with XPENDING. Entries trimmed away while pending are dropped from the pending list by Redis
  (7.0+) and simply not returned.
- A group that vanished under a live consumer (Redis restarted empty, or someone deleted it) is
  created again from the beginning of what the stream holds: those entries were published after
  the loss and nobody in the group has seen them.
- Releasing (graceful shutdown) marks the consumer's pending entries as idle for ages, so any
  consumer's next claim takes them, and announces it in the control stream, where every process's
  listener wakes its group consumers of that channel.
- Nack and extend are XCLAIMs to the entry's own consumer (JUSTID: no delivery counted): a nack
  with an idle time of ages, as releasing does, an extend with none. Acks, nacks, extends and
  deletions are announced in the control stream (`group` entries: a `GroupNotice`), so the
  pumps of every process settle their in-flight counts at once.
- Deleting destroys the group and leaves a tombstone for `TOMBSTONE_MS`, so a pump elsewhere
  reading at that moment does not take the vanished group for a Redis restart and create it
  again from the start of the stream.
- Named consumers stay listed after leaving, with their pending entries, as Redis keeps them.
  Consumers the core named for one subscription are deleted when they leave; their pending
  entries go to a holder consumer first (not listed), since deleting a consumer drops its
  entries from the group.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from ._redis import LUA_CLOCK, RedisLayer, decode_entries, format_id, parse_id
from .base import ConsumerInfo, GroupInfo, GroupNotice
from .errors import LayerUnavailable, UnknownGroup
from .event import Event

# KEYS[1] = stream; ARGV = group, consumer, min idle ms, start id, count
CLAIM_LUA = """
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                           'COUNT', ARGV[5])
local counts = {}
for i, entry in ipairs(claimed[2]) do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
  counts[i] = pending[1] and pending[1][4] or 1
end
return {claimed[1], claimed[2], counts}
"""

# KEYS[1] = id clock, KEYS[2] = control stream, KEYS[3] = stream; ARGV = group, consumer, channel
RELEASE_LUA = (
    LUA_CLOCK
    + """
local pending = redis.call('XPENDING', KEYS[3], ARGV[1], '-', '+', 10000, ARGV[2])
if #pending == 0 then return 0 end
for _, entry in ipairs(pending) do
  redis.call('XCLAIM', KEYS[3], ARGV[1], ARGV[2], 0, entry[1], 'IDLE', 1000000000000, 'JUSTID')
end
local now, ms, seq = clock(KEYS[1])
local id = string.format('%d-%d', ms, seq + 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, id, 'released', ARGV[3])
redis.call('SET', KEYS[1], id)
return #pending
"""
)


# KEYS[1] = stream; ARGV = group, consumer, the holder of departed consumers' entries
# Hands the consumer's pending entries to the holder, with their idle times and delivery counts
# (JUSTID counts no delivery), then deletes the consumer: DELCONSUMER alone would drop them.
FORGET_LUA = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[2])
for _, entry in ipairs(pending) do
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, entry[1], 'IDLE', entry[3], 'JUSTID')
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return #pending
"""

# KEYS[1] = stream; ARGV = group, idle ms ('' for none: an extend), ids...
# The ids still pending, each claimed to its own consumer without counting a delivery.
TOUCH_LUA = """
local touched = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] then
    if ARGV[2] == '' then
      redis.call('XCLAIM', KEYS[1], ARGV[1], pending[1][2], 0, ARGV[i], 'JUSTID')
    else
      redis.call('XCLAIM', KEYS[1], ARGV[1], pending[1][2], 0, ARGV[i], 'IDLE', ARGV[2], 'JUSTID')
    end
    touched[#touched + 1] = ARGV[i]
  end
end
return touched
"""

# KEYS[1] = id clock, KEYS[2] = control stream; ARGV = kind, value...: one control entry each
ANNOUNCE_LUA = (
    LUA_CLOCK
    + """
local now, ms, seq = clock(KEYS[1])
local id
for i = 2, #ARGV do
  seq = seq + 1
  id = string.format('%d-%d', ms, seq)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, id, ARGV[1], ARGV[i])
end
redis.call('SET', KEYS[1], id)
return #ARGV - 1
"""
)

# KEYS[1] = stream, KEYS[2] = the group's tombstone; ARGV = group, tombstone ms
DELETE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local destroyed = redis.call('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
if destroyed == 1 then redis.call('SET', KEYS[2], 1, 'PX', ARGV[2]) end
return destroyed
"""

TOMBSTONE_MS = 60_000
GROUP_NOTICE = b"group"  # the control entries' kind of a GroupNotice

# Not a valid consumer name, so never a real consumer's; not listed as a consumer.
DEPARTED = "#departed"


def is_missing_group(exc: BaseException | None) -> bool:
    message = str(exc)
    return isinstance(exc, ResponseError) and ("NOGROUP" in message or "no such key" in message)


class StreamGroups(RedisLayer):
    """The consumer-group half of `RedisStreamsLayer`."""

    control: str  # the control stream's key

    def __init__(self, url: str, *, key_prefix: str) -> None:
        super().__init__(url, key_prefix=key_prefix)
        self._claim_from: dict[tuple[str, str], bytes] = {}  # where XAUTOCLAIM goes on

    async def group_join(
        self, channel: str, group: str, consumer: str, *, start: str | None = None
    ) -> None:
        key = self.keys.key(channel)
        position = parse_id(start) if start is not None and start != "earliest" else None
        origin = "$" if start is None else format_id(position) if position else "0"
        await self._create_group(key, group, origin)
        with self.unavailable():
            await self.redis.xgroup_createconsumer(key, group, consumer)

    async def _create_group(self, key: str, group: str, start: str) -> None:
        with self.unavailable():
            try:
                await self.redis.xgroup_create(key, group, id=start, mkstream=True)
            except ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise
            await self.redis.persist(key)

    async def group_leave(
        self, channel: str, group: str, consumer: str, *, forget: bool = False
    ) -> None:
        """A named consumer stays listed with its pending entries; a forgotten one is deleted, and
        its pending entries wait for a claim under `DEPARTED`."""
        if not forget:
            return
        try:
            await self.script("forget", [self.keys.key(channel)], [group, consumer, DEPARTED])
        except LayerUnavailable as exc:
            if not is_missing_group(exc.__cause__):
                raise

    async def group_release(self, channel: str, group: str, consumer: str) -> None:
        keys = [self.keys.seq, self.control, self.keys.key(channel)]
        try:
            await self.script("release", keys, [group, consumer, channel])
        except LayerUnavailable as exc:
            if not is_missing_group(exc.__cause__):
                raise

    async def group_read(self, channel: str, group: str, consumer: str, count: int) -> list[Event]:
        key = self.keys.key(channel)
        with self.unavailable():
            try:
                reply = await self.redis.xreadgroup(group, consumer, {key: ">"}, count=count)
            except ResponseError as exc:
                if not is_missing_group(exc):
                    raise
                if await self.redis.exists(self._tombstone(channel, group)):
                    raise UnknownGroup.named(channel, group) from None  # deleted, not lost
                await self._create_group(key, group, "0")
                reply = await self.redis.xreadgroup(group, consumer, {key: ">"}, count=count)
        streams: Any = reply.values() if isinstance(reply, dict) else [e for _, e in reply or ()]
        return [
            event.redelivered(group, 1) for entries in streams for event in decode_entries(entries)
        ]

    async def group_claim(
        self, channel: str, group: str, consumer: str, min_idle: float, count: int
    ) -> list[Event]:
        key = self.keys.key(channel)
        start = self._claim_from.get((key, group), b"0-0")
        args: list[str | bytes | int] = [group, consumer, int(min_idle * 1000), start, count]
        try:
            next_start, entries, counts = await self.script("claim", [key], args)
        except LayerUnavailable as exc:
            if is_missing_group(exc.__cause__):
                return []  # group_read creates it again
            raise
        self._claim_from[key, group] = next_start
        claimed = []
        for (raw_id, fields), deliveries in zip(entries, counts, strict=True):
            pairs = dict(zip(fields[::2], fields[1::2], strict=True))
            for event in decode_entries([(raw_id, pairs)]):
                claimed.append(event.redelivered(group, int(deliveries)))
        return claimed

    async def group_ack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        valid = [id for id in ids if parse_id(id) is not None]  # others were never ids of ours
        if not valid:
            return []
        with self.unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                for id in valid:
                    pipe.xack(self.keys.key(channel), group, id)
                replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise self._refused(channel, group, reply)
        return [id for id, acked in zip(valid, replies, strict=True) if acked]

    async def group_nack(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        nacked = await self._touch(channel, group, ids, idle_ms=1_000_000_000_000)
        if nacked:
            keys = [self.keys.seq, self.control]
            await self.script("announce", keys, ["released", channel])
        return nacked

    async def group_extend(self, channel: str, group: str, ids: Sequence[str]) -> list[str]:
        return await self._touch(channel, group, ids, idle_ms=None)

    async def _touch(
        self, channel: str, group: str, ids: Sequence[str], *, idle_ms: int | None
    ) -> list[str]:
        valid = [id for id in ids if parse_id(id) is not None]
        key = self.keys.key(channel)
        try:
            if not valid:
                await self.group_info(channel, group)  # UnknownGroup when absent
                return []
            args: list[str | bytes | int] = [group, "" if idle_ms is None else idle_ms, *valid]
            touched = await self.script("touch", [key], args)
        except LayerUnavailable as exc:
            if isinstance(exc.__cause__, ResponseError):
                raise self._refused(channel, group, exc.__cause__) from None
            raise
        return [raw.decode() if isinstance(raw, bytes) else str(raw) for raw in touched]

    async def group_delete(self, channel: str, group: str) -> None:
        keys = [self.keys.key(channel), self._tombstone(channel, group)]
        try:
            destroyed = await self.script("delete", keys, [group, TOMBSTONE_MS])
        except LayerUnavailable as exc:
            if is_missing_group(exc.__cause__):
                raise UnknownGroup.named(channel, group) from None
            raise
        if not destroyed:
            raise UnknownGroup.named(channel, group)
        self._claim_from.pop((keys[0], group), None)

    async def group_notify(self, notice: GroupNotice) -> None:
        keys = [self.keys.seq, self.control]
        await self.script("announce", keys, [GROUP_NOTICE.decode(), *notice.encode()])

    def _tombstone(self, channel: str, group: str) -> str:
        return f"{self.keys.prefix}#deleted#{group}#{channel}"

    async def group_info(self, channel: str, group: str) -> GroupInfo:
        key = self.keys.key(channel)
        with self.unavailable():
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.xpending(key, group)
                    pipe.xinfo_consumers(key, group)
                    summary, consumers = await pipe.execute()
            except ResponseError as exc:
                raise self._refused(channel, group, exc) from None
        oldest = parse_id(summary["min"]) if summary["min"] else None
        return GroupInfo(
            channel=channel,
            group=group,
            pending=int(summary["pending"]),
            consumers=[
                ConsumerInfo(c["name"].decode(), int(c["pending"]), int(c["idle"]) / 1000)
                for c in consumers
                if c["name"] != DEPARTED.encode()
            ],
            oldest_unacked_id=format_id(oldest) if oldest else None,
            # ids are Redis milliseconds: the age needs no extra lookup
            oldest_unacked_age_seconds=(
                round(max(0.0, time.time() - oldest[0] / 1000), 3) if oldest else None
            ),
        )

    def _refused(self, channel: str, group: str, exc: ResponseError) -> Exception:
        if is_missing_group(exc):
            return UnknownGroup.named(channel, group)
        return LayerUnavailable(f"Redis at {self.where} refused a command: {exc}")
