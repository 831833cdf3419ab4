"""One Redis connection that carries commands pipelined: each command is written as it comes, and
the replies are matched to their callers in order (Redis answers a connection's commands in the
order it received them).

The Redis layers run their Lua scripts, publishing among them, through it:

- redis-py's client checks a pooled connection out and back in for every command and wraps it in
  timeouts, retries and observability hooks: about 60 µs of CPU per command on this project's
  benchmark machine, against 9 µs for the same command on the bare connection (`python -m bench`,
  S1). One group commit call carries a few dozen publishes, so that was a tenth of a publish.
- Calls in flight at once keep their order: what was sent first runs first, where pooled
  connections would let the server order them.
- The connection is the driver's own (`redis.asyncio.Connection`): URL options, authentication,
  TLS, RESP2 and the client name come with it. hiredis, which the driver parses replies with,
  packs the commands.
- It connects on first use, and again on the next call after it was lost; the calls that waited
  for an attempt that failed fail with it, so an unreachable broker costs each at most one
  attempt. A call gets its answer within `timeout`, connecting included, or fails; the
  connection is then dropped with every command still waiting on it, since a broker that stopped
  answering one command answers none after it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import hiredis
from anyio.abc import TaskGroup
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class CommandPipe:
    def __init__(
        self,
        new_connection: Callable[[], AbstractConnection],
        tasks: TaskGroup,
        *,
        timeout: float,
    ) -> None:
        self._new_connection = new_connection  # with no socket timeout: the reader waits idle
        self._tasks = tasks  # runs the reader of each connection
        self._timeout = timeout
        self._connection: AbstractConnection | None = None
        self._reader = anyio.CancelScope()  # the current connection's reader
        self._replies: deque[asyncio.Future[Any]] = deque()  # in the order the commands went
        self._connecting = anyio.Lock()
        self._failures = 0  # connection attempts that failed: their waiters fail too

    async def call(self, *args: str | bytes | int | float) -> Any:
        """Send one command and return its reply; raises the driver's errors."""
        connection: AbstractConnection | None = None
        try:
            with anyio.fail_after(self._timeout):  # connecting, sending and the reply
                connection = self._connection or await self._connect()
                reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                # Connected, the driver writes before it awaits anything: the reply's place in
                # the queue is the command's place on the wire.
                self._replies.append(reply)
                try:
                    packed = hiredis.pack_command(args)  # type: ignore[arg-type]  # stub: 1-tuples
                    await connection.send_packed_command(packed, check_health=False)
                except BaseException as exc:
                    reply.cancel()  # no one will wait for it
                    self._lost(connection, RedisConnectionError(f"sending failed: {exc!r}"))
                    raise
                return await reply
        except TimeoutError:
            if connection is not None:
                self._lost(connection, RedisTimeoutError(f"no reply within {self._timeout:g} s"))
            raise RedisTimeoutError(f"Redis gave no answer within {self._timeout:g} s") from None

    async def _connect(self) -> AbstractConnection:
        failures = self._failures
        async with self._connecting:
            if self._connection is not None:
                return self._connection
            if self._failures != failures:  # the attempt this call waited for failed: so does it
                raise RedisConnectionError("connecting to Redis failed just now; retry shortly")
            connection = self._new_connection()
            try:
                await connection.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                self._failures += 1
                with anyio.CancelScope(shield=True):
                    await connection.disconnect(nowait=True)
                raise
            self._connection, self._reader = connection, anyio.CancelScope()
            self._tasks.start_soon(self._read, connection, self._reader)
            return connection

    async def _read(self, connection: AbstractConnection, scope: anyio.CancelScope) -> None:
        error: Exception = RedisConnectionError("the connection to Redis closed")
        try:
            with scope:
                while True:
                    try:
                        reply = await connection.read_response(disconnect_on_error=False)
                    except ResponseError as exc:  # the server refused this one command
                        reply = exc
                    if self._connection is not connection:  # dropped: the queue is another's
                        return
                    self._answer(reply)
        except Exception as exc:
            error = exc
        finally:
            self._lost(connection, error)
            with anyio.CancelScope(shield=True):
                await connection.disconnect(nowait=True)

    def _answer(self, reply: Any) -> None:
        future = self._replies.popleft()
        if future.done():  # its caller gave up waiting
            return
        if isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    def _lost(self, connection: AbstractConnection, error: Exception) -> None:
        """Fail every command still waiting on `connection` and stop its reader; the next call
        connects anew."""
        if self._connection is not connection:
            return
        self._connection = None
        self._reader.cancel()
        replies, self._replies = self._replies, deque()
        for future in replies:
            if not future.done():
                future.set_exception(error)
