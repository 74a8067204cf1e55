"""The dashboard API over real sockets, on both backends: figures from real activity
(chat over the room socket, document edits over y-websocket, joins), who may see
what, range validation, and CSV exports that equal the JSON tables."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import update

from rooms.dashboard_routes import csv_cell, render_csv
from storage import open_database
from storage.events import EventRow, insert_events
from storage.models import Membership
from storage.stats import QUARTER_SECONDS, Period
from tests.support import TIMEOUT, Member, ServerProcess, World, join
from tests.yclient import add_activity, yclient

pytestmark = pytest.mark.anyio

TABLES = [
    "timeline",
    "institutions",
    "activities",
    "overdue",
    "silent",
    "agreements",
    "partnerships",
    "online",
]
UTC = dt.UTC


async def get_table(
    client: httpx.AsyncClient, name: str, **params: Any
) -> dict[str, Any]:
    r = await client.get(f"/api/dashboard/{name}", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body: dict[str, Any] = r.json()
    assert body["table"] == name
    assert body["columns"] == (
        list(body["rows"][0]) if body["rows"] else body["columns"]
    )
    return body


async def eventually(
    fetch: Callable[[], Awaitable[dict[str, Any]]],
    ready: Callable[[dict[str, Any]], bool],
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """Fetch until ``ready`` holds: events reach the log through a write queue, and
    document edits are summed until the document unloads."""
    last: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await fetch()
                if ready(last):
                    return last
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"never ready; last answer: {last}") from None


def row_of(table: dict[str, Any], **match: Any) -> dict[str, Any]:
    rows = [r for r in table["rows"] if all(r[k] == v for k, v in match.items())]
    assert len(rows) == 1, (match, table["rows"])
    return rows[0]


@contextlib.asynccontextmanager
async def database(server: ServerProcess) -> AsyncIterator[Any]:
    """The server's own database, for what real activity cannot make: the past."""
    async with open_database(server.database_url) as db:
        yield db


async def backdate_members(
    server: ServerProcess, partnership_id: int, days: int
) -> None:
    async with database(server) as db, db.sessions.begin() as session:
        await session.execute(
            update(Membership)
            .where(Membership.partnership_id == partnership_id)
            .values(created_at=dt.datetime.now(UTC) - dt.timedelta(days=days))
        )


async def say(sock: Any, text: str) -> None:
    client_id = uuid.uuid4().hex
    await sock.send({"type": "chat.send", "id": client_id, "text": text})
    await sock.recv_until("chat.ack", id=client_id)


async def coordinator_of(world: World, role: str = "coordinator") -> Member:
    """A user (of ``role``) who coordinates the world's partnership."""
    user = await world.add_user(
        f"Coord {uuid.uuid4().hex[:6]}", world.institutions[0], role
    )
    r = await world.admin.post(
        f"/api/partnerships/{world.partnership_id}/members",
        json={"user_id": user.id, "role": "coordinator"},
    )
    assert r.status_code == 201, r.text
    return user


# -- figures from real activity ------------------------------------------------------


