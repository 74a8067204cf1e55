"""Dashboard figures: typed queries over the activity event log, memberships and the
activity projection (never over live documents).

Every function takes the session factory, a scope (``None`` for every partnership,
else the partnership ids the caller may see) and plain values, and returns frozen
rows whose field order is the column order of the table behind a chart.

Semantics (also in ``docs/api.md``, "Dashboards"):

- **messages** count ``message`` events (one per chat message sent; edits and
  deletions of messages are not counted again);
- **edits** sum the ``updates`` of ``edit`` events (one update per change a client
  sends; the document writer sums them per person into one event a minute);
- **call minutes** sum the ``seconds`` of ``call`` events whose ``action`` is
  ``leave`` (one per participant leaving a call), counted on the day they left;
- a **participant** is a member of the partnership; an **active** participant had a
  ``join``, ``message``, ``edit`` or ``call`` event in the period;
- a member is **silent** when they have been a member for at least seven days and
  had none of those events in the last seven days;
- an activity is **overdue** when it ends before today and is still ``planned`` or
  ``in_progress`` (as ``GET /api/rooms/{id}/activities`` says).

Days are local days of one IANA time zone. Events are summed in SQL per quarter of
an hour (every time zone in use today is a whole number of quarter hours from UTC,
so a quarter never straddles a local midnight) and the quarters are folded into
local days here, with ``zoneinfo``: daylight-saving days of 23 or 25 hours come out
right, and SQLite needs no time zone database.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    and_,
    case,
    distinct,
    func,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from storage.models import (
    ActivityEvent,
    ActivityRow,
    Agreement,
    Institution,
    MemberRole,
    Membership,
    Partnership,
    PartnershipInstitution,
    Room,
    User,
    UserRole,
)

Sessions = async_sessionmaker[AsyncSession]
# The partnerships a caller may see: None means all of them (administrators).
Scope = Sequence[int] | None

QUARTER_SECONDS = 900
SILENT_DAYS = 7
ACTIVITY_STATUSES = ("planned", "in_progress", "done", "cancelled")
OPEN_STATUSES = ("planned", "in_progress")
# What shows a member is taking part; admin and document bookkeeping events do not.
PRESENCE_KINDS = ("join", "message", "edit", "call")
COUNTED_KINDS = ("message", "edit", "call")


# -- periods ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Period:
    """Local days ``first`` to ``last`` (both included) in time zone ``tz``."""

    first: dt.date
    last: dt.date
    tz: ZoneInfo

    def __post_init__(self) -> None:
        if self.last < self.first:
            raise ValueError("the period ends before it starts")

    @property
    def start(self) -> dt.datetime:
        """The first local midnight, in UTC."""
        return _midnight(self.first, self.tz)

    @property
    def stop(self) -> dt.datetime:
        """The local midnight after the last day, in UTC (excluded)."""
        return _midnight(self.last + dt.timedelta(days=1), self.tz)

    def days(self) -> list[dt.date]:
        count = (self.last - self.first).days + 1
        return [self.first + dt.timedelta(days=i) for i in range(count)]

    def local_day(self, quarter: int) -> dt.date:
        """The local day a quarter hour (counted from the Unix epoch) falls on."""
        at = dt.datetime.fromtimestamp(quarter * QUARTER_SECONDS, dt.UTC)
        return at.astimezone(self.tz).date()


def _midnight(day: dt.date, tz: ZoneInfo) -> dt.datetime:
    # Where a zone skips midnight (a DST change at 00:00) fold=0 gives the earlier
    # offset: the day starts an hour late, which is the best a "midnight" can do.
    return dt.datetime.combine(day, dt.time(0), tzinfo=tz).astimezone(dt.UTC)


def local_today(tz: ZoneInfo) -> dt.date:
    return dt.datetime.now(tz).date()


# -- SQL pieces ------------------------------------------------------------------------


class quarter_hour(FunctionElement[int]):
    """The quarter hour since the Unix epoch of a UTC timestamp column."""

    type = BigInteger()
    inherit_cache = True
    name = "quarter_hour"


@compiles(quarter_hour, "sqlite")
def _quarter_sqlite(element: quarter_hour, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite keeps UTC timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff'; strftime rounds
    # fractional seconds (…59.9996 becomes the next second, maybe the next day), so
    # cut them off first. No bound parameters: GROUP BY must repeat it verbatim.
    (column,) = element.clauses
    at = compiler.process(column, **kw)
    return f"(CAST(strftime('%s', substr({at}, 1, 19)) AS INTEGER) / {QUARTER_SECONDS})"


@compiles(quarter_hour, "postgresql")
def _quarter_postgres(element: quarter_hour, compiler: SQLCompiler, **kw: Any) -> str:
    (column,) = element.clauses
    at = compiler.process(column, **kw)
    return f"CAST(floor(extract(epoch FROM {at}) / {QUARTER_SECONDS}) AS BIGINT)"


_kind = ActivityEvent.kind
_updates = ActivityEvent.details["updates"].as_integer()
_seconds = ActivityEvent.details["seconds"].as_float()
_action = ActivityEvent.details["action"].as_string()


def _measures() -> tuple[ColumnElement[Any], ...]:
    """Messages, document updates and call seconds of the grouped events."""
    return (
        func.coalesce(func.sum(case((_kind == "message", 1), else_=0)), 0),
        func.coalesce(func.sum(case((_kind == "edit", _updates), else_=0)), 0),
        func.coalesce(
            func.sum(
                case((and_(_kind == "call", _action == "leave"), _seconds), else_=0.0)
            ),
            0.0,
        ),
    )


def _partnerships_in(column: Any, scope: Scope) -> ColumnElement[bool]:
    if scope is None:
        return column.is_not(None)  # type: ignore[no-any-return]
    return column.in_(list(scope))  # type: ignore[no-any-return]


def _rooms_of(scope: Scope) -> Any:
    """The ids of the rooms of the partnerships in scope (a subquery)."""
    rooms = select(Room.id)
    if scope is not None:
        rooms = rooms.where(Room.partnership_id.in_(list(scope)))
    return rooms


def _events_in(scope: Scope, period: Period | None, kinds: Sequence[str]) -> Any:
    """The WHERE clause for events of some kinds in the scope's rooms and period."""
    clauses = [ActivityEvent.room_id.in_(_rooms_of(scope)), _kind.in_(list(kinds))]
    if period is not None:
        clauses += [ActivityEvent.at >= period.start, ActivityEvent.at < period.stop]
    return and_(*clauses)


