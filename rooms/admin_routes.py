"""HTTP API for administration. Admins may do everything; coordinators manage the
partnerships they coordinate (members, invitations, stage, agreement)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rooms.access import hash_password
from rooms.broker import Envelope
from rooms.http import (
    ApiError,
    current_user,
    json_response,
    path_int,
    read_body,
    require_admin,
)
from storage import admin
from storage.accounts import UserInfo
from storage.events import EventRow
from storage.models import MemberRole, Stage, UserRole

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Country = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z]{2}$")]
TimeZone = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Email = Annotated[
    str, msgspec.Meta(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
]
Password = Annotated[str, msgspec.Meta(min_length=10, max_length=256)]
Id = Annotated[int, msgspec.Meta(ge=1, le=2**62)]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
Text = Annotated[str, msgspec.Meta(max_length=20_000)]
Ttl = Annotated[int, msgspec.Meta(ge=3600, le=90 * 86400)]


class _Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class NewInstitution(_Body):
    name: Name
    country: Country
    timezone: TimeZone = "UTC"


class InstitutionChanges(_Body):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    country: Country | msgspec.UnsetType = msgspec.UNSET
    timezone: TimeZone | msgspec.UnsetType = msgspec.UNSET


class NewUser(_Body):
    email: Email
    name: Name
    password: Password
    role: UserRole
    institution_id: Id | None = None


class UserChanges(_Body):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    role: UserRole | msgspec.UnsetType = msgspec.UNSET
    institution_id: Id | msgspec.UnsetType | None = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET
    password: Password | msgspec.UnsetType = msgspec.UNSET


class NewPartnership(_Body):
    title: Title
    institution_ids: Annotated[list[Id], msgspec.Meta(min_length=2, max_length=50)]
    goals: Text = ""


class PartnershipChanges(_Body):
    title: Title | msgspec.UnsetType = msgspec.UNSET
    goals: Text | msgspec.UnsetType = msgspec.UNSET
    institution_ids: (
        Annotated[list[Id], msgspec.Meta(min_length=2, max_length=50)]
        | msgspec.UnsetType
    ) = msgspec.UNSET


class StageMove(_Body):
    stage: Stage
    note: Annotated[str, msgspec.Meta(max_length=2000)] = ""


class Signatory(_Body):
    name: Name
    title: Annotated[str, msgspec.Meta(max_length=200)] = ""
    institution_id: Id | None = None
    signed_on: dt.date | None = None


class AgreementValues(_Body):
    kind: Literal["MOU", "MOA"] | msgspec.UnsetType = msgspec.UNSET
    status: (
        Literal["draft", "under_review", "signed", "expired", "terminated"]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    valid_from: dt.date | msgspec.UnsetType | None = msgspec.UNSET
    valid_to: dt.date | msgspec.UnsetType | None = msgspec.UNSET
    signatories: (
        Annotated[list[Signatory], msgspec.Meta(max_length=50)] | msgspec.UnsetType
    ) = msgspec.UNSET
    funding_terms: Text | msgspec.UnsetType = msgspec.UNSET


class MemberChange(_Body):
    role: MemberRole


class NewMember(_Body):
    user_id: Id
    role: MemberRole


class NewInvitation(_Body):
    email: Email
    role: MemberRole
    institution_id: Id | None = None
    ttl_seconds: Ttl | None = None


class Resend(_Body):
    ttl_seconds: Ttl | None = None


def _changes(body: msgspec.Struct) -> dict[str, Any]:
    return {
        f: getattr(body, f)
        for f in body.__struct_fields__
        if getattr(body, f) is not msgspec.UNSET
    }


Handler = Callable[[Request], Awaitable[Response]]


def refusals(handler: Handler) -> Handler:
    """Turn ``storage.admin.Refused`` into the API's JSON errors."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except admin.Refused as refused:
            raise ApiError(refused.status, refused.code, refused.message) from None

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


async def manager_of(request: Request) -> tuple[UserInfo, int]:
    """The caller, if an admin or a coordinator of the partnership in the path."""
    user = await current_user(request)
    partnership_id = path_int(request, "partnership_id")
    if user.role == UserRole.ADMIN:
        return user, partnership_id
    if await admin.is_coordinator(
        request.app.state.db.sessions, partnership_id, user.id
    ):
        return user, partnership_id
    # Same answer whether or not it exists: coordinators see only their own.
    raise ApiError(
        403,
        "forbidden",
        "only its coordinators and administrators manage a partnership",
    )


def _db(request: Request) -> admin.Sessions:
    return request.app.state.db.sessions  # type: ignore[no-any-return]


def _audit(
    request: Request,
    kind: str,
    user: UserInfo,
    room_id: int | None = None,
    **details: Any,
) -> None:
    request.app.state.room_services.hub.record(
        EventRow(kind, room_id, user.id, details)
    )


# -- institutions and users (admins) ------------------------------------------------