async def test_dashboard_counts_messages_edits_calls_and_activities(
    server: ServerProcess, world: World
) -> None:
    """Chat, edits, joins and call events of one partnership appear in every table,
    attributed to the right day, institution and status."""
    ana, lars, mia = world.members  # institutions A, B, A
    pid, room = world.partnership_id, world.room_id
    scope = {"partnership_id": pid}
    async with (
        await join(server, ana, room) as a,
        await join(server, lars, room) as b,
        await join(server, mia, room),
    ):
        online = await eventually(
            lambda: get_table(world.admin, "online", **scope),
            lambda t: t["rows"][0]["online"] == 3,
        )
        assert online["online_users"] == 3
        assert online["rows"][0]["people"] == "; ".join(
            sorted(m.name for m in world.members)
        )
        for i in range(3):
            await say(a, f"hola {i}")
        for i in range(2):
            await say(b, f"hej {i}")
    async with yclient(server, room, "agreement", await lars.token(room)) as y:
        await y.edit(add_activity("t-done", title="Kick-off", status="done"))
        await y.edit(
            add_activity(
                "t-late", title="Syllabus", status="in_progress", ends_on="2020-01-31"
            )
        )
        await y.edit(add_activity("t-plan", title="Exchange", ends_on="2999-01-01"))
        await y.edit(
            add_activity(
                "t-drop", title="Visit", status="cancelled", ends_on="2020-01-01"
            )
        )
    now = dt.datetime.now(UTC)
    async with database(server) as db:
        # Call events as the call service writes them: seconds on each leave.
        await insert_events(
            db.sessions,
            [
                EventRow(
                    "call", room, ana.id, {"action": "start", "call_id": "c1"}, now
                ),
                EventRow(
                    "call", room, ana.id, {"action": "join", "call_id": "c1"}, now
                ),
                EventRow(
                    "call", room, lars.id, {"action": "join", "call_id": "c1"}, now
                ),
                EventRow(
                    "call",
                    room,
                    lars.id,
                    {"action": "leave", "call_id": "c1", "seconds": 30},
                    now,
                ),
                EventRow(
                    "call",
                    room,
                    ana.id,
                    {"action": "leave", "call_id": "c1", "seconds": 90},
                    now,
                ),
                EventRow(
                    "call",
                    room,
                    ana.id,
                    {"action": "end", "call_id": "c1", "seconds": 90},
                    now,
                ),
            ],
        )

    timeline = await eventually(
        lambda: get_table(world.admin, "timeline", **scope),
        lambda t: sum(r["edits"] for r in t["rows"]) >= 4,
    )
    rows = timeline["rows"]
    assert len(rows) == 30 and timeline["to"] == rows[-1]["day"]
    totals = {k: sum(r[k] for r in rows) for k in ("messages", "edits", "call_minutes")}
    assert totals == {"messages": 5, "edits": 4, "call_minutes": 2.0}
    busy = {r["day"] for r in rows if r["messages"] or r["edits"] or r["call_minutes"]}
    # Today (and yesterday only if midnight passed while the test ran).
    assert busy <= {rows[-2]["day"], rows[-1]["day"]}

    inst = await eventually(
        lambda: get_table(world.admin, "institutions", **scope),
        lambda t: sum(r["active_members"] for r in t["rows"]) == 3,
    )
    side_a, side_b = world.institutions
    assert row_of(inst, institution_id=side_a) | {"institution": None} == {
        "institution_id": side_a,
        "institution": None,
        "country": "MX",
        "members": 2,
        "active_members": 2,
        "messages": 3,
        "edits": 0,
        "call_minutes": 1.5,
    }
    assert row_of(inst, institution_id=side_b)["members"] == 1
    assert row_of(inst, institution_id=side_b)["messages"] == 2
    assert row_of(inst, institution_id=side_b)["edits"] == 4
    assert row_of(inst, institution_id=side_b)["call_minutes"] == 0.5
    assert len(inst["rows"]) == 2  # nobody from elsewhere
    assert inst["balance"] == {"active_members": 0.5, "messages": 0.667}

    statuses = await eventually(
        lambda: get_table(world.admin, "activities", **scope),
        lambda t: sum(r["activities"] for r in t["rows"]) == 4,
    )
    assert statuses["rows"] == [
        {"status": "planned", "activities": 1, "overdue": 0},
        {"status": "in_progress", "activities": 1, "overdue": 1},
        {"status": "done", "activities": 1, "overdue": 0},
        {"status": "cancelled", "activities": 1, "overdue": 0},
    ]
    overdue = await get_table(world.admin, "overdue", **scope)
    title = (await world.admin.get(f"/api/partnerships/{pid}")).json()["title"]
    today = dt.date.fromisoformat(overdue["today"])
    assert overdue["rows"] == [
        {
            "partnership_id": pid,
            "partnership": title,
            "activity_id": "t-late",
            "title": "Syllabus",
            "status": "in_progress",
            "ends_on": "2020-01-31",
            "days_overdue": (today - dt.date(2020, 1, 31)).days,
            "owner_id": None,
            "owner": None,
        }
    ]

    summary = await get_table(world.admin, "partnerships")
    mine = row_of(summary, partnership_id=pid)
    assert {k: mine[k] for k in mine if k not in ("partnership", "stage")} == {
        "partnership_id": pid,
        "members": 3,
        "active_members": 3,
        "messages": 5,
        "edits": 4,
        "call_minutes": 2.0,
        "activities": 4,
        "overdue": 1,
        "silent_members": 0,
    }
    # Across partnerships the figures include this one's.
    everything = await get_table(world.admin, "timeline")
    assert everything["rows"][-1]["messages"] >= 5
    assert everything["rows"][-1]["call_minutes"] >= 2.0

    # Once everyone has left, nobody is online.
    await eventually(
        lambda: get_table(world.admin, "online", **scope),
        lambda t: t["rows"][0]["online"] == 0 and t["rows"][0]["people"] == "",
    )


