"""The members' JSON API over real sockets: session, errors, Origin rule, rooms,
room tokens, chat history, and invitations as the invited person sees them."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    PASSWORD,
    TIMEOUT,
    Member,
    ServerProcess,
    World,
    join,
    login,
    room_socket,
)

pytestmark = pytest.mark.anyio

FOREIGN = "https://evil.example"


def fresh_email() -> str:
    return f"{uuid.uuid4().hex[:12]}@tests.coilroom.test"


def set_cookie(response: httpx.Response) -> str:
    """The session cookie's Set-Cookie header (the test fails if there is none)."""
    headers = [
        h
        for h in response.headers.get_list("set-cookie")
        if h.startswith("coilroom_session=")
    ]
    assert len(headers) == 1, response.headers
    return headers[0]


def assert_error(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, str]:
    """The response is ``status`` with the JSON error shape (and ``code``, if given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return dict(body["error"])


@pytest.fixture
async def admin(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    client = await login(server, ADMIN_EMAIL, ADMIN_PASSWORD)
    try:
        yield client
    finally:
        await client.aclose()


async def new_user(
    admin: httpx.AsyncClient,
    role: str = "instructor",
    institution_id: int | None = None,
) -> tuple[int, str]:
    email = fresh_email()
    r = await admin.post(
        "/api/users",
        json={
            "email": email,
            "name": f"User {email[:6]}",
            "password": PASSWORD,
            "institution_id": institution_id,
            "role": role,
        },
    )
    assert r.status_code == 201, r.text
    return int(r.json()["id"]), email


# -- session -----------------------------------------------------------------------


async def test_login_sets_httponly_samesite_lax_cookie(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    """A good login answers with the user and sets an HttpOnly, SameSite=Lax session cookie for /."""
    r = await http.post(
        "/api/session", json={"email": ADMIN_EMAIL.upper(), "password": ADMIN_PASSWORD}
    )
    assert r.status_code == 200, r.text
    assert r.json()["user"]["email"] == ADMIN_EMAIL
    assert r.json()["user"]["role"] == "admin"
    expires = dt.datetime.fromisoformat(r.json()["expires_at"])
    assert expires > dt.datetime.now(dt.UTC)
    attributes = {a.strip().split("=")[0] for a in set_cookie(r).lower().split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "samesite=lax" in set_cookie(r).lower()
    assert (
        "secure" not in attributes
    )  # COILROOM_COOKIE_SECURE is off on the test server
    me = await http.get("/api/me")
    assert me.status_code == 200
    assert me.json()["email"] == ADMIN_EMAIL


async def test_wrong_password_and_unknown_email_get_the_same_401(
    http: httpx.AsyncClient,
) -> None:
    """A wrong password and an unknown e-mail both get 401 invalid_credentials, with no cookie."""
    wrong = await http.post(
        "/api/session", json={"email": ADMIN_EMAIL, "password": "not the password"}
    )
    unknown = await http.post(
        "/api/session", json={"email": fresh_email(), "password": "not the password"}
    )
    a = assert_error(wrong, 401, "invalid_credentials")
    b = assert_error(unknown, 401, "invalid_credentials")
    assert a == b
    assert not wrong.headers.get_list("set-cookie")
    assert not unknown.headers.get_list("set-cookie")


async def test_repeated_failed_logins_get_429_with_retry_after(
    server: ServerProcess, admin: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    """After 5 failures for one e-mail the next try, even with the right password, gets 429 and Retry-After."""
    _, email = await new_user(admin)
    for _ in range(5):
        r = await http.post(
            "/api/session", json={"email": email, "password": "wrong-password-x"}
        )
        assert_error(r, 401, "invalid_credentials")
    blocked = await http.post(
        "/api/session", json={"email": email.upper(), "password": PASSWORD}
    )
    assert_error(blocked, 429, "rate_limited")
    assert 1 <= int(blocked.headers["retry-after"]) <= 301
    assert not blocked.headers.get_list("set-cookie")
    # Another e-mail from the same address is not affected.
    ok = await http.post(
        "/api/session", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    )
    assert ok.status_code == 200


async def test_success_clears_the_failure_count(
    admin: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    """Four failures, a success, then four more failures are still answered 401, not 429."""
    _, email = await new_user(admin)
    for _ in range(4):
        assert (
            await http.post(
                "/api/session", json={"email": email, "password": "wrong-password-x"}
            )
        ).status_code == 401
    assert (
        await http.post("/api/session", json={"email": email, "password": PASSWORD})
    ).status_code == 200
    for _ in range(4):
        r = await http.post(
            "/api/session", json={"email": email, "password": "wrong-password-x"}
        )
        assert_error(r, 401, "invalid_credentials")


async def test_logout_ends_the_session(server: ServerProcess) -> None:
    """After DELETE /api/session the old cookie value no longer authenticates."""
    client = await login(server, ADMIN_EMAIL, ADMIN_PASSWORD)
    try:
        value = client.cookies["coilroom_session"]
        r = await client.delete("/api/session")
        assert r.status_code == 200
        assert r.json() == {"ok": True}
        assert "max-age=0" in set_cookie(r).lower()  # the browser forgets it
    finally:
        await client.aclose()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as replay:
        replay.cookies.set("coilroom_session", value)
        assert_error(await replay.get("/api/me"), 401, "not_authenticated")
        assert_error(await replay.post("/api/rooms/1/tokens"), 401, "not_authenticated")


async def test_me_describes_the_caller(world: World) -> None:
    """GET /api/me gives id, e-mail, name, role and institution; without a cookie it is 401."""
    member = world.members[1]
    r = await member.http.get("/api/me")
    assert r.status_code == 200
    me = r.json()
    assert me["id"] == member.id
    assert me["email"] == member.email
    assert me["name"] == member.name
    assert me["role"] == "instructor"
    assert me["institution"]["id"] == world.institutions[1]
    assert me["institution"]["country"] == "DK"
    async with httpx.AsyncClient(
        base_url=world.server.base_url, timeout=TIMEOUT
    ) as anonymous:
        assert_error(await anonymous.get("/api/me"), 401, "not_authenticated")


# -- errors ------------------------------------------------------------------------------


async def test_unknown_fields_and_wrong_types_are_422(
    admin: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    """Unknown fields, wrong types and out-of-range values are 422 invalid."""
    tag = uuid.uuid4().hex[:8]
    assert_error(
        await admin.post(
            "/api/institutions",
            json={"name": f"U {tag}", "country": "MX", "colour": "red"},
        ),
        422,
        "invalid",
    )
    assert_error(
        await admin.post("/api/institutions", json={"name": 5, "country": "MX"}),
        422,
        "invalid",
    )
    assert_error(
        await admin.post(
            "/api/institutions", json={"name": f"U {tag}", "country": "Mexico"}
        ),
        422,
        "invalid",
    )
    assert_error(
        await admin.post("/api/institutions", json=["a", "list"]), 422, "invalid"
    )
    assert_error(
        await http.post(
            "/api/session",
            json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "remember": True},
        ),
        422,
        "invalid",
    )
    assert_error(
        await http.post("/api/session", json={"email": ADMIN_EMAIL}), 422, "invalid"
    )
    # Nothing was created by the refused requests.
    names = [
        i["name"] for i in (await admin.get("/api/institutions")).json()["institutions"]
    ]
    assert f"U {tag}" not in names


async def test_non_json_body_is_400(admin: httpx.AsyncClient) -> None:
    """A body that is not JSON, sent as JSON, is 400 bad_json."""
    r = await admin.post(
        "/api/institutions",
        content=b"{name: 'x'",
        headers={"content-type": "application/json"},
    )
    assert_error(r, 400, "bad_json")
    r = await admin.post(
        "/api/institutions", content=b"", headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "bad_json")


async def test_wrong_content_type_is_415(
    admin: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    """A body sent as a form or as text is 415; a charset parameter on JSON is fine."""
    r = await admin.post("/api/institutions", data={"name": "x", "country": "MX"})
    assert_error(r, 415, "unsupported_media_type")
    r = await http.post(
        "/api/session",
        content=b'{"email": "a@b.c", "password": "x"}',
        headers={"content-type": "text/plain"},
    )
    assert_error(r, 415, "unsupported_media_type")
    r = await http.post(
        "/api/session",
        content=f'{{"email": "{ADMIN_EMAIL}", "password": "{ADMIN_PASSWORD}"}}'.encode(),
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )
    assert r.status_code == 200, r.text


async def test_too_large_body_is_413(admin: httpx.AsyncClient) -> None:
    """A body over 64 KiB is 413 too_large."""
    r = await admin.post(
        "/api/institutions", json={"name": "x" * 66_000, "country": "MX"}
    )
    assert_error(r, 413, "too_large")


async def test_unknown_api_path_and_method_are_json_errors(
    admin: httpx.AsyncClient,
) -> None:
    """An unknown /api path is 404 and a wrong method 405, both in the JSON error shape."""
    assert_error(await admin.get("/api/nothing-here"), 404, "not_found")
    assert_error(await admin.get("/api/rooms/not-a-number/messages"), 404, "not_found")
    r = await admin.put("/api/me", json={})
    assert_error(r, 405, "method_not_allowed")


# -- Origin rule --------------------------------------------------------------------------


async def test_foreign_origin_with_valid_cookie_is_403(world: World) -> None:
    """A state-changing request from a foreign Origin is refused even with a valid cookie; GET and same-origin pass."""
    member = world.members[0]
    url = f"/api/rooms/{world.room_id}/tokens"
    assert_error(
        await member.http.post(url, headers={"origin": FOREIGN}),
        403,
        "origin_not_allowed",
    )
    assert_error(
        await member.http.post(url, headers={"origin": "null"}),
        403,
        "origin_not_allowed",
    )
    assert_error(
        await world.admin.post(
            "/api/institutions",
            json={"name": f"X {uuid.uuid4().hex}", "country": "MX"},
            headers={"origin": FOREIGN},
        ),
        403,
        "origin_not_allowed",
    )
    # Logging in and out from a foreign page is refused too (login CSRF).
    assert_error(
        await member.http.post(
            "/api/session",
            json={"email": member.email, "password": PASSWORD},
            headers={"origin": FOREIGN},
        ),
        403,
        "origin_not_allowed",
    )
    assert_error(
        await member.http.delete("/api/session", headers={"origin": FOREIGN}),
        403,
        "origin_not_allowed",
    )
    assert (
        await member.http.get("/api/me", headers={"origin": FOREIGN})
    ).status_code == 200
    own = world.server.base_url
    assert (await member.http.post(url, headers={"origin": own})).status_code == 201
    assert (await member.http.post(url)).status_code == 201  # programs send no Origin


# -- rooms, tokens, messages ----------------------------------------------------------------


async def test_rooms_lists_only_the_callers_rooms(
    world: World, admin: httpx.AsyncClient
) -> None:
    """GET /api/rooms gives the member's rooms with id, name and partnership; an outsider sees none of them."""
    member = world.members[0]
    rooms = (await member.http.get("/api/rooms")).json()["rooms"]
    assert [r["id"] for r in rooms] == [world.room_id]
    room = rooms[0]
    assert room["partnership"]["id"] == world.partnership_id
    assert room["name"].startswith("Partnership ")
    assert room["role"] == "instructor"
    assert room["online"] == []
    outsider = await world.add_user("Outsider", world.institutions[0])
    assert (await outsider.http.get("/api/rooms")).json()["rooms"] == []


