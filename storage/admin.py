"""Administration: institutions, users, partnerships, agreements, members, invitations.

Functions take the session factory and plain values and return plain dicts ready
for JSON; they raise ``Refused`` for anything the caller must be told about.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.accounts import hash_secret
from storage.models import (
    Agreement,
    Institution,
    Invitation,
    MemberRole,
    Membership,
    Partnership,
    PartnershipInstitution,
    Room,
    Session,
    Stage,
    StageChange,
    User,
    UserRole,
    utcnow,
)

Sessions = async_sessionmaker[AsyncSession]


class Refused(Exception):
    """The operation cannot be done as asked (maps to an HTTP status)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _iso(value: dt.datetime | dt.date | None) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")


# -- institutions ---------------------------------------------------------------


def institution_json(i: Institution) -> dict[str, Any]:
    return {"id": i.id, "name": i.name, "country": i.country, "timezone": i.timezone}


async def create_institution(
    sessions: Sessions, name: str, country: str, timezone: str
) -> int:
    try:
        async with sessions.begin() as session:
            inst = Institution(name=name, country=country.upper(), timezone=timezone)
            session.add(inst)
            await session.flush()
            return inst.id
    except IntegrityError:
        raise Refused(409, "exists", "an institution with this name exists") from None


async def list_institutions(sessions: Sessions) -> list[dict[str, Any]]:
    async with sessions() as session:
        rows = await session.execute(select(Institution).order_by(Institution.name))
        return [institution_json(i) for i in rows.scalars()]


async def update_institution(
    sessions: Sessions, inst_id: int, changes: dict[str, Any]
) -> dict[str, Any]:
    try:
        async with sessions.begin() as session:
            inst = await session.get(Institution, inst_id)
            if inst is None:
                raise Refused(404, "not_found", "no such institution")
            for key, value in changes.items():
                setattr(inst, key, value.upper() if key == "country" else value)
            return institution_json(inst)
    except IntegrityError:
        raise Refused(409, "exists", "an institution with this name exists") from None


# -- users ------------------------------------------------------------------------


def user_json(u: User) -> dict[str, Any]:
    return {
        "id": u.id,
        "email": u.email,
        "name": u.name,
        "role": u.role.value,
        "institution_id": u.institution_id,
        "disabled": u.disabled,
    }


async def create_user(
    sessions: Sessions,
    *,
    email: str,
    name: str,
    password_hash: str,
    institution_id: int | None,
    role: UserRole,
) -> int:
    try:
        async with sessions.begin() as session:
            if (
                institution_id is not None
                and await session.get(Institution, institution_id) is None
            ):
                raise Refused(422, "invalid", "no such institution")
            user = User(
                email=email.strip().lower(),
                name=name,
                password_hash=password_hash,
                institution_id=institution_id,
                role=role,
            )
            session.add(user)
            await session.flush()
            return user.id
    except IntegrityError:
        raise Refused(409, "exists", "a user with this e-mail exists") from None


async def list_users(sessions: Sessions) -> list[dict[str, Any]]:
    async with sessions() as session:
        rows = await session.execute(select(User).order_by(User.name))
        return [user_json(u) for u in rows.scalars()]


async def update_user(
    sessions: Sessions, user_id: int, changes: dict[str, Any]
) -> tuple[dict[str, Any], list[int]]:
    """Change a user; returns the user and, if they were just disabled, the rooms
    they may enter (so their live sockets can be ended)."""
    async with sessions.begin() as session:
        user = await session.get(User, user_id)
        if user is None:
            raise Refused(404, "not_found", "no such user")
        inst_id = changes.get("institution_id")
        if inst_id is not None and await session.get(Institution, inst_id) is None:
            raise Refused(422, "invalid", "no such institution")
        for key, value in changes.items():
            setattr(user, key, value)
        rooms: list[int] = []
        if changes.get("disabled") is True:
            # A disabled account is logged out everywhere at once.
            await session.execute(delete(Session).where(Session.user_id == user_id))
            rooms = list(
                (
                    await session.execute(
                        select(Room.id)
                        .join(
                            Membership, Membership.partnership_id == Room.partnership_id
                        )
                        .where(Membership.user_id == user_id)
                    )
                ).scalars()
            )
        return user_json(user), rooms


