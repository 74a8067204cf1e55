"""Call records: a row per call session and per participant's stay in it.

Written by ``signaling.service`` as people join and leave (one short transaction
each); read by the room's call history (the dashboards sum the ``call`` activity
events written alongside).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import CallParticipant, CallSession, User

Sessions = async_sessionmaker[AsyncSession]


async def record_join(
    sessions: Sessions,
    *,
    room_id: int,
    call_id: int | None,
    user_id: int,
    conn_id: str,
    at: dt.datetime,
    used: Iterable[str],
) -> tuple[int, int]:
    """Store a participant joining; with ``call_id`` None, the call starts with them.

    Returns the call's id and the participant row's id.
    """
    async with sessions.begin() as session:
        if call_id is None:
            call_id = (
                await session.execute(
                    insert(CallSession)
                    .values(room_id=room_id, started_by=user_id, started_at=at)
                    .returning(CallSession.id)
                )
            ).scalar_one()
        record_id = (
            await session.execute(
                insert(CallParticipant)
                .values(
                    call_id=call_id,
                    user_id=user_id,
                    connection_id=conn_id,
                    joined_at=at,
                    **_media_used(used),
                )
                .returning(CallParticipant.id)
            )
        ).scalar_one()
    return call_id, record_id


async def record_leave(
    sessions: Sessions,
    *,
    record_id: int,
    at: dt.datetime,
    used: Iterable[str],
    reason: str,
    end_call_id: int | None = None,
) -> None:
    """Store a participant leaving (and the call ending, when it was the last one).

    A row already closed is left as it is: each stay is closed exactly once, by
    whichever process took the participant out first.
    """
    async with sessions.begin() as session:
        await session.execute(
            update(CallParticipant)
            .where(CallParticipant.id == record_id, CallParticipant.left_at.is_(None))
            .values(
                left_at=at,
                left_reason=reason,
                **_media_used(used),
            )
        )
        if end_call_id is not None:
            await session.execute(
                update(CallSession)
                .where(CallSession.id == end_call_id, CallSession.ended_at.is_(None))
                .values(ended_at=at)
            )


async def discard_join(
    sessions: Sessions, *, record_id: int, call_id: int | None = None
) -> None:
    """Delete the rows of a join that did not happen (``call_id``: the session it
    would have started): another process changed the room's call first."""
    async with sessions.begin() as session:
        await session.execute(
            delete(CallParticipant).where(CallParticipant.id == record_id)
        )
        if call_id is not None:
            await session.execute(delete(CallSession).where(CallSession.id == call_id))


async def close_uncertain_join(
    sessions: Sessions, *, record_id: int, call_id: int | None, at: dt.datetime
) -> None:
    """Close the rows of a join whose outcome was never learnt (Redis went away
    during it) and which is not in the call now: an ``interrupted`` stay, and
    the session it started (``call_id``) if nobody else is in it."""
    async with sessions.begin() as session:
        await session.execute(
            update(CallParticipant)
            .where(CallParticipant.id == record_id, CallParticipant.left_at.is_(None))
            .values(left_at=at, left_reason="interrupted")
        )
        if call_id is not None:
            still_open = (
                select(CallParticipant.id)
                .where(
                    CallParticipant.call_id == call_id,
                    CallParticipant.left_at.is_(None),
                )
                .exists()
            )
            await session.execute(
                update(CallSession)
                .where(
                    CallSession.id == call_id,
                    CallSession.ended_at.is_(None),
                    ~still_open,
                )
                .values(ended_at=at)
            )


async def close_lost_stay(
    sessions: Sessions, *, record_id: int, call_id: int, at: dt.datetime, reason: str
) -> tuple[bool, dt.datetime | None]:
    """Close a stay that the live call state lost (it is no longer anywhere),
    unless it is closed already; end its call when no stay of it is open.

    Returns whether this closed the stay, and the call's start when this ended
    the call. The call's row is locked first, so two processes closing the last
    two stays of one call cannot each see the other's as open.
    """
    async with sessions.begin() as session:
        started_at = await _lock_open_call(session, call_id)
        closed = (
            await session.execute(
                update(CallParticipant)
                .where(
                    CallParticipant.id == record_id, CallParticipant.left_at.is_(None)
                )
                .values(left_at=at, left_reason=reason)
            )
        ).rowcount  # type: ignore[attr-defined]
        if started_at is None or not await _end_if_empty(session, call_id, at):
            return bool(closed), None
        return bool(closed), started_at


async def close_empty_call(
    sessions: Sessions, *, call_id: int, at: dt.datetime
) -> bool:
    """End a call that no open stay belongs to, unless it ended already.

    Returns whether this ended it. Locked like ``close_lost_stay``, so a call
    ends once however many processes close it at once.
    """
    async with sessions.begin() as session:
        if await _lock_open_call(session, call_id) is None:
            return False
        return await _end_if_empty(session, call_id, at)


async def _lock_open_call(session: AsyncSession, call_id: int) -> dt.datetime | None:
    """Lock the row of call ``call_id`` if it is open; its start, or None."""
    return (
        await session.execute(
            select(CallSession.started_at)
            .where(CallSession.id == call_id, CallSession.ended_at.is_(None))
            .with_for_update()
        )
    ).scalar_one_or_none()