@refusals
async def institutions(request: Request) -> Response:
    if request.method == "GET":
        await current_user(request)  # any logged-in user may read the list
        return json_response(
            {"institutions": await admin.list_institutions(_db(request))}
        )
    user = await require_admin(request)
    body = await read_body(request, NewInstitution)
    inst_id = await admin.create_institution(
        _db(request), body.name, body.country, body.timezone
    )
    _audit(request, "admin.institution_created", user, institution_id=inst_id)
    return json_response({"id": inst_id}, 201)


@refusals
async def institution(request: Request) -> Response:
    user = await require_admin(request)
    inst_id = path_int(request, "institution_id")
    body = await read_body(request, InstitutionChanges)
    changes = _changes(body)
    result = await admin.update_institution(_db(request), inst_id, changes)
    _audit(
        request,
        "admin.institution_changed",
        user,
        institution_id=inst_id,
        fields=sorted(changes),
    )
    return json_response(result)


@refusals
async def users(request: Request) -> Response:
    user = await require_admin(request)
    if request.method == "GET":
        return json_response({"users": await admin.list_users(_db(request))})
    body = await read_body(request, NewUser)
    user_id = await admin.create_user(
        _db(request),
        email=body.email,
        name=body.name,
        password_hash=await hash_password(body.password),
        institution_id=body.institution_id,
        role=body.role,
    )
    _audit(request, "admin.user_created", user, user_id=user_id)
    return json_response({"id": user_id}, 201)


@refusals
async def user_detail(request: Request) -> Response:
    caller = await require_admin(request)
    body = await read_body(request, UserChanges)
    changes = _changes(body)
    user_id = path_int(request, "user_id")
    if user_id == caller.id and (
        changes.get("disabled") is True
        or changes.get("role", UserRole.ADMIN) != UserRole.ADMIN
    ):
        # Guard against locking the last administrator out by mistake.
        raise ApiError(
            409, "self", "administrators cannot disable or demote themselves"
        )
    if "password" in changes:
        changes["password_hash"] = await hash_password(changes.pop("password"))
    result, room_ids = await admin.update_user(_db(request), user_id, changes)
    hub = request.app.state.room_services.hub
    for room_id in room_ids:
        # A disabled user's live sockets end now, on every process.
        await hub.publish(room_id, Envelope(control="revoke", user_id=user_id))
    _audit(
        request, "admin.user_changed", caller, user_id=user_id, fields=sorted(changes)
    )
    return json_response(result)


# -- partnerships ----------------------------------------------------------------------


@refusals
async def partnerships(request: Request) -> Response:
    user = await current_user(request)
    if user.role not in (UserRole.ADMIN, UserRole.COORDINATOR):
        raise ApiError(403, "forbidden", "administrators and coordinators only")
    if request.method == "GET":
        scope = None if user.role == UserRole.ADMIN else user.id
        return json_response(
            {"partnerships": await admin.list_partnerships(_db(request), user_id=scope)}
        )
    body = await read_body(request, NewPartnership)
    partnership_id, room_id = await admin.create_partnership(
        _db(request),
        title=body.title,
        goals=body.goals,
        institution_ids=body.institution_ids,
        created_by=user.id,
        # A coordinator who creates a partnership coordinates it.
        coordinator_id=user.id if user.role == UserRole.COORDINATOR else None,
    )
    _audit(
        request,
        "admin.partnership_created",
        user,
        room_id,
        partnership_id=partnership_id,
    )
    return json_response({"id": partnership_id, "room_id": room_id}, 201)


@refusals
async def partnership(request: Request) -> Response:
    user, partnership_id = await manager_of(request)
    if request.method == "GET":
        return json_response(await admin.get_partnership(_db(request), partnership_id))
    body = await read_body(request, PartnershipChanges)
    changes = _changes(body)
    result = await admin.update_partnership(_db(request), partnership_id, dict(changes))
    _audit(
        request,
        "partnership_changed",
        user,
        result["room_id"],
        partnership_id=partnership_id,
        fields=sorted(changes),
    )
    return json_response(result)


@refusals
async def stages(request: Request) -> Response:
    user, partnership_id = await manager_of(request)
    if request.method == "GET":
        return json_response(
            {"stages": await admin.stage_history(_db(request), partnership_id)}
        )
    body = await read_body(request, StageMove)
    change = await admin.change_stage(
        _db(request), partnership_id, body.stage, user.id, body.note
    )
    _audit(
        request,
        "stage_changed",
        user,
        partnership_id=partnership_id,
        to=body.stage.value,
    )
    return json_response(change, 201)


@refusals
async def agreement(request: Request) -> Response:
    user, partnership_id = await manager_of(request)
    if request.method == "GET":
        return json_response(await admin.get_agreement(_db(request), partnership_id))
    body = await read_body(request, AgreementValues)
    values = _changes(body)
    if "signatories" in values:
        values["signatories"] = msgspec.to_builtins(values["signatories"])
    result = await admin.set_agreement(_db(request), partnership_id, values, user.id)
    _audit(
        request,
        "agreement_changed",
        user,
        partnership_id=partnership_id,
        fields=sorted(values),
    )
    return json_response(result)