# -- partnerships ---------------------------------------------------------------------


async def is_coordinator(sessions: Sessions, partnership_id: int, user_id: int) -> bool:
    async with sessions() as session:
        role = (
            await session.execute(
                select(Membership.role).where(
                    Membership.partnership_id == partnership_id,
                    Membership.user_id == user_id,
                )
            )
        ).scalar_one_or_none()
        return role == MemberRole.COORDINATOR


async def _check_institutions(session: AsyncSession, ids: Sequence[int]) -> None:
    if len(set(ids)) < 2:
        raise Refused(
            422, "invalid", "a partnership needs at least two different institutions"
        )
    found = (
        await session.execute(select(func.count()).where(Institution.id.in_(list(ids))))
    ).scalar_one()
    if found != len(set(ids)):
        raise Refused(422, "invalid", "unknown institution id")


async def create_partnership(
    sessions: Sessions,
    *,
    title: str,
    goals: str,
    institution_ids: Sequence[int],
    created_by: int,
    coordinator_id: int | None,
) -> tuple[int, int]:
    """Create the partnership and its room; returns ``(partnership_id, room_id)``."""
    async with sessions.begin() as session:
        await _check_institutions(session, institution_ids)
        p = Partnership(
            title=title, goals=goals, stage=Stage.PLANNING, created_by=created_by
        )
        session.add(p)
        await session.flush()
        session.add_all(
            PartnershipInstitution(partnership_id=p.id, institution_id=i)
            for i in sorted(set(institution_ids))
        )
        session.add(
            StageChange(
                partnership_id=p.id,
                from_stage=None,
                to_stage=Stage.PLANNING,
                changed_by=created_by,
            )
        )
        session.add(Agreement(partnership_id=p.id))
        room = Room(partnership_id=p.id, name=title[:200])
        session.add(room)
        if coordinator_id is not None:
            session.add(
                Membership(
                    partnership_id=p.id,
                    user_id=coordinator_id,
                    role=MemberRole.COORDINATOR,
                )
            )
        await session.flush()
        return p.id, room.id


async def partnership_json(session: AsyncSession, p: Partnership) -> dict[str, Any]:
    insts = (
        await session.execute(
            select(Institution)
            .join(
                PartnershipInstitution,
                PartnershipInstitution.institution_id == Institution.id,
            )
            .where(PartnershipInstitution.partnership_id == p.id)
            .order_by(Institution.name)
        )
    ).scalars()
    room_id = (
        (
            await session.execute(
                select(Room.id).where(Room.partnership_id == p.id).order_by(Room.id)
            )
        )
        .scalars()
        .first()
    )
    return {
        "id": p.id,
        "title": p.title,
        "goals": p.goals,
        "stage": p.stage.value,
        "institutions": [institution_json(i) for i in insts],
        "room_id": room_id,
        "created_at": _iso(p.created_at),
    }


async def list_partnerships(
    sessions: Sessions, *, user_id: int | None
) -> list[dict[str, Any]]:
    """All partnerships (``user_id`` None) or those the user coordinates."""
    async with sessions() as session:
        query = select(Partnership).order_by(Partnership.id)
        if user_id is not None:
            query = query.join(
                Membership, Membership.partnership_id == Partnership.id
            ).where(
                Membership.user_id == user_id, Membership.role == MemberRole.COORDINATOR
            )
        return [
            await partnership_json(session, p)
            for p in (await session.execute(query)).scalars()
        ]


async def get_partnership(sessions: Sessions, partnership_id: int) -> dict[str, Any]:
    async with sessions() as session:
        p = await session.get(Partnership, partnership_id)
        if p is None:
            raise Refused(404, "not_found", "no such partnership")
        return await partnership_json(session, p)


async def update_partnership(
    sessions: Sessions, partnership_id: int, changes: dict[str, Any]
) -> dict[str, Any]:
    async with sessions.begin() as session:
        p = await session.get(Partnership, partnership_id)
        if p is None:
            raise Refused(404, "not_found", "no such partnership")
        ids = changes.pop("institution_ids", None)
        if ids is not None:
            await _check_institutions(session, ids)
            await session.execute(
                delete(PartnershipInstitution).where(
                    PartnershipInstitution.partnership_id == p.id
                )
            )
            session.add_all(
                PartnershipInstitution(partnership_id=p.id, institution_id=i)
                for i in sorted(set(ids))
            )
        for key, value in changes.items():
            setattr(p, key, value)
        await session.flush()
        return await partnership_json(session, p)


