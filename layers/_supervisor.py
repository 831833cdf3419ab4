"""One reconnect loop for every broker connection a layer keeps open (Redis, PostgreSQL, MQTT).

    supervisor = Supervisor("Redis listener at redis://h:6379/0", sink, logger)
    await supervisor.run(connection, task_status=task_status)

`connection(ready)` is one connection's whole life: connect, restore what the layer had (its
subscriptions), call `ready()` once it serves, then serve until the connection fails, by raising.
The supervisor runs it again and again: after a failure it reports the error to the sink (for the
metrics), logs it, and waits (0.05 s, doubling, at most `max_delay`) before the next attempt;
each `ready()` after the first counts as a reconnect and is reported as `sink.reconnected()`,
which is where the core tells subscribers of a layer without history that they may have missed
messages.

A broker that is down when the layer starts does not stop it: the layer starts anyway (readiness
is red, calls raise `LayerUnavailable`) and connects as soon as the broker is there, as it does
after any later outage. Only a configuration error on the first attempt (`LayerConfigurationError`:
a wrong database, a wrong URL) ends the layer, since retrying cannot fix it. A connection a caller
opens on demand and must hear about (`fail_fast=True`) raises its first error instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskStatus

from .base import Sink
from .errors import ChannelError, LayerConfigurationError

MIN_DELAY = 0.05

Connection = Callable[[Callable[[], None]], Awaitable[None]]


class Supervisor:
    """Keeps one broker connection alive; see the module docstring."""

    def __init__(
        self,
        what: str,
        sink: Sink,
        logger: logging.Logger,
        *,
        max_delay: float = 2.0,
        reports_reconnects: bool = True,
    ) -> None:
        """`what` names the connection in log lines; `reports_reconnects=False` keeps its
        reconnects from the sink (a group session's, which loses nothing live subscribers see)."""
        self.what = what
        self.sink = sink
        self.logger = logger
        self.max_delay = max_delay
        self.reports_reconnects = reports_reconnects
        self.reconnects = 0  # times `ready()` came after an earlier one

    async def run(
        self, connection: Connection, *, task_status: TaskStatus[None], fail_fast: bool = False
    ) -> None:
        """Run `connection` until cancelled; `task_status.started()` comes with the first
        `ready()`, or with the first failure unless that failure is fatal (see the module)."""
        started = False
        ever_ready = False
        delay = MIN_DELAY

        def ready() -> None:
            nonlocal started, ever_ready, delay
            delay = MIN_DELAY
            if ever_ready:
                self.reconnects += 1
                if self.reports_reconnects:
                    self.sink.reconnected()
            ever_ready = True
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                await connection(ready)
                raise RuntimeError("the connection ended without an error")
            except Exception as exc:
                if not started and (fail_fast or isinstance(exc, LayerConfigurationError)):
                    raise
                self.sink.layer_error(exc)
                expected = isinstance(exc, ChannelError)
                self.logger.warning(
                    "%s: %s; retrying in %.2f s",
                    self.what,
                    exc.detail if isinstance(exc, ChannelError) else repr(exc),
                    delay,
                    exc_info=not expected,
                )
                if not started:
                    started = True
                    task_status.started()  # the layer runs; readiness stays red until ready()
            await anyio.sleep(delay)
            delay = min(delay * 2, self.max_delay)
