"""The layers there are: scheme -> module, class, driver extra and capabilities.

Kept apart from the layer modules (and their drivers, imported only when a layer is created, by
`layers.factory.create_layer`) so that anything may ask which layers keep a capability, as
`ChannelLayer` does to name them in `CapabilityNotSupported`. A new layer is one line here.
"""

from __future__ import annotations

from typing import NamedTuple


class LayerEntry(NamedTuple):
    module: str
    class_name: str
    extra: str | None  # the pip extra that installs the driver
    capabilities: frozenset[str]  # which of history, groups, idempotency the class has (tested)


_KEYS = frozenset({"idempotency"})
_HGK = frozenset({"history", "groups", "idempotency"})

# scheme -> layer; the first scheme of a class is the one hints name.
LAYERS: dict[str, LayerEntry] = {
    "memory": LayerEntry("layers.memory", "InMemoryChannelLayer", None, _HGK),
    "redis": LayerEntry("layers.redis_pubsub", "RedisPubSubLayer", "redis", _KEYS),
    "rediss": LayerEntry("layers.redis_pubsub", "RedisPubSubLayer", "redis", _KEYS),
    "redis+streams": LayerEntry("layers.redis_streams", "RedisStreamsLayer", "redis", _HGK),
    "rediss+streams": LayerEntry("layers.redis_streams", "RedisStreamsLayer", "redis", _HGK),
    "postgresql": LayerEntry("layers.postgres", "PostgresLayer", "postgres", _HGK),
    "postgres": LayerEntry("layers.postgres", "PostgresLayer", "postgres", _HGK),
    "mqtt": LayerEntry("layers.mqtt", "MQTTLayer", "mqtt", frozenset({"groups"})),
    "mqtts": LayerEntry("layers.mqtt", "MQTTLayer", "mqtt", frozenset({"groups"})),
    "nats": LayerEntry("layers.nats_jetstream", "NatsJetStreamLayer", "nats", _HGK),
    "tls": LayerEntry("layers.nats_jetstream", "NatsJetStreamLayer", "nats", _HGK),
}


def layers_with(capability: str) -> list[str]:
    """The schemes (one per layer) of the layers that have `capability` ("history", "groups",
    "idempotency")."""
    seen: set[tuple[str, str]] = set()
    schemes = []
    for scheme, entry in LAYERS.items():
        if (entry.module, entry.class_name) not in seen:
            seen.add((entry.module, entry.class_name))
            if capability in entry.capabilities:
                schemes.append(scheme)
    return schemes
