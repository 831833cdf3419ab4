"""Glob patterns are matched against every published channel: a hostile one must cost little."""

from __future__ import annotations

import time

import anyio
import pytest

from tests.app.conftest import RunningGateway

pytestmark = pytest.mark.anyio


async def test_hostile_patterns_do_not_stall_the_gateway(gateway: RunningGateway) -> None:
    """`chat.*a*a*...*b` against a long `chat.aaa...` channel backtracked for seconds per publish
    and per pattern, stalling every request of the process (/healthz took 3.4 s)."""
    hostile = [f"chat.*{'a*' * n}b" for n in range(8, 40, 4)]
    query = "&".join(f"pattern={p}" for p in ["chat.*", *hostile])
    channel = "chat." + "a" * 195
    async with gateway.sse(f"/events?{query}") as sse, gateway.client() as http:
        with anyio.fail_after(10):
            for n in range(3):
                reply = await http.post(f"/channels/{channel}/publish", json={"data": n})
                assert reply.status_code == 200, reply.text
            started = time.perf_counter()
            assert (await http.get("/healthz")).status_code == 200
            healthz_seconds = time.perf_counter() - started
            received = await sse.take(3)
    assert [event.json["data"] for event in received] == [0, 1, 2]
    assert healthz_seconds < 1.0
