"""`Channel.presence` and join/leave events on every layer in `CONTRACT_LAYERS`, with two
`Channel`s on one broker standing for two gateway processes (one on memory://)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

from layers import Channel
from layers._presence import Member, PresenceEvent
from tests.layers.conftest import OpenChannel
from tests.layers.test_contract import events
from tests.layers.test_publish_pattern import two_channels

pytestmark = pytest.mark.anyio


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Until `check()` holds: another process's control messages have no event to await here."""
    with anyio.fail_after(within):
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def clients(channel: Channel, name: str) -> list[str]:
    return [member.client_id for member in await channel.presence(name)]


async def test_members_of_every_process_are_counted(open_channel: OpenChannel, unique: str) -> None:
    room = f"{unique}.room"
    alice = Member("alice-1", "alice", "sse")
    bob = Member("bob-1", "bob", "ws")
    async with two_channels(open_channel) as (first, second):
        async with (
            first.subscribe(room, member=alice),
            second.subscribe(room, f"{unique}.other", member=bob),
            second.subscribe(patterns=[f"{unique}.*"]),  # patterns are not counted
        ):

            async def both() -> bool:
                seen = [sorted(await clients(c, room)) for c in (first, second)]
                other = await clients(first, f"{unique}.other")
                return seen == [["alice-1", "bob-1"]] * 2 and other == ["bob-1"]

            await eventually(both)
            (seen,) = [m for m in await first.presence(room) if m.client_id == "bob-1"]
            assert (seen.user, seen.transport) == ("bob", "ws")

        async def empty() -> bool:
            return not await clients(first, room) and not await clients(second, room)

        await eventually(empty)


async def test_join_and_leave_go_to_subscribers_that_asked(
    open_channel: OpenChannel, unique: str
) -> None:
    room = f"{unique}.room"
    async with (
        two_channels(open_channel) as (first, second),
        first.subscribe(room, presence=True, member=Member("watcher")) as watcher,
        first.subscribe(room, member=Member("plain")) as plain,
    ):
        own, other = await events(watcher, 2)  # its own join, then the plain subscriber's
        assert [(e.event, e.data["client_id"]) for e in (own, other)] == [
            ("join", "watcher"),
            ("join", "plain"),
        ]
        async with second.subscribe(room, member=Member("guest", "g", "ws")):
            (joined,) = await events(watcher, 1)
        (left,) = await events(watcher, 1)
        await first.publish(room, "marker")
        (marker,) = await events(plain, 1)
        history = await first.history(room) if first.capabilities.history else None
    assert isinstance(joined, PresenceEvent) and isinstance(left, PresenceEvent)
    assert (joined.event, left.event) == ("join", "leave")
    assert joined.data == {"channel": room, "client_id": "guest", "user": "g", "transport": "ws"}
    assert b"id:" not in joined.sse_frame()
    assert marker.data == "marker"  # the plain subscriber saw no join or leave before it
    if history is not None:
        assert [e.data for e in history.events] == ["marker"]
