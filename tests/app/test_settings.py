"""Settings from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.settings import Settings


def test_defaults_are_the_one_process_memory_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(_env_file=None)
    assert settings.layer == "memory://"
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8000, 1)


def test_lists_take_json_or_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CHANNELS", "chat.*, news")
    monkeypatch.setenv("GATEWAY_CORS_ORIGINS", '["https://a.example", "https://b.example"]')
    settings = Settings(_env_file=None)
    assert settings.channels == ["chat.*", "news"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]


def test_memory_layer_refuses_several_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_WORKERS", "2")
    with pytest.raises(ValidationError, match="choose a cross-process layer"):
        Settings(_env_file=None)
    monkeypatch.setenv("GATEWAY_LAYER", "redis://127.0.0.1:6379/0")
    assert Settings(_env_file=None).workers == 2


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_BACKLOG_POLICY", "block")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)
    monkeypatch.delenv("GATEWAY_BACKLOG_POLICY")
    monkeypatch.setenv("GATEWAY_CHANNELS", "bad glob")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)
