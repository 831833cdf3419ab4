"""FastAPI's native OpenTelemetry: off unless `GATEWAY_OPENTELEMETRY` asks for it (then each
request is traced by the configured SDK; off, no request pays for looking one up)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from opentelemetry import trace

from tests.app.conftest import serve

pytestmark = pytest.mark.anyio


class RecordingTracer(trace.NoOpTracer):
    def __init__(self) -> None:
        self.spans: list[str] = []

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
        self.spans.append(name)
        return super().start_span(name, *args, **kwargs)


class RecordingProvider(trace.TracerProvider):
    """An SDK's place: a configured tracer provider that records the spans started."""

    def __init__(self) -> None:
        self.tracer = RecordingTracer()

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return self.tracer


@pytest.mark.parametrize("on", [False, True])
async def test_requests_are_traced_only_when_asked(
    on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = RecordingProvider()
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)  # what setting up an SDK does
    with serve(opentelemetry=on) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            assert (await http.get("/healthz")).status_code == 200
            published = await http.post("/channels/t/publish", json={"data": 1})
            assert published.status_code == 200
    assert bool(provider.tracer.spans) is on
