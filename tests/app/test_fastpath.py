"""The publish fast path answers exactly as the FastAPI route: the same request, sent to a gateway
with the fast path and to one without it, gets the same status, headers and body."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from app.api.fastpath import PublishFastPath
from tests.app.conftest import RunningGateway, serve, serve_without
from tests.app.test_auth import SECRET, bearer, token

pytestmark = pytest.mark.anyio

SETTINGS: dict[str, Any] = {
    "jwt_secret": SECRET,
    "cors_origins": "https://app.example",
    "max_payload_bytes": 64,
    "channels": "ok.*",
}
REQUEST_ID = {"X-Request-ID": "same-request"}


def without_fast_path(**settings: Any) -> AbstractContextManager[RunningGateway]:
    """A gateway whose publishes all go through FastAPI's router."""
    return serve_without(PublishFastPath, **settings)


def cases() -> list[tuple[str, dict[str, Any]]]:
    publish = token(publish=["ok.*"])
    json = {"Content-Type": "application/json", **bearer(publish)}
    return [
        ("/channels/ok.a/publish", {"content": b'{"data": 1}', "headers": json}),
        ("/channels/ok.a/publish?event=e", {"content": "text", "headers": bearer(publish)}),
        ("/channels/ok.a/publish", {"content": b'{"data": 1}', "headers": {}}),
        ("/channels/ok.a/publish", {"content": b"{}", "headers": bearer("not-a-jwt")}),
        ("/channels/ok.a/publish", {"content": b'{"data":1}', "headers": bearer(token())}),
        ("/channels/other/publish", {"content": b'{"data": 1}', "headers": json}),
        ("/channels/ok..a/publish", {"content": b'{"data": 1}', "headers": json}),
        ("/channels/ok.a/publish", {"content": b"{nope", "headers": json}),
        ("/channels/ok.a/publish", {"content": b"[1]", "headers": json}),
        ("/channels/ok.a/publish", {"content": b'{"data": 1, "x": 2}', "headers": json}),
        ("/channels/ok.a/publish", {"content": b'{"event": 3}', "headers": json}),
        ("/channels/ok.a/publish", {"content": b'{"data": "%s"}' % (b"x" * 80), "headers": json}),
        ("/channels/ok.a/publish?event=bad%20type", {"content": b"{}", "headers": json}),
        (
            "/channels/ok.a/publish",
            {"content": b"<a/>", "headers": {**json, "Content-Type": "application/xml"}},
        ),
        (
            "/channels/ok.a/publish",
            {"content": b'{"data": 1}', "headers": {**json, "Origin": "https://app.example"}},
        ),
        ("/channels/ok.a/publish/", {"content": b'{"data": 1}', "headers": json}),
    ]


def reply(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {k: v for k, v in response.headers.items() if k not in ("date", "content-length")}
    if "location" in headers:  # a redirect names the server's own port
        headers["location"] = urlsplit(headers["location"]).path
    body: Any = response.content
    if response.headers.get("content-type") == "application/json":
        body = response.json()
        if isinstance(body, dict) and "id" in body:
            body["id"] = "<id>"  # each gateway numbers its own messages
    return response.status_code, headers, body


async def test_every_publish_reply_is_the_routes_reply() -> None:
    answers: list[list[tuple[int, dict[str, str], Any]]] = []
    for make in (serve, without_fast_path):
        with make(**SETTINGS) as gateway:
            async with gateway.client() as http:
                answers.append(
                    [
                        reply(
                            await http.post(
                                path, **{**options, "headers": {**options["headers"], **REQUEST_ID}}
                            )
                        )
                        for path, options in cases()
                    ]
                )
    fast, routed = answers
    for case, a, b in zip(cases(), fast, routed, strict=True):
        assert a == b, case
    assert {status for status, _, _ in fast} == {200, 307, 400, 401, 403, 413, 415, 422}


async def test_the_fast_path_answers_publishes_without_the_route(gateway: RunningGateway) -> None:
    gateway.app.router.routes = [
        r
        for r in gateway.app.router.routes
        if getattr(r, "path", "") != "/channels/{channel}/publish"
    ]
    async with gateway.client() as http:
        response = await http.post("/channels/a/publish", json={"data": 1})
    assert response.status_code == 200, response.text
    assert response.json()["channel"] == "a"
    assert response.headers["x-request-id"]