async def test_room_token_only_for_members(world: World) -> None:
    """Members get a room token (201); others 403; an unknown room 404; no cookie 401."""
    member = world.members[0]
    r = await member.http.post(f"/api/rooms/{world.room_id}/tokens")
    assert r.status_code == 201, r.text
    assert set(r.json()) == {"token", "expires_at"}
    async with room_socket(
        world.server, world.room_id, token=r.json()["token"]
    ) as sock:
        assert sock.welcome["user"]["id"] == member.id
    outsider = await world.add_user("Outsider", world.institutions[0])
    assert_error(
        await outsider.http.post(f"/api/rooms/{world.room_id}/tokens"), 403, "forbidden"
    )
    assert_error(
        await member.http.post("/api/rooms/999999999/tokens"), 404, "not_found"
    )
    assert_error(await member.http.post("/api/rooms/0/tokens"), 404, "not_found")
    async with httpx.AsyncClient(
        base_url=world.server.base_url, timeout=TIMEOUT
    ) as anonymous:
        assert_error(
            await anonymous.post(f"/api/rooms/{world.room_id}/tokens"),
            401,
            "not_authenticated",
        )


async def test_room_token_ttl_is_capped(world: World) -> None:
    """ttl_seconds is honoured below the maximum, capped at it (3600 s) above, and refused below 10 s."""
    member = world.members[0]
    url = f"/api/rooms/{world.room_id}/tokens"
    now = dt.datetime.now(dt.UTC)
    short = await member.http.post(url, json={"ttl_seconds": 60})
    assert short.status_code == 201, short.text
    expires = dt.datetime.fromisoformat(short.json()["expires_at"])
    assert now + dt.timedelta(seconds=55) <= expires <= now + dt.timedelta(seconds=65)
    long = await member.http.post(url, json={"ttl_seconds": 30 * 86400})
    assert long.status_code == 201, long.text
    expires = dt.datetime.fromisoformat(long.json()["expires_at"])
    assert (
        now + dt.timedelta(seconds=3590) <= expires <= now + dt.timedelta(seconds=3610)
    )
    default = await member.http.post(url)
    expires = dt.datetime.fromisoformat(default.json()["expires_at"])
    assert now + dt.timedelta(seconds=890) <= expires <= now + dt.timedelta(seconds=910)
    assert_error(await member.http.post(url, json={"ttl_seconds": 5}), 422, "invalid")
    assert_error(
        await member.http.post(url, json={"ttl_seconds": "60"}), 422, "invalid"
    )
    assert_error(await member.http.post(url, json={"ttl": 60}), 422, "invalid")


