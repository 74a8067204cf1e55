"""HTTP API for the dashboards: the table behind each chart, as JSON or CSV.

Administrators see every partnership, coordinators the partnerships they coordinate;
everyone else is refused (403). Every table answers at ``/api/dashboard/{name}``
(JSON, or CSV with ``?format=csv``) and at ``/api/dashboard/{name}.csv``; the CSV
holds exactly the JSON's ``columns`` and ``rows``. The figures come from
``storage.stats`` (the persisted event log and projections); who is online now comes
from the live presence store. ``docs/api.md`` ("Dashboards") describes each table.

Live numbers: the page polls ``/api/dashboard/online`` every few seconds rather than
holding a Server-Sent Events stream. Presence has no change feed across rooms, so a
stream would poll the same store on the server; a poll is one short request that any
process can answer (presence moves to Redis for several processes), needs no
connection held across deploys or proxies, and stops by itself when the tab is hidden.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rooms.http import ApiError, current_user, json_response
from storage import stats
from storage.models import UserRole, utcnow

DEFAULT_DAYS = 30
MAX_RANGE_DAYS = 366
DEFAULT_WITHIN_DAYS = 90
MAX_WITHIN_DAYS = 365
FIRST_DAY = dt.date(1970, 1, 2)
LAST_DAY = dt.date(9998, 12, 31)
COMMON_PARAMS = frozenset({"partnership_id", "from", "to", "tz", "format"})

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ZONE = re.compile(r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")
_ID = re.compile(r"^[1-9][0-9]{0,17}$")
# A spreadsheet runs a cell that starts with one of these as a formula
# (OWASP "CSV injection"); such text cells get a leading apostrophe.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, slots=True)
class Query:
    """A dashboard request, validated: who asks, about what, for which days."""

    scope: stats.Scope
    partnership_id: int | None
    period: stats.Period
    tz_name: str
    format: str
    params: dict[str, str]

    @property
    def today(self) -> dt.date:
        return stats.local_today(self.period.tz)


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid", message)


def _date_param(raw: str | None, name: str) -> dt.date | None:
    if raw is None:
        return None
    try:
        if not _DATE.match(raw):
            raise ValueError
        day = dt.date.fromisoformat(raw)
    except ValueError:
        raise _invalid(f"{name} must be a date, YYYY-MM-DD") from None
    # Midnights are converted to UTC and back: keep clear of the calendar's ends.
    if not FIRST_DAY <= day <= LAST_DAY:
        raise _invalid(f"{name} must be between {FIRST_DAY} and {LAST_DAY}")
    return day


def _zone(raw: str | None) -> tuple[str, ZoneInfo]:
    name = raw if raw is not None else "UTC"
    try:
        if len(name) > 64 or not _ZONE.match(name):
            raise ValueError
        return name, ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _invalid(
            "tz must be an IANA time zone such as Europe/Copenhagen"
        ) from None


async def _scope(request: Request) -> stats.Scope:
    """401 not logged in; 403 neither an administrator nor a coordinator."""
    user = await current_user(request)
    scope = await stats.dashboard_scope(_db(request), user.id, user.role)
    if scope is None or scope or user.role == UserRole.COORDINATOR:
        return scope
    raise ApiError(403, "forbidden", "administrators and coordinators only")


async def parse_query(request: Request, extra: frozenset[str] = frozenset()) -> Query:
    """Check the caller and the query string (422 for anything unknown or malformed)."""
    scope = await _scope(request)
    params = dict(request.query_params)
    unknown = sorted(set(params) - COMMON_PARAMS - extra)
    if unknown:
        raise _invalid(f"unknown parameter {unknown[0]!r}")
    as_csv = request.url.path.endswith(".csv")
    fmt = params.get("format", "csv" if as_csv else "json")
    if as_csv and fmt != "csv":
        raise _invalid("a .csv address gives CSV only")
    if fmt not in ("json", "csv"):
        raise _invalid("format must be json or csv")
    tz_name, tz = _zone(params.get("tz"))
    last = _date_param(params.get("to"), "to") or stats.local_today(tz)
    first = _date_param(params.get("from"), "from") or last - dt.timedelta(
        days=DEFAULT_DAYS - 1
    )
    if first > last:
        raise _invalid("from is after to")
    if (last - first).days + 1 > MAX_RANGE_DAYS:
        raise _invalid(f"at most {MAX_RANGE_DAYS} days at once")
    partnership_id = None
    if "partnership_id" in params:
        raw = params["partnership_id"]
        if not _ID.match(raw):
            raise _invalid("partnership_id must be a positive integer")
        partnership_id = int(raw)
        if scope is None:
            if not await stats.partnership_exists(_db(request), partnership_id):
                raise ApiError(404, "not_found", "no such partnership")
        elif partnership_id not in scope:
            # Same answer whether or not it exists: coordinators see only their own.
            raise ApiError(
                403, "forbidden", "only its coordinators and administrators see it"
            )
        scope = [partnership_id]
    return Query(
        scope=scope,
        partnership_id=partnership_id,
        period=stats.Period(first, last, tz),
        tz_name=tz_name,
        format=fmt,
        params=params,
    )


def _db(request: Request) -> stats.Sessions:
    return request.app.state.db.sessions  # type: ignore[no-any-return]


# -- rendering ------------------------------------------------------------------------


def csv_cell(value: Any) -> str:
    """One CSV cell: empty for null; text that a spreadsheet would run is defused."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value if value.startswith(_FORMULA_START) else value
    return str(value)