async def test_dashboard_days_follow_the_time_zone(
    server: ServerProcess, world: World
) -> None:
    """Events are counted on the local day of the requested time zone, including
    across a daylight-saving change and at the last instant of a day."""
    room, member = world.room_id, world.members[0].id

    def message(at: str) -> EventRow:
        return EventRow("message", room, member, {}, dt.datetime.fromisoformat(at))

    async with database(server) as db:
        await insert_events(
            db.sessions,
            [
                # Copenhagen moved from UTC+1 to UTC+2 on 2025-03-30 (a 23-hour day).
                message("2025-03-29T22:59:59+00:00"),  # 23:59:59 on the 29th there
                message("2025-03-29T23:00:00+00:00"),  # 00:00 on the 30th
                message("2025-03-30T21:59:59+00:00"),  # 23:59:59 CEST on the 30th
                message("2025-03-30T22:00:00+00:00"),  # 00:00 on the 31st
                # The last microsecond of a UTC day stays on that day.
                message("2025-03-31T23:59:59.999999+00:00"),
            ],
        )

    async def days(tz: str) -> dict[str, int]:
        t = await get_table(
            world.admin,
            "timeline",
            partnership_id=world.partnership_id,
            tz=tz,
            **{"from": "2025-03-29", "to": "2025-04-01"},
        )
        assert t["tz"] == tz
        return {r["day"]: r["messages"] for r in t["rows"]}

    assert await days("Europe/Copenhagen") == {
        "2025-03-29": 1,
        "2025-03-30": 2,
        "2025-03-31": 1,
        "2025-04-01": 1,
    }
    assert await days("UTC") == {
        "2025-03-29": 2,
        "2025-03-30": 2,
        "2025-03-31": 1,
        "2025-04-01": 0,
    }
    # Half-hour offsets: India is UTC+5:30 all year.
    assert await days("Asia/Kolkata") == {
        "2025-03-29": 0,
        "2025-03-30": 2,
        "2025-03-31": 2,
        "2025-04-01": 1,
    }


async def test_dashboard_silent_members(server: ServerProcess, world: World) -> None:
    """Members of a week or more with no join, message, edit or call in seven days
    are silent, never-active ones first; newer members are not."""
    ana, lars, mia = world.members
    await backdate_members(server, world.partnership_id, days=30)
    newcomer = await world.add_member("Newcomer", world.institutions[1])
    eight_days_ago = dt.datetime.now(UTC) - dt.timedelta(days=8)
    async with database(server) as db:
        await insert_events(
            db.sessions,
            [
                EventRow("join", world.room_id, lars.id, {}, eight_days_ago),
                # Administrative events are not taking part.
                EventRow("member_changed", world.room_id, mia.id, {}),
            ],
        )
    async with await join(server, ana, world.room_id) as a:
        await say(a, "still here")
    silent = await get_table(world.admin, "silent", partnership_id=world.partnership_id)
    assert silent["days"] == 7
    assert [(r["user_id"], r["days_silent"]) for r in silent["rows"]] == [
        (mia.id, None),
        (lars.id, 8),
    ]
    assert silent["rows"][0]["last_active_at"] is None
    assert silent["rows"][1]["last_active_at"].startswith(
        eight_days_ago.date().isoformat()
    )
    assert newcomer.id not in [r["user_id"] for r in silent["rows"]]
    summary = await get_table(world.admin, "partnerships")
    assert row_of(summary, partnership_id=world.partnership_id)["silent_members"] == 2


