"""`create_layer(url)`: pick a layer from the URL scheme and import its driver only then."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import LayerConfigurationError
from .registry import LAYERS
from .urls import redact

if TYPE_CHECKING:
    from .base import ChannelLayer

HISTORY_OPTIONS = ("history_size", "history_ttl")
IDEMPOTENCY_OPTIONS = ("idempotency_ttl",)


def create_layer(url: str = "memory://", **options: Any) -> ChannelLayer:
    """Build the layer for `url`; `options` (history_size, history_ttl, idempotency_ttl, ...) go
    to its constructor.

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
    if not layer_class.capabilities.idempotency:
        options = {k: v for k, v in options.items() if k not in IDEMPOTENCY_OPTIONS}
    if scheme == "memory":
        return layer_class(**options)
    return layer_class(url, **options)  # type: ignore[call-arg]
