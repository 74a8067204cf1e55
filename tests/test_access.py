"""Who may open a room socket: members only, with valid credentials, from allowed origins."""

from __future__ import annotations

import time

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from tests.support import ServerProcess, World, join, room_socket

pytestmark = pytest.mark.anyio


def _cookie(member_http) -> str:  # type: ignore[no-untyped-def]
    return f"coilroom_session={member_http.cookies['coilroom_session']}"


async def refused_with(server: ServerProcess, room_id: int, **kw) -> int | None:  # type: ignore[no-untyped-def]
    async with room_socket(server, room_id, expect_welcome=False, **kw) as sock:
        return await sock.close_code()


async def test_member_with_cookie_from_own_origin_enters(
    server: ServerProcess, world: World
) -> None:
    """The session cookie from the server's own origin opens the room."""
    ana = world.members[0]
    async with room_socket(
        server,
        world.room_id,
        headers={"Cookie": _cookie(ana.http), "Origin": server.base_url},
    ) as sock:
        assert sock.welcome["user"]["id"] == ana.id


async def test_cookie_from_foreign_origin_is_refused(
    server: ServerProcess, world: World
) -> None:
    """A valid cookie sent by another site's page (or with no Origin) is refused with 4403."""
    ana = world.members[0]
    for origin in ("http://evil.example", f"http://127.0.0.1:{server.port + 1}", None):
        headers = {"Cookie": _cookie(ana.http)}
        if origin:
            headers["Origin"] = origin
        assert await refused_with(server, world.room_id, headers=headers) == 4403


async def test_non_member_is_refused(server: ServerProcess, world: World) -> None:
    """A logged-in user who is not a member gets 4403."""
    stranger = await world.add_user("Stranger", world.institutions[0])
    headers = {"Cookie": _cookie(stranger.http), "Origin": server.base_url}
    assert await refused_with(server, world.room_id, headers=headers) == 4403


async def test_token_for_another_room_is_refused(
    server: ServerProcess, world: World
) -> None:
    """A member's token for room A does not open room B."""
    ana = world.members[0]
    token = await ana.token(world.room_id)
    other = await world.admin.post(
        "/api/partnerships",
        json={"title": "Other", "institution_ids": world.institutions},
    )
    assert await refused_with(server, other.json()["room_id"], token=token) == 4403


async def test_forged_expired_and_missing_credentials_get_4401(
    server: ServerProcess, world: World
) -> None:
    """No credentials, garbage, a wrong signature or an expired token: 4401."""
    ana = world.members[0]
    key = (server.data_dir / "secret_key").read_text().strip()
    now = int(time.time())
    claims = {"sub": str(ana.id), "room": world.room_id, "typ": "room", "iat": now}
    forged = jwt.encode(
        {**claims, "exp": now + 600},
        "a-different-key-of-enough-length-0123456789",
        algorithm="HS256",
    )
    expired = jwt.encode(
        {**claims, "iat": now - 900, "exp": now - 60}, key, algorithm="HS256"
    )
    unsigned = jwt.encode({**claims, "exp": now + 600}, None, algorithm="none")
    assert await refused_with(server, world.room_id) == 4401
    for token in ("garbage", forged, expired, unsigned):
        assert await refused_with(server, world.room_id, token=token) == 4401
    # The real key with valid claims works: the refusals above were about the token.
    good = jwt.encode({**claims, "exp": now + 600}, key, algorithm="HS256")
    async with room_socket(server, world.room_id, token=good) as sock:
        assert sock.welcome["user"]["id"] == ana.id


async def test_logged_out_cookie_is_refused(
    server: ServerProcess, world: World
) -> None:
    """After logout the old cookie value no longer opens the room."""
    member = await world.add_member("Leaving", world.institutions[1])
    cookie = _cookie(member.http)
    await member.http.delete("/api/session")
    headers = {"Cookie": cookie, "Origin": server.base_url}
    assert await refused_with(server, world.room_id, headers=headers) == 4401


async def test_unknown_room_is_4404(server: ServerProcess, world: World) -> None:
    """A room that does not exist answers 4404 (after authentication)."""
    ana = world.members[0]
    headers = {"Cookie": _cookie(ana.http), "Origin": server.base_url}
    assert await refused_with(server, 987654321, headers=headers) == 4404


async def test_bad_path_is_rejected_before_accept(server: ServerProcess) -> None:
    """A non-numeric room id can never succeed: the handshake itself is refused."""
    with pytest.raises(InvalidStatus):
        async with room_socket(server, "abc", expect_welcome=False):  # type: ignore[arg-type]
            pass


async def test_tokens_and_passwords_never_reach_the_log(
    server: ServerProcess, world: World
) -> None:
    """The server log holds no room token, session cookie or password."""
    ana = world.members[0]
    token = await ana.token(world.room_id)
    async with await join(server, ana, world.room_id):
        pass
    async with room_socket(server, world.room_id, token=token):
        pass
    log = server.log()
    assert "[redacted]" in log  # the socket paths were logged, with the token hidden
    assert token not in log
    assert ana.http.cookies["coilroom_session"] not in log
    assert "member-password-1" not in log
