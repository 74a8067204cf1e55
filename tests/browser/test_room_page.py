"""The room page in Chromium: presence, chat, the co-edited activity list, offline and back."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from playwright.async_api import Locator, Page, expect

from tests.browser.conftest import OpenPage
from tests.support import TIMEOUT, World

pytestmark = pytest.mark.anyio


async def enter_room(page: Page, room_id: int) -> None:
    """Open the room and wait until chat and the activity list are live."""
    await page.goto(f"/room/{room_id}")
    await expect(page.locator(".doc-status")).to_contain_text("Live")
    await expect(page.locator(".banner")).to_be_hidden()


async def say(page: Page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    await box.fill(text)
    await box.press("Enter")


def chat_line(page: Page, text: str) -> Locator:
    return page.locator(".messages .msg-text", has_text=text)


def title_field(page: Page, position: int) -> Locator:
    return page.get_by_label(f"Title of activity {position}", exact=True)


async def titles(page: Page) -> list[str]:
    return await page.locator(".activity .act-title input").evaluate_all(
        "els => els.map(e => e.value)"
    )


async def converged(
    pages: list[Page], read: Callable[[Page], Awaitable[Any]], what: str
) -> Any:
    """Wait until ``read(page)`` gives the same value on every page; return it."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            values = [await read(p) for p in pages]
            if all(v == values[0] for v in values):
                return values[0]
            await pages[0].wait_for_timeout(50)  # polling a page, bounded by TIMEOUT
    raise AssertionError(what)  # pragma: no cover - the timeout raises first


@pytest.mark.slow
async def test_room_two_instructors_presence_chat_and_offline_edits_converge(
    world: World, open_page: OpenPage, console_errors: list[str]
) -> None:
    """Two instructors see each other and chat both ways; one goes offline, edits the
    activity list and comes back: the lists converge and the chat resumes without loss."""
    ana_m, lars_m = world.members[0], world.members[1]
    ana = await open_page(ana_m)
    lars = await open_page(lars_m)
    await enter_room(ana, world.room_id)
    await enter_room(lars, world.room_id)

    # Presence: each sees the other, with institution and country, and typing.
    await expect(ana.locator(".people")).to_contain_text(lars_m.name)
    await expect(ana.locator(".people")).to_contain_text("Denmark")
    await expect(lars.locator(".people")).to_contain_text(ana_m.name)
    await expect(lars.locator(".people")).to_contain_text("Mexico")
    await lars.get_by_label("Message", exact=True).press_sequentially("Hej")
    await expect(ana.locator(".typing-line")).to_have_text(f"{lars_m.name} is typing…")

    # Chat both ways; the new message is announced to screen readers.
    await say(lars, "Hej from Aarhus")
    await expect(chat_line(ana, "Hej from Aarhus")).to_be_visible()
    await expect(ana.locator("#announcer")).to_contain_text("Hej from Aarhus")
    await say(ana, "Hola from Guadalajara")
    await expect(chat_line(lars, "Hola from Guadalajara")).to_be_visible()

    # A shared activity, typed by Ana, reaches Lars live.
    await ana.get_by_role("button", name="Add activity").click()
    await title_field(ana, 1).fill("Joint workshop")
    await expect(title_field(lars, 1)).to_have_value("Joint workshop")

    # Lars goes offline: both pages say so, and his edits stay local.
    await lars.context.set_offline(True)
    await expect(lars.locator(".banner")).to_contain_text("You are offline")
    await expect(lars.locator(".doc-status")).to_contain_text("Offline")
    await title_field(lars, 1).fill("Joint workshop (Aarhus, May)")
    await lars.get_by_role("button", name="Add activity").click()
    await title_field(lars, 2).fill("Student exchange")
    await lars.get_by_label("Status").nth(1).select_option("in_progress")
    # Meanwhile Ana writes to him and edits another field of the same activity.
    await say(ana, "Are you there?")
    await say(ana, "I added the outcomes")
    await ana.get_by_label("Predicted outcomes").first.fill("A joint report")
    await expect(chat_line(ana, "I added the outcomes")).to_be_visible()
    assert await titles(ana) == ["Joint workshop"]

    # Back online: the page says so, shows what he missed, and both lists converge.
    await lars.context.set_offline(False)
    await expect(lars.locator(".banner")).to_contain_text(
        "Back online — 2 messages you missed are shown."
    )
    await expect(chat_line(lars, "Are you there?")).to_be_visible()
    await expect(chat_line(lars, "I added the outcomes")).to_be_visible()
    await expect(lars.locator(".doc-status")).to_contain_text("Back online")
    expected = ["Joint workshop (Aarhus, May)", "Student exchange"]
    for page in (ana, lars):
        await expect(page.locator(".activity .act-title input")).to_have_count(2)
        await expect(page.get_by_label("Predicted outcomes").first).to_have_value(
            "A joint report"
        )
        await expect(page.get_by_label("Status").nth(1)).to_have_value("in_progress")
    assert await converged([ana, lars], titles, "titles") == expected

    # The chat goes on both ways after the reconnect, nothing twice.
    await say(lars, "Back again")
    await expect(chat_line(ana, "Back again")).to_be_visible()
    for page in (ana, lars):
        await expect(page.locator(".messages .msg")).to_have_count(5)
    assert console_errors == []


