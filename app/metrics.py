"""Prometheus metrics, in a registry per application so several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self, layer: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.layer = layer
        self.published = Counter(
            "gateway_messages_published",
            "Messages accepted by the layer",
            ["layer"],
            registry=self.registry,
        ).labels(layer)
        self._delivered = Counter(
            "gateway_messages_delivered",
            "Events written to subscribers",
            ["transport", "layer"],
            registry=self.registry,
        )
        self._dropped = Counter(
            "gateway_messages_dropped",
            "Events dropped by a subscriber's backlog policy",
            ["transport", "layer"],
            registry=self.registry,
        )
        self._subscribers = Gauge(
            "gateway_subscribers_active",
            "Open subscriber connections",
            ["transport", "layer"],
            registry=self.registry,
        )

    def delivered(self, transport: str) -> Counter:
        return self._delivered.labels(transport, self.layer)

    def dropped(self, transport: str) -> Counter:
        return self._dropped.labels(transport, self.layer)

    def subscribers(self, transport: str) -> Gauge:
        return self._subscribers.labels(transport, self.layer)
