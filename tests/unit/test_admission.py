"""``storage.accounts.admission``: the one query behind every socket's admission,
on SQLite and PostgreSQL. It must give what the separate lookups gave (user,
institution, room, role), and nothing for a disabled user or a stale session."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import pytest
from sqlalchemy import select

from storage import Database
from storage.accounts import RoomAccess, admission, create_session, hash_secret
from storage.models import (
    Institution,
    MemberRole,
    Membership,
    Partnership,
    Room,
    Session,
    User,
    UserRole,
    utcnow,
)

pytestmark = pytest.mark.anyio


@dataclass
class Place:
    room_id: int
    partnership_id: int
    member: int  # an observer, from an institution
    stranger: int  # no membership, no institution
    disabled: int  # a member whose account is disabled
    institution: str
    title: str


@pytest.fixture
async def place(db: Database) -> Place:
    tag = uuid.uuid4().hex[:8]
    async with db.sessions.begin() as session:
        inst = Institution(name=f"Universidad {tag}", country="MX")
        session.add(inst)
        await session.flush()
        users = [
            User(
                email=f"{name}-{tag}@example.org",
                name=name,
                role=UserRole.INSTRUCTOR,
                password_hash="-",
                institution_id=inst.id if name == "ana" else None,
                disabled=name == "gone",
            )
            for name in ("ana", "lars", "gone")
        ]
        session.add_all(users)
        partnership = Partnership(title=f"Water {tag}")
        session.add(partnership)
        await session.flush()
        room = Room(partnership_id=partnership.id, name="Water room")
        session.add(room)
        for user in (users[0], users[2]):
            session.add(
                Membership(
                    partnership_id=partnership.id,
                    user_id=user.id,
                    role=MemberRole.OBSERVER,
                )
            )
        await session.flush()
        return Place(
            room.id,
            partnership.id,
            users[0].id,
            users[1].id,
            users[2].id,
            inst.name,
            partnership.title,
        )


async def test_member_by_id_gets_user_institution_room_and_role(
    db: Database, place: Place
) -> None:
    found = await admission(db, place.room_id, user_id=place.member)
    assert found is not None
    user, access = found
    assert (user.id, user.name, user.role) == (place.member, "ana", UserRole.INSTRUCTOR)
    assert (user.institution, user.country) == (place.institution, "MX")
    assert access == RoomAccess(
        place.room_id,
        "Water room",
        place.partnership_id,
        place.title,
        MemberRole.OBSERVER,
    )


async def test_non_member_unknown_room_unknown_and_disabled_user(
    db: Database, place: Place
) -> None:
    stranger = await admission(db, place.room_id, user_id=place.stranger)
    assert stranger is not None
    assert stranger[0].id == place.stranger and stranger[0].institution is None
    assert stranger[1] is False  # a user, but not a member
    no_room = await admission(db, 987_654_321, user_id=place.member)
    assert no_room is not None and no_room[1] is None
    assert await admission(db, place.room_id, user_id=987_654_321) is None
    assert await admission(db, place.room_id, user_id=place.disabled) is None


async def test_by_session_cookie_current_expired_and_unknown(
    db: Database, place: Place
) -> None:
    cookie, _ = await create_session(db.sessions, place.member, ttl=600)
    found = await admission(db, place.room_id, session_token=cookie)
    assert found is not None and found[0].id == place.member
    assert isinstance(found[1], RoomAccess)
    # The same session once its time has passed: nobody.
    async with db.sessions.begin() as session:
        row = await session.get(Session, await _session_id(db, cookie))
        assert row is not None
        row.expires_at = utcnow() - dt.timedelta(seconds=1)
    assert await admission(db, place.room_id, session_token=cookie) is None
    assert await admission(db, place.room_id, session_token="x" * 43) is None
    # A disabled user's session (were it still there) admits nobody either.
    stale, _ = await create_session(db.sessions, place.disabled, ttl=600)
    assert await admission(db, place.room_id, session_token=stale) is None


async def _session_id(db: Database, cookie: str) -> int:
    async with db.sessions() as session:
        return (
            await session.execute(
                select(Session.id).where(Session.token_hash == hash_secret(cookie))
            )
        ).scalar_one()
