"""`create_layer(url)`: pick a layer from the URL scheme and import its driver only then."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from .errors import LayerConfigurationError
from .urls import redact

if TYPE_CHECKING:  # `base` asks this registry which layers keep a capability
    from .base import ChannelLayer

HISTORY_OPTIONS = ("history_size", "history_ttl")


class LayerEntry(NamedTuple):
    module: str
    class_name: str
    extra: str | None  # the pip extra that installs the driver
    capabilities: frozenset[str]  # which of history, groups the class has (a test checks it)


_HG = frozenset({"history", "groups"})

# scheme -> layer; the first scheme of a class is the one hints name.
LAYERS: dict[str, LayerEntry] = {
    "memory": LayerEntry("layers.memory", "InMemoryChannelLayer", None, _HG),
    "redis": LayerEntry("layers.redis_pubsub", "RedisPubSubLayer", "redis", frozenset()),
    "rediss": LayerEntry("layers.redis_pubsub", "RedisPubSubLayer", "redis", frozenset()),
    "redis+streams": LayerEntry("layers.redis_streams", "RedisStreamsLayer", "redis", _HG),
    "rediss+streams": LayerEntry("layers.redis_streams", "RedisStreamsLayer", "redis", _HG),
    "postgresql": LayerEntry("layers.postgres", "PostgresLayer", "postgres", _HG),
    "postgres": LayerEntry("layers.postgres", "PostgresLayer", "postgres", _HG),
    "mqtt": LayerEntry("layers.mqtt", "MQTTLayer", "mqtt", frozenset({"groups"})),
    "mqtts": LayerEntry("layers.mqtt", "MQTTLayer", "mqtt", frozenset({"groups"})),
}


def layers_with(capability: str) -> list[str]:
    """The schemes (one per layer) of the layers that have `capability` ("history", "groups")."""
    seen: set[tuple[str, str]] = set()
    schemes = []
    for scheme, entry in LAYERS.items():
        if (entry.module, entry.class_name) not in seen:
            seen.add((entry.module, entry.class_name))
            if capability in entry.capabilities:
                schemes.append(scheme)
    return schemes


def create_layer(url: str = "memory://", **options: Any) -> ChannelLayer:
    """Build the layer for `url`; `options` (history_size, history_ttl, ...) go to its constructor.

    Layers other than memory take the URL as their first argument.
    """
    scheme = urlsplit(url).scheme.lower()
    try:
        module_name, class_name, extra, _ = LAYERS[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in LAYERS)
        raise LayerConfigurationError(
            f"unknown layer URL scheme {scheme!r} in {redact(url)!r}; use one of {known}"
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
