"""`redis+streams://`: Redis Streams with history, resume and consumer groups, across processes.

Design decisions:

- One stream per channel (`<prefix><channel>`), trimmed by `history_size` (exactly below 1000
  entries, where Redis's approximate trimming would keep whole 100-entry nodes, approximately from
  there on) and by age (`MINID ~ now - history_ttl`; replay also skips older entries, and a stream
  nobody publishes to expires as a key). Streams with a consumer group are made persistent, so a
  group and its pending messages live as long as Redis does.
- A publish is one Lua script call, also for a batch: it assigns the ids from the shared clock
  (see `layers._redis`), appends, trims, and notes each stream it creates in the control stream
  `<prefix>#events`; the same call checks and writes idempotency records (`layers._redis_keys`).
- Live delivery: one listener connection per process runs a blocking XREAD over the control stream
  and every subscribed stream, each from its own cursor. A newly subscribed channel starts at the
  clock's current id, so nothing old is replayed, and the listener is interrupted (CLIENT UNBLOCK)
  to include it. Each blocking XREAD is pipelined with a non-blocking one over the same cursors and
  only the second reply is used: Redis before 7.2 answers a woken XREAD with the one stream that
  woke it, while the second read sees every stream at one instant. Entries are handed to the core
  in id order, and only up to the smallest id where a stream's reply was cut off, so the process
  sees all channels in one global order and a client's last id is a safe resume point for all of
  them.
- Patterns: subscribing SCANs for the streams that exist; streams created later are announced in
  the control stream, in the same script that creates them and with the same id as their first
  entry. The listener adds such a stream from its beginning and delivers nothing past that id
  until the next read includes it, so a pattern subscriber loses nothing and keeps the order.
- Control messages (`ChannelLayer.broadcast`) are entries of the stream `<prefix>#broadcast`
  (ids of its own, not from the clock, which stays the channels'; trimmed to about 1000 entries
  and expiring a minute after the last), read by the listener in the same XREAD as the channels.
- Reconnecting: cursors are kept, so after a dropped connection the listener continues where it
  was and delivers what was published meanwhile. If Redis lost data (restart without persistence),
  cursors ahead of the clock are pulled back to it; patterns are rescanned.
- Consumer groups: see `layers._redis_groups`.
- Requires Redis 7.0 or later (XAUTOCLAIM's deleted-entry reply, XINFO's entries-added).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import anyio
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from ._idempotency import DEFAULT_TTL
from ._redis import (
    COMMAND_TIMEOUT,
    LUA_CLOCK,
    IdTuple,
    decode_entries,
    decode_event,
    format_id,
    parse_id,
)
from ._redis_groups import (
    ANNOUNCE_LUA,
    CLAIM_LUA,
    DELETE_LUA,
    FORGET_LUA,
    GROUP_NOTICE,
    RELEASE_LUA,
    TOUCH_LUA,
    StreamGroups,
)
from ._redis_keys import LUA_RECORDS, read_ids, record_args
from .base import Capabilities, GroupNotice, Replay
from .errors import InvalidArgument, LayerUnavailable
from .event import Event, Message
from .names import compile_pattern

logger = logging.getLogger("layers.redis")

BLOCK_SECONDS = 5.0  # a blocking read's length: also how often a silent connection is checked
READ_COUNT = 1000  # entries per stream per read
EXACT_TRIM_BELOW = 1000  # history sizes trimmed exactly: "~" would keep up to 100 entries more

# KEYS[1] = id clock, KEYS[2] = control stream, KEYS[3..] = channel streams
# ARGV[1] = MAXLEN, ARGV[2] = '~' or '=', ARGV[3] = ttl in ms (0: none),
# ARGV[i + 1] = the entry for KEYS[i]; then the idempotency records of a keyed publish from
# ARGV[#KEYS + 2] (see `layers._redis_keys`)
PUBLISH_LUA = (
    LUA_CLOCK
    + LUA_RECORDS
    + """
