"""`redis://`: Redis Pub/Sub, fire-and-forget, across processes.

Design decisions:

- One connection per process carries every subscription (SUBSCRIBE for channels, PSUBSCRIBE for
  patterns) and one more publishes. Subscribing and unsubscribing only send commands on the
  listening connection, which keeps reading, so other channels' messages keep flowing; a call
  returns once Redis confirmed it, so a message published afterwards is received.
- A publish is one Lua script call (one round trip for a whole batch) that assigns the ids from
  the shared clock (see `layers._redis`) and PUBLISHes `<id> <wire blob>`; the same call checks
  and writes idempotency records (`layers._redis_keys`).
- Redis sends a message once per matching subscription (`message` for the channel, `pmessage` for
  each pattern). Those copies are written back to back, so the listener drops a message whose id
  equals the previous one and the core sees every message exactly once.
- Messages published while the listening connection is down are lost: that is Pub/Sub. The
  subscriptions themselves survive; the listener re-subscribes everything when it reconnects.
- Control messages (`ChannelLayer.broadcast`) are PUBLISHed on `<prefix>#broadcast`, which the
  listener always subscribes to; no channel name holds `#`, and the copies a user's pattern
  (`<prefix>*`) brings of it are dropped.
- No history and no consumer groups: those calls raise `CapabilityNotSupported` naming
  `redis+streams://`, which has both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import anyio
from redis.asyncio.connection import AbstractConnection

from ._idempotency import DEFAULT_TTL
from ._redis import LUA_CLOCK, RedisLayer, decode_event
from ._redis_keys import LUA_RECORDS, read_ids, record_args
from .base import Capabilities
from .errors import LayerUnavailable
from .event import Message

CONFIRM_TIMEOUT = 5.0

# KEYS[1] = id clock; ARGV[1] = n, ARGV[2j], ARGV[2j + 1] = channel key and blob of message j;
# then the idempotency records of a keyed publish from ARGV[2n + 2] (see `layers._redis_keys`)
PUBLISH_LUA = (
    LUA_CLOCK
    + LUA_RECORDS
    + """
local n = tonumber(ARGV[1])
local found, conflict = recall(2 * n + 2, n)
if conflict then
  return conflict
end
local now, ms, seq = clock(KEYS[1])
local ids, last = {}, nil
for j = 1, n do
  if found[j] then
    ids[j] = found[j]
  else
    seq = seq + 1
    local id = string.format('%d-%d', ms, seq)
    redis.call('PUBLISH', ARGV[2 * j], id .. ' ' .. ARGV[2 * j + 1])
    remember(2 * n + 2, j, id)
    ids[j], last = id, id
  end
end
if last then
  redis.call('SET', KEYS[1], last)
