"""Who may enter which room: cookies, room tokens, Origin checks and passwords."""

from __future__ import annotations

import datetime as dt
import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import anyio.to_thread
import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from rooms.errors import Forbidden, NotAuthenticated, RoomNotFound
from storage.accounts import (
    RoomAccess,
    UserInfo,
    admission,
    user_for_session,
)
from storage.database import Database

SESSION_COOKIE = "coilroom_session"
MAX_COOKIE_LENGTH = 200  # ours are 43 characters; longer ones are not looked up
ROOM_TOKEN_TYPE = "room"  # noqa: S105 - a token kind, not a secret

_hasher = PasswordHasher()
# Verified against when the e-mail is unknown, so a failed login takes as long
# whether or not the account exists.
_DUMMY_HASH = _hasher.hash("coilroom: no such user")


def configure_password_hashing(*, time_cost: int, memory_kib: int) -> None:
    """Set the argon2id cost for new hashes (process-wide; existing hashes keep theirs)."""
    global _hasher, _DUMMY_HASH
    if (time_cost, memory_kib) != (_hasher.time_cost, _hasher.memory_cost):
        _hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib)
        _DUMMY_HASH = _hasher.hash("coilroom: no such user")


async def hash_password(password: str) -> str:
    """argon2id hash, computed off the event loop (it costs tens of milliseconds)."""
    return await anyio.to_thread.run_sync(_hasher.hash, password)


async def verify_password(stored_hash: str | None, password: str) -> bool:
    def check() -> bool:
        try:
            return (
                _hasher.verify(stored_hash or _DUMMY_HASH, password)
                and stored_hash is not None
            )
        except (VerificationError, InvalidHashError):
            return False

    return await anyio.to_thread.run_sync(check)


def normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


@dataclass(frozen=True, slots=True)
class Access:
    """An authenticated member at the door of a room."""

    user: UserInfo
    room: RoomAccess
    by_token: bool


class Authenticator:
    """Checks credentials; holds the signing key (never logged, never sent)."""

    def __init__(
        self,
        *,
        secret_key: str,
        db: Database,
        allowed_origins: Iterable[str],
        room_token_ttl: float,
        room_token_max_ttl: float,
    ) -> None:
        self._key = secret_key
        self.db = db
        self.sessions = db.sessions
        self.allowed_origins = frozenset(
            normalise_origin(o) for o in allowed_origins if o
        )
        self.room_token_ttl = room_token_ttl
        self.room_token_max_ttl = room_token_max_ttl

    def __repr__(self) -> str:  # keep the key out of any debug output
        return f"Authenticator(origins={sorted(self.allowed_origins)})"

    def origin_allowed(
        self, origin: str | None, *, host: str | None, scheme: str
    ) -> bool:
        """Same origin as the request, or listed in the allowed origins."""
        if not origin:
            return False
        origin = normalise_origin(origin)
        if origin in self.allowed_origins:
            return True
        if host:
            http = "https" if scheme in ("https", "wss") else "http"
            return hmac.compare_digest(origin, f"{http}://{host.lower()}")
        return False

    def mint_room_token(
        self, user_id: int, room_id: int, ttl: float | None = None
    ) -> tuple[str, dt.datetime]:
        """A short-lived token that lets a program open this room's sockets as the user."""
        ttl = min(ttl or self.room_token_ttl, self.room_token_max_ttl)
        now = int(time.time())
        expires = now + int(ttl)
        token = jwt.encode(
            {
                "sub": str(user_id),
                "room": room_id,
                "typ": ROOM_TOKEN_TYPE,
                "iat": now,
                "exp": expires,
            },
            self._key,
            algorithm="HS256",
        )
        return token, dt.datetime.fromtimestamp(expires, dt.UTC)

    def read_room_token(self, token: str, room_id: int) -> int:
        """The user id in a valid token for this room.

        Raises:
            NotAuthenticated: forged, malformed or expired.
            Forbidden: valid, but for another room.
        """
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                options={"require": ["exp", "sub", "room", "typ"]},
            )
        except jwt.ExpiredSignatureError:
            raise NotAuthenticated("token expired") from None
        except jwt.PyJWTError:
            raise NotAuthenticated("invalid token") from None
        if claims.get("typ") != ROOM_TOKEN_TYPE:
            raise NotAuthenticated("invalid token")
        if claims.get("room") != room_id:
            raise Forbidden("token is for another room")
        try:
            return int(claims["sub"])
        except (TypeError, ValueError):
            raise NotAuthenticated("invalid token") from None

    async def user_from_cookie(self, cookies: Mapping[str, str]) -> UserInfo | None:
        token = cookies.get(SESSION_COOKIE)
        if not token or len(token) > MAX_COOKIE_LENGTH:
            return None
        return await user_for_session(self.sessions, token)

    async def admit(
        self,
        room_id: int,
        *,
        token: str | None,
        cookies: Mapping[str, str],
        origin: str | None,
        host: str | None,
        scheme: str,
    ) -> Access:
        """Authenticate a socket and check membership of the room.

        A ``token`` (query string) wins over the cookie. A cookie is accepted only
        from an allowed Origin, because browsers attach it to cross-site sockets.

        Raises:
            NotAuthenticated, Forbidden, RoomNotFound.
        """
        if token:
            user_id = self.read_room_token(token, room_id)
            found = await admission(self.db, room_id, user_id=user_id)
            if found is None:
                raise NotAuthenticated("unknown user")
            by_token = True
        else:
            cookie = cookies.get(SESSION_COOKIE)
            if cookie is None:
                raise NotAuthenticated()
            if not self.origin_allowed(origin, host=host, scheme=scheme):
                raise Forbidden("origin not allowed")
            found = None
            if cookie and len(cookie) <= MAX_COOKIE_LENGTH:
                found = await admission(self.db, room_id, session_token=cookie)
            if found is None:
                raise NotAuthenticated("session expired")
            by_token = False
        user, access = found
        if access is None:
            raise RoomNotFound()
        if access is False:
            raise Forbidden()
        assert isinstance(access, RoomAccess)
        return Access(user, access, by_token)