async def test_room_concurrent_edits_of_one_activity_converge_and_observer_cannot_edit(
    world: World, open_page: OpenPage, console_errors: list[str]
) -> None:
    """Both instructors edit the same activity at once and end up with the same list;
    an observer sees it without any edit control, and the document stays unchanged."""
    ana_m, lars_m = world.members[0], world.members[1]
    ana = await open_page(ana_m)
    lars = await open_page(lars_m)
    await enter_room(ana, world.room_id)
    await enter_room(lars, world.room_id)
    await ana.get_by_role("button", name="Add activity").click()
    await title_field(ana, 1).fill("Shared syllabus")
    await expect(title_field(lars, 1)).to_have_value("Shared syllabus")

    # Ana's focus shows on Lars's page by name (awareness).
    await title_field(ana, 1).focus()
    await expect(lars.locator(".act-title .remote-chip")).to_contain_text(ana_m.name)

    # The same fields, from both sides at once (each page's steps in order: typing
    # goes to whichever field has the focus).
    async def edit(page: Page, who: str, status: str, date: tuple[str, str]) -> None:
        await title_field(page, 1).fill(f"Shared syllabus v2 ({who})")
        await page.get_by_label("Status").select_option(status)
        await page.get_by_label(date[0]).fill(date[1])

    await asyncio.gather(
        edit(ana, "Ana", "done", ("Starts on", "2027-02-01")),
        edit(lars, "Lars", "cancelled", ("Ends on", "2027-06-30")),
    )

    async def state(page: Page) -> tuple[object, ...]:
        return (
            await title_field(page, 1).input_value(),
            await page.get_by_label("Status").input_value(),
            await page.get_by_label("Starts on").input_value(),
            await page.get_by_label("Ends on").input_value(),
        )

    final = await converged([ana, lars], state, "one activity")
    # Text fields are plain strings (DESIGN.md): the last writer wins, or, when a remote
    # value lands between one side's select-all and its typing, that typing replaces
    # the selection in the new value. Either way both sides show the same text.
    assert "(Ana)" in final[0] or "(Lars)" in final[0], final
    assert final[1] in ("done", "cancelled")
    assert final[2:] == ("2027-02-01", "2027-06-30")

    # Reorder: a second activity moved to the top, seen by both.
    await ana.get_by_role("button", name="Add activity").click()
    await title_field(ana, 2).fill("Kick-off call")
    await ana.get_by_role("button", name="Move up").nth(1).click()
    await expect(title_field(lars, 1)).to_have_value("Kick-off call")
    assert await converged([ana, lars], titles, "order") == ["Kick-off call", final[0]]

    # An observer reads the same list and gets no way to change it.
    observer_m = await world.add_member(
        "Olga Observer", world.institutions[0], "observer"
    )
    order = ["Kick-off call", final[0]]

    async def projected() -> list[str]:
        r = await ana_m.http.get(f"/api/rooms/{world.room_id}/activities")
        return [a["title"] for a in r.json()["activities"]]

    async with asyncio.timeout(TIMEOUT):
        while await projected() != order:  # the overview follows within 0.1 s
            await asyncio.sleep(0.05)
    olga = await open_page(observer_m)
    await olga.goto(f"/room/{world.room_id}")
    await expect(olga.locator(".activity")).to_have_count(2)
    await expect(olga.locator(".activity").first).to_contain_text("Kick-off call")
    await expect(olga.get_by_text("You are an observer")).to_be_visible()
    await expect(olga.get_by_role("button", name="Add activity")).to_have_count(0)
    agreement = olga.locator(".agreement")
    await expect(agreement.locator("input, textarea, select")).to_have_count(0)
    await expect(agreement.get_by_role("button", name="Move up")).to_have_count(0)
    await expect(agreement.get_by_role("button", name="Restore")).to_have_count(0)
    # She can still chat; the document is what it was.
    await say(olga, "Reading along")
    await expect(chat_line(ana, "Reading along")).to_be_visible()
    assert await projected() == order
    assert await titles(ana) == order
    assert console_errors == []