def render_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    # A byte order mark: spreadsheet programs then read the names as UTF-8.
    out.write("\ufeff")
    writer = csv.writer(out)  # RFC 4180: CRLF line ends, quotes where needed
    writer.writerow(columns)
    writer.writerows([csv_cell(row[c]) for c in columns] for row in rows)
    return out.getvalue()


def _respond(
    query: Query, name: str, row_type: type, rows: list[Any], **extra: Any
) -> Response:
    columns = [f.name for f in dataclasses.fields(row_type)]
    # One conversion for both formats (dates as YYYY-MM-DD, times as UTC with Z),
    # so the CSV is the JSON table cell for cell.
    plain: list[dict[str, Any]] = msgspec.to_builtins(rows)
    if query.format == "csv":
        scope = f"-p{query.partnership_id}" if query.partnership_id else ""
        filename = (
            f"coilroom-{name}{scope}-{query.period.first}-to-{query.period.last}.csv"
        )
        return Response(
            render_csv(columns, plain),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    return json_response(
        {
            "table": name,
            "partnership_id": query.partnership_id,
            "from": query.period.first.isoformat(),
            "to": query.period.last.isoformat(),
            "tz": query.tz_name,
            **extra,
            "columns": columns,
            "rows": plain,
        },
    )


# -- tables -----------------------------------------------------------------------------


async def timeline(request: Request) -> Response:
    query = await parse_query(request)
    rows = await stats.daily_activity(_db(request), query.scope, query.period)
    return _respond(query, "timeline", stats.DayRow, rows)


async def institutions(request: Request) -> Response:
    query = await parse_query(request)
    result = await stats.participation(_db(request), query.scope, query.period)
    return _respond(
        query,
        "institutions",
        stats.InstitutionRow,
        result.rows,
        balance={
            "active_members": result.balance_active_members,
            "messages": result.balance_messages,
        },
    )


async def activities(request: Request) -> Response:
    query = await parse_query(request)
    rows = await stats.activity_statuses(_db(request), query.scope, query.today)
    return _respond(query, "activities", stats.StatusRow, rows, today=query.today)


async def overdue(request: Request) -> Response:
    query = await parse_query(request)
    rows = await stats.overdue_activities(_db(request), query.scope, query.today)
    return _respond(query, "overdue", stats.OverdueRow, rows, today=query.today)


async def silent(request: Request) -> Response:
    query = await parse_query(request)
    rows = await stats.silent_members(_db(request), query.scope, utcnow())
    return _respond(query, "silent", stats.SilentRow, rows, days=stats.SILENT_DAYS)


async def agreements(request: Request) -> Response:
    query = await parse_query(request, frozenset({"within_days"}))
    raw = query.params.get("within_days", str(DEFAULT_WITHIN_DAYS))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_WITHIN_DAYS:
        raise _invalid(f"within_days must be between 1 and {MAX_WITHIN_DAYS}")
    rows = await stats.expiring_agreements(
        _db(request), query.scope, query.today, int(raw)
    )
    return _respond(
        query,
        "agreements",
        stats.AgreementRow,
        rows,
        today=query.today,
        within_days=int(raw),
    )


async def partnerships(request: Request) -> Response:
    query = await parse_query(request)
    rows = await stats.partnership_summary(
        _db(request), query.scope, query.period, utcnow()
    )
    return _respond(query, "partnerships", stats.PartnershipRow, rows)


@dataclass(frozen=True, slots=True)
class OnlineRow:
    partnership_id: int
    partnership: str
    room_id: int
    room: str
    online: int
    away: int
    people: str  # "Ana Morales; Lars Nielsen"


async def online(request: Request) -> Response:
    """Who is online now in each room in scope, from the live presence store."""
    query = await parse_query(request)
    presence = request.app.state.room_services.presence
    rows, everyone = [], set()
    for ref in await stats.rooms_in_scope(_db(request), query.scope):
        here = await presence.snapshot(ref.room_id)
        everyone.update(p.user.id for p in here)
        rows.append(
            OnlineRow(
                ref.partnership_id,
                ref.partnership,
                ref.room_id,
                ref.room,
                len(here),
                sum(p.status == "away" for p in here),
                "; ".join(sorted(p.user.name for p in here)),
            )
        )
    return _respond(
        query,
        "online",
        OnlineRow,
        rows,
        online_users=len(everyone),
        at=utcnow(),
    )


async def overview(request: Request) -> Response:
    """What the dashboard page needs first: the partnerships in scope and the limits."""
    query = await parse_query(request)
    refs = await stats.rooms_in_scope(_db(request), query.scope)
    seen: dict[int, dict[str, Any]] = {}
    for ref in refs:
        seen.setdefault(
            ref.partnership_id,
            {"id": ref.partnership_id, "title": ref.partnership, "room_ids": []},
        )["room_ids"].append(ref.room_id)
    return json_response(
        {
            "partnerships": list(seen.values()),
            "from": query.period.first.isoformat(),
            "to": query.period.last.isoformat(),
            "tz": query.tz_name,
            "max_range_days": MAX_RANGE_DAYS,
            "tables": [name for name, _ in TABLES],
        },
    )


Handler = Callable[[Request], Awaitable[Response]]
TABLES: list[tuple[str, Handler]] = [
    ("timeline", timeline),
    ("institutions", institutions),
    ("activities", activities),
    ("overdue", overdue),
    ("silent", silent),
    ("agreements", agreements),
    ("partnerships", partnerships),
    ("online", online),
]

routes = [Route("/api/dashboard", overview, methods=["GET"])]
for _name, _handler in TABLES:
    routes += [
        Route(f"/api/dashboard/{_name}", _handler, methods=["GET"]),
        Route(f"/api/dashboard/{_name}.csv", _handler, methods=["GET"]),
    ]
