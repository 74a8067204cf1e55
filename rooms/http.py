"""Shared pieces of the JSON HTTP API: errors, bodies, the caller's identity."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from rooms.access import MAX_COOKIE_LENGTH, SESSION_COOKIE, Authenticator
from storage.accounts import RoomAccess, UserInfo, admission
from storage.models import UserRole

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BODY_BYTES = 64 * 1024
_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """An error the client caused; rendered as ``{"error": {"code", "message"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        _encoder.encode(data),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
}


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(
        exc.status_code,
        _HTTP_CODES.get(exc.status_code, "error"),
        str(exc.detail),
        exc.headers,
    )


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    # Details stay in the log; the client learns only that it was our fault.
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.internal_errors.inc()
    return error_response(500, "internal", "internal server error")


async def read_body(request: Request, schema: type[T], *, empty: T | None = None) -> T:
    """Decode a JSON body into ``schema``.

    415 if not sent as JSON, 413 if too big, 400 if not JSON at all, 422 if it does not
    fit the schema (unknown fields, wrong types, values out of range). When ``empty``
    is given, a request without a body means ``empty``.
    """
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
    if not body and empty is not None:
        return empty
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "send the body as application/json"
        )
    try:
        return msgspec.json.decode(bytes(body), type=schema)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "invalid", str(exc)) from None
    except msgspec.DecodeError:
        raise ApiError(400, "bad_json", "the body is not valid JSON") from None


def path_int(request: Request, name: str) -> int:
    try:
        value = int(request.path_params[name])
    except (KeyError, ValueError):
        raise ApiError(
            404, "not_found", f"no such {name.removesuffix('_id')}"
        ) from None
    if value < 1 or value > 2**62:
        raise ApiError(404, "not_found", f"no such {name.removesuffix('_id')}")
    return value


def query_int(
    request: Request, name: str, default: int | None, *, low: int, high: int
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, "invalid", f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(422, "invalid", f"{name} must be between {low} and {high}")
    return value


def check_origin(request: Request) -> None:
    """Refuse (403) a state-changing request sent from a foreign page.

    Browsers send ``Origin`` with every cross-site POST/PUT/PATCH/DELETE (and with
    same-site ones); programs usually send none, and are let through. Together with
    the SameSite=Lax cookie this closes cross-site request forgery.
    """
    origin = request.headers.get("origin")
    if request.method in ("GET", "HEAD", "OPTIONS") or origin is None:
        return
    auth: Authenticator = request.app.state.auth
    if not auth.origin_allowed(
        origin, host=request.headers.get("host"), scheme=request.url.scheme
    ):
        raise ApiError(
            403, "origin_not_allowed", "requests from this origin are not allowed"
        )


async def current_user(request: Request) -> UserInfo:
    """The logged-in caller (401 otherwise); 403 for a state change from a foreign Origin."""
    auth: Authenticator = request.app.state.auth
    user = await auth.user_from_cookie(request.cookies)
    if user is None:
        raise ApiError(401, "not_authenticated", "log in first")
    check_origin(request)
    return user


async def require_admin(request: Request) -> UserInfo:
    user = await current_user(request)
    if user.role != UserRole.ADMIN:
        raise ApiError(403, "forbidden", "administrators only")
    return user


async def room_member(request: Request) -> tuple[UserInfo, RoomAccess]:
    """The caller and their access to the room in the path: 401 not logged in,
    404 no such room, 403 not a member. One query for all of it (as a socket's
    admission), on every room request."""
    try:
        room_id = path_int(request, "room_id")
    except ApiError:
        await current_user(request)  # 401 first, as for a well-formed path
        raise
    cookie = request.cookies.get(SESSION_COOKIE)
    found = None
    if cookie and len(cookie) <= MAX_COOKIE_LENGTH:
        found = await admission(request.app.state.db, room_id, session_token=cookie)
    if found is None:
        raise ApiError(401, "not_authenticated", "log in first")
    check_origin(request)
    user, access = found
    if access is None:
        raise ApiError(404, "not_found", "no such room")
    if access is False:
        raise ApiError(403, "forbidden", "not a member of this room")
    assert isinstance(access, RoomAccess)
    return user, access