async def test_room_named_versions_save_view_and_restore(
    world: World, open_page: OpenPage, console_errors: list[str]
) -> None:
    """A named version is saved, viewed and restored from the page, and the restore
    reaches the other person's page live."""
    ana_m, lars_m = world.members[0], world.members[1]
    ana = await open_page(ana_m)
    lars = await open_page(lars_m)
    await enter_room(ana, world.room_id)
    await enter_room(lars, world.room_id)
    await ana.get_by_role("button", name="Add activity").click()
    await title_field(ana, 1).fill("Draft plan")
    await expect(title_field(lars, 1)).to_have_value("Draft plan")

    await ana.get_by_text("Named versions").click()
    await ana.get_by_label("Name for the current state").fill("First draft")
    await ana.get_by_role("button", name="Save version").click()
    await expect(ana.locator(".versions")).to_contain_text("First draft")

    await title_field(lars, 1).fill("Final plan")
    await expect(title_field(ana, 1)).to_have_value("Final plan")

    await ana.get_by_role("button", name="View version First draft").click()
    await expect(ana.locator(".version-view")).to_contain_text("Draft plan")
    ana.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await ana.get_by_role("button", name="Restore version First draft").click()
    await expect(title_field(lars, 1)).to_have_value("Draft plan")
    await expect(title_field(ana, 1)).to_have_value("Draft plan")
    assert console_errors == []


async def test_room_chat_edit_and_delete_own_messages(
    world: World, open_page: OpenPage, console_errors: list[str]
) -> None:
    """One's own message can be edited and deleted from the page, the other person
    sees both live, and nobody is offered to change someone else's message."""
    ana_m, lars_m = world.members[0], world.members[1]
    ana = await open_page(ana_m)
    lars = await open_page(lars_m)
    await enter_room(ana, world.room_id)
    await enter_room(lars, world.room_id)
    await say(ana, "See you on Tuesday")
    await say(ana, "Bring the syllabus")
    await expect(chat_line(lars, "Bring the syllabus")).to_be_visible()
    await expect(lars.locator(".messages").get_by_role("button")).to_have_count(0)

    first = ana.locator(".messages .msg").first
    await first.get_by_role("button", name=re.compile("^Edit your message")).click()
    editor = first.get_by_label("Edit your message")
    await expect(editor).to_be_focused()
    await editor.fill("See you on Thursday")
    await editor.press("Enter")
    await expect(chat_line(lars, "See you on Thursday")).to_be_visible()
    await expect(lars.locator(".messages .msg").first).to_contain_text("edited")

    ana.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    second = ana.locator(".messages .msg").nth(1)
    await second.get_by_role("button", name=re.compile("^Delete your message")).click()
    await expect(lars.locator(".messages .msg").nth(1)).to_contain_text(
        "This message was deleted."
    )
    await expect(chat_line(lars, "Bring the syllabus")).to_have_count(0)
    assert console_errors == []
