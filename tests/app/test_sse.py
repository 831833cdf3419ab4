"""Server-Sent Events through a real server, read with a WHATWG-conformant parser."""

from __future__ import annotations

import anyio
import httpx
import pytest

from tests.app.conftest import RunningGateway, serve
from tests.conftest import eventually
from tests.sse import SSEParser, data_of

pytestmark = pytest.mark.anyio


async def publish(http: httpx.AsyncClient, channel: str, data: object, **extra: object) -> str:
    reply = await http.post(f"/channels/{channel}/publish", json={"data": data, **extra})
    assert reply.status_code == 200, reply.text
    message_id: str = reply.json()["id"]
    return message_id


async def test_stream_headers_framing_and_envelope(gateway: RunningGateway) -> None:
    async with gateway.client() as http, http.stream("GET", "/channels/news/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-accel-buffering"] == "no"
        parser = SSEParser()
        chunks = response.aiter_text()
        with anyio.fail_after(10):
            while parser.retry is None:
                parser.feed(await chunks.__anext__())
            assert parser.retry == 3000
            message_id = await publish(
                http, "news", {"text": "line1\nline2\r\n\u2028"}, event="alert"
            )
            events = []
            while not events:
                events = parser.feed(await chunks.__anext__())
    (event,) = events
    assert event.type == "alert"
    assert event.last_event_id == message_id
    envelope = event.json
    assert envelope == {
        "channel": "news",
        "id": message_id,
        "event": "alert",
        "data": {"text": "line1\nline2\r\n\u2028"},
        "published_at": envelope["published_at"],
    }


async def test_keepalive_comments_flow(gateway: RunningGateway) -> None:
    async with gateway.sse("/channels/quiet/events") as stream:
        with anyio.fail_after(5):
            chunks = stream.response.aiter_text()
            seen = ""
            while "keepalive" not in seen:
                seen += await chunks.__anext__()
    assert ": keepalive\n\n" in seen


async def test_several_channels_and_patterns(gateway: RunningGateway) -> None:
    path = "/events?channel=a&channel=b&pattern=room.*"
    async with gateway.client() as http, gateway.sse(path) as stream:
        for channel in ("a", "x", "room.1", "b", "roomy", "room.2.deep"):
            await publish(http, channel, channel)
        with anyio.fail_after(10):
            received = await stream.take(4)
    assert data_of(received) == ["a", "room.1", "b", "room.2.deep"]


async def test_events_needs_a_channel_or_pattern(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        reply = await http.get("/events")
        assert reply.status_code == 422
        bad = await http.get("/events", params={"pattern": "a[b]"})
        assert bad.status_code == 422
        assert bad.json()["error"] == "invalid_argument"


async def test_resume_with_messages_published_during_the_reconnect(
    gateway: RunningGateway,
) -> None:
    """The browser path: read some, drop, messages keep coming, reconnect with Last-Event-ID."""
    seen: list[int] = []
    stop = anyio.Event()
    async with gateway.client() as http:

        async def publisher() -> None:
            n = 0
            while not stop.is_set():
                await publish(http, "feed", n)
                n += 1
                await anyio.sleep(0.002)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(publisher)
                last_id = ""
                for round_ in range(4):
                    headers = {"Last-Event-ID": last_id} if last_id else {}
                    path = "/channels/feed/events" + ("" if last_id else "?history=1000")
                    async with gateway.sse(path, headers=headers) as stream:
                        for event in await stream.take(25 + round_):
                            seen.append(event.json["data"])
                            last_id = event.last_event_id
                stop.set()
            total = (await http.get("/channels/feed/history")).json()["messages"]
            async with gateway.sse(
                "/channels/feed/events", headers={"Last-Event-ID": last_id}
            ) as stream:
                remaining = [m for m in total if m["data"] > seen[-1]]
                for event in await stream.take(len(remaining)):
                    seen.append(event.json["data"])
    assert seen == list(range(len(seen)))
    assert seen[-1] == total[-1]["data"]


async def test_resume_by_query_parameter_across_channels_and_patterns(
    gateway: RunningGateway,
) -> None:
    async with gateway.client() as http:
        first = await publish(http, "one", 0)
        await publish(http, "two.x", 1)
        await publish(http, "one", 2)
        await publish(http, "other", "skip")
        path = f"/events?channel=one&pattern=two.*&last_event_id={first}"
        async with gateway.sse(path) as stream:
            with anyio.fail_after(10):
                replayed = await stream.take(2)
                await publish(http, "two.y", 3)
                live = await stream.next()
    assert data_of(replayed) == [1, 2]
    assert live.json["data"] == 3


async def test_header_wins_over_query_parameter(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        ids = [await publish(http, "pick", n) for n in range(3)]
        async with gateway.sse(
            f"/channels/pick/events?last_event_id={ids[0]}", headers={"Last-Event-ID": ids[1]}
        ) as stream:
            with anyio.fail_after(10):
                assert (await stream.next()).json["data"] == 2


async def test_evicted_id_opens_with_gap_then_remaining() -> None:
    with serve(history_size=3) as gateway:
        async with gateway.client() as http:
            ids = [await publish(http, "short", n) for n in range(10)]
            async with gateway.sse(
                "/channels/short/events", headers={"Last-Event-ID": ids[0]}
            ) as s:
                with anyio.fail_after(10):
                    gap, *rest = await s.take(4)
    assert gap.type == "gap"
    assert gap.json["reason"] == "evicted"
    assert gap.json["last_event_id"] == ids[0]
    assert gap.last_event_id == ""  # a gap does not move the browser's last event id
    assert data_of(rest) == [7, 8, 9]


async def test_history_n_on_fresh_connect(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        for n in range(5):
            await publish(http, "recent", n)
        async with gateway.sse("/channels/recent/events?history=2") as stream:
            with anyio.fail_after(10):
                assert data_of(await stream.take(2)) == [3, 4]


async def test_client_going_away_frees_the_subscription(gateway: RunningGateway) -> None:
    channel = gateway.gateway.channel
    async with gateway.sse("/channels/leave/events") as stream:
        with anyio.fail_after(5):
            await stream.response.aiter_text().__anext__()
        assert channel.subscriber_count == 1
    await eventually(lambda: not channel.subscriber_count and not gateway.gateway.connections)


async def test_disconnect_policy_ends_stream_with_error_and_retry() -> None:
    with serve(max_backlog=2, backlog_policy="disconnect") as gateway:
        async with (
            gateway.client() as http,
            http.stream("GET", "/channels/flood/events") as response,
        ):
            chunks = response.aiter_text()
            with anyio.fail_after(10):
                await chunks.__anext__()
                messages = [{"channel": "flood", "data": n} for n in range(50)]
                assert (await http.post("/publish", json={"messages": messages})).status_code == 200
                text = ""
                async for chunk in chunks:
                    text += chunk
    events = SSEParser().feed(text)
    assert events[-1].type == "error"
    assert events[-1].json["error"] == "subscriber_overflow"
    assert "retry: " in text


async def test_group_stream_ignores_browser_last_event_id(gateway: RunningGateway) -> None:
    async with (
        gateway.client() as http,
        gateway.sse(
            "/channels/work/events?group=g&consumer=c", headers={"Last-Event-ID": "whatever"}
        ) as stream,
    ):
        await publish(http, "work", "task")
        with anyio.fail_after(10):
            event = await stream.next()
    assert event.json["data"] == "task"
    assert event.json["deliveries"] == 1
