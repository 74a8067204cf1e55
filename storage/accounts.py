"""Users, login sessions and room access, as the server's request paths need them."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

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


def hash_secret(value: str) -> str:
    """SHA-256 of a high-entropy secret (session cookie, invitation code)."""
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class UserInfo:
    id: int
    email: str
    name: str
    role: UserRole
    institution_id: int | None
    institution: str | None
    country: str | None

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "email": self.email,
            "name": self.name,
            "role": self.role.value,
            "institution": None
            if self.institution_id is None
            else {
                "id": self.institution_id,
                "name": self.institution,
                "country": self.country,
            },
        }


@dataclass(frozen=True, slots=True)
class RoomAccess:
    room_id: int
    room_name: str
    partnership_id: int
    partnership_title: str
    role: MemberRole


def _user_query():  # type: ignore[no-untyped-def]
    return select(User, Institution.name, Institution.country).outerjoin(
        Institution, Institution.id == User.institution_id
    )


def _info(user: User, inst: str | None, country: str | None) -> UserInfo:
    return UserInfo(
        user.id, user.email, user.name, user.role, user.institution_id, inst, country
    )


async def user_by_id(session: AsyncSession, user_id: int) -> UserInfo | None:
    row = (
        await session.execute(
            _user_query().where(User.id == user_id, User.disabled.is_(False))
        )
    ).first()
    return None if row is None else _info(*row)


async def user_with_hash(
    sessions: async_sessionmaker[AsyncSession], email: str
) -> tuple[UserInfo, str] | None:
    """The active user with this e-mail and their password hash."""
    async with sessions() as session:
        row = (
            await session.execute(
                _user_query().where(
                    User.email == email.strip().lower(), User.disabled.is_(False)
                )
            )
        ).first()
    return None if row is None else (_info(*row), row[0].password_hash)


async def create_session(
    sessions: async_sessionmaker[AsyncSession], user_id: int, ttl: float
) -> tuple[str, dt.datetime]:
    """Start a login session; returns the cookie value (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    expires = utcnow() + dt.timedelta(seconds=ttl)
    async with sessions.begin() as session:
        # Housekeeping: a user's expired sessions go when they log in again.
        await session.execute(
            delete(Session).where(
                Session.user_id == user_id, Session.expires_at < utcnow()
            )
        )
        session.add(
            Session(token_hash=hash_secret(token), user_id=user_id, expires_at=expires)
        )
    return token, expires


async def user_for_session(
    sessions: async_sessionmaker[AsyncSession], token: str
) -> UserInfo | None:
    """The user logged in with this cookie value, if the session is current."""
    async with sessions() as session:
        row = (
            await session.execute(
                select(Session.user_id).where(
                    Session.token_hash == hash_secret(token),
                    Session.expires_at > utcnow(),
                )
            )
        ).first()
        if row is None:
            return None
        return await user_by_id(session, row[0])


async def end_session(sessions: async_sessionmaker[AsyncSession], token: str) -> None:
    async with sessions.begin() as session:
        await session.execute(
            delete(Session).where(Session.token_hash == hash_secret(token))
        )


async def room_access(
    sessions: async_sessionmaker[AsyncSession], room_id: int, user_id: int
) -> RoomAccess | bool | None:
    """The user's access to a room: ``None`` if no such room, ``False`` if not a member."""
    async with sessions() as session:
        room = (
            await session.execute(
                select(Room, Partnership.title)
                .join(Partnership, Partnership.id == Room.partnership_id)
                .where(Room.id == room_id)
            )
        ).first()
        if room is None:
            return None
        role = (
            await session.execute(
                select(Membership.role).where(
                    Membership.partnership_id == room[0].partnership_id,
                    Membership.user_id == user_id,
                )
            )
        ).scalar_one_or_none()
        if role is None:
            return False
        return RoomAccess(
            room[0].id, room[0].name, room[0].partnership_id, room[1], role
        )