async def test_messages_history_for_members(world: World) -> None:
    """Chat history is newest last with paging by before; limits out of range are 422; outsiders 403."""
    a = world.members[0]
    async with await join(world.server, a, world.room_id) as sock:
        for i in range(3):
            await sock.send({"type": "chat.send", "id": f"m{i}", "text": f"hello {i}"})
            await sock.recv_until("chat.ack", id=f"m{i}")
    r = await world.members[1].http.get(f"/api/rooms/{world.room_id}/messages")
    assert r.status_code == 200, r.text
    page = r.json()
    assert [m["text"] for m in page["messages"]] == ["hello 0", "hello 1", "hello 2"]
    assert page["messages"][0]["author"] == {"id": a.id, "name": a.name}
    assert page["has_more"] is False
    last = page["messages"][-1]["seq"]
    older = (
        await a.http.get(
            f"/api/rooms/{world.room_id}/messages", params={"before": last, "limit": 1}
        )
    ).json()
    assert [m["text"] for m in older["messages"]] == ["hello 1"]
    assert older["has_more"] is True
    assert_error(
        await a.http.get(f"/api/rooms/{world.room_id}/messages?limit=0"), 422, "invalid"
    )
    assert_error(
        await a.http.get(f"/api/rooms/{world.room_id}/messages?before=x"),
        422,
        "invalid",
    )
    outsider = await world.add_user("Outsider", world.institutions[0])
    assert_error(
        await outsider.http.get(f"/api/rooms/{world.room_id}/messages"),
        403,
        "forbidden",
    )


