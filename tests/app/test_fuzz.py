"""Fuzz the HTTP API from its OpenAPI document: no input yields a 500, every reply matches the
schema (status, content type, body, each SSE event), schema-valid requests are accepted and
schema-violating ones refused.

Runs in-process through schemathesis' ASGI transport, which starts the app's lifespan. SSE routes
stream until the client leaves, so their requests get a short read timeout: the transport keeps
the events streamed by then and validates them. The WebSocket is not in OpenAPI; its hostile input
is covered by the WebSocket tests.

CI runs a fixed (derandomized) set of 40 examples per operation, so a run is reproducible; set
`FUZZ_EXAMPLES` for a longer local run. The regression tests below are the failures it found.
"""

from __future__ import annotations

import os

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import RunningGateway

app = create_app(Settings())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)

# Long enough for a stream to start on a busy machine (its first bytes come within this too).
STREAM_READ_SECONDS = 0.25


def parameters_depend_on_each_other(case: schemathesis.Case) -> bool:
    """Requests OpenAPI cannot call invalid, which the gateway refuses (422) as it should:
    `/events` with neither a channel nor a pattern, a `consumer`, `prefetch` or `start` without
    its `group`, a `group` asked for `history` (a group resumes from its pending messages); and a
    publish whose idempotency key an earlier example used for another body (422
    `idempotency_key_reused`)."""
    if any(name.lower() == "idempotency-key" for name in case.headers or {}):
        return True
    messages = case.body.get("messages") if isinstance(case.body, dict) else None
    if isinstance(messages, list) and any(
        isinstance(item, dict) and "idempotency_key" in item for item in messages
    ):
        return True
    query = case.query or {}
    if case.path == "/events":
        return not query.get("channel") and not query.get("pattern")
    if "group" in query:
        return query.get("history") is not None
    return any(name in query for name in ("consumer", "prefetch", "start"))


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(
        timeout=STREAM_READ_SECONDS if case.path.endswith("/events") else 10,
        excluded_checks=[positive_data_acceptance] if parameters_depend_on_each_other(case) else [],
    )


# -- what the fuzzer found ----------------------------------------------------------------------


def test_request_bodies_have_no_dangling_references() -> None:
    """`$ref: #/$defs/...` inside an inline request body resolved against the document root."""
    assert b"#/$defs/" not in orjson.dumps(app.openapi())


@pytest.mark.anyio
async def test_an_invalid_event_query_is_refused_beside_a_json_body(
    gateway: RunningGateway,
) -> None:
    async with gateway.client() as http:
        reply = await http.post(
            "/channels/c/publish", params={"event": ""}, json={"data": 1, "event": "ok"}
        )
    assert reply.status_code == 422


@pytest.mark.anyio
async def test_acks_beyond_the_documented_limit_are_refused(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        reply = await http.post("/channels/c/groups/g/ack", json={"ids": ["x"] * 10_001})
    assert reply.status_code == 422
    assert "10000" in reply.json()["detail"]


@pytest.mark.anyio
async def test_a_consumer_needs_a_group(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        reply = await http.get("/channels/c/events", params={"consumer": "c1"})
    assert reply.status_code == 422
