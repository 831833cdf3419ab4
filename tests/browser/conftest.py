"""Real-browser tests: Debian's Chromium, headless, driven by Playwright for Python.

No browser is ever downloaded: Playwright launches the OS package's binary (`/usr/bin/chromium`,
or `TEST_CHROMIUM`), which `.ci/run` installs with apt. Without it these tests skip locally and
fail under CI=true, like a missing broker.

Every page gets a fresh browser context, so localStorage starts empty, and records console errors
and uncaught exceptions: a test that expects none checks `ConsolePage.errors`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from tests.conftest import IN_CI

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

pytestmark = pytest.mark.anyio

CHROMIUM = os.environ.get("TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TIMEOUT_MS = 20_000  # any one Playwright action or wait


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # Playwright's async API runs on asyncio; module scope lets one browser serve
    # a whole module (starting Chromium costs seconds)


def missing(what: str, fix: str) -> NoReturn:
    message = f"{what} is missing: {fix}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        missing(f"Chromium at {CHROMIUM}", "apt-get install chromium, or set TEST_CHROMIUM")
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing("Playwright for Python", "pip install -e '.[dev]'")
    async with async_playwright() as playwright:
        # Playwright adds --headless and a fresh temporary profile.
        launched = await playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class ConsolePage:
    page: Page
    errors: list[str] = field(default_factory=list)


@pytest.fixture
async def console(browser: Browser) -> AsyncIterator[ConsolePage]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    opened = ConsolePage(page)
    page.on("console", lambda m: opened.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: opened.errors.append(f"uncaught: {exc}"))
    try:
        yield opened
    finally:
        await context.close()


async def subscribe_in_page(
    page: Page, transport: str, channels: str, *, patterns: str = "", types: str = "message"
) -> None:
    """Subscribe with the console's form; returns once the gateway holds the subscription."""
    await page.select_option("#sub-transport", transport)
    await page.fill("#sub-channels", channels)
    await page.fill("#sub-patterns", patterns)
    await page.fill("#sub-types", types)
    await page.click("#sub-start")
    # "live": the SSE response started or the WebSocket's subscribe was answered `ok`, both only
    # after the gateway opened the subscription
    await page.locator("#sub-status.ok").wait_for()


async def shown_ids(page: Page) -> list[str]:
    """Ids of the messages in the console's list, oldest first."""
    ids: list[str] = await page.locator("#messages li.message").evaluate_all(
        "items => items.map((item) => item.dataset.id).reverse()"
    )
    return ids


async def wait_shown(page: Page, message_id: str) -> None:
    await page.locator(f'#messages li[data-id="{message_id}"]').wait_for()
