"""The stream fast path answers exactly as the FastAPI routes: the same request, sent to a gateway
with the fast path and to one without it, gets the same status, headers and body (for a stream,
its opening), and an open stream keeps nothing of its request."""

from __future__ import annotations

import gc
from contextlib import AbstractContextManager
from typing import Any

import anyio
import httpx
import orjson
import pytest
from starlette.requests import Request

from app.api.stream_path import StreamFastPath
from tests.app.conftest import RunningGateway, serve, serve_without
from tests.app.test_auth import SECRET, bearer, token
from tests.fixtures_redis import REDIS_URL, redis_reachable

pytestmark = pytest.mark.anyio

SETTINGS: dict[str, Any] = {
    "jwt_secret": SECRET,
    "cors_origins": "https://app.example",
    "channels": "ok.*",
    "max_channels_per_subscription": 3,
}
REQUEST_ID = {"X-Request-ID": "same-request"}
ORIGIN = {"Origin": "https://app.example"}


def without_fast_path(**settings: Any) -> AbstractContextManager[RunningGateway]:
    """A gateway whose streams all go through FastAPI's router."""
    return serve_without(StreamFastPath, **settings)


def cases() -> list[tuple[str, str, dict[str, str]]]:
    """(method, path, headers): good streams, and every kind of refusal."""
    reader = bearer(token(subscribe=["ok.*"]))
    worker = bearer(token(subscribe=["ok.*"], groups=["ok.*"], sub="w"))
    good = [
        "/channels/ok.a/events",
        "/channels/ok.a/events?last_event_id=0-0",
        "/channels/ok.a/events?history=2",
        "/channels/ok.a/events?presence=true",
        "/channels/ok.a/events?presence=0",
        "/events?channel=ok.a&channel=ok.b&pattern=ok.c.*",
        "/events?pattern=ok.*&history=1&presence=yes",
        f"/channels/ok.a/events?access_token={token(subscribe=['ok.*'])}",
    ]
    bad_parameters = [
        "/channels/ok.a/events?history=-1",
        "/channels/ok.a/events?history=100001",
        "/channels/ok.a/events?history=x",
        "/channels/ok.a/events?history=",
        "/channels/ok.a/events?history=1&history=nope",
        "/channels/ok.a/events?prefetch=0&group=g",
        "/channels/ok.a/events?prefetch=1001&group=g",
        "/channels/ok.a/events?prefetch=many&group=g",
        "/channels/ok.a/events?start=&group=g",
        f"/channels/ok.a/events?start={'x' * 201}&group=g",
        "/channels/ok.a/events?presence=maybe",
        "/channels/ok.a/events?presence=",
        "/channels/ok.a/events?history=x&prefetch=0&presence=maybe",
        "/channels/ok.a/events?consumer=w",
        "/channels/ok.a/events?prefetch=5",
        "/channels/ok..a/events",
        "/channels/ok.a%20b/events",
        "/events",
        "/events?channel=",
        "/events?pattern=ok.[",
        "/events?channel=ok.a&channel=ok.b&channel=ok.c&pattern=ok.*",
        "/events?presence=maybe&channel=ok.a",
    ]
    return [
        *[("GET", path, {**reader, **REQUEST_ID}) for path in good],
        ("GET", "/channels/ok.a/events?group=g&consumer=w:1", {**worker, **REQUEST_ID}),
        ("GET", "/channels/ok.a/events?group=h&prefetch=5&start=earliest", worker),
        ("GET", "/channels/ok.a/events", {**reader, "Last-Event-ID": "0-0"}),
        ("GET", "/channels/ok.a/events?last_event_id=x", {**reader, "Last-Event-ID": ""}),
        ("GET", "/channels/ok.a/events", {**reader, **ORIGIN}),
        ("GET", "/channels/ok.a/events", {**reader, "Origin": "https://elsewhere.example"}),
        *[("GET", path, {**reader, **REQUEST_ID}) for path in bad_parameters],
        # auth: none, a bad token, an expired one, one without the right
        ("GET", "/channels/ok.a/events", REQUEST_ID),
        ("GET", "/channels/ok.a/events?history=x", REQUEST_ID),
        ("GET", "/channels/ok.a/events", bearer("not-a-jwt")),
        ("GET", "/channels/ok.a/events", bearer(token(subscribe=["ok.*"], ttl=-10))),
        ("GET", "/channels/ok.a/events", bearer(token(subscribe=["other"]))),
        ("GET", "/events?pattern=ok.*", bearer(token(subscribe=["ok.a"]))),
        ("GET", "/channels/ok.a/events?group=g", reader),
        ("GET", "/channels/ok.a/events?group=g&consumer=someone", worker),
        ("GET", "/channels/other/events", reader),
        ("GET", "/events?pattern=*", reader),
        # what the routes and the router answer alike
        ("GET", "/channels/ok.a/b/events", reader),
        ("GET", "/channels/ok.a/events/", reader),
        ("GET", "/events/", reader),
        ("HEAD", "/channels/ok.a/events", reader),
        ("POST", "/channels/ok.a/events", reader),
        # CORS preflight
        (
            "OPTIONS",
            "/channels/ok.a/events",
            {
                **ORIGIN,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "Last-Event-ID, Authorization",
            },
        ),
        ("OPTIONS", "/events", {**ORIGIN, "Access-Control-Request-Method": "DELETE"}),
    ]


