"""The committed OpenAPI document is the app's, and it documents every route."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from app.openapi import export
from tests.app.conftest import RunningGateway

pytestmark = pytest.mark.anyio

COMMITTED = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
CANNOT_FAIL = {"/healthz", "/", "/metrics"}  # routes with no error reply to document


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]


def test_committed_document_matches_the_app() -> None:
    assert COMMITTED.read_bytes() == export(), (
        "openapi/openapi.json is stale: run `python -m app.openapi > openapi/openapi.json`"
    )


def test_every_operation_has_summary_bodies_and_errors() -> None:
    document = orjson.loads(export())
    found = operations(document)
    assert len(found) >= 10
    for path, method, operation in found:
        where = f"{method.upper()} {path}"
        assert operation.get("summary"), where
        success = operation["responses"].get("200") or operation["responses"]["204"]
        for media in success.get("content", {}).values():
            assert media.get("schema"), where
        if method == "post":
            for media in operation["requestBody"]["content"].values():
                assert media.get("schema"), where
        failures = {code: reply for code, reply in operation["responses"].items() if code >= "400"}
        if path not in CANNOT_FAIL:
            assert failures, where
        for code, reply in failures.items():
            schema = reply["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorReply"}, (where, code)
            assert reply["description"], (where, code)


def test_websocket_protocol_is_described() -> None:
    websocket = orjson.loads(export())["x-websocket"]
    assert websocket["path"] == "/ws"
    assert set(websocket["client_frames"]) == {
        "subscribe",
        "unsubscribe",
        "publish",
        "ack",
        "nack",
        "extend",
    }
    assert set(websocket["server_frames"]) == {"message", "gap", "ok", "error"}


async def test_served_document_is_the_exported_one(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        served = (await http.get("/openapi.json")).json()
    assert served == orjson.loads(export())
