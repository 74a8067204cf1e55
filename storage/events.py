"""The activity event log: the append-only record that dashboards aggregate."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import ActivityEvent, utcnow


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