# -- invitations, as the invited person sees them ---------------------------------------------


async def invite(world: World, email: str, role: str = "instructor") -> dict[str, str]:
    r = await world.admin.post(
        f"/api/partnerships/{world.partnership_id}/invitations",
        json={"email": email, "role": role},
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_invitation_preview(world: World, http: httpx.AsyncClient) -> None:
    """Anyone holding the code sees the partnership, e-mail, role and whether the account exists; a bad code is 404."""
    email = fresh_email()
    inv = await invite(world, email, "observer")
    r = await http.get(f"/api/invitations/{inv['code']}")
    assert r.status_code == 200, r.text
    preview = r.json()
    assert preview["partnership"]["id"] == world.partnership_id
    assert preview["partnership"]["title"].startswith("Partnership ")
    assert preview["email"] == email
    assert preview["role"] == "observer"
    assert preview["account_exists"] is False
    assert preview["expires_at"] == inv["expires_at"]
    existing = await invite(world, world.members[0].email.upper())
    assert (await http.get(f"/api/invitations/{existing['code']}")).json()[
        "account_exists"
    ] is True
    assert_error(
        await http.get("/api/invitations/not-a-real-code-at-all"), 404, "not_found"
    )


async def test_accept_creates_account_logs_in_and_opens_the_room(
    world: World, server: ServerProcess
) -> None:
    """Accepting with a new e-mail creates the account, sets the cookie, and the new member can open the room."""
    email = fresh_email()
    inv = await invite(world, email)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
        r = await client.post(
            "/api/invitations/accept",
            json={
                "code": inv["code"],
                "name": "New Person",
                "password": "new-person-pass",
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["partnership_id"] == world.partnership_id
        assert body["room_id"] == world.room_id
        assert body["user"]["email"] == email
        assert body["user"]["role"] == "instructor"
        assert "httponly" in set_cookie(r).lower()
        me = (await client.get("/api/me")).json()
        assert me["email"] == email and me["name"] == "New Person"
        rooms = (await client.get("/api/rooms")).json()["rooms"]
        assert [room["id"] for room in rooms] == [world.room_id]
        newcomer = Member(me["id"], email, "New Person", client)
        async with await join(server, newcomer, world.room_id) as sock:
            assert sock.welcome["user"]["id"] == me["id"]
        # Single use: the same code again is gone.
        again = await client.post(
            "/api/invitations/accept",
            json={
                "code": inv["code"],
                "name": "Someone",
                "password": "someone-password",
            },
        )
        assert_error(again, 410)
        assert_error(
            await client.get(f"/api/invitations/{inv['code']}"), 410, "accepted"
        )
    # The new account logs in with its own password.
    again_client = await login(server, email, "new-person-pass")
    try:
        assert (await again_client.get("/api/me")).json()["email"] == email
    finally:
        await again_client.aclose()


async def test_accept_new_account_needs_name_and_password(
    world: World, http: httpx.AsyncClient
) -> None:
    """Without name and a 10+ character password no account is made and the invitation stays usable."""
    inv = await invite(world, fresh_email())
    assert_error(
        await http.post("/api/invitations/accept", json={"code": inv["code"]}),
        422,
        "invalid",
    )
    assert_error(
        await http.post(
            "/api/invitations/accept",
            json={"code": inv["code"], "name": "X", "password": "short"},
        ),
        422,
        "invalid",
    )
    assert (await http.get(f"/api/invitations/{inv['code']}")).status_code == 200


async def test_accept_for_existing_account_needs_login_or_password(
    world: World, server: ServerProcess
) -> None:
    """An existing account must give its password or be logged in as itself; a wrong password is 401."""
    user = await world.add_user("Existing", world.institutions[0])
    inv = await invite(world, user.email)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
        assert_error(
            await client.post("/api/invitations/accept", json={"code": inv["code"]}),
            409,
            "account_exists",
        )
        # Logged in as somebody else is not enough either.
        other = world.members[0]
        assert_error(
            await other.http.post(
                "/api/invitations/accept", json={"code": inv["code"]}
            ),
            409,
            "account_exists",
        )
        assert_error(
            await client.post(
                "/api/invitations/accept",
                json={"code": inv["code"], "password": "wrong-password-1"},
            ),
            401,
            "invalid_credentials",
        )
        r = await client.post(
            "/api/invitations/accept", json={"code": inv["code"], "password": PASSWORD}
        )
        assert r.status_code == 200, r.text
        assert r.json()["user"]["id"] == user.id
        assert (await client.get("/api/me")).json()["id"] == user.id
    assert [
        room["id"] for room in (await user.http.get("/api/rooms")).json()["rooms"]
    ] == [world.room_id]
    # A second invitation, accepted while logged in as that account, needs no password.
    second = await world.add_user("Second", world.institutions[1])
    inv2 = await invite(world, second.email, "observer")
    r = await second.http.post("/api/invitations/accept", json={"code": inv2["code"]})
    assert r.status_code == 200, r.text
    assert r.json()["user"]["id"] == second.id
    rooms = (await second.http.get("/api/rooms")).json()["rooms"]
    assert rooms[0]["role"] == "observer"


async def test_revoked_and_unknown_codes_cannot_be_used(
    world: World, http: httpx.AsyncClient
) -> None:
    """A revoked invitation is 410 for preview and accept; an unknown code is 404."""
    inv = await invite(world, fresh_email())
    r = await world.admin.delete(
        f"/api/partnerships/{world.partnership_id}/invitations/{inv['id']}"
    )
    assert r.status_code == 200
    assert_error(await http.get(f"/api/invitations/{inv['code']}"), 410, "revoked")
    assert_error(
        await http.post(
            "/api/invitations/accept",
            json={"code": inv["code"], "name": "X", "password": "long-enough-pw"},
        ),
        410,
    )
    assert_error(
        await http.post(
            "/api/invitations/accept",
            json={"code": "x" * 32, "name": "X", "password": "long-enough-pw"},
        ),
        404,
        "not_found",
    )


async def test_members_of_a_room_are_listed_for_its_members(
    server: ServerProcess, world: World
) -> None:
    """Any member sees who belongs to the room (names, roles, institutions), never
    their e-mail addresses; others get 403."""
    ana = world.members[0]
    observer = await world.add_member(
        "Olga Observer", world.institutions[1], "observer"
    )
    r = await observer.http.get(f"/api/rooms/{world.room_id}/members")
    assert r.status_code == 200, r.text
    members = {m["id"]: m for m in r.json()["members"]}
    assert set(members) == {m.id for m in world.members}
    assert members[ana.id]["name"] == ana.name
    assert members[ana.id]["role"] == "instructor"
    assert members[ana.id]["institution"]["id"] == world.institutions[0]
    assert members[observer.id]["role"] == "observer"
    assert "email" not in r.text
    async with World.create(server, members=1) as other:
        r = await other.members[0].http.get(f"/api/rooms/{world.room_id}/members")
        assert r.status_code == 403
