"""Users, login sessions and room access, as the server's request paths need them."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import and_, bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.database import Database
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


def _admission_query(by_session: bool):  # type: ignore[no-untyped-def]
    """The user, their institution, the room and their role in it, as one row."""
    query = (
        select(
            User.id,
            User.email,
            User.name,
            User.role,
            User.institution_id,
            Institution.name,
            Institution.country,
            Room.id,
            Room.name,
            Room.partnership_id,
            Partnership.title,
            Membership.role,
        )
        .select_from(User)
        .outerjoin(Institution, Institution.id == User.institution_id)
        .outerjoin(Room, Room.id == bindparam("room_id"))
        .outerjoin(Partnership, Partnership.id == Room.partnership_id)
        .outerjoin(
            Membership,
            and_(
                Membership.partnership_id == Room.partnership_id,
                Membership.user_id == User.id,
            ),
        )
        .where(User.disabled.is_(False))
    )
    if by_session:
        return query.join(Session, Session.user_id == User.id).where(
            Session.token_hash == bindparam("token_hash"),
            Session.expires_at > bindparam("now"),
        )
    return query.where(User.id == bindparam("user_id"))


# Built once: a socket's admission runs on every connect, and building the
# statement costs more than the lookup itself.
_ADMISSION_BY_USER = _admission_query(False)
_ADMISSION_BY_SESSION = _admission_query(True)


async def admission(
    db: Database,
    room_id: int,
    *,
    user_id: int | None = None,
    session_token: str | None = None,
) -> tuple[UserInfo, RoomAccess | bool | None] | None:
    """Who is at the door of a room, in one query: the active user (by id, or by a
    current login session's cookie value) and their access to the room: ``None``
    if there is no such room, ``False`` if they are not a member. ``None`` in all
    if there is no such active user or session.

    It runs as one ``Database.read`` (on SQLite one hop to a thread, rows read
    there), not through an ORM session: it is on the path of every socket's open."""
    if session_token is not None:
        statement = _ADMISSION_BY_SESSION
        params: dict[str, object] = {
            "room_id": room_id,
            "token_hash": hash_secret(session_token),
            "now": utcnow(),
        }
    else:
        statement = _ADMISSION_BY_USER
        params = {"room_id": room_id, "user_id": user_id}
    row = await db.read(lambda conn: conn.execute(statement, params).first())
    if row is None:
        return None
    user = UserInfo(*row[:7])
    room_id_found, room_name, partnership_id, title, role = row[7:]
    if room_id_found is None or title is None:
        return user, None
    if role is None:
        return user, False
    return user, RoomAccess(room_id_found, room_name, partnership_id, title, role)