def _minutes(seconds: float) -> float:
    return round(float(seconds) / 60, 1)


async def _measures_by(
    session: AsyncSession, group: Any, scope: Scope, period: Period
) -> dict[Any, tuple[int, int, float]]:
    """Messages, edits and call seconds of the period, per value of ``group`` (a
    column of the event's room or user)."""
    rows = await session.execute(
        select(group, *_measures())
        .select_from(ActivityEvent)
        .join(Room, Room.id == ActivityEvent.room_id)
        .outerjoin(User, User.id == ActivityEvent.user_id)
        .where(_events_in(scope, period, COUNTED_KINDS))
        .group_by(group)
    )
    return {key: (int(m), int(e), float(s)) for key, m, e, s in rows}


async def _active_by(
    session: AsyncSession, group: Any, scope: Scope, period: Period
) -> dict[Any, int]:
    """Members who took part in the period (in their partnership's room), per value
    of ``group``; each person counts once per group."""
    rows = await session.execute(
        select(group, func.count(distinct(ActivityEvent.user_id)))
        .select_from(ActivityEvent)
        .join(Room, Room.id == ActivityEvent.room_id)
        .join(
            Membership,
            and_(
                Membership.partnership_id == Room.partnership_id,
                Membership.user_id == ActivityEvent.user_id,
            ),
        )
        .join(User, User.id == ActivityEvent.user_id)
        .where(_events_in(scope, period, PRESENCE_KINDS))
        .group_by(group)
    )
    return {key: int(n) for key, n in rows}


# -- scope -----------------------------------------------------------------------------


async def dashboard_scope(sessions: Sessions, user_id: int, role: UserRole) -> Scope:
    """Administrators see every partnership; others those they coordinate."""
    if role == UserRole.ADMIN:
        return None
    async with sessions() as session:
        rows = await session.execute(
            select(Membership.partnership_id)
            .where(
                Membership.user_id == user_id,
                Membership.role == MemberRole.COORDINATOR,
            )
            .order_by(Membership.partnership_id)
        )
        return list(rows.scalars())


