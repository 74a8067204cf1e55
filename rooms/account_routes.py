"""HTTP API for members: log in and out, who am I, my rooms, room tokens, chat history,
and accepting an invitation."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rooms.access import SESSION_COOKIE, Authenticator, hash_password, verify_password
from rooms.http import (
    ApiError,
    check_origin,
    current_user,
    json_response,
    query_int,
    read_body,
    room_member,
)
from rooms.limits import FailureWindow
from rooms.messages import iso
from storage import admin
from storage.accounts import (
    UserInfo,
    create_session,
    end_session,
    user_by_id,
    user_with_hash,
)
from storage.chat import history
from storage.events import EventRow

Email = Annotated[
    str, msgspec.Meta(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
]
Password = Annotated[str, msgspec.Meta(min_length=10, max_length=256)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    pass


class Login(_Body):
    email: Annotated[str, msgspec.Meta(max_length=254)]
    password: Annotated[str, msgspec.Meta(max_length=256)]


class TokenRequest(_Body):
    ttl_seconds: Annotated[int, msgspec.Meta(ge=10)] | None = None


class Accept(_Body):
    code: Annotated[str, msgspec.Meta(min_length=10, max_length=100)]
    name: Name | None = None
    password: Password | None = None


def set_session_cookie(
    request: Request, response: Response, token: str, ttl: float
) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(ttl),
        httponly=True,
        samesite="lax",
        secure=request.app.state.settings.cookie_secure,
        path="/",
    )


def _attempt(request: Request, email: str) -> tuple[str, ...]:
    """Count one password attempt for this address and e-mail, or refuse it (429).

    The attempt is counted before the (slow) password check, so parallel guesses
    cannot slip past the limit; a success clears the count.
    """
    limiter: FailureWindow = request.app.state.login_limiter
    client = request.client.host if request.client else "unknown"
    email = email.strip().lower()
    keys = (f"{client}|{email}", f"email|{email}")
    now = time.monotonic()
    wait = max(limiter.blocked_for(k, now) for k in keys)
    if wait > 0:
        raise ApiError(
            429,
            "rate_limited",
            "too many failed logins: try again later",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    for k in keys:
        limiter.fail(k, now)
    return keys


def _succeeded(request: Request, keys: tuple[str, ...]) -> None:
    limiter: FailureWindow = request.app.state.login_limiter
    for k in keys:
        limiter.clear(k)


async def login(request: Request) -> Response:
    # A foreign page must not log a browser in (login CSRF).
    check_origin(request)
    body = await read_body(request, Login)
    keys = _attempt(request, body.email)
    found = await user_with_hash(request.app.state.db.sessions, body.email)
    ok = await verify_password(found[1] if found else None, body.password)
    if not found or not ok:
        raise ApiError(401, "invalid_credentials", "wrong e-mail or password")
    _succeeded(request, keys)
    user = found[0]
    return await _logged_in(request, user, {"user": user.as_json()})


async def _logged_in(
    request: Request, user: UserInfo, payload: dict[str, Any]
) -> Response:
    ttl = request.app.state.settings.session_ttl
    token, expires = await create_session(request.app.state.db.sessions, user.id, ttl)
    response = json_response({**payload, "expires_at": iso(expires)})
    set_session_cookie(request, response, token, ttl)
    return response


async def logout(request: Request) -> Response:
    check_origin(request)
    token = request.cookies.get(SESSION_COOKIE)
    if token and len(token) <= 200:
        await end_session(request.app.state.db.sessions, token)
    response = json_response({"ok": True})
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.app.state.settings.cookie_secure,
    )
    return response


async def me(request: Request) -> Response:
    user = await current_user(request)
    return json_response(user.as_json())


async def my_rooms(request: Request) -> Response:
    user = await current_user(request)
    rooms = await admin.rooms_of(request.app.state.db.sessions, user.id)
    presence = request.app.state.room_services.presence
    for room in rooms:
        room["online"] = [
            {"id": p.user.id, "name": p.user.name, "status": p.status}
            for p in await presence.snapshot(room["id"])
        ]
    return json_response({"rooms": rooms})


async def _member_of(request: Request) -> tuple[UserInfo, int]:
    user, access = await room_member(request)
    return user, access.room_id


async def room_token(request: Request) -> Response:
    user, room_id = await _member_of(request)
    body = await read_body(request, TokenRequest, empty=TokenRequest())
    auth: Authenticator = request.app.state.auth
    token, expires = auth.mint_room_token(user.id, room_id, body.ttl_seconds)
    return json_response({"token": token, "expires_at": iso(expires)}, 201)


async def room_members(request: Request) -> Response:
    """Who belongs to the room's partnership, for any member (owners of activities,
    call tiles): names, roles and institutions, not e-mail addresses."""
    _, access = await room_member(request)
    members = await admin.list_members(
        request.app.state.db.sessions, access.partnership_id
    )
    return json_response(
        {
            "members": [
                {
                    "id": m["user_id"],
                    "name": m["name"],
                    "role": m["role"],
                    "institution": m["institution"],
                }
                for m in members
            ]
        }
    )


async def room_messages(request: Request) -> Response:
    _, room_id = await _member_of(request)
    before = query_int(request, "before", None, low=1, high=2**62)
    limit = query_int(request, "limit", 50, low=1, high=200)
    assert limit is not None
    async with request.app.state.db.sessions() as session:
        page = await history(session, room_id, before=before, limit=limit)
    return json_response(
        {
            "messages": [
                {
                    "seq": m.seq,
                    "id": m.client_id,
                    "author": {"id": m.author_id, "name": m.author_name},
                    "text": m.text,
                    "created_at": iso(m.created_at),
                    "edited_at": iso(m.edited_at),
                    "deleted": m.deleted,
                }
                for m in page
            ],
            # Page further back with before=<first seq> while has_more is true.
            "has_more": bool(page) and page[0].seq > 1,
        }
    )


async def invitation_preview(request: Request) -> Response:
    code = request.path_params["code"]
    try:
        inv, title, exists = await admin.find_invitation(
            request.app.state.db.sessions, code
        )
    except admin.Refused as refused:
        raise ApiError(refused.status, refused.code, refused.message) from None
    return json_response(
        {
            "partnership": {"id": inv.partnership_id, "title": title},
            "email": inv.email,
            "role": inv.role.value,
            "account_exists": exists,
            "expires_at": iso(inv.expires_at),
        }
    )


async def accept_invitation(request: Request) -> Response:
    """Accept: link the logged-in account (or the one whose password is given),
    or create an account with ``name`` and ``password``; then log in."""
    check_origin(request)
    body = await read_body(request, Accept)
    sessions = request.app.state.db.sessions
    try:
        inv, _title, exists = await admin.find_invitation(sessions, body.code)
    except admin.Refused as refused:
        raise ApiError(refused.status, refused.code, refused.message) from None
    auth: Authenticator = request.app.state.auth
    caller = await auth.user_from_cookie(request.cookies)
    user_id: int | None = None
    new_user: dict[str, Any] | None = None
    if exists:
        if caller is not None and caller.email == inv.email:
            user_id = caller.id
        elif body.password is not None:
            # A password guess like any other: the login limit applies.
            keys = _attempt(request, inv.email)
            found = await user_with_hash(sessions, inv.email)
            if found is None or not await verify_password(found[1], body.password):
                raise ApiError(
                    401, "invalid_credentials", "wrong password for the invited account"
                )
            _succeeded(request, keys)
            user_id = found[0].id
        else:
            raise ApiError(
                409,
                "account_exists",
                "an account with this e-mail exists: log in as it, or give its password",
            )
    else:
        if body.name is None or body.password is None:
            raise ApiError(
                422, "invalid", "name and password (10+ characters) create the account"
            )
        new_user = {
            "name": body.name,
            "password_hash": await hash_password(body.password),
        }
    try:
        user_id, partnership_id, room_id = await admin.accept_invitation(
            sessions, body.code, user_id=user_id, new_user=new_user
        )
    except admin.Refused as refused:
        raise ApiError(refused.status, refused.code, refused.message) from None
    request.app.state.room_services.hub.record(
        EventRow("invitation_accepted", room_id, user_id, {"invitation": inv.id})
    )
    async with sessions() as session:
        user = await user_by_id(session, user_id)
    assert user is not None
    return await _logged_in(
        request,
        user,
        {"user": user.as_json(), "partnership_id": partnership_id, "room_id": room_id},
    )


routes = [
    Route("/api/session", login, methods=["POST"]),
    Route("/api/session", logout, methods=["DELETE"]),
    Route("/api/me", me, methods=["GET"]),
    Route("/api/rooms", my_rooms, methods=["GET"]),
    Route("/api/rooms/{room_id}/tokens", room_token, methods=["POST"]),
    Route("/api/rooms/{room_id}/messages", room_messages, methods=["GET"]),
    Route("/api/rooms/{room_id}/members", room_members, methods=["GET"]),
    Route("/api/invitations/accept", accept_invitation, methods=["POST"]),
    Route("/api/invitations/{code}", invitation_preview, methods=["GET"]),
]
