"""The room page's shape: desktop and phone widths (screenshots kept as test
artifacts), keyboard and screen-reader landmarks, and a page that runs under the
strict Content-Security-Policy without violations."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from tests.browser.conftest import OpenPage
from tests.support import World

pytestmark = pytest.mark.anyio


async def test_room_page_desktop_and_phone_screenshots(
    world: World, open_page: OpenPage, console_errors: list[str], artifacts
) -> None:
    """The room page fits a 375 px wide phone without sideways scrolling, and both
    widths are saved as screenshots in test-artifacts/."""
    ana_m, lars_m = world.members[0], world.members[1]
    lars = await open_page(lars_m)
    await lars.goto(f"/room/{world.room_id}")
    await expect(lars.locator(".doc-status")).to_contain_text("Live")
    await lars.get_by_role("button", name="Add activity").click()
    await lars.get_by_label("Title of activity 1").fill("Virtual exchange week")
    await lars.get_by_label("Starts on").fill("2027-03-01")
    await lars.get_by_label("Message", exact=True).fill(
        "Hej! I drafted the first activity."
    )
    await lars.get_by_label("Message", exact=True).press("Enter")

    for name, width, height in (("desktop", 1280, 900), ("phone", 375, 812)):
        page = await open_page(ana_m, width=width, height=height)
        await page.goto(f"/room/{world.room_id}")
        await expect(page.get_by_label("Title of activity 1")).to_have_value(
            "Virtual exchange week"
        )
        await expect(page.locator(".messages .msg-text")).to_have_text(
            ["Hej! I drafted the first activity."]
        )
        await page.get_by_label(
            "Title of activity 1"
        ).focus()  # no remote chip on Lars's
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0, f"{name}: {overflow}px of sideways scrolling"
        await page.screenshot(path=artifacts / f"room-{name}.png", full_page=True)
        await page.close()
    assert (artifacts / "room-phone.png").stat().st_size > 0
    assert console_errors == []


async def test_room_page_keyboard_landmarks_and_strict_csp(
    world: World, open_page: OpenPage, console_errors: list[str]
) -> None:
    """The page is served with a strict CSP and runs without violating it; focus starts
    on the room's heading and Tab goes through the chat to the activity list; the chat
    has labelled controls and a live region; an activity can be added and named with
    the keyboard alone."""
    page = await open_page(world.members[0])
    response = await page.goto(f"/room/{world.room_id}")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    html = await response.text()
    # No inline code: module scripts by URL, the entry list as a JSON data block.
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    for attrs, body in scripts:
        assert ('type="module"' in attrs and "src=" in attrs and not body.strip()) or (
            'type="application/json"' in attrs
        ), attrs
    assert re.search(r'src="/static/dist/app\.entry-[A-Z0-9]+\.js"', html)
    await expect(page.locator(".doc-status")).to_contain_text("Live")

    await expect(page.get_by_role("heading", level=1)).to_be_focused()
    for target in (
        page.get_by_role("region", name="Chat history"),
        page.get_by_label("Message", exact=True),
        page.get_by_role("button", name="Send"),
        page.get_by_role("button", name="Add activity"),
    ):
        await page.keyboard.press("Tab")
        await expect(target).to_be_focused()
    await expect(page.locator("#announcer")).to_have_attribute("aria-live", "polite")
    await page.keyboard.press("Enter")
    # Adding puts the caret in the new title, ready to type.
    await expect(page.get_by_label("Title of activity 1")).to_be_focused()
    await page.keyboard.type("Typed with the keyboard")
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Description")).to_be_focused()
    await expect(page.get_by_label("Title of activity 1")).to_have_value(
        "Typed with the keyboard"
    )
    assert console_errors == []