# -- members and invitations --------------------------------------------------------------


@refusals
async def members(request: Request) -> Response:
    user, partnership_id = await manager_of(request)
    if request.method == "GET":
        return json_response(
            {"members": await admin.list_members(_db(request), partnership_id)}
        )
    body = await read_body(request, NewMember)
    added = await admin.set_member(
        _db(request), partnership_id, body.user_id, body.role
    )
    _audit(
        request,
        "member_added" if added else "member_changed",
        user,
        partnership_id=partnership_id,
        member=body.user_id,
        role=body.role.value,
    )
    return json_response(
        {"user_id": body.user_id, "role": body.role.value}, 201 if added else 200
    )


@refusals
async def member(request: Request) -> Response:
    user, partnership_id = await manager_of(request)
    member_id = path_int(request, "user_id")
    if request.method == "PATCH":
        body = await read_body(request, MemberChange)
        # Only changes a role: adding someone is POST .../members.
        await admin.change_member_role(
            _db(request), partnership_id, member_id, body.role
        )
        _audit(
            request,
            "member_changed",
            user,
            partnership_id=partnership_id,
            member=member_id,
            role=body.role.value,
        )
        return json_response({"user_id": member_id, "role": body.role.value})
    room_ids = await admin.remove_member(_db(request), partnership_id, member_id)
    hub = request.app.state.room_services.hub
    for room_id in room_ids:
        # Live sockets of the removed member end now, on every process.
        await hub.publish(room_id, Envelope(control="revoke", user_id=member_id))
    _audit(
        request, "member_removed", user, partnership_id=partnership_id, member=member_id
    )
    return json_response({"ok": True})


def _accept_url(request: Request, code: str) -> str:
    return str(request.base_url).rstrip("/") + f"/invite/{code}"


@refusals
async def invitations(request: Request) -> Response:
    user, partnership_id = await manager_of(request)
    if request.method == "GET":
        return json_response(
            {"invitations": await admin.list_invitations(_db(request), partnership_id)}
        )
    body = await read_body(request, NewInvitation)
    ttl = body.ttl_seconds or request.app.state.settings.invitation_ttl
    inv, code = await admin.create_invitation(
        _db(request),
        partnership_id,
        email=body.email,
        role=body.role,
        institution_id=body.institution_id,
        ttl=ttl,
        by=user.id,
    )
    _audit(
        request,
        "invitation_created",
        user,
        partnership_id=partnership_id,
        invitation=inv["id"],
    )
    return json_response(
        {**inv, "code": code, "accept_url": _accept_url(request, code)}, 201
    )


@refusals
async def invitation(request: Request) -> Response:
    user, partnership_id = await manager_of(request)
    inv_id = path_int(request, "invitation_id")
    inv = await admin.revoke_invitation(_db(request), partnership_id, inv_id)
    _audit(
        request,
        "invitation_revoked",
        user,
        partnership_id=partnership_id,
        invitation=inv_id,
    )
    return json_response(inv)


@refusals
async def resend_invitation(request: Request) -> Response:
    user, partnership_id = await manager_of(request)
    inv_id = path_int(request, "invitation_id")
    body = await read_body(request, Resend, empty=Resend())
    ttl = body.ttl_seconds or request.app.state.settings.invitation_ttl
    inv, code = await admin.renew_invitation(_db(request), partnership_id, inv_id, ttl)
    _audit(
        request,
        "invitation_resent",
        user,
        partnership_id=partnership_id,
        invitation=inv_id,
    )
    return json_response(
        {**inv, "code": code, "accept_url": _accept_url(request, code)}
    )


P = "/api/partnerships/{partnership_id}"
routes = [
    Route("/api/institutions", institutions, methods=["GET", "POST"]),
    Route("/api/institutions/{institution_id}", institution, methods=["PATCH"]),
    Route("/api/users", users, methods=["GET", "POST"]),
    Route("/api/users/{user_id}", user_detail, methods=["PATCH"]),
    Route("/api/partnerships", partnerships, methods=["GET", "POST"]),
    Route(P, partnership, methods=["GET", "PATCH"]),
    Route(P + "/stages", stages, methods=["GET", "POST"]),
    Route(P + "/agreement", agreement, methods=["GET", "PUT"]),
    Route(P + "/members", members, methods=["GET", "POST"]),
    Route(P + "/members/{user_id}", member, methods=["PATCH", "DELETE"]),
    Route(P + "/invitations", invitations, methods=["GET", "POST"]),
    Route(P + "/invitations/{invitation_id}", invitation, methods=["DELETE"]),
    Route(
        P + "/invitations/{invitation_id}/resend", resend_invitation, methods=["POST"]
    ),
]