async def change_stage(
    sessions: Sessions, partnership_id: int, stage: Stage, by: int, note: str
) -> dict[str, Any]:
    async with sessions.begin() as session:
        p = await session.get(Partnership, partnership_id, with_for_update=True)
        if p is None:
            raise Refused(404, "not_found", "no such partnership")
        if p.stage == stage:
            raise Refused(
                409, "unchanged", f"the partnership is already at {stage.value}"
            )
        change = StageChange(
            partnership_id=p.id,
            from_stage=p.stage,
            to_stage=stage,
            changed_by=by,
            note=note,
        )
        p.stage = stage
        session.add(change)
        await session.flush()
        return stage_json(change)


async def _require_partnership(session: AsyncSession, partnership_id: int) -> None:
    if await session.get(Partnership, partnership_id) is None:
        raise Refused(404, "not_found", "no such partnership")


def stage_json(c: StageChange) -> dict[str, Any]:
    return {
        "from": c.from_stage.value if c.from_stage else None,
        "to": c.to_stage.value,
        "changed_by": c.changed_by,
        "changed_at": _iso(c.changed_at),
        "note": c.note,
    }


async def stage_history(
    sessions: Sessions, partnership_id: int
) -> list[dict[str, Any]]:
    async with sessions() as session:
        await _require_partnership(session, partnership_id)
        rows = await session.execute(
            select(StageChange)
            .where(StageChange.partnership_id == partnership_id)
            .order_by(StageChange.id)
        )
        return [stage_json(c) for c in rows.scalars()]


# -- agreement ----------------------------------------------------------------------------


def agreement_json(a: Agreement) -> dict[str, Any]:
    return {
        "kind": a.kind,
        "status": a.status,
        "valid_from": _iso(a.valid_from),
        "valid_to": _iso(a.valid_to),
        "signatories": a.signatories,
        "funding_terms": a.funding_terms,
        "updated_by": a.updated_by,
        "updated_at": _iso(a.updated_at),
    }


async def get_agreement(sessions: Sessions, partnership_id: int) -> dict[str, Any]:
    async with sessions() as session:
        a = await session.get(Agreement, partnership_id)
        if a is None:
            raise Refused(404, "not_found", "no such partnership")
        return agreement_json(a)


async def set_agreement(
    sessions: Sessions, partnership_id: int, values: dict[str, Any], by: int
) -> dict[str, Any]:
    async with sessions.begin() as session:
        a = await session.get(Agreement, partnership_id)
        if a is None:
            raise Refused(404, "not_found", "no such partnership")
        for key, value in values.items():
            setattr(a, key, value)
        if a.valid_from and a.valid_to and a.valid_to < a.valid_from:
            raise Refused(422, "invalid", "valid_to is before valid_from")
        a.updated_by = by
        a.updated_at = utcnow()
        return agreement_json(a)


# -- members ----------------------------------------------------------------------------


async def list_members(sessions: Sessions, partnership_id: int) -> list[dict[str, Any]]:
    async with sessions() as session:
        await _require_partnership(session, partnership_id)
        rows = await session.execute(
            select(Membership, User, Institution)
            .join(User, User.id == Membership.user_id)
            .outerjoin(Institution, Institution.id == User.institution_id)
            .where(Membership.partnership_id == partnership_id)
            .order_by(User.name)
        )
        return [
            {
                "user_id": u.id,
                "name": u.name,
                "email": u.email,
                "role": m.role.value,
                "institution": None
                if i is None
                else {"id": i.id, "name": i.name, "country": i.country},
                "last_read_seq": m.last_read_seq,
                "since": _iso(m.created_at),
            }
            for m, u, i in rows.tuples()
        ]


async def set_member(
    sessions: Sessions, partnership_id: int, user_id: int, role: MemberRole
) -> bool:
    """Add the user or change their role; returns True if they were added."""
    async with sessions.begin() as session:
        if await session.get(Partnership, partnership_id) is None:
            raise Refused(404, "not_found", "no such partnership")
        if await session.get(User, user_id) is None:
            raise Refused(422, "invalid", "no such user")
        m = await session.get(Membership, (partnership_id, user_id))
        if m is None:
            session.add(
                Membership(partnership_id=partnership_id, user_id=user_id, role=role)
            )
            return True
        m.role = role
        return False


