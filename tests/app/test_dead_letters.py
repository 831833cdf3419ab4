"""A channel's dead letters (`<channel>.dead`) are readable by whoever may consume its groups."""

from __future__ import annotations

import anyio
import pytest

from tests.app.conftest import serve
from tests.app.test_auth import SECRET, bearer, token

pytestmark = pytest.mark.anyio


async def test_the_dead_letters_of_a_200_character_channel_can_be_read() -> None:
    channel = "j" * 200
    with serve(ack_timeout_seconds=0.3, max_deliveries=1) as gateway:
        async with (
            gateway.sse(f"/channels/{channel}.dead/events") as dead,
            gateway.sse(f"/channels/{channel}/events?group=g&consumer=c") as stream,
            gateway.client() as http,
        ):
            await http.post(f"/channels/{channel}/publish", json={"data": "never acked"})
            with anyio.fail_after(10):
                await stream.next()
                letter = (await dead.next()).json
            assert (letter["channel"], letter["data"]["group"]) == (f"{channel}.dead", "g")
            history = await http.get(f"/channels/{channel}.dead/history")
            assert [m["data"]["message"]["data"] for m in history.json()["messages"]] == [
                "never acked"
            ]
            too_long = await http.get(f"/channels/{'j' * 201}/history")
            assert too_long.status_code == 422


async def test_the_allow_list_admits_the_dead_letters_of_the_channels_it_admits() -> None:
    with serve(channels=["chat.*", "jobs"]) as gateway:
        async with gateway.client() as http:
            for name in ("jobs.dead", "chat.room.dead", "jobs"):
                assert (await http.get(f"/channels/{name}/history")).status_code == 200, name
            for name in ("mail.dead", "jobs.other", "jobs.other.dead"):
                refused = await http.get(f"/channels/{name}/history")
                assert (refused.status_code, refused.json()["error"]) == (
                    403,
                    "channel_not_allowed",
                )


async def test_the_group_right_reads_the_dead_letters() -> None:
    with serve(jwt_secret=SECRET) as gateway:
        consumer = bearer(token(groups=["jobs"]))
        async with gateway.client(headers=consumer) as http:
            assert (await http.get("/channels/jobs.dead/history")).status_code == 200
        async with gateway.sse("/channels/jobs.dead/events", headers=consumer):
            pass
        for other in (token(subscribe=["jobs"]), token(groups=["mail"])):
            async with gateway.client(headers=bearer(other)) as http:
                assert (await http.get("/channels/jobs.dead/history")).status_code == 403