async def partnership_exists(sessions: Sessions, partnership_id: int) -> bool:
    async with sessions() as session:
        return await session.get(Partnership, partnership_id) is not None


# -- messages, edits and call minutes over time ---------------------------------------


@dataclass(frozen=True, slots=True)
class DayRow:
    day: dt.date
    messages: int
    edits: int
    call_minutes: float


async def daily_activity(
    sessions: Sessions, scope: Scope, period: Period
) -> list[DayRow]:
    """Messages, edits and call minutes per local day, every day of the period."""
    bucket = quarter_hour(ActivityEvent.at)
    query = (
        select(bucket, *_measures())
        .where(_events_in(scope, period, COUNTED_KINDS))
        .group_by(bucket)
    )
    sums: dict[dt.date, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    async with sessions() as session:
        for quarter, messages, edits, seconds in await session.execute(query):
            day = sums[period.local_day(int(quarter))]
            day[0] += int(messages)
            day[1] += int(edits)
            day[2] += float(seconds)
    return [
        DayRow(d, int(sums[d][0]), int(sums[d][1]), _minutes(sums[d][2]))
        for d in period.days()
    ]


# -- participants by institution ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstitutionRow:
    institution_id: int | None  # None: members of no partner institution
    institution: str
    country: str
    members: int
    active_members: int
    messages: int
    edits: int
    call_minutes: float


@dataclass(frozen=True, slots=True)
class Participation:
    rows: list[InstitutionRow]
    # Smallest over largest share among the partner institutions: 1.0 is even,
    # 0.0 means one side is absent; None when nobody took part at all.
    balance_active_members: float | None
    balance_messages: float | None


def _balance(values: list[int]) -> float | None:
    if len(values) < 2 or max(values) == 0:
        return None
    return round(min(values) / max(values), 3)


async def participation(
    sessions: Sessions, scope: Scope, period: Period
) -> Participation:
    """Members, active members and their messages, edits and call minutes, per
    institution of the partnerships in scope (a member from elsewhere, or an event of
    a former member, is counted under "other")."""
    members_of = (
        select(Membership.user_id)
        .where(_partnerships_in(Membership.partnership_id, scope))
        .distinct()
        .subquery()
    )
    async with sessions() as session:
        partners = (
            await session.execute(
                select(Institution.id, Institution.name, Institution.country)
                .join(
                    PartnershipInstitution,
                    PartnershipInstitution.institution_id == Institution.id,
                )
                .where(_partnerships_in(PartnershipInstitution.partnership_id, scope))
                .distinct()
                .order_by(Institution.name)
            )
        ).all()
        members = dict(
            (
                await session.execute(
                    select(User.institution_id, func.count())
                    .join(members_of, members_of.c.user_id == User.id)
                    .group_by(User.institution_id)
                )
            )
            .tuples()
            .all()
        )
        measures = await _measures_by(session, User.institution_id, scope, period)
        active = await _active_by(session, User.institution_id, scope, period)
    partner_ids = {i for i, _, _ in partners}
    rows = []
    for inst_id, name, country in partners:
        m, e, s = measures.get(inst_id, (0, 0, 0.0))
        rows.append(
            InstitutionRow(
                inst_id,
                name,
                country,
                int(members.get(inst_id, 0)),
                int(active.get(inst_id, 0)),
                m,
                e,
                _minutes(s),
            )
        )
    # Everyone else in one row: members without a partner institution, events of
    # people who have left or whose account is gone.
    other = [0, 0, 0, 0, 0.0]
    for table, index in ((members, 0), (active, 1)):
        for inst_id, count in table.items():
            if inst_id not in partner_ids:
                other[index] += int(count)
    for inst_id, (m, e, s) in measures.items():
        if inst_id not in partner_ids:
            other[2] += m
            other[3] += e
            other[4] += s
    if any(other):
        rows.append(
            InstitutionRow(
                None,
                "other",
                "",
                int(other[0]),
                int(other[1]),
                int(other[2]),
                int(other[3]),
                _minutes(other[4]),
            )
        )
    sides = [r for r in rows if r.institution_id is not None]
    return Participation(
        rows,
        _balance([r.active_members for r in sides]),
        _balance([r.messages for r in sides]),
    )


# -- activities --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusRow:
    status: str
    activities: int
    overdue: int


def _overdue(today: dt.date) -> ColumnElement[bool]:
    return and_(
        ActivityRow.ends_on.is_not(None),
        ActivityRow.ends_on < today,
        ActivityRow.status.in_(OPEN_STATUSES),
    )


async def activity_statuses(
    sessions: Sessions, scope: Scope, today: dt.date
) -> list[StatusRow]:
    """Activities now in each status, and how many of them are overdue; the four
    statuses of the agreement schema always, then any other a client wrote."""
    query = (
        select(
            ActivityRow.status,
            func.count(),
            func.coalesce(func.sum(case((_overdue(today), 1), else_=0)), 0),
        )
        .where(ActivityRow.room_id.in_(_rooms_of(scope)))
        .group_by(ActivityRow.status)
    )
    async with sessions() as session:
        found = {s: (int(n), int(o)) for s, n, o in await session.execute(query)}
    statuses = [*ACTIVITY_STATUSES, *sorted(set(found) - set(ACTIVITY_STATUSES))]
    return [StatusRow(s, *found.get(s, (0, 0))) for s in statuses]


@dataclass(frozen=True, slots=True)
class OverdueRow:
    partnership_id: int
    partnership: str
    activity_id: str
    title: str
    status: str
    ends_on: dt.date
    days_overdue: int
    owner_id: int | None
    owner: str | None


async def overdue_activities(
    sessions: Sessions, scope: Scope, today: dt.date
) -> list[OverdueRow]:
    """Overdue activities, longest overdue first."""
    query = (
        select(
            Partnership.id,
            Partnership.title,
            ActivityRow.activity_id,
            ActivityRow.title,
            ActivityRow.status,
            ActivityRow.ends_on,
            ActivityRow.owner_id,
            User.name,
        )
        .join(Room, Room.id == ActivityRow.room_id)
        .join(Partnership, Partnership.id == Room.partnership_id)
        .outerjoin(User, User.id == ActivityRow.owner_id)
        .where(_partnerships_in(Partnership.id, scope), _overdue(today))
        .order_by(ActivityRow.ends_on, Partnership.id, ActivityRow.position)
    )
    async with sessions() as session:
        rows = (await session.execute(query)).all()
    return [
        OverdueRow(pid, pt, aid, title, status, ends, (today - ends).days, oid, owner)
        for pid, pt, aid, title, status, ends, oid, owner in rows
    ]


# -- silent members ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SilentRow:
    partnership_id: int
    partnership: str
    user_id: int
    name: str
    email: str
    institution: str | None
    role: str
    member_since: dt.datetime
    last_active_at: dt.datetime | None  # None: never
    days_silent: int | None  # None: never active


async def silent_members(
    sessions: Sessions, scope: Scope, now: dt.datetime, days: int = SILENT_DAYS
) -> list[SilentRow]:
    """Members of at least ``days`` days with no join, message, edit or call in the
    partnership's rooms in the last ``days`` days; never-active ones first."""
    cutoff = now - dt.timedelta(days=days)
    last = (
        select(
            Room.partnership_id.label("partnership_id"),
            ActivityEvent.user_id.label("user_id"),
            func.max(ActivityEvent.at).label("last_at"),
        )
        .join(Room, Room.id == ActivityEvent.room_id)
        .where(_events_in(scope, None, PRESENCE_KINDS))
        .group_by(Room.partnership_id, ActivityEvent.user_id)
        .subquery()
    )
    query = (
        select(
            Partnership.id,
            Partnership.title,
            User.id,
            User.name,
            User.email,
            Institution.name,
            Membership.role,
            Membership.created_at,
            last.c.last_at,
        )
        .select_from(Membership)
        .join(Partnership, Partnership.id == Membership.partnership_id)
        .join(User, User.id == Membership.user_id)
        .outerjoin(Institution, Institution.id == User.institution_id)
        .outerjoin(
            last,
            and_(
                last.c.partnership_id == Membership.partnership_id,
                last.c.user_id == Membership.user_id,
            ),
        )
        .where(
            _partnerships_in(Membership.partnership_id, scope),
            Membership.created_at <= cutoff,
            or_(last.c.last_at.is_(None), last.c.last_at < cutoff),
        )
        .order_by(Partnership.id, User.name, User.id)
    )
    async with sessions() as session:
        rows = (await session.execute(query)).all()
    out = [
        SilentRow(
            pid,
            title,
            uid,
            name,
            email,
            inst,
            role.value,
            since,
            last_at,
            None if last_at is None else (now - last_at).days,
        )
        for pid, title, uid, name, email, inst, role, since, last_at in rows
    ]
    # Never active first, then the longest silent.
    out.sort(key=lambda r: (r.last_active_at is not None, r.last_active_at or now))
    return out


# -- agreements nearing expiry -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgreementRow:
    partnership_id: int
    partnership: str
    kind: str
    status: str
    valid_to: dt.date
    days_left: int


async def expiring_agreements(
    sessions: Sessions, scope: Scope, today: dt.date, within_days: int
) -> list[AgreementRow]:
    """Agreements valid until today or one of the next ``within_days`` days, and not
    already marked expired or terminated; soonest first."""
    query = (
        select(
            Partnership.id,
            Partnership.title,
            Agreement.kind,
            Agreement.status,
            Agreement.valid_to,
        )
        .join(Partnership, Partnership.id == Agreement.partnership_id)
        .where(
            _partnerships_in(Partnership.id, scope),
            Agreement.valid_to.is_not(None),
            Agreement.valid_to >= today,
            Agreement.valid_to <= today + dt.timedelta(days=within_days),
            Agreement.status.not_in(("expired", "terminated")),
        )
        .order_by(Agreement.valid_to, Partnership.id)
    )
    async with sessions() as session:
        rows = (await session.execute(query)).all()
    return [
        AgreementRow(pid, title, kind, status, valid_to, (valid_to - today).days)
        for pid, title, kind, status, valid_to in rows
    ]


# -- partnerships side by side ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartnershipRow:
    partnership_id: int
    partnership: str
    stage: str
    members: int
    active_members: int
    messages: int
    edits: int
    call_minutes: float
    activities: int
    overdue: int
    silent_members: int


async def partnership_summary(
    sessions: Sessions, scope: Scope, period: Period, now: dt.datetime
) -> list[PartnershipRow]:
    """One row per partnership in scope: the period's figures and today's state."""
    today = now.astimezone(period.tz).date()
    async with sessions() as session:
        partnerships = (
            await session.execute(
                select(Partnership.id, Partnership.title, Partnership.stage)
                .where(_partnerships_in(Partnership.id, scope))
                .order_by(Partnership.title, Partnership.id)
            )
        ).all()
        members = dict(
            (
                await session.execute(
                    select(Membership.partnership_id, func.count())
                    .where(_partnerships_in(Membership.partnership_id, scope))
                    .group_by(Membership.partnership_id)
                )
            )
            .tuples()
            .all()
        )
        measures = await _measures_by(session, Room.partnership_id, scope, period)
        active = await _active_by(session, Room.partnership_id, scope, period)
        activities = {
            pid: (int(n), int(o))
            for pid, n, o in await session.execute(
                select(
                    Room.partnership_id,
                    func.count(),
                    func.coalesce(func.sum(case((_overdue(today), 1), else_=0)), 0),
                )
                .select_from(ActivityRow)
                .join(Room, Room.id == ActivityRow.room_id)
                .where(_partnerships_in(Room.partnership_id, scope))
                .group_by(Room.partnership_id)
            )
        }
    silent: dict[int, int] = defaultdict(int)
    for row in await silent_members(sessions, scope, now):
        silent[row.partnership_id] += 1
    out = []
    for pid, title, stage in partnerships:
        m, e, s = measures.get(pid, (0, 0, 0.0))
        n, o = activities.get(pid, (0, 0))
        out.append(
            PartnershipRow(
                pid,
                title,
                stage.value,
                int(members.get(pid, 0)),
                int(active.get(pid, 0)),
                m,
                e,
                _minutes(s),
                n,
                o,
                silent[pid],
            )
        )
    return out


# -- rooms (for who is online now) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoomRef:
    partnership_id: int
    partnership: str
    room_id: int
    room: str


async def rooms_in_scope(sessions: Sessions, scope: Scope) -> list[RoomRef]:
    async with sessions() as session:
        rows = await session.execute(
            select(Partnership.id, Partnership.title, Room.id, Room.name)
            .join(Room, Room.partnership_id == Partnership.id)
            .where(_partnerships_in(Partnership.id, scope))
            .order_by(Partnership.title, Partnership.id, Room.id)
        )
        return [RoomRef(*row) for row in rows.tuples()]
