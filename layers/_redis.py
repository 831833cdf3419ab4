"""Plumbing shared by the Redis layers: connections, keys, ids, errors and the listener loop.

Design decisions:

- Each layer instance opens one pipelined connection for its Lua scripts (publishing among
  them), pings and Pub/Sub's control messages (`layers._redis_pipe`), a connection pool for the
  rest (queries, blocking reads, transactions, redis-py's helpers) and one dedicated listener
  connection, all named after the instance (`client_name`), so an operator or a test can find
  and kill exactly this instance's connections. Commands are never retried: a publish that fails
  raises `LayerUnavailable` at once (the gateway answers 503) instead of hanging on retries or
  risking a duplicate. A dropped connection is replaced by the next command (the pipe's reader
  sees it close; the pool checks a connection as it hands it out), so the first publish after it
  still succeeds.
- The listener reconnects by itself (`layers._supervisor`) and lets the layer restore its
  subscriptions; meanwhile `ping` fails (readiness goes red) and live subscriptions stay open. A
  broker unreachable at start-up is the same: the layer starts, and calls raise
  `LayerUnavailable` naming the URL (secrets masked, `layers.urls.redact`) until it connects.
- Ids are `<ms>-<seq>` from one clock per key prefix, assigned inside the publishing Lua script:
  `ms` is Redis `TIME` but never less than the last id's, and `seq` goes up while `ms` stands
  still. Ids are therefore strictly increasing across all channels (one id places a resuming
  subscriber in every channel it follows), time-based (history can expire by id), and they keep
  increasing across a Redis restart that lost the clock key, because time moved on.
- Channel `c` lives at key `<prefix>c` (prefix `gw:`, or `?key_prefix=` in the URL). Names are
  used as they are: no case folding, and no escaping, since channel names hold no glob characters.
  The layer's own keys contain `#`, which channel names cannot, so they never collide with one.
- RESP2 is used on every connection: replies are plain arrays whatever the driver's default.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._redis_pipe import CommandPipe
from ._supervisor import Supervisor
from .base import ChannelLayer, Sink
from .errors import InvalidArgument, LayerUnavailable
from .event import Event
from .urls import redact, split_options

logger = logging.getLogger("layers.redis")

COMMAND_TIMEOUT = 5.0  # seconds a command (or a wait for a pooled connection) may take

# Defines `clock(seq_key)` -> now_ms, ms, seq; the caller assigns ids `ms-(seq+1)`, ... and stores
# the last one with `SET seq_key`. Lua numbers are doubles: exact for millisecond timestamps.
LUA_CLOCK = """
local function clock(seq_key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local ms, seq = now, -1
  local last = redis.call('GET', seq_key)
  if last then
    local dash = string.find(last, '-', 1, true)
    local last_ms = tonumber(string.sub(last, 1, dash - 1))
    if last_ms >= now then
      ms, seq = last_ms, tonumber(string.sub(last, dash + 1))
    end
  end
  return now, ms, seq
end
"""

IdTuple = tuple[int, int]


MAX_ID_PART = (1 << 64) - 1  # Redis stream ids are two unsigned 64-bit numbers


def parse_id(id: str | bytes) -> IdTuple | None:
    """`<ms>-<seq>` as a comparable tuple, or None if `id` is not one Redis could have issued.

    Only canonical decimals within Redis's range count: anything else would make Redis refuse the
    command it is put in, where it is bad input (or an unknown id), not an unavailable broker.
    """
    text = id.decode(errors="replace") if isinstance(id, bytes) else id
    ms, dash, seq = text.partition("-")
    if not dash or not _canonical(ms) or not _canonical(seq):
        return None
    parsed = int(ms), int(seq)
    return parsed if max(parsed) <= MAX_ID_PART else None


def _canonical(number: str) -> bool:
    return (
        0 < len(number) <= 20
        and number.isascii()
        and number.isdigit()
        and (number == "0" or number[0] != "0")
    )


def format_id(id: IdTuple) -> str:
    return f"{id[0]}-{id[1]}"


# What redis-py reads from a URL's query (`redis.asyncio.connection.parse_url`).
DRIVER_OPTIONS = (
    *sorted(URL_QUERY_ARGUMENT_PARSERS),
    "username",
    "password",
    "client_name",
    *("ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path"),
    "ssl_password",
)


def driver_url(url: str) -> str:
    """`redis+streams://h/0?key_prefix=p:` -> `redis://h/0`: what the driver understands."""
    stripped, _ = split_options(url, ("key_prefix",), driver=DRIVER_OPTIONS)
    parts = urlsplit(stripped)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))


class KeySpace:
    """Maps channel names to Redis keys and back, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seq = f"{prefix}#seq"  # the id clock
        self.control = f"{prefix}#events"  # new streams and releases (Redis Streams)
        self.broadcast = f"{prefix}#broadcast"  # control messages (Pub/Sub; `layers._broadcast`)

    def key(self, channel: str) -> str:
        return self.prefix + channel

    def channel(self, key: str | bytes) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        return text[len(self.prefix) :]

    def glob(self, pattern: str) -> str:
        """A Redis glob (PSUBSCRIBE, SCAN MATCH) for a channel pattern; the prefix is escaped."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return escaped + pattern


def decode_event(id: str, blob: bytes) -> Event | None:
    """The event in a message or stream entry; None (and a warning) if another writer put it."""
    try:
        return Event.from_wire(id, blob)
    except (ValueError, KeyError, TypeError):
        logger.warning("ignoring entry %s: it was not written by this gateway", id)
        return None


def decode_entries(entries: Iterable[tuple[bytes, dict[bytes, bytes] | None]]) -> list[Event]:
    """Stream entries as the driver parses them (id, fields) -> events, skipping foreign ones."""
    events = []
    for raw_id, fields in entries:
        event = decode_event(raw_id.decode(), (fields or {}).get(b"m", b""))
        if event is not None:
            events.append(event)
    return events


class RedisLayer(ChannelLayer):
    """What both Redis layers share; subclasses implement `_serve` on the listener connection."""

    command_connections = 1
    listener_timeout: float | None = None  # read timeout on the listener connection
    lua: ClassVar[dict[str, str]] = {}  # scripts by name, loaded once per server (EVALSHA)

    def __init__(self, url: str, *, key_prefix: str = "gw:") -> None:
        # The URL may carry the prefix (`?key_prefix=`): the gateway configures a layer by URL.
        _, options = split_options(url, ("key_prefix",), driver=DRIVER_OPTIONS)
        key_prefix = options.get("key_prefix", key_prefix)
        if not key_prefix:
            raise InvalidArgument("key_prefix must not be empty: the layer's keys need a namespace")
        self.url = url
        self.keys = KeySpace(key_prefix)
        self.client_name = f"channels-gateway:{uuid.uuid4().hex[:12]}"
        self.where = redact(url)
        self._client: Redis | None = None
        self._shas = {  # EVALSHA names a script by this
            name: hashlib.sha1(lua.encode()).hexdigest() for name, lua in self.lua.items()
        }
        self._pipe: CommandPipe | None = None  # runs the scripts (see `layers._redis_pipe`)
        self._sink: Sink | None = None
        self._listening = False  # the listener connection is up and its subscriptions restored

    @property
    def redis(self) -> Redis:
        if self._client is None:
            raise LayerUnavailable(f"the layer for {self.where} is not running; open the Channel")
        return self._client

    @contextmanager
    def unavailable(self) -> Iterator[None]:
        """Turn driver errors into `LayerUnavailable` naming the broker."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError) as exc:
            raise LayerUnavailable(
                f"Redis at {self.where} is not reachable ({exc}); "
                "start it or fix the layer URL, then retry"
            ) from exc
        except RedisError as exc:
            raise LayerUnavailable(f"Redis at {self.where} refused a command: {exc}") from exc

    async def command(self, *args: str | bytes | int) -> Any:
        """One command on the script pipe (see `layers._redis_pipe`), its reply as Redis sent it."""
        with self.unavailable():
            return await self._running_pipe().call(*args)

    async def script(self, name: str, keys: list[str], args: list[str | bytes | int]) -> Any:
        """Run one of the layer's Lua scripts: one round trip (a reload only after a restart)."""
        pipe = self._running_pipe()
        command = ("EVALSHA", self._shas[name], len(keys), *keys, *args)
        with self.unavailable():
            try:
                return await pipe.call(*command)
            except NoScriptError:  # Redis restarted, or its scripts were flushed
                await pipe.call("SCRIPT", "LOAD", self.lua[name])
                return await pipe.call(*command)

    def _running_pipe(self) -> CommandPipe:
        if self._pipe is None:
            raise LayerUnavailable(f"the layer for {self.where} is not running; open the Channel")
        return self._pipe

    async def ping(self) -> None:
        """Redis answers on the publishing connection and the listener is connected (else live
        messages are not arriving)."""
        await self.command("PING")
        if not self._listening:
            raise LayerUnavailable(f"Redis at {self.where} answers, the listener is reconnecting")

    def _open_pool(self) -> Redis:
        pool = BlockingConnectionPool.from_url(
            driver_url(self.url),
            max_connections=self.command_connections,
            timeout=COMMAND_TIMEOUT,
            client_name=self.client_name,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=COMMAND_TIMEOUT,
            socket_keepalive=True,
            protocol=2,
        )
        return Redis(connection_pool=pool)

    def _new_connection(self, socket_timeout: float | None) -> AbstractConnection:
        """A connection of its own (listener, script pipe), with the pool's options."""
        pool = self.redis.connection_pool
        options = {**pool.connection_kwargs, "socket_timeout": socket_timeout}
        return pool.connection_class(**options)

    async def run(self, sink: Sink, *, task_status: TaskStatus[None]) -> None:
        self._client = self._open_pool()
        self._sink = sink
        supervisor = Supervisor(f"Redis listener at {self.where}", sink, logger)
        try:
            async with anyio.create_task_group() as pipe_tasks:
                # no socket timeout: the pipe times each command out itself
                self._pipe = CommandPipe(
                    lambda: self._new_connection(None), pipe_tasks, timeout=COMMAND_TIMEOUT
                )
                await supervisor.run(self._listen, task_status=task_status)
        finally:
            self._sink, self._listening, self._pipe = None, False, None
            with anyio.CancelScope(shield=True):
                await self.redis.aclose(close_connection_pool=True)
            self._client = None

    async def _listen(self, ready: Callable[[], None]) -> None:
        """One listener connection's life (see `layers._supervisor`)."""

        def serving() -> None:
            self._listening = True
            ready()

        connection = self._new_connection(self.listener_timeout)
        try:
            with self.unavailable():
                await connection.connect()  # type: ignore[no-untyped-call]
                await self._serve(connection, serving)
        finally:
            self._listening = False
            with anyio.CancelScope(shield=True):
                await connection.disconnect(nowait=True)

    @abstractmethod
    async def _serve(self, connection: AbstractConnection, ready: Callable[[], None]) -> None:
        """Restore subscriptions on a fresh listener connection, call `ready`, then read forever."""

    async def _scan(self, patterns: list[str], type: str | None = None) -> set[str]:
        """Keys of channels matching any of the patterns, without the layer's own keys."""
        found: set[str] = set()
        with self.unavailable():
            for pattern in patterns:
                async for key in self.redis.scan_iter(
                    match=self.keys.glob(pattern), count=1000, _type=type
                ):
                    text = key.decode()
                    if "#" not in text[len(self.keys.prefix) :]:
                        found.add(text)
        return found