async def change_member_role(
    sessions: Sessions, partnership_id: int, user_id: int, role: MemberRole
) -> None:
    """Change the role of an existing member (404 if not a member)."""
    async with sessions.begin() as session:
        await _require_partnership(session, partnership_id)
        m = await session.get(Membership, (partnership_id, user_id))
        if m is None:
            raise Refused(404, "not_found", "not a member")
        m.role = role


async def remove_member(
    sessions: Sessions, partnership_id: int, user_id: int
) -> list[int]:
    """Remove a membership; returns the partnership's room ids (to end live sockets)."""
    async with sessions.begin() as session:
        await _require_partnership(session, partnership_id)
        result = await session.execute(
            delete(Membership).where(
                Membership.partnership_id == partnership_id,
                Membership.user_id == user_id,
            )
        )
        if result.rowcount == 0:  # type: ignore[attr-defined]
            raise Refused(404, "not_found", "not a member")
        return list(
            (
                await session.execute(
                    select(Room.id).where(Room.partnership_id == partnership_id)
                )
            ).scalars()
        )


# -- invitations --------------------------------------------------------------------------


def invitation_json(inv: Invitation) -> dict[str, Any]:
    now = utcnow()
    if inv.accepted_at:
        state = "accepted"
    elif inv.revoked_at:
        state = "revoked"
    elif inv.expires_at <= now:
        state = "expired"
    else:
        state = "pending"
    return {
        "id": inv.id,
        "partnership_id": inv.partnership_id,
        "email": inv.email,
        "role": inv.role.value,
        "institution_id": inv.institution_id,
        "state": state,
        "created_at": _iso(inv.created_at),
        "expires_at": _iso(inv.expires_at),
        "accepted_at": _iso(inv.accepted_at),
    }


async def create_invitation(
    sessions: Sessions,
    partnership_id: int,
    *,
    email: str,
    role: MemberRole,
    institution_id: int | None,
    ttl: float,
    by: int,
) -> tuple[dict[str, Any], str]:
    """Returns the invitation and its code (shown once; only its hash is kept)."""
    code = secrets.token_urlsafe(24)
    async with sessions.begin() as session:
        await _require_partnership(session, partnership_id)
        if institution_id is not None and (
            await session.get(PartnershipInstitution, (partnership_id, institution_id))
            is None
        ):
            raise Refused(
                422, "invalid", "the institution is not part of this partnership"
            )
        inv = Invitation(
            partnership_id=partnership_id,
            email=email.strip().lower(),
            role=role,
            institution_id=institution_id,
            code_hash=hash_secret(code),
            created_by=by,
            expires_at=utcnow() + dt.timedelta(seconds=ttl),
        )
        session.add(inv)
        await session.flush()
        return invitation_json(inv), code


async def list_invitations(
    sessions: Sessions, partnership_id: int
) -> list[dict[str, Any]]:
    async with sessions() as session:
        await _require_partnership(session, partnership_id)
        rows = await session.execute(
            select(Invitation)
            .where(Invitation.partnership_id == partnership_id)
            .order_by(Invitation.id)
        )
        return [invitation_json(i) for i in rows.scalars()]


async def revoke_invitation(
    sessions: Sessions, partnership_id: int, invitation_id: int
) -> dict[str, Any]:
    async with sessions.begin() as session:
        inv = await session.get(Invitation, invitation_id)
        if inv is None or inv.partnership_id != partnership_id:
            raise Refused(404, "not_found", "no such invitation")
        if inv.accepted_at is not None:
            raise Refused(409, "accepted", "the invitation was already accepted")
        inv.revoked_at = inv.revoked_at or utcnow()
        return invitation_json(inv)


