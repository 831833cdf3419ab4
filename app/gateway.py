"""The state one gateway process shares between requests: settings, the channel, metrics, limits."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from app.auth import Authenticator
from app.errors import ApiError
from app.metrics import Metrics
from app.settings import Settings
from app.timers import Keepalives, SendWatchdog
from layers import Channel
from layers.names import (
    DEAD_LETTER_SUFFIX,
    compile_pattern,
    pattern_within,
    validate_channel,
    validate_pattern,
)

logger = logging.getLogger("app")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = Authenticator(settings)
        self.metrics = Metrics(settings.layer.split(":", 1)[0])
        self._channel: Channel | None = None
        self.connections = 0
        self.draining = False
        self._drain_hooks: set[Callable[[], None]] = set()
        self.keepalives = Keepalives(settings.keepalive_seconds)
        self.watchdog = SendWatchdog(settings.send_timeout_seconds)

    @property
    def channel(self) -> Channel:
        if self._channel is None:
            raise ApiError(503, "starting", "the gateway is starting or stopping; retry shortly")
        return self._channel

    @channel.setter
    def channel(self, channel: Channel | None) -> None:
        self._channel = channel

    def check_channel(self, name: str) -> str:
        """A valid channel name that the `GATEWAY_CHANNELS` allow-list admits, as it admits the
        dead letters (`<channel>.dead`) of every channel it admits."""
        validate_channel(name)
        allowed = self.settings.channels
        base = name.removesuffix(DEAD_LETTER_SUFFIX)
        if allowed and not any(
            compile_pattern(glob)(name) or compile_pattern(glob)(base) for glob in allowed
        ):
            raise ApiError(
                403, "channel_not_allowed", f"channel {name!r} is not in GATEWAY_CHANNELS"
            )
        return name

    def check_subscription(self, channels: Sequence[str], patterns: Sequence[str]) -> None:
        if not channels and not patterns:
            raise ApiError(422, "invalid_argument", "name at least one channel or pattern")
        limit = self.settings.max_channels_per_subscription
        if len(channels) + len(patterns) > limit:
            raise ApiError(
                422,
                "too_many_channels",
                f"at most {limit} channels and patterns per subscription "
                "(GATEWAY_MAX_CHANNELS_PER_SUBSCRIPTION)",
            )
        for name in channels:
            self.check_channel(name)
        for pattern in patterns:
            self.check_pattern(pattern)

    def check_pattern(self, pattern: str) -> str:
        """A valid glob pattern every channel of which the `GATEWAY_CHANNELS` allow-list admits."""
        validate_pattern(pattern)
        allowed = self.settings.channels
        if allowed and not any(pattern_within(pattern, glob) for glob in allowed):
            raise ApiError(
                403,
                "channel_not_allowed",
                f"pattern {pattern!r} can match channels outside GATEWAY_CHANNELS",
            )
        return pattern

    def drain(self) -> None:
        """Shutdown started (see `app.shutdown`): refuse new streams, end the open ones.

        SSE streams end with a short `retry:` hint and WebSockets close with 1001, so clients
        reconnect to another instance; group consumers release their unacked messages so the
        group's other consumers take them over at once.
        """
        if self.draining:
            return
        self.draining = True
        logger.info("draining: ending %d streaming connections", self.connections)
        if self._channel is not None:
            self._channel.close_subscriptions(release=True)
        for hook in list(self._drain_hooks):
            hook()

    @contextmanager
    def on_drain(self, hook: Callable[[], None]) -> Iterator[None]:
        """While the block runs, `drain` also calls `hook` (a connection with no subscription)."""
        self._drain_hooks.add(hook)
        try:
            yield
        finally:
            self._drain_hooks.discard(hook)

    @contextmanager
    def connection(self) -> Iterator[None]:
        """Count one streaming connection; 503 past `GATEWAY_MAX_CONNECTIONS` or when draining."""
        if self.draining:
            raise ApiError(
                503, "shutting_down", "this instance is shutting down; reconnect to another one"
            )
        if self.connections >= self.settings.max_connections:
            raise ApiError(
                503,
                "too_many_connections",
                f"this instance holds its maximum of {self.settings.max_connections} "
                "connections; retry later or on another instance",
            )
        self.connections += 1
        try:
            yield
        finally:
            self.connections -= 1
