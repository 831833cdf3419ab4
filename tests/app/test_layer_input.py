"""Hostile ids and anonymous group consumers through the HTTP API, on the layers with history and
groups: ids a layer did not issue are unknown ids (never a 503 from the broker refusing them),
and group connects without `consumer=` leave no consumer behind."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from tests.app.conftest import RunningGateway, serve
from tests.conftest import eventually

pytestmark = pytest.mark.anyio

STRANGE_IDS = ["0-99999999999999999999999", "99999999999999999999999-0", "9" * 300, "1-²"]


@pytest.fixture(params=["memory", "redis+streams", "postgresql"])
def layer_gateway(request: pytest.FixtureRequest) -> Iterator[RunningGateway]:
    scheme: str = request.param
    if scheme == "memory":
        url = "memory://"
    elif scheme == "redis+streams":
        base = request.getfixturevalue("redis_url").replace("redis://", "redis+streams://", 1)
        url = f"{base}?key_prefix={request.getfixturevalue('redis_prefix')}"
    else:
        url = request.getfixturevalue("postgres_url")
        request.getfixturevalue("postgres_layer_factory")  # removes the test's rows afterwards
    with serve(layer=url, keepalive_seconds=0.5) as running:
        yield running


async def test_ids_a_layer_did_not_issue_are_unknown_ids(
    layer_gateway: RunningGateway, unique: str
) -> None:
    async with layer_gateway.client() as http:
        kept = (await http.post(f"/channels/{unique}/publish", json={"data": 1})).json()["id"]
        for after in STRANGE_IDS:
            reply = await http.get(f"/channels/{unique}/history", params={"after": after})
            assert reply.status_code == 200, reply.text
            assert reply.json()["gap"] is True
            assert [m["id"] for m in reply.json()["messages"]] == [kept]
        async with layer_gateway.sse(
            f"/channels/{unique}/events", headers={"Last-Event-ID": STRANGE_IDS[0]}
        ) as sse:
            with anyio.fail_after(10):
                gap, event = await sse.take(2)
        assert (gap.type, gap.json["reason"]) == ("gap", "unknown_id")
        assert event.last_event_id == kept


async def test_anonymous_group_consumers_are_not_kept(
    layer_gateway: RunningGateway, unique: str
) -> None:
    path = f"/channels/{unique}/events?group=g"
    async with layer_gateway.sse(f"{path}&consumer=named"):
        pass
    for _ in range(5):
        async with layer_gateway.sse(path):
            pass
    await eventually(lambda: layer_gateway.gateway.channel.subscriber_count == 0)
    async with layer_gateway.client() as http:
        # A consumer leaves its group once its stream has ended: one more broker round trip.
        with anyio.fail_after(5):
            while True:
                info = (await http.get(f"/channels/{unique}/groups/g")).json()
                if [c["name"] for c in info["consumers"]] == ["named"]:
                    break
                await anyio.sleep(0.05)
        reply = await http.post(f"/channels/{unique}/groups/g/ack", json={"ids": STRANGE_IDS[:2]})
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"acked": 0, "unknown": STRANGE_IDS[:2]}
