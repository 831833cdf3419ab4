"""The layer registry (`layers.registry.LAYERS`) agrees with the layer classes it names."""

from __future__ import annotations

import importlib

import pytest

from layers import CapabilityNotSupported, InMemoryChannelLayer
from layers.registry import LAYERS, layers_with


@pytest.mark.parametrize("scheme", list(LAYERS))
def test_the_registry_states_each_layers_capabilities(scheme: str) -> None:
    entry = LAYERS[scheme]
    layer_class = getattr(importlib.import_module(entry.module), entry.class_name)
    kept = {
        name
        for name in ("history", "groups", "idempotency")
        if getattr(layer_class.capabilities, name)
    }
    assert kept == entry.capabilities


def test_a_missing_capability_names_the_layers_that_have_it() -> None:
    class Forgetful(InMemoryChannelLayer):
        scheme = "forgetful"

    lacks = Forgetful()._lacks("history")
    assert isinstance(lacks, CapabilityNotSupported)
    assert lacks.detail == (
        "the forgetful:// layer has no history; configure a layer that keeps it: "
        "memory://, redis+streams://, postgresql:// or nats://"
    )
    assert layers_with("groups") == ["memory", "redis+streams", "postgresql", "mqtt", "nats"]
    assert layers_with("idempotency") == ["memory", "redis", "redis+streams", "postgresql", "nats"]
    assert "consumer groups" in Forgetful()._lacks("groups").detail
