"""Publishing, history, groups and operations routes, through a real server."""

from __future__ import annotations

import logging
import socket

import anyio
import pytest

from tests.app.conftest import RunningGateway, serve, server_log
from tests.conftest import eventually

pytestmark = pytest.mark.anyio


async def test_publish_json_and_text(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        reply = await http.post(
            "/channels/chat.room/publish", json={"data": {"n": 1}, "event": "x"}
        )
        assert reply.status_code == 200
        assert reply.json()["channel"] == "chat.room"
        first = reply.json()["id"]
        text = await http.post(
            "/channels/chat.room/publish?event=note",
            content="plain words",
            headers={"content-type": "text/plain; charset=utf-8"},
        )
        assert text.status_code == 200
        history = (await http.get("/channels/chat.room/history")).json()
    assert [m["data"] for m in history["messages"]] == [{"n": 1}, "plain words"]
    assert [m["event"] for m in history["messages"]] == ["x", "note"]
    assert history["messages"][0]["id"] == first
    assert history["gap"] is False
    assert history["messages"][0]["published_at"].endswith("Z")


async def test_batch_publish_returns_ids_in_order(gateway: RunningGateway) -> None:
    messages = [{"channel": f"b.{n % 3}", "data": n} for n in range(9)]
    async with gateway.client() as http:
        reply = await http.post("/publish", json={"messages": messages})
        assert reply.status_code == 200
        published = reply.json()["published"]
        assert [p["channel"] for p in published] == [m["channel"] for m in messages]
        history = (await http.get("/channels/b.1/history")).json()["messages"]
    assert [m["data"] for m in history] == [1, 4, 7]
    assert [m["id"] for m in history] == [published[n]["id"] for n in (1, 4, 7)]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [
        (
            "/channels/c/publish",
            {"content": b"{bad", "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
        ),
        (
            "/channels/c/publish",
            {"content": b"a=1", "headers": {"content-type": "application/x-www-form-urlencoded"}},
            415,
            "unsupported_media_type",
        ),
        ("/channels/c/publish", {"json": {"nodata": 1}}, 422, "invalid_argument"),
        ("/channels/c/publish", {"json": {"data": 1, "extra": 2}}, 422, "invalid_argument"),
        ("/channels/c/publish", {"json": [1, 2]}, 422, "invalid_argument"),
        (
            "/channels/c/publish",
            {"json": {"data": 1, "event": "bad type"}},
            422,
            "invalid_argument",
        ),
        ("/channels/c/publish", {"json": {"data": 1, "event": 5}}, 422, "invalid_argument"),
        ("/channels/bad..name/publish", {"json": {"data": 1}}, 422, "invalid_argument"),
        ("/channels/a%20b/publish", {"json": {"data": 1}}, 422, "invalid_argument"),
        (
            "/channels/c/publish",
            {"content": b"\xff\xfe", "headers": {"content-type": "text/plain"}},
            400,
            "invalid_text",
        ),
        ("/publish", {"json": {"messages": []}}, 422, "invalid_argument"),
        (
            "/publish",
            {"json": {"messages": [{"channel": "ok", "data": 1}, {"channel": "no..", "data": 2}]}},
            422,
            "invalid_argument",
        ),
        ("/publish", {"json": {"messages": [5]}}, 422, "invalid_argument"),
        ("/channels/c/groups/g/ack", {"json": {"ids": "1"}}, 422, "invalid_argument"),
        ("/channels/c/groups/nobody/ack", {"json": {"ids": ["1"]}}, 404, "unknown_group"),
    ],
)
async def test_bad_input_is_a_json_error(
    gateway: RunningGateway, path: str, kwargs: dict[str, object], status: int, code: str
) -> None:
    async with gateway.client() as http:
        reply = await http.post(path, **kwargs)  # type: ignore[arg-type]
        assert reply.status_code == status, reply.text
        body = reply.json()
        assert body["error"] == code
        assert body["detail"]
        # nothing was published by a refused request
        history = (await http.get("/channels/ok/history")).json()
        assert history["messages"] == []


async def test_batch_error_names_the_message(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        reply = await http.post(
            "/publish",
            json={"messages": [{"channel": "ok", "data": 1}, {"channel": "x y", "data": 1}]},
        )
    assert reply.status_code == 422
    assert reply.json()["detail"].startswith("messages[1]")


async def test_payload_over_the_limit_is_413() -> None:
    with serve(max_payload_bytes=100) as gateway:
        async with gateway.client() as http:
            reply = await http.post("/channels/c/publish", json={"data": "x" * 200})
            assert reply.status_code == 413
            assert reply.json()["error"] == "payload_too_large"

            async def chunks():  # no Content-Length: the limit applies while reading
                for _ in range(10):
                    yield b'"' + b"x" * 50

            streamed = await http.post(
                "/channels/c/publish",
                content=chunks(),
                headers={"content-type": "application/json"},
            )
            assert streamed.status_code == 413
            ok = await http.post("/channels/c/publish", json={"data": "small"})
            assert ok.status_code == 200


async def test_unknown_routes_and_methods(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        missing = await http.get("/nothing/here")
        assert missing.status_code == 404
        assert missing.json()["error"] == "not_found"
        wrong = await http.get("/channels/c/publish")
        assert wrong.status_code == 405
        assert wrong.json()["error"] == "method_not_allowed"
        unknown_group = await http.get("/channels/c/groups/nobody")
        assert unknown_group.status_code == 404
        assert unknown_group.json()["error"] == "unknown_group"
        bad_limit = await http.get("/channels/c/history?limit=0")
        assert bad_limit.status_code == 422
        assert bad_limit.json()["error"] == "invalid_argument"


async def test_history_after_and_limit(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        ids = [
            (await http.post("/channels/h/publish", json={"data": n})).json()["id"]
            for n in range(5)
        ]
        after = (await http.get("/channels/h/history", params={"after": ids[1], "limit": 2})).json()
        assert [m["id"] for m in after["messages"]] == ids[2:4]
        newest = (await http.get("/channels/h/history", params={"limit": 2})).json()
        assert [m["data"] for m in newest["messages"]] == [3, 4]
        foreign = (await http.get("/channels/h/history", params={"after": "nope"})).json()
        assert foreign["gap"] is True


async def test_health_readiness_and_metrics(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = (await http.get("/readyz")).json()
        assert ready["status"] == "ready"
        assert ready["layer"] == "memory"
        await http.post("/channels/m/publish", json={"data": 1})
        async with gateway.sse("/channels/m/events?history=1", client=gateway.client()) as stream:
            await stream.next()
            metrics = (await http.get("/metrics")).text
            assert 'gateway_subscribers_active{layer="memory",transport="sse"} 1.0' in metrics
        assert 'gateway_messages_published_total{layer="memory"} 1.0' in metrics
        assert 'gateway_messages_delivered_total{layer="memory",transport="sse"} 1.0' in metrics


async def test_group_ack_and_info_over_http(gateway: RunningGateway) -> None:
    async with (
        gateway.client() as http,
        gateway.sse("/channels/jobs/events?group=workers&consumer=w1") as stream,
    ):
        await http.post("/channels/jobs/publish", json={"data": "job"})
        event = await stream.next()
        envelope = event.json
        assert envelope["deliveries"] == 1
        info = (await http.get("/channels/jobs/groups/workers")).json()
        assert info["pending"] == 1
        assert info["oldest_unacked"]["id"] == envelope["id"]
        assert {c["name"] for c in info["consumers"]} == {"w1"}
        ack = await http.post(
            "/channels/jobs/groups/workers/ack", json={"ids": [envelope["id"], "x-1"]}
        )
        assert ack.json() == {"acked": 1, "unknown": ["x-1"]}
        assert (await http.get("/channels/jobs/groups/workers")).json()["pending"] == 0


async def test_allow_list_limits_channels_and_patterns() -> None:
    with serve(channels="public.*,news") as gateway, anyio.fail_after(10):
        async with gateway.client() as http:
            assert (await http.post("/channels/news/publish", json={"data": 1})).status_code == 200
            assert (
                await http.post("/channels/public.a/publish", json={"data": 1})
            ).status_code == 200
            denied = await http.post("/channels/private/publish", json={"data": 1})
            assert denied.status_code == 403
            assert denied.json()["error"] == "channel_not_allowed"
            wide = await http.get("/events", params={"pattern": "*"})
            assert wide.status_code == 403
            async with gateway.sse("/events?pattern=public.a*") as stream:
                await http.post("/channels/public.ab/publish", json={"data": "in"})
                assert (await stream.next()).json["data"] == "in"


async def test_connection_limit_is_503() -> None:
    with serve(max_connections=1) as gateway, anyio.fail_after(10):
        async with gateway.sse("/channels/c/events"), gateway.client() as http:
            second = await http.get("/channels/c/events")
            assert second.status_code == 503
            assert second.headers["retry-after"]
            assert second.json()["error"] == "too_many_connections"


async def test_too_many_channels_in_one_subscription() -> None:
    with serve(max_channels_per_subscription=2) as gateway:
        async with gateway.client() as http:
            reply = await http.get("/events", params={"channel": ["a", "b", "c"]})
    assert reply.status_code == 422
    assert reply.json()["error"] == "too_many_channels"


async def test_a_body_cut_short_is_not_logged_as_an_error(gateway: RunningGateway) -> None:
    with server_log() as log:
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            sock.sendall(
                b"POST /channels/c/publish HTTP/1.1\r\nHost: gateway\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"data":'
            )
        # nothing to await: an error would be logged within moments of the disconnect
        with anyio.move_on_after(1):
            await eventually(lambda: any(r.levelno >= logging.ERROR for r in log), within=1)
        async with gateway.client() as http:
            assert (await http.post("/channels/c/publish", json={"data": 1})).status_code == 200
    assert not [r.getMessage() for r in log if r.levelno >= logging.ERROR]
