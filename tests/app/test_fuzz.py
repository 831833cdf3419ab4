"""Fuzz the HTTP API from its OpenAPI document: no input yields a 500, every reply matches the
schema (status, content type, body, each SSE event), schema-valid requests are accepted and
schema-violating ones refused.

Runs in-process through schemathesis' ASGI transport, which starts the app's lifespan. SSE routes
stream until the client leaves, so their requests get a short read timeout: the transport keeps
the events streamed by then and validates them. The WebSocket is not in OpenAPI; its hostile input
is covered by the WebSocket tests. `FUZZ_EXAMPLES` sets the examples per operation (CI: 40).
"""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from app.settings import Settings

app = create_app(Settings())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)

STREAM_READ_SECONDS = 0.05


def parameters_depend_on_each_other(case: schemathesis.Case) -> bool:
    """Requests OpenAPI cannot call invalid, which the gateway refuses (422) as it should:
    `/events` with neither a channel nor a pattern, a `consumer` without its `group`, a `group`
    asked for `history` (a group resumes from its pending messages)."""
    query = case.query or {}
    if case.path == "/events":
        return not query.get("channel") and not query.get("pattern")
    if "group" in query:
        return query.get("history") is not None
    return "consumer" in query


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(
        timeout=STREAM_READ_SECONDS if case.path.endswith("/events") else 10,
        excluded_checks=[positive_data_acceptance] if parameters_depend_on_each_other(case) else [],
    )