local found, conflict = recall(#KEYS + 2, #KEYS - 2)
if conflict then
  return conflict
end
local now, ms, seq = clock(KEYS[1])
local ttl = tonumber(ARGV[3])
local ids, last = {}, nil
for i = 3, #KEYS do
  if found[i - 2] then
    ids[#ids + 1] = found[i - 2]
  else
    local key = KEYS[i]
    seq = seq + 1
    local id = string.format('%d-%d', ms, seq)
    local pttl = redis.call('PTTL', key)
    redis.call('XADD', key, 'MAXLEN', ARGV[2], ARGV[1], id, 'm', ARGV[i + 1])
    if ttl > 0 then
      redis.call('XTRIM', key, 'MINID', '~', string.format('%d-0', now - ttl))
      if pttl ~= -1 then  -- -1: made persistent because it holds a group
        redis.call('PEXPIRE', key, ttl)
      end
    end
    if pttl == -2 then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, id, 'new', key)
    end
    remember(#KEYS + 2, i - 2, id)
    ids[#ids + 1], last = id, id
  end
end
if last then
  redis.call('SET', KEYS[1], last)
end
return ids
"""
)


BROADCAST_KEEP_MS = 60_000  # an idle broadcast stream expires after this


class RedisStreamsLayer(StreamGroups):
    scheme = "redis+streams"
    capabilities = Capabilities(cross_process=True, history=True, groups=True, idempotency=True)
    command_connections = 8  # publishes, replays and group pumps run side by side
    listener_timeout = BLOCK_SECONDS + COMMAND_TIMEOUT
    lua = {
        "publish": PUBLISH_LUA,
        "claim": CLAIM_LUA,
        "release": RELEASE_LUA,
        "forget": FORGET_LUA,
        "touch": TOUCH_LUA,
        "announce": ANNOUNCE_LUA,
        "delete": DELETE_LUA,
    }

    def __init__(
        self,
        url: str,
        *,
        history_size: int = 1000,
        history_ttl: float | None = None,
        key_prefix: str = "gw:",
        idempotency_ttl: float = DEFAULT_TTL,
    ) -> None:
        super().__init__(url, key_prefix=key_prefix)
        self.idempotency_ttl = idempotency_ttl
        if history_size < 1:
            raise InvalidArgument("history_size must be at least 1: live delivery reads history")
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.control = self.keys.control
        self._trim = "=" if history_size < EXACT_TRIM_BELOW else "~"
        self._channels: set[str] = set()  # subscribed by name
        self._patterns: dict[str, Callable[[str], bool]] = {}
        self._cursors: dict[str, IdTuple] = {}  # stream key -> id of the last entry read
        self._control_cursor: IdTuple | None = None
        self._broadcast_cursor: IdTuple | None = None
        self._lock = anyio.Lock()
        self._generation = 0  # goes up whenever streams are added to the listener's read
        self._reading: int | None = None  # generation of the read in flight
        self._listener_id: int | None = None

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        keys = [self.keys.seq, self.control]
        ttl_ms = int(self.history_ttl * 1000) if self.history_ttl else 0
        args: list[str | bytes | int] = [self.history_size, self._trim, ttl_ms]
        for message in messages:
            keys.append(self.keys.key(message.channel))
            args.append(message.to_wire())
        args += record_args(self.keys.prefix, messages, self.idempotency_ttl)
        ids = await self.script("publish", keys, args)
        return read_ids(ids, messages)

    async def broadcast(self, blob: bytes) -> None:
        key = self.keys.broadcast
        with self.unavailable():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(key, {"b": blob}, maxlen=1000, approximate=True)
                pipe.pexpire(key, BROADCAST_KEEP_MS)
                await pipe.execute()

    async def _clock(self) -> IdTuple:
        """The last id handed out (0-0 if none): anything published later has a greater one."""
        with self.unavailable():
            last = await self.redis.get(self.keys.seq)
        return (parse_id(last) if last else None) or (0, 0)

    # -- subscribing -----------------------------------------------------------------------------

    async def subscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        async with self._lock:
            start = await self._clock()
            reading = len(self._cursors)
            for channel in channels:
                self._channels.add(channel)
                self._cursors.setdefault(self.keys.key(channel), start)
            if patterns:
                # Known before scanning: a stream created meanwhile is either found by the scan
                # or announced in the control stream while the pattern is known.
                self._patterns.update((p, compile_pattern(p)) for p in patterns)
                try:
                    found = await self._scan(list(patterns), "stream")
                except BaseException:
                    for pattern in patterns:
                        del self._patterns[pattern]
                    self._prune()
                    raise
                for key in found:
                    self._cursors.setdefault(key, start)
            added = len(self._cursors) > reading
        if added:
            await self._interrupt_read()

    async def unsubscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        async with self._lock:
            self._channels.difference_update(channels)
            for pattern in patterns:
                self._patterns.pop(pattern, None)
            self._prune()

    def _wants(self, channel: str) -> bool:
        return channel in self._channels or any(m(channel) for m in self._patterns.values())

    def _prune(self) -> None:
        """Stop reading streams no subscription wants any more."""
        for key in [k for k in self._cursors if not self._wants(self.keys.channel(k))]:
            del self._cursors[key]

    async def _interrupt_read(self) -> None:
        """Make the listener start a new read that includes the streams just added.

        CLIENT UNBLOCK only works once Redis runs the blocking read; while the read is still on its
        way, try again shortly. Without this, new streams would wait for the read's timeout.
        """
        self._generation += 1
        generation = self._generation
        for _ in range(200):
            reading, listener = self._reading, self._listener_id
            if reading is None or reading >= generation or listener is None:
                return
            try:
                with self.unavailable():
                    if await self.redis.client_unblock(listener):
                        return
            except LayerUnavailable:
                return  # refused or disconnected: the next read (BLOCK_SECONDS at most) has them
            await anyio.sleep(0.002)

    # -- listening -------------------------------------------------------------------------------

    async def _serve(self, connection: AbstractConnection, ready: Callable[[], None]) -> None:
        await connection.send_command("CLIENT", "ID")
        listener_id = int(await connection.read_response())
        await self._resync()
        self._listener_id = listener_id
        ready()
        block_ms = int(BLOCK_SECONDS * 1000)
        try:
            while True:
                streams: list[str | int] = [self.control, self.keys.broadcast, *self._cursors]
                streams.append(format_id(self._control_cursor or (0, 0)))
                streams.append(format_id(self._broadcast_cursor or (0, 0)))
                streams += [format_id(cursor) for cursor in self._cursors.values()]
                self._reading = self._generation
                blocking = ["XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", *streams]
                whole = ["XREAD", "COUNT", READ_COUNT, "STREAMS", *streams]
                await connection.send_packed_command(connection.pack_commands([blocking, whole]))
                await connection.read_response()  # only the wake-up; the second read has it all
                reply = await connection.read_response()
                self._reading = None
                if reply:
                    self._dispatch(reply)
        finally:
            self._listener_id = self._reading = None

    async def _resync(self) -> None:
        """On a new listener connection: align the cursors with what Redis holds now."""
        clock = await self._clock()
        if self._control_cursor is None:
            self._control_cursor = clock
        if self._broadcast_cursor is None:  # from now on: control messages are live only
            with self.unavailable():
                seconds, micros = await self.redis.time()
            # XREAD reads after the cursor, and a control message added within this very
            # millisecond has the id (now, 0): the cursor starts a millisecond back
            self._broadcast_cursor = (seconds * 1000 + micros // 1000 - 1, 0)
        if self._control_cursor > clock or any(c > clock for c in self._cursors.values()):
            logger.warning("Redis at %s lost data (restarted?); reading from %s", self.where, clock)
            self._control_cursor = min(self._control_cursor, clock)
            self._cursors = {key: min(cursor, clock) for key, cursor in self._cursors.items()}
        if self._patterns:
            # Streams created while disconnected whose announcement may have been trimmed away.
            for key in await self._scan(list(self._patterns), "stream"):
                self._cursors.setdefault(key, self._control_cursor)

    def _dispatch(self, reply: list[list[Any]]) -> None:
        """Deliver one read in id order, up to the id where every stream is known complete."""
        limit: IdTuple | None = None
        streams: list[tuple[str, list[Any]]] = []
        control: list[Any] = []
        for raw_key, entries in reply:
            if raw_key.decode() == self.keys.broadcast:  # ids of its own: no part of the order
                self._broadcasts(entries)
                continue
            if len(entries) >= READ_COUNT:  # cut off: later entries of others must wait for it
                last = _id(entries[-1][0])
                limit = last if limit is None else min(limit, last)
            key = raw_key.decode()
            if key == self.control:
                control = entries
            else:
                streams.append((key, entries))
        if control:
            limit = self._read_control(control, limit)
        events: list[tuple[IdTuple, Event]] = []
        for key, entries in streams:
            last_read = None
            for raw_id, fields in entries:
                id = _id(raw_id)
                if limit is not None and id > limit:
                    break
                last_read = id
                event = decode_event(raw_id.decode(), fields[1])
                if event is not None:
                    events.append((id, event))
            cursor = self._cursors.get(key)
            if last_read is not None and cursor is not None and last_read > cursor:
                self._cursors[key] = last_read
        events.sort(key=lambda pair: pair[0])
        if self._sink is not None:
            for _, event in events:
                self._sink.deliver(event)

    def _broadcasts(self, entries: list[Any]) -> None:
        for raw_id, fields in entries:
            self._broadcast_cursor = _id(raw_id)
            if self._sink is not None:
                self._sink.broadcast(fields[1])

    def _read_control(self, entries: list[Any], limit: IdTuple | None) -> IdTuple | None:
        """Follow new streams matching a pattern; pass on releases and group notices. Returns
        the new limit."""
        first_new: IdTuple | None = None
        for raw_id, (kind, value) in entries:
            id = _id(raw_id)
            if limit is not None and id > limit:
                break
            self._control_cursor = id
            if kind == b"new":
                key = value.decode()
                if key not in self._cursors and self._wants(self.keys.channel(key)):
                    self._cursors[key] = (0, 0)  # all of it is new: it was created just now
                    first_new = first_new or id
            elif kind == b"released" and self._sink is not None:
                self._sink.wake(value.decode(), released=True)
            elif kind == GROUP_NOTICE and self._sink is not None:
                notice = GroupNotice.decode(value)
                if notice is not None:
                    self._sink.group_notice(notice)
        if first_new is None:
            return limit
        # The new stream's first entry has the announcement's id: stop just before it.
        before = (first_new[0], first_new[1] - 1)
        return before if limit is None else min(limit, before)

    # -- history ---------------------------------------------------------------------------------

    async def replay(
        self,
        channels: Collection[str],
        patterns: Collection[str],
        *,
        after: str | None,
        limit: int | None,
    ) -> Replay:
        named = [self.keys.key(c) for c in dict.fromkeys(channels)]
        keys = named + sorted(await self._scan(list(patterns), "stream") - set(named))
        floor = _floor(self.history_ttl)
        oldest = format_id(floor) if floor else "-"
        if after is None:
            newest = await self._each_stream(
                keys, lambda pipe, key: pipe.xrevrange(key, "+", oldest, count=limit)
            )
            events = _merge(list(reversed(entries)) for (entries,) in newest)
            return Replay(events[-limit:] if limit else events)
        position = parse_id(after)
        if position is None or position > await self._clock():
            # Not an id of this Redis, or one from before it lost its data.
            retained = await self._each_stream(
                keys, lambda pipe, key: pipe.xrange(key, oldest, "+", count=limit)
            )
            events = _merge(entries for (entries,) in retained)[:limit]
            return Replay(events, gap=True, reason="unknown_id")
        after_id = f"({format_id(position)}"
        expired = floor is not None and position < floor  # some of what followed is too old
        replies = await self._each_stream(
            keys,
            lambda pipe, key: pipe.xrange(key, oldest if expired else after_id, "+", count=limit),
            lambda pipe, key: pipe.xinfo_stream(key),
            *(
                [lambda pipe, key: pipe.xrange(key, after_id, f"({oldest}", count=1)]
                if expired
                else []
            ),
        )
        gap = False
        for key, (_, info, *too_old) in zip(keys, replies, strict=True):
            if isinstance(info, ResponseError):  # no stream: it may have expired as a whole
                gap = gap or (expired and key in named)
            else:
                gap = gap or bool(too_old and too_old[0]) or _lost_after(info, position)
        events = _merge(entries for entries, *_ in replies)[:limit]
        return Replay(events, gap=gap, reason="evicted" if gap else None)

    async def _each_stream(
        self, keys: list[str], *commands: Callable[[Pipeline, str], object]
    ) -> list[list[Any]]:
        """Run `commands` on each stream in one pipeline; the replies, grouped by stream.

        A missing stream's XINFO error comes back as the reply; other errors raise.
        """
        with self.unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    for command in commands:
                        command(pipe, key)
                replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, ResponseError) and "no such key" not in str(reply):
                raise LayerUnavailable(f"Redis at {self.where} refused a command: {reply}")
        size = len(commands)
        return [replies[i : i + size] for i in range(0, len(replies), size)]


def _id(raw: bytes) -> IdTuple:
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq)


def _floor(ttl: float | None) -> IdTuple | None:
    """The oldest id within the history TTL (ids are Redis milliseconds)."""
    return (int((time.time() - ttl) * 1000), 0) if ttl else None


def _lost_after(info: dict[str, Any], position: IdTuple) -> bool:
    """Whether XINFO STREAM shows that entries following `position` may have been removed.

    Redis 7.0 records deletions (XDEL) but not trimming; trimming shows as fewer entries than were
    added and a first entry past `position`. That is conservative by one entry: a client that had
    read exactly up to the trim point is told of a gap it did not have.
    """
    deleted = parse_id(info.get("max-deleted-entry-id") or b"0-0") or (0, 0)
    if deleted > position:
        return True
    first = info.get("first-entry")
    last = parse_id(info.get("last-generated-id") or b"0-0") or (0, 0)
    trimmed = int(info.get("entries-added", 0)) > int(info.get("length", 0))
    return trimmed and last > position and (not first or _id(first[0]) > position)


def _merge(ranges: Iterable[list[Any]]) -> list[Event]:
    """Per-stream entries in id order -> their events, in one id order."""
    return decode_entries(heapq.merge(*ranges, key=lambda entry: _id(entry[0])))