async def test_dashboard_agreements_nearing_expiry(
    server: ServerProcess, world: World
) -> None:
    """A signed agreement that ends within the window is listed with its days left;
    outside the window, or terminated, it is not."""
    path = f"/api/partnerships/{world.partnership_id}/agreement"
    scope = {"partnership_id": world.partnership_id, "tz": "Pacific/Auckland"}
    first = await get_table(world.admin, "agreements", **scope)
    today = dt.date.fromisoformat(first["today"])
    assert first["rows"] == [] and first["within_days"] == 90
    valid_to = today + dt.timedelta(days=10)
    r = await world.admin.put(
        path, json={"status": "signed", "valid_to": valid_to.isoformat()}
    )
    assert r.status_code == 200, r.text
    listed = await get_table(world.admin, "agreements", **scope)
    assert listed["rows"] == [
        {
            "partnership_id": world.partnership_id,
            "partnership": listed["rows"][0]["partnership"],
            "kind": "MOU",
            "status": "signed",
            "valid_to": valid_to.isoformat(),
            "days_left": 10,
        }
    ]
    assert (await get_table(world.admin, "agreements", within_days=9, **scope))[
        "rows"
    ] == []
    everything = await get_table(world.admin, "agreements")
    assert world.partnership_id in [r["partnership_id"] for r in everything["rows"]]
    await world.admin.put(path, json={"status": "terminated"})
    assert (await get_table(world.admin, "agreements", **scope))["rows"] == []


# -- who may see what -------------------------------------------------------------------


