"""Browser fixtures: Playwright (Python, async) driving Debian's Chromium.

Fixtures for every test under ``tests/browser/`` (the room page's and the dashboards'):

- ``browser``: one headless Chromium for the whole test session, launched from
  ``/usr/bin/chromium`` (``COILROOM_CHROMIUM`` overrides the path). A missing Chromium
  fails the tests: it is never skipped, and no browser is ever downloaded.
- ``open_page``: ``await open_page(member=None, *, width=1280, height=900)`` gives a
  ``Page`` in a new browser context (one person: own cookies, own network, so
  ``page.context.set_offline(True)`` cuts only that person off). With a ``member``
  (``tests.support.Member``, e.g. from ``world.members``) the context is logged in as
  them; ``page.goto("/room/1")`` is relative to the shared server. Contexts close
  when the test ends.
- ``artifacts``: the folder ``test-artifacts/`` (gitignored) for screenshots.
- ``console_errors``: a list that collects the uncaught page exceptions and the
  Content-Security-Policy violations of the pages made by ``open_page``; tests assert
  it is empty. (Failed socket connections while offline are expected, not collected.)

Every test here runs against the SQLite server only: the HTTP and socket behaviour is
tested on both backends elsewhere, and the browser adds nothing backend-specific.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from tests.support import PASSWORD, ROOT, TIMEOUT, Member, ServerProcess

CHROMIUM = Path(os.environ.get("COILROOM_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts"
# As root in a container: no sandbox; nothing phones home; QUIC off (loopback only).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

OpenPage = Callable[..., Awaitable[Page]]


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Keep only the SQLite variant of browser tests (``backend`` is parametrized)."""
    here = Path(__file__).parent
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        in_here = here in Path(str(item.fspath)).parents
        if (
            in_here
            and callspec
            and callspec.params.get("backend")
            not in (
                None,
                "sqlite",
            )
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def built_page() -> None:
    """Fail with the fix when the browser client has not been built."""
    page = ROOT / "static" / "index.html"
    if not page.exists() or not re.search(
        r"/static/dist/app\.entry-", page.read_text()
    ):
        pytest.fail(
            "the browser client is not built: run `make build` (make test does)"
        )


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One headless Debian Chromium for the test session."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's Chromium "
            "(apt-get install -y chromium; .ci/run installs it)"
        )
    built_page()
    async with async_playwright() as driver:
        # Playwright gives the browser a fresh temporary --user-data-dir itself.
        chromium = await driver.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=TIMEOUT * 3000
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def console_errors() -> list[str]:
    return []


@pytest.fixture
async def open_page(
    browser: Browser, server: ServerProcess, console_errors: list[str]
) -> AsyncIterator[OpenPage]:
    """Open a page for one person in a context of their own (closed after the test)."""
    contexts: list[Any] = []

    async def open_(
        member: Member | None = None, *, width: int = 1280, height: int = 900
    ) -> Page:
        context = await browser.new_context(
            base_url=server.base_url,
            viewport={"width": width, "height": height},
            locale="en-GB",
            timezone_id="UTC",
        )
        context.set_default_timeout(TIMEOUT * 1000)
        contexts.append(context)
        if member is not None:
            r = await context.request.post(
                "/api/session", data={"email": member.email, "password": PASSWORD}
            )
            assert r.ok, await r.text()
        page = await context.new_page()
        label = member.name if member else "anonymous"

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error" and "Content Security Policy" in message.text:
                console_errors.append(f"{label}: {message.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: console_errors.append(f"{label}: {exc}"))
        return page

    yield open_
    for context in contexts:
        await context.close()


# -- calls: Chromium with fake camera, microphone and screen, and a server whose echo
# peer offers 127.0.0.1 (the only address both ends share here) -------------------------

# Fake devices (a test pattern and a beep; getDisplayMedia gives a fake screen), no
# permission prompt (granted, or denied with "=deny"), and loopback ICE candidates.
CALL_ARGS = [
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    # Headless Chromium may throttle timers and media of pages it deems hidden.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--autoplay-policy=no-user-gesture-required",
]


async def launch_call_browser(driver: Any, *, deny: bool = False) -> Browser:
    ui = "--use-fake-ui-for-media-stream" + ("=deny" if deny else "")
    return await driver.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[*CHROMIUM_ARGS, *CALL_ARGS, ui],
        timeout=TIMEOUT * 3000,
    )


class CallBrowsers:
    """Chromium with fake media devices, launched on first use: ``"allow"`` grants
    camera, microphone and screen without asking; ``"deny"`` refuses them."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.browsers: dict[str, Browser] = {}

    async def get(self, kind: str) -> Browser:
        if kind not in self.browsers:
            self.browsers[kind] = await launch_call_browser(
                self.driver, deny=kind == "deny"
            )
        return self.browsers[kind]


@pytest.fixture(scope="session")
async def call_browsers() -> AsyncIterator[CallBrowsers]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's Chromium")
    built_page()
    async with async_playwright() as driver:
        browsers = CallBrowsers(driver)
        try:
            yield browsers
        finally:
            for b in browsers.browsers.values():
                await b.close()


@pytest.fixture(scope="module")
def call_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of the calls' own: its echo peer gathers on 127.0.0.1 only."""
    from tests.conftest import dedicated_server

    with dedicated_server(
        "sqlite", tmp_path_factory, {"RTC_HOST_ADDRESSES": "127.0.0.1"}
    ) as proc:
        yield proc


@pytest.fixture
async def open_call_page(
    call_browsers: CallBrowsers, call_server: ServerProcess, console_errors: list[str]
) -> AsyncIterator[OpenPage]:
    """Like ``open_page``, on the call server, in Chromium with fake media devices:
    ``await open_call_page(member, deny=False, width=1280, height=900)``."""
    contexts: list[Any] = []

    async def open_(
        member: Member, *, deny: bool = False, width: int = 1280, height: int = 900
    ) -> Page:
        browser = await call_browsers.get("deny" if deny else "allow")
        context = await browser.new_context(
            base_url=call_server.base_url,
            viewport={"width": width, "height": height},
            locale="en-GB",
            timezone_id="UTC",
        )
        context.set_default_timeout(TIMEOUT * 1000)
        contexts.append(context)
        r = await context.request.post(
            "/api/session", data={"email": member.email, "password": PASSWORD}
        )
        assert r.ok, await r.text()
        page = await context.new_page()
        page.on("pageerror", lambda exc: console_errors.append(f"{member.name}: {exc}"))
        page.on(
            "console",
            lambda m: (
                console_errors.append(f"{member.name}: {m.text}")
                if m.type == "error" and "Content Security Policy" in m.text
                else None
            ),
        )
        return page

    yield open_
    for context in contexts:
        await context.close()