Reply = tuple[int, dict[str, str], Any]


async def answer(http: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]) -> Reply:
    """Status, headers (but the date and the generated request id) and body; of a stream, what
    it sends first (`: connected` and the `retry:` hint)."""
    async with http.stream(method, path, headers=headers) as response:
        kept = {k: v for k, v in response.headers.items() if k not in ("date", "content-length")}
        if "x-request-id" not in headers:
            kept["x-request-id"] = "<generated>" if kept.get("x-request-id") else "<none>"
        if "location" in kept:  # a redirect names the server's own port
            kept["location"] = httpx.URL(kept["location"]).raw_path.decode()
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            opening = b""
            with anyio.fail_after(10):
                async for chunk in response.aiter_raw():
                    opening += chunk
                    if opening.count(b"\n\n") >= 1:
                        break
            return response.status_code, kept, opening
        body = await response.aread()
        parsed: Any = body
        if body and response.headers.get("content-type") == "application/json":
            parsed = orjson.loads(body)
        return response.status_code, kept, parsed


async def replies(make: Any, settings: dict[str, Any]) -> list[Reply]:
    with make(**settings) as gateway:
        async with gateway.client() as http:
            return [await answer(http, *case) for case in cases()]


async def test_every_stream_reply_is_the_routes_reply() -> None:
    fast = await replies(serve, SETTINGS)
    routed = await replies(without_fast_path, SETTINGS)
    for case, a, b in zip(cases(), fast, routed, strict=True):
        assert a == b, case
    statuses = {status for status, _, _ in fast}
    assert statuses == {200, 307, 400, 401, 403, 404, 405, 422}, statuses


@pytest.mark.skipif(not redis_reachable(REDIS_URL), reason="no Redis at TEST_REDIS_URL")
async def test_a_missing_capability_is_the_routes_501() -> None:
    settings = {"layer": REDIS_URL}
    paths = [
        "/channels/a/events?history=3",
        "/channels/a/events?group=g",
        "/channels/a/events?last_event_id=1",
        "/events?channel=a&history=1",
    ]
    answers = []
    for make in (serve, without_fast_path):
        with make(**settings) as gateway:
            async with gateway.client() as http:
                answers.append([await answer(http, "GET", p, REQUEST_ID) for p in paths])
    fast, routed = answers
    assert fast == routed
    assert [status for status, _, _ in fast] == [501, 501, 200, 501]


async def test_the_fast_path_serves_streams_without_the_routes(gateway: RunningGateway) -> None:
    gateway.app.router.routes = [
        r
        for r in gateway.app.router.routes
        if getattr(r, "path", "") not in ("/channels/{channel}/events", "/events")
    ]
    async with gateway.sse("/channels/a/events") as stream, gateway.client() as http:
        assert stream.response.headers["x-request-id"]
        assert (await http.post("/channels/a/publish", json={"data": 1})).status_code == 200
        with anyio.fail_after(10):
            event = await stream.next()
        assert event.json["data"] == 1


def open_requests(path: str) -> list[Request]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, Request) and o.scope.get("path") == path]


async def test_an_open_stream_keeps_nothing_of_its_request(gateway: RunningGateway) -> None:
    channel = gateway.gateway.channel
    async with gateway.sse("/channels/kept/events?history=1&presence=true"):
        assert channel.subscriber_count == 1
        assert not open_requests("/channels/kept/events")
    async with gateway.sse("/events?channel=kept&pattern=k.*"):
        assert not open_requests("/events")
