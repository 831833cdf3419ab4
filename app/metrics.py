"""Prometheus metrics, in a registry per application so several apps can live in one process.

Under gunicorn every worker is its own process: with `PROMETHEUS_MULTIPROC_DIR` set (the gunicorn
config sets it) prometheus-client keeps each worker's values in files there and `/metrics` sums
them, so one scrape sees the whole pod whichever worker answers. Without it (`python -m app`, the
tests) the per-app registry is exposed as it is. The metric objects are registered in the per-app
registry either way, so per-process reads (`/stats`) work the same in both modes.

`Metrics` is also the `ChannelObserver` of the app's `Channel`: redeliveries, dead letters, layer
errors and reconnects arrive through it, without `layers` knowing about Prometheus.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from layers import ChannelObserver

# Publish latency buckets, seconds: a memory publish takes microseconds, a broker round trip
# milliseconds, a struggling broker seconds.
TRANSPORTS = ("sse", "ws")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics(ChannelObserver):
    def __init__(self, layer: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.layer = layer
        registry = self.registry
        self._published = Counter(
            "gateway_messages_published",
            "Messages accepted by the layer",
            ["layer"],
            registry=registry,
        ).labels(layer)
        self._publish_latency = Histogram(
            "gateway_publish_latency_seconds",
            "Time for the layer to accept a publish call (one message or a batch)",
            ["layer"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ).labels(layer)
        self._delivered = Counter(
            "gateway_messages_delivered",
            "Events written to subscribers",
            ["transport", "layer"],
            registry=registry,
        )
        self._dropped = Counter(
            "gateway_messages_dropped",
            "Events dropped by a subscriber's backlog policy",
            ["transport", "layer"],
            registry=registry,
        )
        self._subscribers = Gauge(
            "gateway_subscribers_active",
            "Open subscriber connections",
            ["transport", "layer"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._redelivered = Counter(
            "gateway_messages_redelivered",
            "Group messages claimed again after their ack timeout or a release",
            ["layer"],
            registry=registry,
        ).labels(layer)
        self._dead_lettered = Counter(
            "gateway_messages_dead_lettered",
            "Group messages moved to <channel>.dead after max deliveries",
            ["layer"],
            registry=registry,
        ).labels(layer)
        self._layer_errors = Counter(
            "gateway_layer_errors",
            "Broker errors the layer recovered from",
            ["layer"],
            registry=registry,
        ).labels(layer)
        self._reconnects = Counter(
            "gateway_layer_reconnects",
            "Times the layer got its broker connection back",
            ["layer"],
            registry=registry,
        ).labels(layer)
        # Every series exists from start-up, at zero; each transport's is looked up once here,
        # not on every write (`labels` takes a lock and builds the key each call).
        self._delivered_by = {t: self._delivered.labels(t, layer) for t in TRANSPORTS}
        self._dropped_by = {t: self._dropped.labels(t, layer) for t in TRANSPORTS}
        self._subscribers_by = {t: self._subscribers.labels(t, layer) for t in TRANSPORTS}

    def delivered(self, transport: str) -> Counter:
        return self._delivered_by[transport]

    def dropped(self, transport: str) -> Counter:
        return self._dropped_by[transport]

    def subscribers(self, transport: str) -> Gauge:
        return self._subscribers_by[transport]

    def exposition(self) -> bytes:
        """The Prometheus text for `/metrics`: every worker's values under gunicorn."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    # -- ChannelObserver -------------------------------------------------------------------------

    def published(self, count: int, seconds: float) -> None:
        self._published.inc(count)
        self._publish_latency.observe(seconds)

    def redelivered(self, channel: str, group: str, count: int) -> None:
        self._redelivered.inc(count)

    def dead_lettered(self, channel: str, group: str) -> None:
        self._dead_lettered.inc()

    def layer_error(self, scheme: str, error: BaseException) -> None:
        self._layer_errors.inc()

    def reconnected(self, scheme: str) -> None:
        self._reconnects.inc()