end
return ids
"""
)

Reply = tuple[bytes, bytes]  # (kind of confirmation, channel key or glob)


class RedisPubSubLayer(RedisLayer):
    scheme = "redis"
    capabilities = Capabilities(cross_process=True, history=False, groups=False, idempotency=True)

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "gw:",
        idempotency_ttl: float = DEFAULT_TTL,
    ) -> None:
        super().__init__(url, key_prefix=key_prefix)
        self.idempotency_ttl = idempotency_ttl
        self._broadcast_key = self.keys.broadcast.encode()
        # keys wanted on the listener connection; the control channel always
        self._channels: set[bytes] = {self._broadcast_key}
        self._globs: set[bytes] = set()
        self._connection: AbstractConnection | None = None  # set while listening
        self._lock = anyio.Lock()  # one subscription change at a time
        self._expected: set[Reply] = set()
        self._confirmed = anyio.Event()
        self._last_id: bytes | None = None

    lua = {"publish": PUBLISH_LUA}

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        args: list[str | bytes | int] = [len(messages)]
        for message in messages:
            args += (self.keys.key(message.channel), message.to_wire())
        args += record_args(self.keys.prefix, messages, self.idempotency_ttl)
        ids = await self.script("publish", [self.keys.seq], args)
        return read_ids(ids, messages)

    async def broadcast(self, blob: bytes) -> None:
        await self.command("PUBLISH", self.keys.broadcast, blob)

    # -- subscribing -----------------------------------------------------------------------------

    async def subscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        async with self._lock:
            keys = {self.keys.key(c).encode() for c in channels} - self._channels
            globs = {self.keys.glob(p).encode() for p in patterns} - self._globs
            self._channels |= keys
            self._globs |= globs
            try:
                await self._change(b"subscribe", keys, globs)
            except BaseException:
                self._channels -= keys  # the core will not unsubscribe what failed
                self._globs -= globs
                raise

    async def unsubscribe(self, channels: Collection[str], patterns: Collection[str]) -> None:
        async with self._lock:
            keys = {self.keys.key(c).encode() for c in channels} & self._channels
            globs = {self.keys.glob(p).encode() for p in patterns} & self._globs
            self._channels -= keys
            self._globs -= globs
            if self._connection is not None:  # else the next connection leaves them out anyway
                await self._change(b"unsubscribe", keys, globs)

    async def _change(self, kind: bytes, keys: set[bytes], globs: set[bytes]) -> None:
        """Send (P)SUBSCRIBE or (P)UNSUBSCRIBE and wait until Redis confirmed every name."""
        if not keys and not globs:
            return
        connection = self._connection
        if connection is None:
            raise LayerUnavailable(f"Redis at {self.where} is not connected; retry shortly")
        self._expected = {(kind, k) for k in keys} | {(b"p" + kind, g) for g in globs}
        self._confirmed = anyio.Event()
        with self.unavailable():
            if keys:
                await connection.send_command(kind.decode().upper(), *keys)
            if globs:
                await connection.send_command("P" + kind.decode().upper(), *globs)
        with anyio.move_on_after(CONFIRM_TIMEOUT):
            await self._confirmed.wait()
        if self._expected:
            self._expected = set()
            raise LayerUnavailable(f"Redis at {self.where} did not confirm {kind.decode()}")

    # -- listening -------------------------------------------------------------------------------

    async def _serve(self, connection: AbstractConnection, ready: Callable[[], None]) -> None:
        # Subscriptions are restored before the layer counts as (re)connected, so a message
        # published after `ready` is received. Until then subscribe() answers LayerUnavailable.
        restoring: set[Reply] | None = {(b"subscribe", key) for key in self._channels} | {
            (b"psubscribe", glob) for glob in self._globs
        }
        if self._channels:
            await connection.send_command("SUBSCRIBE", *self._channels)
        if self._globs:
            await connection.send_command("PSUBSCRIBE", *self._globs)
        try:
            while True:
                if restoring is not None and not restoring:
                    restoring = None
                    self._connection = connection
                    ready()
                reply = await connection.read_response()
                kind = reply[0]
                if kind == b"message":
                    if reply[1] == self._broadcast_key:
                        if self._sink is not None:
                            self._sink.broadcast(reply[2])
                    else:
                        self._receive(reply[2])
                elif kind == b"pmessage":
                    if reply[2] != self._broadcast_key:
                        self._receive(reply[3])
                elif restoring is not None:
                    restoring.discard((kind, reply[1]))
                else:
                    self._confirm((kind, reply[1]))
        finally:
            self._connection = None
            self._confirmed.set()  # a waiting subscribe sees its names unconfirmed and fails

    def _confirm(self, reply: Reply) -> None:
        expected = self._expected
        if reply in expected:
            expected.discard(reply)
            if not expected:
                self._confirmed.set()

    def _receive(self, payload: bytes) -> None:
        id, _, blob = payload.partition(b" ")
        if id == self._last_id:  # the same message again, through another matching subscription
            return
        self._last_id = id
        event = decode_event(id.decode(errors="replace"), blob)
        if event is not None and self._sink is not None:
            self._sink.deliver(event)