async def test_dashboard_scope_by_role(server: ServerProcess, world: World) -> None:
    """Coordinators see only the partnerships they coordinate (403 for others, existing
    or not), admins see all (404 for none), instructors and observers get 403."""
    coordinator = await coordinator_of(world)
    instructor_coordinating = await coordinator_of(world, role="instructor")
    observer = await world.add_member(
        "Olga Observer", world.institutions[1], "observer"
    )
    async with World.create(server, members=1) as other:
        for who in (coordinator, instructor_coordinating):
            summary = await get_table(who.http, "partnerships")
            assert [r["partnership_id"] for r in summary["rows"]] == [
                world.partnership_id
            ]
            online = await get_table(who.http, "online")
            assert [r["room_id"] for r in online["rows"]] == [world.room_id]
            r = await who.http.get(
                "/api/dashboard/timeline",
                params={"partnership_id": other.partnership_id},
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            r = await who.http.get(
                "/api/dashboard/timeline", params={"partnership_id": 2**50}
            )
            assert r.status_code == 403
            overview = (await who.http.get("/api/dashboard")).json()
            assert [p["id"] for p in overview["partnerships"]] == [world.partnership_id]
        admin_summary = await get_table(world.admin, "partnerships")
        assert {world.partnership_id, other.partnership_id} <= {
            r["partnership_id"] for r in admin_summary["rows"]
        }
        r = await world.admin.get(
            "/api/dashboard/timeline", params={"partnership_id": 2**50}
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        # A coordinator by role who coordinates nothing sees empty tables.
        idle = await world.add_user(
            "Idle Coordinator", world.institutions[0], "coordinator"
        )
        assert (await get_table(idle.http, "partnerships"))["rows"] == []
        for who in (world.members[0], observer, other.members[0]):
            for name in ("", *(f"/{t}" for t in TABLES), "/timeline.csv"):
                r = await who.http.get(f"/api/dashboard{name}")
                assert r.status_code == 403, (name, r.text)
                assert r.json()["error"]["code"] == "forbidden"
    async with httpx.AsyncClient(base_url=server.base_url) as anonymous:
        r = await anonymous.get("/api/dashboard/timeline")
        assert r.status_code == 401 and r.json()["error"]["code"] == "not_authenticated"


# -- ranges and parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"from": "2026-03-02", "to": "2026-03-01"},
        {"from": "2025-01-01", "to": "2026-01-02"},  # 367 days
        {"from": "2026-13-01"},
        {"to": "20260301"},
        {"from": "yesterday"},
        {"from": "0001-01-01", "to": "0001-01-02"},
        {"from": "9999-12-30", "to": "9999-12-31"},
        {"tz": "Mars/Olympus_Mons"},
        {"tz": "../../etc/passwd"},
        {"tz": "Europe"},
        {"partnership_id": "abc"},
        {"partnership_id": "0"},
        {"format": "xml"},
        {"colour": "red"},
    ],
)
async def test_dashboard_bad_parameters_are_422(
    world: World, params: dict[str, str]
) -> None:
    """Malformed or out-of-range parameters, and unknown ones, are refused with 422."""
    r = await world.admin.get("/api/dashboard/timeline", params=params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid"


async def test_dashboard_range_defaults_and_limits(world: World) -> None:
    """Without a range the last 30 days up to today (in the time zone) are shown;
    366 days is the longest range; window and format errors are 422."""
    t = await get_table(world.admin, "timeline", tz="Pacific/Kiritimati")
    last = dt.datetime.now(dt.timezone(dt.timedelta(hours=14))).date()
    assert dt.date.fromisoformat(t["to"]) in (last, last - dt.timedelta(days=1))
    assert dt.date.fromisoformat(t["from"]) == dt.date.fromisoformat(
        t["to"]
    ) - dt.timedelta(days=29)
    assert len(t["rows"]) == 30
    t = await get_table(
        world.admin, "timeline", **{"from": "2025-01-01", "to": "2026-01-01"}
    )
    assert len(t["rows"]) == 366
    t = await get_table(world.admin, "timeline", to="2026-01-10")
    assert (t["from"], t["to"]) == ("2025-12-12", "2026-01-10")
    for path, params in (
        ("/api/dashboard/agreements", {"within_days": "0"}),
        ("/api/dashboard/agreements", {"within_days": "366"}),
        ("/api/dashboard/timeline", {"within_days": "5"}),
        ("/api/dashboard/timeline.csv", {"format": "json"}),
    ):
        r = await world.admin.get(path, params=params)
        assert r.status_code == 422, (path, params, r.text)


# -- CSV -----------------------------------------------------------------------------------


def spreadsheet_safe(value: Any) -> str:
    """What a CSV cell must hold: text that starts a formula gets an apostrophe."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return str(value)


async def test_dashboard_csv_equals_the_json_tables(
    server: ServerProcess, world: World
) -> None:
    """Every table's CSV (``?format=csv`` and ``.csv``) holds the JSON columns and rows
    cell for cell, with formula-like text defused, as a named attachment."""
    ana = world.members[0]
    sly = await world.add_member(
        '=HYPERLINK("http://x.test","hi")', world.institutions[1]
    )
    await world.add_member("-Minus Person", world.institutions[0])
    await world.add_member("@At Person", world.institutions[1])
    await backdate_members(server, world.partnership_id, days=10)
    async with (
        await join(server, sly, world.room_id) as s,
        await join(server, ana, world.room_id),
    ):
        await say(s, "+1 from me")
        async with yclient(
            server, world.room_id, "agreement", await ana.token(world.room_id)
        ) as y:
            await y.edit(
                add_activity(
                    "x1",
                    title="=SUM(A1:A9)",
                    status="in_progress",
                    ends_on="2021-05-05",
                )
            )
        params = {
            "partnership_id": str(world.partnership_id),
            "from": "2026-01-01",
            "to": "2026-12-31",
            "tz": "America/Mexico_City",
        }
        await eventually(
            lambda: get_table(world.admin, "overdue", **params),
            lambda t: len(t["rows"]) == 1,
        )
        await eventually(
            lambda: get_table(world.admin, "online", **params),
            lambda t: t["rows"][0]["online"] == 2,
        )
        for name in TABLES:
            table = await get_table(world.admin, name, **params)
            for url, query in (
                (f"/api/dashboard/{name}", params | {"format": "csv"}),
                (f"/api/dashboard/{name}.csv", params),
            ):
                r = await world.admin.get(url, params=query)
                assert r.status_code == 200, r.text
                assert r.headers["content-type"] == "text/csv; charset=utf-8"
                assert r.headers["content-disposition"] == (
                    f'attachment; filename="coilroom-{name}-p{world.partnership_id}'
                    '-2026-01-01-to-2026-12-31.csv"'
                )
                assert "no-store" in r.headers["cache-control"]  # private figures
                assert r.content.startswith("\ufeff".encode())
                assert b"\r\n" in r.content
                got = list(
                    csv.reader(io.StringIO(r.content.decode("utf-8-sig"), newline=""))
                )
                assert got[0] == table["columns"], name
                expected = [
                    [spreadsheet_safe(row[c]) for c in table["columns"]]
                    for row in table["rows"]
                ]
                if name == "online":  # live: compare what cannot move meanwhile
                    expected = [e[:4] for e in expected]
                    got = [got[0], *(g[:4] for g in got[1:])]
                assert got[1:] == expected, name
    # The defused cells are really there.
    overdue_csv = (
        await world.admin.get("/api/dashboard/overdue.csv", params=params)
    ).text
    assert "'=SUM(A1:A9)" in overdue_csv
    silent = await get_table(world.admin, "silent", **params)
    names = [r["name"] for r in silent["rows"]]
    silent_csv = (
        await world.admin.get("/api/dashboard/silent.csv", params=params)
    ).text
    assert "'-Minus Person" in silent_csv and "'@At Person" in silent_csv
    assert "-Minus Person" in names and "@At Person" in names


# -- pure pieces -----------------------------------------------------------------------------


def test_period_days_are_local_days_across_daylight_saving() -> None:
    """A local day may last 23 or 25 hours; quarters fold into the local day they start."""
    copenhagen = ZoneInfo("Europe/Copenhagen")
    spring = Period(dt.date(2025, 3, 30), dt.date(2025, 3, 30), copenhagen)
    autumn = Period(dt.date(2025, 10, 26), dt.date(2025, 10, 26), copenhagen)
    assert spring.stop - spring.start == dt.timedelta(hours=23)
    assert autumn.stop - autumn.start == dt.timedelta(hours=25)
    assert spring.start == dt.datetime(2025, 3, 29, 23, tzinfo=UTC)

    def quarter(at: dt.datetime) -> int:
        return int(at.timestamp()) // QUARTER_SECONDS

    assert spring.local_day(quarter(spring.start)) == dt.date(2025, 3, 30)
    last = spring.stop - dt.timedelta(seconds=1)
    assert spring.local_day(quarter(last)) == dt.date(2025, 3, 30)
    assert spring.local_day(quarter(spring.stop)) == dt.date(2025, 3, 31)
    with pytest.raises(ValueError, match="ends before"):
        Period(dt.date(2025, 1, 2), dt.date(2025, 1, 1), copenhagen)


def test_csv_defuses_formulas_but_not_numbers() -> None:
    """Text cells that a spreadsheet would run get an apostrophe; numbers, empty cells
    and ordinary text do not; the file is UTF-8 with a byte order mark and CRLF."""
    assert [
        csv_cell(v) for v in ("=1+2", "+49 30", "-x", "@SUM(A1)", "\tx", "Sofía")
    ] == [
        "'=1+2",
        "'+49 30",
        "'-x",
        "'@SUM(A1)",
        "'\tx",
        "Sofía",
    ]
    assert [csv_cell(v) for v in (-3, 2.5, None, True)] == ["-3", "2.5", "", "true"]
    text = render_csv(
        ["name", "days_left"], [{"name": '=HYPERLINK("x")', "days_left": -1}]
    )
    assert text == '\ufeffname,days_left\r\n"\'=HYPERLINK(""x"")",-1\r\n'
