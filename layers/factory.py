"""`create_layer(url)`: pick a layer from the URL scheme and import its driver only then."""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from .base import ChannelLayer
from .errors import LayerConfigurationError

HISTORY_OPTIONS = ("history_size", "history_ttl")

# scheme -> (module, class, pip extra that installs the driver)
LAYERS: dict[str, tuple[str, str, str | None]] = {
    "memory": ("layers.memory", "InMemoryChannelLayer", None),
    "redis": ("layers.redis_pubsub", "RedisPubSubLayer", "redis"),
    "rediss": ("layers.redis_pubsub", "RedisPubSubLayer", "redis"),
    "redis+streams": ("layers.redis_streams", "RedisStreamsLayer", "redis"),
    "rediss+streams": ("layers.redis_streams", "RedisStreamsLayer", "redis"),
    "postgresql": ("layers.postgres", "PostgresLayer", "postgres"),
    "postgres": ("layers.postgres", "PostgresLayer", "postgres"),
    "mqtt": ("layers.mqtt", "MQTTLayer", "mqtt"),
    "mqtts": ("layers.mqtt", "MQTTLayer", "mqtt"),
    "nats": ("layers.nats_jetstream", "NatsJetStreamLayer", "nats"),
    "tls": ("layers.nats_jetstream", "NatsJetStreamLayer", "nats"),
}


def create_layer(url: str = "memory://", **options: Any) -> ChannelLayer:
    """Build the layer for `url`; `options` (history_size, history_ttl, ...) go to its constructor.

    Layers other than memory take the URL as their first argument.
    """
    scheme = urlsplit(url).scheme.lower()
    try:
        module_name, class_name, extra = LAYERS[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in LAYERS)
        raise LayerConfigurationError(
            f"unknown layer URL scheme {scheme!r} in {url!r}; use one of {known}"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise LayerConfigurationError(f"the {scheme}:// layer is not available") from None
        raise LayerConfigurationError(
            f"the {scheme}:// layer needs the {exc.name!r} driver: "
            f"pip install 'channels-gateway[{extra}]'"
        ) from None
    layer_class: type[ChannelLayer] = getattr(module, class_name)
    if not layer_class.capabilities.history:
        # The gateway passes its history settings to any layer; one that keeps none takes none.
        options = {key: value for key, value in options.items() if key not in HISTORY_OPTIONS}
    if scheme == "memory":
        return layer_class(**options)
    return layer_class(url, **options)  # type: ignore[call-arg]
