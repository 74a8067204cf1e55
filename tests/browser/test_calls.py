"""Calls on the room page in Chromium with fake camera, microphone and screen: two
instructors see each other, share screens at the same moment (glare), leave; the echo
test shows one's own video; a refused permission is said plainly."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Locator, Page, expect

from tests.browser.conftest import OpenPage
from tests.support import ServerProcess, World

pytestmark = pytest.mark.anyio

# Screen shares started at once by both sides, one round after the other: a wedge in
# the glare handling, or m-lines piling up past the SDP limit, shows within 5 rounds.
GLARE_ROUNDS = 5


@pytest.fixture
async def call_world(call_server: ServerProcess) -> AsyncIterator[World]:
    async with World.create(call_server) as w:
        yield w


async def enter_room(page: Page, room_id: int) -> None:
    await page.goto(f"/room/{room_id}")
    await expect(page.locator(".call-summary")).to_have_text(
        re_any("No call right now.", "A call is on")
    )


def re_any(*texts: str) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(t) for t in texts))


def tile(page: Page, name: str, kind: str = "camera") -> Locator:
    return page.locator(f'.call-tiles .tile[data-kind="{kind}"]').filter(
        has=page.locator(".tile-caption", has_text=name)
    )


async def video_plays(video: Locator) -> None:
    """The video element shows decoded frames, and its time moves on."""
    await expect(video).to_be_visible()
    handle = await video.element_handle()
    assert handle is not None
    page = video.page
    await page.wait_for_function(
        "v => v.videoWidth > 0 && v.readyState >= 2", arg=handle
    )
    first = await handle.evaluate("v => v.currentTime")
    await page.wait_for_function(
        "([v, t]) => v.currentTime > t + 0.2 && !v.paused", arg=[handle, first]
    )


async def join_call(page: Page) -> None:
    await (
        page.locator(".call-panel")
        .get_by_role("button", name=re_any("Start a call", "Join call"))
        .click()
    )
    await expect(page.get_by_role("button", name="Leave call")).to_be_visible()


async def shoot(page: Page, artifacts: Path, name: str) -> None:
    await page.screenshot(path=artifacts / name, full_page=True)


@pytest.mark.slow
async def test_call_two_instructors_video_screen_glare_and_leave(
    call_world: World,
    open_call_page: OpenPage,
    console_errors: list[str],
    artifacts: Path,
) -> None:
    """Two instructors in a call see each other's camera playing; both start a screen
    share at the same moment, several times, and each receives the other's screen;
    leaving removes one's tile on the other side."""
    ana_m, lars_m = call_world.members[0], call_world.members[1]
    ana = await open_call_page(ana_m)
    lars = await open_call_page(lars_m)
    await enter_room(ana, call_world.room_id)
    await enter_room(lars, call_world.room_id)

    await join_call(ana)
    await expect(lars.locator(".call-summary")).to_contain_text(
        f"A call is on with {ana_m.name}"
    )
    await join_call(lars)
    for page, other in ((ana, lars_m.name), (lars, ana_m.name)):
        await expect(page.locator(".call-summary")).to_contain_text(
            f"You are in the call with {other}"
        )
        await video_plays(tile(page, other).locator("video"))
    await expect(tile(ana, lars_m.name)).to_contain_text("microphone on")
    await shoot(ana, artifacts, "call-two.png")

    for round_ in range(GLARE_ROUNDS):
        # Both click "Share screen" in the same moment: the offers cross (glare).
        await _click_both(ana, lars, "Share screen")
        for page, other in ((ana, lars_m.name), (lars, ana_m.name)):
            await video_plays(tile(page, other, "screen").locator("video"))
        if round_ == 0:
            await shoot(lars, artifacts, "call-screens.png")
        await _click_both(ana, lars, "Share screen")
        for page, other in ((ana, lars_m.name), (lars, ana_m.name)):
            await expect(tile(page, other, "screen")).to_have_count(0)
        # The cameras still play after the renegotiations.
        await video_plays(tile(ana, lars_m.name).locator("video"))

    # Raise a hand: the other side sees it.
    await lars.get_by_role("button", name="Raise hand").click()
    await expect(tile(ana, lars_m.name)).to_contain_text("hand raised")

    await lars.get_by_role("button", name="Leave call").click()
    await expect(tile(ana, lars_m.name)).to_have_count(0)
    await expect(ana.locator(".call-summary")).to_have_text(
        "You are in the call. Nobody else is here yet."
    )
    await expect(lars.get_by_role("button", name="Join call")).to_be_visible()
    # Lars's camera and microphone are off again (every track stopped).
    assert await lars.evaluate("() => document.querySelectorAll('.tile').length") == 0
    assert console_errors == []


