"""The activity event log: the append-only record that dashboards aggregate."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import ActivityEvent, User, utcnow


@dataclass(frozen=True, slots=True)
class EventRow:
    kind: str
    room_id: int | None
    user_id: int | None
    details: dict[str, Any] = field(default_factory=dict)
    at: dt.datetime = field(default_factory=utcnow)


async def insert_events(
    sessions: async_sessionmaker[AsyncSession], rows: Sequence[EventRow]
) -> None:
    """Append events in one transaction."""
    async with sessions.begin() as session:
        await session.execute(
            insert(ActivityEvent),
            [
                {
                    "kind": r.kind,
                    "room_id": r.room_id,
                    "user_id": r.user_id,
                    "details": r.details,
                    "at": r.at,
                }
                for r in rows
            ],
        )


async def list_events(
    sessions: async_sessionmaker[AsyncSession],
    *,
    room_id: int,
    kinds: Sequence[str],
    document: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """A room's events of some kinds, newest first, with the user's name."""
    async with sessions() as session:
        query = (
            select(ActivityEvent, User.name)
            .outerjoin(User, User.id == ActivityEvent.user_id)
            .where(
                ActivityEvent.room_id == room_id, ActivityEvent.kind.in_(list(kinds))
            )
            .order_by(ActivityEvent.id.desc())
            .limit(limit * 4 if document else limit)
        )
        rows = (await session.execute(query)).tuples().all()
    out = []
    for event, name in rows:
        if document is not None and (event.details or {}).get("document") != document:
            continue
        out.append(
            {
                "kind": event.kind,
                "user": {"id": event.user_id, "name": name},
                "at": event.at.isoformat().replace("+00:00", "Z"),
                "details": event.details,
            }
        )
        if len(out) >= limit:
            break
    return out
