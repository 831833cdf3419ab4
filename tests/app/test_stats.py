"""`GET /stats`: the per-process numbers the web console draws."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from tests.app.conftest import RunningGateway, serve
from tests.app.test_auth import SECRET, bearer, token

pytestmark = pytest.mark.anyio


async def test_stats_count_subscribers_messages_and_groups(gateway: RunningGateway) -> None:
    async with gateway.client() as http:
        fresh = (await http.get("/stats")).json()
        assert fresh == {
            "layer": "memory",
            "subscribers": {"sse": 0, "ws": 0},
            "published": 0,
            "delivered": {"sse": 0, "ws": 0},
            "dropped": {"sse": 0, "ws": 0},
            "groups": [],
        }
        async with (
            gateway.sse("/channels/news/events") as news,
            gateway.sse("/channels/jobs/events?group=workers&consumer=w1") as jobs,
            connect(gateway.ws_url),
        ):
            # the WebSocket counts once the server accepted it, just after the client saw that
            await until_stats(http, lambda stats: stats["subscribers"] == {"sse": 2, "ws": 1})
            await http.post("/publish", json={"messages": [{"channel": "news", "data": 1}] * 3})
            await http.post("/channels/jobs/publish", json={"data": "job"})
            with anyio.fail_after(10):
                await news.take(3)
                await jobs.next()
            stats = (await http.get("/stats")).json()
            assert stats["published"] == 4
            assert stats["delivered"] == {"sse": 4, "ws": 0}
            assert stats["groups"] == [
                {
                    "channel": "jobs",
                    "group": "workers",
                    "consumers": 1,
                    "members": [{"name": "w1", "in_flight": 1, "prefetch": 10}],
                }
            ]
        await until_stats(http, lambda stats: stats["subscribers"] == {"sse": 0, "ws": 0})
        assert (await http.get("/stats")).json()["groups"] == []


async def until_stats(http: httpx.AsyncClient, check: Callable[[dict[str, Any]], bool]) -> None:
    """Poll `/stats` until `check` holds: the server updates it when it notices a connection."""
    with anyio.fail_after(10):
        while not check((await http.get("/stats")).json()):  # noqa: ASYNC110 - server state
            await anyio.sleep(0.02)


async def test_groups_are_listed_only_for_channels_whose_groups_the_token_may_consume() -> None:
    with serve(jwt_secret=SECRET) as secured:
        jobs = token(groups=["jobs"], sub="c")
        async with (
            secured.client(headers=bearer(jobs)) as http,
            secured.sse("/channels/jobs/events?group=w&consumer=c", headers=bearer(jobs)),
            secured.sse(
                "/channels/secret/events?group=w&consumer=c",
                headers=bearer(token(groups=["secret"], sub="c")),
            ),
        ):
            await until_stats(http, lambda stats: stats["subscribers"]["sse"] == 2)
            assert (await http.get("/stats")).json()["groups"] == [
                {
                    "channel": "jobs",
                    "group": "w",
                    "consumers": 1,
                    "members": [{"name": "c", "in_flight": 0, "prefetch": 10}],
                }
            ]
            async with secured.client() as without_token:
                anonymous = await without_token.get("/stats")
            assert anonymous.status_code == 401
            assert anonymous.json()["error"] == "token_required"
            bad = await http.get("/stats", headers=bearer("not-a-token"))
            assert bad.status_code == 401