async def _click_both(a: Page, b: Page, name: str) -> None:
    """Press a button on two pages in the same event-loop turn (their clicks race)."""
    await asyncio.gather(
        a.get_by_role("button", name=name).click(),
        b.get_by_role("button", name=name).click(),
    )


@pytest.mark.slow
async def test_call_echo_test_shows_ones_own_video(
    call_world: World,
    open_call_page: OpenPage,
    console_errors: list[str],
    artifacts: Path,
) -> None:
    """The echo test sends one's camera to the server and plays what comes back; Stop
    hangs up."""
    page = await open_call_page(call_world.members[0])
    await enter_room(page, call_world.room_id)
    await page.get_by_role("button", name="Test camera and microphone").click()
    await expect(page.locator(".echo-status")).to_contain_text("Connected")
    await video_plays(page.locator(".echo-video"))
    await shoot(page, artifacts, "call-echo.png")
    await page.get_by_role("button", name="Stop the test").click()
    await expect(page.locator(".echo-status")).to_have_text("The test has ended.")
    await expect(
        page.get_by_role("button", name="Test camera and microphone")
    ).to_be_enabled()
    assert console_errors == []


async def test_call_permission_denied_is_said_plainly(
    call_world: World,
    open_call_page: OpenPage,
    console_errors: list[str],
    artifacts: Path,
) -> None:
    """When the browser refuses the camera and microphone, the page says how to allow
    them, and one still joins the call to watch and listen (on a phone: the call panel
    fits 375 px without sideways scrolling)."""
    page = await open_call_page(call_world.members[0], deny=True, width=375, height=812)
    await enter_room(page, call_world.room_id)
    await join_call(page)
    await expect(page.locator(".call-problem")).to_contain_text(
        "Coilroom is not allowed to use your camera and microphone"
    )
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - window.innerWidth"
    )
    assert overflow <= 0, f"{overflow}px of sideways scrolling"
    await shoot(page, artifacts, "call-phone.png")
    await expect(page.get_by_role("button", name="Microphone")).to_have_attribute(
        "aria-pressed", "false"
    )
    await page.get_by_role("button", name="Leave call").click()
    await page.get_by_role("button", name="Test camera and microphone").click()
    await expect(page.locator(".echo-status")).to_contain_text(
        "Coilroom is not allowed to use your camera and microphone"
    )
    assert console_errors == []


async def test_call_without_a_camera_is_said_plainly(
    call_world: World,
    open_call_page: OpenPage,
    console_errors: list[str],
) -> None:
    """A computer with no camera or microphone: the browser reports NotFoundError
    (emulated here, since Chromium's fake devices are always present), and the page
    says what to check; one still joins to watch and listen."""
    page = await open_call_page(call_world.members[1])
    await page.add_init_script(
        """
        navigator.mediaDevices.getUserMedia = () =>
          Promise.reject(new DOMException("Requested device not found", "NotFoundError"));
        """
    )
    await enter_room(page, call_world.room_id)
    await join_call(page)
    await expect(page.locator(".call-problem")).to_contain_text("was found")
    await expect(page.locator(".call-problem")).to_contain_text("plugged in")
    await page.get_by_role("button", name="Leave call").click()
    assert console_errors == []
