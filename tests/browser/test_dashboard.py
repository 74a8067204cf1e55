"""The administration pages and the dashboard in Chromium: an admin sets up a
partnership and invites an instructor, who accepts and takes part; the dashboard shows
that activity, updates who is online without a reload, and its CSV exports match."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import re
import uuid
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import OpenPage
from tests.support import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    TIMEOUT,
    World,
    login,
    room_socket,
)
from tests.yclient import add_activity, yclient

pytestmark = pytest.mark.anyio

PASSWORD = "instructor-passphrase"
# Who is online is polled every 5 s: allow two polls and the presence update.
LIVE_MS = (TIMEOUT + 5) * 1000
COUNTRIES = {"MX": "Mexico", "DK": "Denmark"}


async def as_admin(open_page: OpenPage, **size: Any) -> Page:
    page = await open_page(**size)
    r = await page.context.request.post(
        "/api/session", data={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    )
    assert r.ok, await r.text()
    return page


async def institution_names(world: World) -> list[str]:
    listed = (await world.admin.get("/api/institutions")).json()["institutions"]
    names = {i["id"]: i["name"] for i in listed}
    return [names[i] for i in world.institutions]


async def table_rows(page: Page, table: str) -> list[list[str]]:
    """The body rows of a dashboard table as the page shows them (hidden or not)."""
    return await page.locator(f'table[data-table="{table}"] tbody tr').evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.textContent.trim()))"
    )


async def csv_rows(page: Page, table: str) -> tuple[list[str], list[list[str]]]:
    """Download the card's CSV through its link, with the page's own cookies."""
    href = await page.locator(f'a.csv-link[data-table="{table}"]').get_attribute("href")
    assert href and href.startswith(f"/api/dashboard/{table}.csv?"), href
    r = await page.context.request.get(href)
    assert r.ok and r.headers["content-type"] == "text/csv; charset=utf-8"
    assert r.headers["content-disposition"].startswith("attachment; filename=")
    rows = list(
        csv.reader(io.StringIO((await r.body()).decode("utf-8-sig"), newline=""))
    )
    return rows[0], rows[1:]


def as_shown(column: str, cell: str) -> str:
    """A CSV cell as the page shows it (en-GB numbers, words for codes, a dash for none)."""
    if cell == "":
        return "—"
    if re.fullmatch(r"-?\d+(\.\d+)?", cell):
        number = float(cell)
        return f"{number:,.1f}".removesuffix(".0")
    if column == "status":
        return cell.replace("_", " ")
    if column == "country":  # the test world's countries, named in en-GB
        return f"{COUNTRIES[cell]} ({cell})"
    return cell


async def assert_csv_matches_page(page: Page, table: str) -> list[list[str]]:
    header, rows = await csv_rows(page, table)
    shown = [i for i, c in enumerate(header) if not re.search(r"(^|_)id$", c)]
    expected = [[as_shown(header[i], row[i]) for i in shown] for row in rows]
    assert await table_rows(page, table) == expected, table
    return rows


@pytest.mark.slow
async def test_admin_invites_instructor_and_dashboard_shows_their_activity(
    server: Any,
    world: World,
    open_page: OpenPage,
    console_errors: list[str],
    artifacts: Any,
) -> None:
    """An admin creates a partnership and invites an instructor, who accepts and enters
    the room; the dashboard shows their messages, activity statuses and call minutes,
    who is online (live, without a reload), and CSV exports that match the tables."""
    tag = uuid.uuid4().hex[:6]
    name_a, name_b = await institution_names(world)
    admin = await as_admin(open_page)

    # The admin creates a partnership of two institutions.
    await admin.goto("/admin")
    title = f"Reef Futures {tag}"
    await admin.get_by_label("Title", exact=True).fill(title)
    await admin.get_by_label(re.compile(re.escape(name_a))).check()
    await admin.get_by_label(re.compile(re.escape(name_b))).check()
    await admin.get_by_role("button", name="Create partnership").click()
    await expect(admin.get_by_role("heading", level=1)).to_have_text(title)
    partnership_id = int(re.search(r"/admin/partnerships/(\d+)$", admin.url)[1])  # type: ignore[index]

    # ... moves it on a stage and invites an instructor of the first institution.
    await admin.get_by_label("Move to stage").select_option("meeting")
    await admin.get_by_role("button", name="Move").click()
    await expect(admin.locator(".meta")).to_contain_text("Stage: meeting")
    email = f"reef-{tag}@tests.coilroom.test"
    await admin.get_by_label("E-mail").fill(email)
    await admin.get_by_label("Role", exact=True).select_option("instructor")
    await admin.get_by_label("Institution", exact=True).select_option(label=name_a)
    await admin.get_by_role("button", name="Invite", exact=True).click()
    link = await admin.get_by_label("Invitation link").input_value()
    assert re.fullmatch(rf"{re.escape(server.base_url)}/invite/[\w-]+", link), link
    await expect(admin.locator("tr[data-invitation]", has_text=email)).to_contain_text(
        "pending"
    )

    # The instructor accepts (a new account) and lands in the room.
    instructor = await open_page()
    await instructor.goto(link.removeprefix(server.base_url))
    await instructor.get_by_label("Your name (as partners will see it)").fill(
        f"Rosa Reef {tag}"
    )
    await instructor.get_by_label("Choose a password").fill(PASSWORD)
    await instructor.get_by_label("Repeat the password").fill(PASSWORD)
    await instructor.get_by_role("button", name="Create my account and accept").click()
    await expect(instructor).to_have_url(re.compile(r"/room/\d+$"))
    room_id = int(instructor.url.rsplit("/", 1)[1])
    await expect(instructor.locator(".doc-status")).to_contain_text("Live")
    box = instructor.get_by_label("Message", exact=True)
    for text in ("Hola", "Shall we plan the reef survey?", "Tuesday works"):
        await box.fill(text)
        await box.press("Enter")
        await expect(
            instructor.locator(".messages .msg-text", has_text=text)
        ).to_be_visible()
    await admin.reload()
    await expect(admin.locator("tr[data-invitation]", has_text=email)).to_contain_text(
        "accepted"
    )

    # Activities in the agreement (a stock Yjs client, as the instructor), and a call.
    client: httpx.AsyncClient = await login(server, email, PASSWORD)
    try:
        r = await client.post(f"/api/rooms/{room_id}/tokens")
        token = r.json()["token"]
    finally:
        await client.aclose()
    async with yclient(server, room_id, "agreement", token) as y:
        await y.edit(add_activity("a1", title="Survey", status="done"))
        await y.edit(
            add_activity(
                "a2", title="Report", status="in_progress", ends_on="2021-06-30"
            )
        )
        await y.edit(add_activity("a3", title="Exchange", ends_on="2999-12-31"))
    # A real call of about five seconds: 0.1 call minutes on the dashboard (minutes
    # are shown to one decimal; anything from 3 to 8.9 seconds reads 0.1).
    async with room_socket(server, room_id, token=token) as sock:
        await sock.send({"type": "call.join"})
        await sock.recv_until("call.joined")
        await asyncio.sleep(5)
        await sock.send({"type": "call.leave"})
        await sock.recv_until("call.participant_left")
    # The activity overview follows the document shortly after an edit.
    for _ in range(int(TIMEOUT * 20)):
        got = await world.admin.get(
            "/api/dashboard/activities", params={"partnership_id": partnership_id}
        )
        if sum(r["activities"] for r in got.json()["rows"]) == 3:
            break
        await admin.wait_for_timeout(50)  # bounded by TIMEOUT

    # The dashboard of this partnership.
    await admin.goto(f"/dashboard?partnership={partnership_id}")
    await expect(admin.get_by_label("Partnership", exact=True)).to_have_value(
        str(partnership_id)
    )
    online = admin.locator(".tile", has_text="Online now").locator(".tile-value")
    await expect(online).to_have_text("1")
    await expect(
        admin.locator(".tile", has_text="Messages").locator(".tile-value")
    ).to_have_text("3")
    await expect(
        admin.locator(".tile", has_text="Call minutes").locator(".tile-value")
    ).to_have_text("0.1")
    await expect(
        admin.locator(".tile", has_text="Overdue activities").locator(".tile-value")
    ).to_have_text("1")
    await expect(
        admin.locator('table[data-table="activities"] tbody tr')
    ).to_have_count(4)
    assert await table_rows(admin, "activities") == [
        ["planned", "1", "0"],
        ["in progress", "1", "1"],
        ["done", "1", "0"],
        ["cancelled", "0", "0"],
    ]
    timeline = await table_rows(admin, "timeline")
    assert len(timeline) == 30
    assert sum(int(row[1]) for row in timeline) == 3  # messages, on today's row
    late = (dt.datetime.now(dt.UTC).date() - dt.date(2021, 6, 30)).days  # page in UTC
    assert await table_rows(admin, "overdue") == [
        [title, "Report", "in progress", "2021-06-30", f"{late:,}", "—"]
    ]
    online_rows = await table_rows(admin, "online")
    assert online_rows == [[title, title, "1", "0", f"Rosa Reef {tag}"]]

    # Each card's CSV holds what its table shows.
    for table in ("timeline", "institutions", "activities", "overdue", "online"):
        await assert_csv_matches_page(admin, table)
    institutions = await csv_rows(admin, "institutions")
    header = institutions[0]
    by_name = {row[header.index("institution")]: row for row in institutions[1]}
    assert by_name[name_a][header.index("messages")] == "3"
    assert by_name[name_a][header.index("call_minutes")] == "0.1"
    assert by_name[name_b][header.index("members")] == "0"

    await admin.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)

    # The instructor leaves the room: the dashboard says so without a reload.
    await instructor.goto("/")
    await expect(online).to_have_text("0", timeout=LIVE_MS)
    await expect(
        admin.locator('table[data-table="online"] tbody td[data-column="online"]')
    ).to_have_text("0")

    # Across partnerships the admin sees this one next to the others.
    await admin.get_by_label("Partnership", exact=True).select_option("")
    row = admin.locator('table[data-table="partnerships"] tbody tr', has_text=title)
    await expect(row).to_have_count(1)
    await expect(row.locator('td[data-column="messages"]')).to_have_text("3")
    await expect(admin).to_have_url(re.compile(r"/dashboard\?from="))
    assert console_errors == []


async def test_dashboard_fits_a_phone_and_reads_as_tables(
    world: World, open_page: OpenPage, console_errors: list[str], artifacts: Any
) -> None:
    """On a 375 px phone the dashboard and the administration pages do not scroll
    sideways, every chart is an image with a summary label, and every card has a table
    and a CSV link."""
    page = await as_admin(open_page, width=375, height=800)
    await page.goto(f"/dashboard?partnership={world.partnership_id}")
    await expect(page.locator('table[data-table="timeline"]')).to_have_count(1)
    await expect(page.locator('table[data-table="online"]')).to_have_count(1)
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - window.innerWidth"
    )
    assert overflow <= 0, overflow
    labels = await page.locator("canvas").evaluate_all(
        "cs => cs.map(c => [c.getAttribute('role'), c.getAttribute('aria-label')])"
    )
    assert labels and all(
        role == "img" and label.startswith("Chart: ") for role, label in labels
    ), labels
    for card in await page.locator(".dash-card").all():
        await expect(card.locator("table")).to_have_count(1)
        await expect(card.locator("a.csv-link")).to_have_count(1)
    # A bad range is explained, not sent.
    await page.get_by_label("From", exact=True).fill("2026-05-02")
    await page.get_by_label("To", exact=True).fill("2026-05-01")
    await page.get_by_role("button", name="Show").click()
    await expect(page.get_by_role("alert")).to_have_text(
        "The first day is after the last day."
    )
    await page.screenshot(path=str(artifacts / "dashboard-phone.png"), full_page=True)
    # The administration pages fit too.
    for path in ("/admin", f"/admin/partnerships/{world.partnership_id}"):
        await page.goto(path)
        await expect(page.locator(".data-table").first).to_be_visible()
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0, (path, overflow)
    assert console_errors == []


async def test_admin_pages_resend_and_revoke_invitations(
    server: Any, world: World, open_page: OpenPage, console_errors: list[str]
) -> None:
    """Resending an invitation makes a new link (the old one stops working) and revoking
    it shows it revoked; an admin adds an existing account as a member; coordinators
    see their own partnerships, instructors are told the pages are not for them."""
    page = await as_admin(open_page)
    await page.goto(f"/admin/partnerships/{world.partnership_id}")
    email = f"inv-{uuid.uuid4().hex[:6]}@tests.coilroom.test"
    await page.get_by_label("E-mail").fill(email)
    await page.get_by_role("button", name="Invite", exact=True).click()
    first = await page.get_by_label("Invitation link").input_value()
    await page.get_by_role("button", name=f"Resend the invitation for {email}").click()
    await expect(page.get_by_label("Invitation link")).not_to_have_value(first)
    second = await page.get_by_label("Invitation link").input_value()
    code = first.rsplit("/", 1)[1]
    assert (await world.admin.get(f"/api/invitations/{code}")).status_code == 404
    await page.get_by_role("button", name=f"Revoke the invitation for {email}").click()
    await expect(page.locator("tr[data-invitation]", has_text=email)).to_contain_text(
        "revoked"
    )
    await expect(page.get_by_label("Invitation link")).to_have_count(0)
    assert (
        await world.admin.get(f"/api/invitations/{second.rsplit('/', 1)[1]}")
    ).status_code == 410

    # An admin adds someone who already has an account.
    existing = await world.add_user(
        f"Xavier {uuid.uuid4().hex[:6]}", world.institutions[1]
    )
    await page.reload()
    await page.get_by_label("Person").select_option(
        label=f"{existing.name} ({existing.email})"
    )
    await page.get_by_label("Role in the partnership").select_option("observer")
    await page.get_by_role("button", name="Add member").click()
    await expect(page.get_by_role("heading", name="Members (4)")).to_be_visible()
    await expect(page.get_by_label(f"Role of {existing.name}")).to_have_value(
        "observer"
    )

    coordinator = await world.add_user(
        "Cora Coordinator", world.institutions[0], "coordinator"
    )
    r = await world.admin.post(
        f"/api/partnerships/{world.partnership_id}/members",
        json={"user_id": coordinator.id, "role": "coordinator"},
    )
    assert r.status_code == 201
    coord_page = await open_page(coordinator)
    await coord_page.goto("/admin")
    rows = coord_page.locator(".data-table tbody tr")
    await expect(rows).to_have_count(1)
    await expect(coord_page.get_by_role("heading", name="Institutions")).to_have_count(
        0
    )
    await coord_page.goto("/dashboard")
    options = coord_page.get_by_label("Partnership", exact=True).locator("option")
    await expect(options).to_have_count(2)  # "All my partnerships" and theirs

    instructor_page = await open_page(world.members[0])
    await instructor_page.goto("/dashboard")
    await expect(instructor_page.locator(".notice.error")).to_contain_text(
        "administrators and coordinators"
    )
    await instructor_page.goto("/admin")
    await expect(instructor_page.locator(".notice.error")).to_contain_text(
        "administrators and the coordinators"
    )
    assert console_errors == []
