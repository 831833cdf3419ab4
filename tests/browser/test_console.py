"""The web console in headless Chromium against a real gateway."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import jwt
import pytest

from tests.app.conftest import RunningGateway, serve
from tests.browser.conftest import (
    ARTIFACTS,
    ConsolePage,
    shown_ids,
    subscribe_in_page,
    wait_shown,
)

pytestmark = pytest.mark.anyio

TEST_SECONDS = 60
SECRET = "browser-test-secret-of-32-bytes-or-more"


def token(*, publish: list[str], subscribe: list[str]) -> str:
    rights = {"publish": publish, "subscribe": subscribe}
    claims = {"exp": int(time.time()) + 300, "channels": rights}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
def gateway() -> Iterator[RunningGateway]:
    with serve(keepalive_seconds=1) as running:
        yield running


async def publish(gateway: RunningGateway, channel: str, data: Any, **extra: Any) -> str:
    async with gateway.client() as http:
        reply = await http.post(f"/channels/{channel}/publish", json={"data": data, **extra})
    assert reply.status_code == 200, reply.text
    message_id: str = reply.json()["id"]
    return message_id


async def test_console_loads_without_errors(gateway: RunningGateway, console: ConsolePage) -> None:
    page = console.page
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        await page.locator("#ready.ok").wait_for()
        assert await page.inner_text("#layer") == "memory"
        chips = await page.locator("#capabilities .chip").all_inner_texts()
        assert sorted(chips) == ["cross process", "groups", "history", "idempotency"]
        await page.locator("#subscribers", has_text="SSE").wait_for()
        assert "curl -X POST" in await page.inner_text("#pub-snippet")
        assert "new EventSource(" in await page.inner_text("#sub-snippet")
    assert console.errors == []


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_page_subscriber_sees_what_python_publishes(
    gateway: RunningGateway, console: ConsolePage, transport: str
) -> None:
    page = console.page
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        await subscribe_in_page(page, transport, "chat", patterns="rooms.*", types="message, alert")
        first = await publish(gateway, "chat", {"text": "hello"})
        second = await publish(gateway, "rooms.blue", [1, 2], event="alert")
        await publish(gateway, "elsewhere", "not subscribed")
        await wait_shown(page, second)
        assert await shown_ids(page) == [first, second]
        item = page.locator(f'#messages li[data-id="{second}"]')
        assert await item.locator(".channel").inner_text() == "rooms.blue"
        assert await item.locator(".event").inner_text() == "alert"
        assert await item.locator(".time").inner_text() != ""
        assert await item.locator("pre").inner_text() == "[\n  1,\n  2\n]"
        assert await page.inner_text("#msg-count") == "2"
    assert console.errors == []


async def test_pause_holds_messages_and_clear_empties_the_list(
    gateway: RunningGateway, console: ConsolePage
) -> None:
    page = console.page
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        await subscribe_in_page(page, "ws", "chat")
        shown = await publish(gateway, "chat", "before")
        await wait_shown(page, shown)
        await page.click("#msg-pause")
        held = [await publish(gateway, "chat", n) for n in (1, 2)]
        await page.locator("#msg-held", has_text="2 held while paused").wait_for()
        assert await shown_ids(page) == [shown]
        await page.click("#msg-pause")
        assert await shown_ids(page) == [shown, *held]
        await page.click("#msg-clear")
        assert await shown_ids(page) == []
        assert await page.inner_text("#msg-count") == "0"
        after = await publish(gateway, "chat", "after")
        await wait_shown(page, after)
        assert await shown_ids(page) == [after]
    assert console.errors == []


async def test_page_publish_reaches_a_python_subscriber(
    gateway: RunningGateway, console: ConsolePage
) -> None:
    page = console.page
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        async with gateway.sse("/channels/chat/events") as stream:
            await page.fill("#pub-channel", "chat")
            await page.fill("#pub-event", "note")
            await page.fill("#pub-data", '{"text": "from the page", "n": [1, 2]}')
            snippet = await page.inner_text("#pub-snippet")
            assert "/channels/chat/publish" in snippet
            assert '"event":"note"' in snippet
            await page.click("#pub-send")
            event = await stream.next()
        assert event.type == "note"
        assert event.json["data"] == {"text": "from the page", "n": [1, 2]}
        await page.locator("#pub-status", has_text=f"published {event.json['id']}").wait_for()
    assert console.errors == []


async def test_page_publish_with_an_idempotency_key_is_replayed_when_sent_again(
    gateway: RunningGateway, console: ConsolePage
) -> None:
    page = console.page
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        async with gateway.sse("/channels/orders/events") as stream:
            await page.fill("#pub-channel", "orders")
            await page.fill("#pub-data", '{"order": 1042}')
            await page.fill("#pub-key", "order-1042")
            assert "Idempotency-Key: order-1042" in await page.inner_text("#pub-snippet")
            await page.click("#pub-send")
            event = await stream.next()
            await page.locator("#pub-status", has_text=f"published {event.json['id']}").wait_for()
            await page.click("#pub-send")
            await page.locator("#pub-status", has_text=f"replayed {event.json['id']}").wait_for()
            after = await publish(gateway, "orders", "after")
            assert (await stream.next()).json["id"] == after  # the replay published nothing
    assert console.errors == []


async def test_batch_publish_in_chunks_with_progress(
    gateway: RunningGateway, console: ConsolePage
) -> None:
    page = console.page
    count = 1234  # more than one chunk of POST /publish
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        async with gateway.sse("/channels/load/events") as stream:
            await page.fill("#pub-channel", "load")
            await page.fill("#batch-count", str(count))
            await page.click("#batch-send")
            events = await stream.take(count)
        assert [event.json["data"]["test"] for event in events] == list(range(1, count + 1))
        await page.locator("#batch-status", has_text=f"{count} published").wait_for()
        assert await page.locator("#batch-progress").evaluate("bar => bar.value") == count


async def test_bad_input_is_refused_with_a_readable_message(
    gateway: RunningGateway, console: ConsolePage
) -> None:
    page = console.page
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        await page.fill("#pub-data", '{"text": ')
        assert await page.locator("#pub-send").is_disabled()
        assert await page.inner_text("#pub-status") == "data is not valid JSON"
        await page.fill("#pub-data", "42")
        await page.fill("#pub-channel", "no spaces allowed")
        await page.click("#pub-send")
        notice = page.locator("#notices .notice").last
        await notice.wait_for()
        assert (await notice.inner_text()).startswith(
            "invalid_argument: invalid channel name 'no spaces allowed'"
        )
        # a refused EventSource hides the response; the console asks again and shows the reason
        await page.fill("#sub-channels", "bad!")
        await page.click("#sub-start")
        await page.locator("#notices .notice", has_text="invalid channel name 'bad!'").wait_for()
        assert await page.inner_text("#sub-status") == "refused"
        text = await page.inner_text("#notices")
        assert "Traceback" not in text


async def test_reload_resumes_after_the_last_seen_id(
    gateway: RunningGateway, console: ConsolePage
) -> None:
    page = console.page
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        await subscribe_in_page(page, "sse", "feed")
        seen = await publish(gateway, "feed", 1)
        await wait_shown(page, seen)
        await page.goto("about:blank")
        missed = [await publish(gateway, "feed", n) for n in (2, 3)]
        await page.goto(gateway.url)
        await page.locator("#sub-status.ok").wait_for()
        live = await publish(gateway, "feed", 4)
        await wait_shown(page, live)
        assert await shown_ids(page) == [*missed, live]


async def test_group_pending_messages_are_acked_and_nacked_by_hand(
    gateway: RunningGateway, console: ConsolePage
) -> None:
    page = console.page
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        await page.fill("#group-channel", "jobs")
        await page.fill("#group-name", "workers")
        await page.fill("#group-consumer", "console")
        await page.click("#group-join")
        row = page.locator('#group-table tr[data-group="jobs/workers"]')
        await row.wait_for()
        await page.locator("#group-info", has_text="consumers: console").wait_for()
        ids = [await publish(gateway, "jobs", {"job": n}) for n in (1, 2, 3)]
        pending = page.locator("#group-pending li")
        await page.locator(f'#group-pending li[data-id="{ids[-1]}"]').wait_for()
        assert await pending.evaluate_all("items => items.map((i) => i.dataset.id)") == ids
        await page.locator("#group-info", has_text="3 pending").wait_for()
        await page.locator("#group-info", has_text="console (3/10 in flight)").wait_for()
        await pending.first.get_by_role("button", name="Ack", exact=True).click()
        await page.locator("#group-info", has_text="2 pending").wait_for()
        second = page.locator(f'#group-pending li[data-id="{ids[1]}"]')
        await second.get_by_role(
            "button", name="Nack", exact=True
        ).click()  # back at once, delivered again
        await page.locator("#group-info", has_text="console (2/10 in flight)").wait_for()
        await second.wait_for()
        await page.fill("#nack-delay", "1")
        await second.get_by_role("button", name="Nack", exact=True).click()
        await page.locator("#group-info", has_text="console (1/10 in flight)").wait_for()
        await second.wait_for(state="detached")
        await second.wait_for()  # after the delay
        await page.click("#group-ack-all")
        await page.locator("#group-info", has_text="0 pending").wait_for()
        async with gateway.client() as http:
            info = (await http.get("/channels/jobs/groups/workers")).json()
            stats = (await http.get("/stats")).json()
        assert info["pending"] == 0
        assert stats["groups"] == [
            {
                "channel": "jobs",
                "group": "workers",
                "consumers": 1,
                "members": [{"name": "console", "in_flight": 0, "prefetch": 10}],
            }
        ]
        # the table shows the pending count and that the consumer is on this process
        await row.locator("td", has_text="0").first.wait_for()
    assert console.errors == []


async def test_screenshot(gateway: RunningGateway, console: ConsolePage) -> None:
    """A console in use, saved as test-artifacts/console.png (docs/console.png is one of these)
    and console-phone.png."""
    page = console.page
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        await subscribe_in_page(page, "sse", "chat", patterns="rooms.*")
        await page.fill("#group-channel", "jobs")
        await page.click("#group-join")
        await page.locator("#group-info", has_text="consumers").wait_for()
        async with gateway.client() as http:
            for second in range(6):
                await http.post(
                    "/publish",
                    json={
                        "messages": [
                            {"channel": "rooms.lobby", "data": {"tick": second, "n": n}}
                            for n in range(20 * (second + 1))
                        ]
                    },
                )
                await http.post("/channels/jobs/publish", json={"data": {"job": second}})
                await http.post(
                    "/channels/chat/publish",
                    json={"data": {"user": "ada", "text": f"message {second}"}},
                )
                await anyio.sleep(1)  # the rate chart samples once a second
        await page.locator("#rates", has_text="published/s").wait_for()
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=ARTIFACTS / "console.png", full_page=True)
        # a phone: one column, nothing wider than the screen
        await page.set_viewport_size({"width": 390, "height": 844})
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await page.screenshot(path=ARTIFACTS / "console-phone.png")
    assert (ARTIFACTS / "console.png").stat().st_size > 10_000
    assert console.errors == []


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_token_pasted_in_the_page_authorizes_it(console: ConsolePage, transport: str) -> None:
    page = console.page
    with serve(jwt_secret=SECRET, keepalive_seconds=1) as secured, anyio.fail_after(TEST_SECONDS):
        await page.goto(secured.url)
        # no token: readable refusals, no retry loop
        await page.fill("#sub-channels", "chat")
        await page.select_option("#sub-transport", transport)
        await page.click("#sub-start")
        await page.locator("#notices .notice", has_text="token_required:").wait_for()
        await page.locator("#sub-status", has_text="refused").wait_for()
        await page.click("#pub-send")
        await page.locator("#pub-status", has_text="failed").wait_for()

        await page.click("#auth summary")
        await page.fill("#token", token(publish=["chat"], subscribe=["chat"]))
        assert "Authorization: Bearer ey" in await page.inner_text("#pub-snippet")
        assert "access_token=ey" in await page.inner_text("#sub-snippet")
        await subscribe_in_page(page, transport, "chat")
        await page.click("#pub-send")
        await page.locator("#pub-status", has_text="published").wait_for()
        published = (await page.inner_text("#pub-status")).removeprefix("published ")
        await wait_shown(page, published)
        # the page's own request for a channel the token does not grant
        await page.fill("#pub-channel", "elsewhere")
        await page.click("#pub-send")
        await page.locator("#notices .notice", has_text="elsewhere").wait_for()


async def test_presence_of_a_channel_and_its_joins_and_leaves(
    gateway: RunningGateway, console: ConsolePage
) -> None:
    page = console.page
    with anyio.fail_after(TEST_SECONDS):
        await page.goto(gateway.url)
        await page.fill("#presence-channel", "lobby")
        await page.click("#presence-watch")
        await page.locator("#presence-count", has_text="1").wait_for()  # the page itself
        async with gateway.sse("/channels/lobby/events"):
            await page.locator("#presence-count", has_text="2").wait_for()
            await page.locator("#presence-events li.join").nth(1).wait_for()
            assert await page.locator("#presence-clients li").count() == 2
        await page.locator("#presence-events li.leave").wait_for()
        await page.locator("#presence-count", has_text="1").wait_for()
    assert console.errors == []
