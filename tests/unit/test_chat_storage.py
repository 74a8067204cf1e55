"""``storage.chat.append_messages`` on SQLite and PostgreSQL: a retried message is
found by its exact (author, client id) pair, whichever query shape the backend uses."""

from __future__ import annotations

import uuid

import pytest

from storage import Database
from storage.chat import NewMessage, append_messages
from storage.models import Partnership, Room, User, UserRole

pytestmark = pytest.mark.anyio


async def test_retries_are_found_by_their_exact_pair(db: Database) -> None:
    tag = uuid.uuid4().hex[:8]
    async with db.sessions.begin() as session:
        users = [
            User(
                email=f"{n}-{tag}@example.org",
                name=n,
                role=UserRole.INSTRUCTOR,
                password_hash="-",
            )
            for n in ("ana", "lars")
        ]
        session.add_all(users)
        partnership = Partnership(title=tag)
        session.add(partnership)
        await session.flush()
        room = Room(partnership_id=partnership.id, name="r")
        session.add(room)
        await session.flush()
        ana, lars, room_id = users[0].id, users[1].id, room.id
    names = {ana: "ana", lars: "lars"}
    first = await append_messages(
        db,
        room_id,
        [NewMessage(ana, "x", "ana x"), NewMessage(lars, "y", "lars y")],
        names,
    )
    assert [(m.seq, m.duplicate) for m in first] == [(1, False), (2, False)]
    # The crossed pairs are new messages; the same pairs are retries.
    second = await append_messages(
        db,
        room_id,
        [
            NewMessage(ana, "y", "ana y"),
            NewMessage(lars, "y", "lars y again"),
            NewMessage(lars, "x", "lars x"),
            NewMessage(ana, "x", "ana x again"),
        ],
        names,
    )
    assert [(m.author_id, m.client_id, m.seq, m.duplicate, m.text) for m in second] == [
        (ana, "y", 3, False, "ana y"),
        (lars, "y", 2, True, "lars y"),
        (lars, "x", 4, False, "lars x"),
        (ana, "x", 1, True, "ana x"),
    ]