async def _end_if_empty(session: AsyncSession, call_id: int, at: dt.datetime) -> bool:
    """End call ``call_id`` (its row locked) if no stay of it is open."""
    still_open = (
        select(CallParticipant.id)
        .where(CallParticipant.call_id == call_id, CallParticipant.left_at.is_(None))
        .exists()
    )
    # The condition is in the UPDATE too: SQLite ignores FOR UPDATE, and takes
    # its write lock only here.
    ended = await session.execute(
        update(CallSession)
        .where(CallSession.id == call_id, CallSession.ended_at.is_(None), ~still_open)
        .values(ended_at=at)
    )
    return bool(ended.rowcount)  # type: ignore[attr-defined]


async def record_media(
    sessions: Sessions, *, record_id: int, used: Iterable[str]
) -> None:
    async with sessions.begin() as session:
        await session.execute(
            update(CallParticipant)
            .where(CallParticipant.id == record_id)
            .values(**_media_used(used))
        )


async def close_interrupted_calls(sessions: Sessions, at: dt.datetime) -> int:
    """Close the calls a stopped process left open (only when no other process can
    hold live calls: the embedded single-process set-up). Returns how many."""
    async with sessions.begin() as session:
        await session.execute(
            update(CallParticipant)
            .where(CallParticipant.left_at.is_(None))
            .values(left_at=at, left_reason="interrupted")
        )
        result = await session.execute(
            update(CallSession)
            .where(CallSession.ended_at.is_(None))
            .values(ended_at=at)
        )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class OpenRecords:
    """Call records still open that began before some moment."""

    stays: list[tuple[int, int, int]]  # (record id, call id, room id)
    calls: list[tuple[int, int]]  # (call id, room id) of calls with no open stay


async def open_records(
    sessions: Sessions, *, before: dt.datetime, limit: int
) -> OpenRecords:
    """Open stays that joined before ``before``, and open calls that started
    before it with no open stay (at most ``limit`` of each, oldest first): what
    to check against the live calls for records nothing will ever close."""
    async with sessions.begin() as session:
        stays = await session.execute(
            select(CallParticipant.id, CallParticipant.call_id, CallSession.room_id)
            .join(CallSession, CallSession.id == CallParticipant.call_id)
            .where(
                CallParticipant.left_at.is_(None), CallParticipant.joined_at < before
            )
            .order_by(CallParticipant.id)
            .limit(limit)
        )
        open_stay = (
            select(CallParticipant.id)
            .where(
                CallParticipant.call_id == CallSession.id,
                CallParticipant.left_at.is_(None),
            )
            .exists()
        )
        calls = await session.execute(
            select(CallSession.id, CallSession.room_id)
            .where(
                CallSession.ended_at.is_(None),
                CallSession.started_at < before,
                ~open_stay,
            )
            .order_by(CallSession.id)
            .limit(limit)
        )
        return OpenRecords(
            [(r, c, room) for r, c, room in stays], [(c, room) for c, room in calls]
        )


@dataclass(frozen=True, slots=True)
class CallStay:
    user_id: int | None
    user_name: str | None
    connection_id: str
    joined_at: dt.datetime
    left_at: dt.datetime | None
    audio: bool
    video: bool
    screen: bool
    left_reason: str | None

    def as_json(self) -> dict[str, object]:
        return {
            "user": {"id": self.user_id, "name": self.user_name},
            "connection_id": self.connection_id,
            "joined_at": _iso(self.joined_at),
            "left_at": _iso(self.left_at),
            "media_used": {
                "audio": self.audio,
                "video": self.video,
                "screen": self.screen,
            },
            "left_reason": self.left_reason,
        }


@dataclass(frozen=True, slots=True)
class CallRecord:
    id: int
    started_by: int | None
    started_at: dt.datetime
    ended_at: dt.datetime | None
    participants: list[CallStay]

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "started_by": self.started_by,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "seconds": None
            if self.ended_at is None
            else round((self.ended_at - self.started_at).total_seconds(), 3),
            "participants": [p.as_json() for p in self.participants],
        }


async def room_calls(
    session: AsyncSession, room_id: int, *, before: int | None = None, limit: int = 20
) -> list[CallRecord]:
    """A room's call sessions, newest first, each with its participants."""
    query = select(CallSession).where(CallSession.room_id == room_id)
    if before is not None:
        query = query.where(CallSession.id < before)
    calls = list(
        (
            await session.execute(query.order_by(CallSession.id.desc()).limit(limit))
        ).scalars()
    )
    if not calls:
        return []
    rows = await session.execute(
        select(CallParticipant, User.name)
        .outerjoin(User, User.id == CallParticipant.user_id)
        .where(CallParticipant.call_id.in_([c.id for c in calls]))
        .order_by(CallParticipant.id)
    )
    stays: dict[int, list[CallStay]] = {c.id: [] for c in calls}
    for p, name in rows:
        stays[p.call_id].append(
            CallStay(
                p.user_id,
                name,
                p.connection_id,
                p.joined_at,
                p.left_at,
                p.audio,
                p.video,
                p.screen,
                p.left_reason,
            )
        )
    return [
        CallRecord(c.id, c.started_by, c.started_at, c.ended_at, stays[c.id])
        for c in calls
    ]


def _media_used(used: Iterable[str]) -> dict[str, bool]:
    """The participant's media columns: whether each was on at any time."""
    kinds = set(used)
    return {kind: kind in kinds for kind in ("audio", "video", "screen")}


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")
