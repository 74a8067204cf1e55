"""Logging in, "my rooms" with who is online and what is unread, history that scrolls
back, and accepting an invitation, in Chromium."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from tests.browser.conftest import OpenPage
from tests.support import PASSWORD, Member, World, join

pytestmark = pytest.mark.anyio


async def send_messages(world: World, member: Member, texts: list[str]) -> None:
    """Send chat messages over a room socket and wait for each to be stored."""
    async with await join(world.server, member, world.room_id) as sock:
        for i, text in enumerate(texts):
            await sock.send({"type": "chat.send", "id": f"py-{i}", "text": text})
        for i in range(len(texts)):
            await sock.recv_until("chat.ack", id=f"py-{i}")


async def test_login_my_rooms_online_unread_and_history(
    world: World, open_page: OpenPage, console_errors: list[str]
) -> None:
    """After logging in through the form, "my rooms" shows the room with who is online
    and the unread count; the room opens at the "New messages" marker, older history
    loads on demand, and reading clears the unread count."""
    ana_m, lars_m = world.members[0], world.members[1]
    await send_messages(world, lars_m, [f"Earlier note {i}" for i in range(1, 61)])

    page = await open_page()
    await page.goto("/")
    await expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    await page.get_by_label("E-mail").fill(ana_m.email)
    await page.get_by_label("Password").fill("not the password")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_contain_text("Wrong e-mail or password")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="My rooms")).to_be_visible()

    card = page.locator(".room-card")
    await expect(card).to_contain_text("60 unread")
    await expect(card).to_contain_text("Nobody is online right now.")
    # Lars comes online: the list shows him (it refreshes when the tab is shown again).
    async with await join(world.server, lars_m, world.room_id):
        await page.reload()
        await expect(card.locator(".online-list")).to_contain_text(lars_m.name)

    await card.get_by_role("link").click()
    await expect(page).to_have_url(re.compile(rf"/room/{world.room_id}$"))
    marker = page.locator(".unread-marker")
    await expect(marker).to_be_visible()
    # The newest 50 came first; scrolling back to the top loads the older ones (it may
    # already have, as the marker sits at the top), and the marker stays before them.
    messages = page.locator(".messages .msg-text")
    await expect(messages.last).to_have_text("Earlier note 60")
    await page.locator(".log").evaluate(
        "log => { log.scrollTop = 0; log.dispatchEvent(new Event('scroll')); }"
    )
    await expect(messages).to_have_count(60)
    await expect(messages.first).to_have_text("Earlier note 1")
    await expect(
        page.get_by_text("This is the start of the conversation.")
    ).to_be_visible()
    await expect(page.locator(".unread-marker + .msg .msg-text")).to_have_text(
        "Earlier note 1"
    )

    # Reading to the bottom sends chat.read: the unread count is gone.
    await page.locator(".log").evaluate("log => { log.scrollTop = log.scrollHeight; }")
    await expect(page).to_have_title(re.compile(r"^Partnership"))  # no "(60) " any more
    await page.get_by_role("link", name="My rooms").click()
    await expect(page.get_by_role("heading", name="My rooms")).to_be_visible()
    await expect(card).not_to_contain_text("unread")
    assert console_errors == []


async def test_invitation_accepted_in_the_browser_enters_the_room(
    world: World, open_page: OpenPage, console_errors: list[str]
) -> None:
    """An invitation made through the admin API is accepted in the browser by someone
    without an account, who lands in the partnership's room and is seen there."""
    email = "sofia.invited@tests.coilroom.test"
    r = await world.admin.post(
        f"/api/partnerships/{world.partnership_id}/invitations",
        json={
            "email": email,
            "role": "instructor",
            "institution_id": world.institutions[1],
        },
    )
    assert r.status_code == 201, r.text
    code = r.json()["code"]
    ana = await open_page(world.members[0])
    await ana.goto(f"/room/{world.room_id}")

    page = await open_page()
    await page.goto(f"/invite/{code}")
    await expect(page.get_by_text("You are invited to join")).to_be_visible()
    await page.get_by_label("Your name (as partners will see it)").fill("Sofía Reyes")
    await page.get_by_label("Choose a password").fill("a long passphrase")
    await page.get_by_label("Repeat the password").fill("a long passphrase")
    await page.get_by_role("button", name="Create my account and accept").click()

    await expect(page).to_have_url(re.compile(rf"/room/{world.room_id}$"))
    await expect(page.locator(".people")).to_contain_text("Sofía Reyes")
    await expect(page.locator(".people")).to_contain_text("Denmark")
    await expect(ana.locator(".people")).to_contain_text("Sofía Reyes")
    await expect(page.get_by_role("button", name="Add activity")).to_be_visible()

    # The code is single use: opening it again says so.
    again = await open_page()
    await again.goto(f"/invite/{code}")
    await expect(again.get_by_text("already been used")).to_be_visible()
    assert console_errors == []