async def renew_invitation(
    sessions: Sessions, partnership_id: int, invitation_id: int, ttl: float
) -> tuple[dict[str, Any], str]:
    """Resend: a fresh code and expiry; the old code stops working."""
    code = secrets.token_urlsafe(24)
    async with sessions.begin() as session:
        inv = await session.get(Invitation, invitation_id)
        if inv is None or inv.partnership_id != partnership_id:
            raise Refused(404, "not_found", "no such invitation")
        if inv.accepted_at is not None:
            raise Refused(409, "accepted", "the invitation was already accepted")
        inv.code_hash = hash_secret(code)
        inv.revoked_at = None
        inv.expires_at = utcnow() + dt.timedelta(seconds=ttl)
        return invitation_json(inv), code


async def find_invitation(
    sessions: Sessions, code: str
) -> tuple[Invitation, str, bool]:
    """A usable invitation by code, its partnership title, and whether its e-mail has an account.

    Raises:
        Refused: 404 unknown code; 410 used, revoked or expired.
    """
    async with sessions() as session:
        inv = (
            await session.execute(
                select(Invitation).where(Invitation.code_hash == hash_secret(code))
            )
        ).scalar_one_or_none()
        if inv is None:
            raise Refused(404, "not_found", "no such invitation")
        state = invitation_json(inv)["state"]
        if state != "pending":
            raise Refused(410, state, f"this invitation is {state}")
        title = (
            await session.execute(
                select(Partnership.title).where(Partnership.id == inv.partnership_id)
            )
        ).scalar_one()
        exists = (
            await session.execute(select(User.id).where(User.email == inv.email))
        ).scalar_one_or_none() is not None
        return inv, title, exists


async def accept_invitation(
    sessions: Sessions,
    code: str,
    *,
    user_id: int | None,
    new_user: dict[str, Any] | None,
) -> tuple[int, int, int | None]:
    """Use an invitation once: link ``user_id`` or create ``new_user``.

    Returns ``(user_id, partnership_id, room_id)``.
    """
    async with sessions.begin() as session:
        used = await session.execute(
            update(Invitation)
            .where(
                Invitation.code_hash == hash_secret(code),
                Invitation.accepted_at.is_(None),
                Invitation.revoked_at.is_(None),
                Invitation.expires_at > utcnow(),
            )
            .values(accepted_at=utcnow())
            .returning(
                Invitation.id,
                Invitation.partnership_id,
                Invitation.role,
                Invitation.email,
                Invitation.institution_id,
            )
        )
        row = used.first()
        if row is None:
            raise Refused(410, "gone", "this invitation can no longer be used")
        inv_id, partnership_id, role, email, institution_id = row
        if user_id is None:
            assert new_user is not None
            user = User(
                email=email,
                name=new_user["name"],
                password_hash=new_user["password_hash"],
                institution_id=institution_id,
                role=UserRole.COORDINATOR
                if role == MemberRole.COORDINATOR
                else UserRole.INSTRUCTOR,
            )
            session.add(user)
            try:
                await session.flush()
            except IntegrityError:
                raise Refused(
                    409, "exists", "an account with this e-mail exists: log in first"
                ) from None
            user_id = user.id
        await session.execute(
            update(Invitation)
            .where(Invitation.id == inv_id)
            .values(accepted_by=user_id)
        )
        m = await session.get(Membership, (partnership_id, user_id))
        if m is None:
            session.add(
                Membership(partnership_id=partnership_id, user_id=user_id, role=role)
            )
        room_id = (
            (
                await session.execute(
                    select(Room.id)
                    .where(Room.partnership_id == partnership_id)
                    .order_by(Room.id)
                )
            )
            .scalars()
            .first()
        )
        return user_id, partnership_id, room_id


async def rooms_of(sessions: Sessions, user_id: int) -> list[dict[str, Any]]:
    """The rooms a user may enter, with their partnership and the user's role."""
    async with sessions() as session:
        rows = await session.execute(
            select(Room, Partnership, Membership.role, Membership.last_read_seq)
            .join(Partnership, Partnership.id == Room.partnership_id)
            .join(Membership, Membership.partnership_id == Partnership.id)
            .where(Membership.user_id == user_id)
            .order_by(Partnership.title, Room.id)
        )
        return [
            {
                "id": r.id,
                "name": r.name,
                "partnership": {"id": p.id, "title": p.title, "stage": p.stage.value},
                "role": role.value,
                "last_seq": r.last_seq,
                "last_read_seq": last_read,
            }
            for r, p, role, last_read in rows.tuples()
        ]
