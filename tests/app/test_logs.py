"""Request ids: taken from a sane `X-Request-ID`, made otherwise, returned on every response."""

from __future__ import annotations

import logging

import pytest

from app.logs import REQUEST_ID, RequestIdFilter
from tests.app.conftest import RunningGateway

pytestmark = pytest.mark.anyio


async def test_request_id_is_echoed_or_made(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        given = await http.get("/healthz", headers={"X-Request-ID": "lb-1234.abc"})
        made = await http.get("/healthz", headers={"X-Request-ID": "not ok!" * 30})
        error = await http.post("/channels/bad name/publish", json={"data": 1})
    assert given.headers["x-request-id"] == "lb-1234.abc"
    assert len(made.headers["x-request-id"]) == 16
    assert error.status_code == 422 and len(error.headers["x-request-id"]) == 16


def test_records_carry_the_request_id() -> None:
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "hello", None, None)
    token = REQUEST_ID.set("abc")
    try:
        assert RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    assert record.request_id == "abc"  # type: ignore[attr-defined]
