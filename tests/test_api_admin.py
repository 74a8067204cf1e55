"""The administration JSON API over real sockets: institutions, users, partnerships,
stages, the agreement record, members, invitations, and who may do what."""

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
    ServerProcess,
    World,
    join,
    login,
    room_socket,
)

pytestmark = pytest.mark.anyio


def tag() -> str:
    return uuid.uuid4().hex[:10]


def assert_error(
    response: httpx.Response, status: int, code: str | None = None
) -> None:
    """The response is ``status`` in the ``{error: {code, message}}`` shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body


@pytest.fixture
async def admin(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    client = await login(server, ADMIN_EMAIL, ADMIN_PASSWORD)
    try:
        yield client
    finally:
        await client.aclose()


async def institution(admin: httpx.AsyncClient, country: str = "MX") -> int:
    r = await admin.post(
        "/api/institutions", json={"name": f"Inst {tag()}", "country": country}
    )
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


async def partnership(
    admin: httpx.AsyncClient, institutions: list[int]
) -> dict[str, int]:
    r = await admin.post(
        "/api/partnerships",
        json={"title": f"P {tag()}", "institution_ids": institutions},
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


# -- institutions ---------------------------------------------------------------------------


async def test_institutions_create_list_patch(admin: httpx.AsyncClient) -> None:
    """Admins create, list and change institutions; a duplicate name is 409 and the country is upper-cased."""
    name = f"Universidad {tag()}"
    r = await admin.post(
        "/api/institutions",
        json={"name": name, "country": "mx", "timezone": "America/Mexico_City"},
    )
    assert r.status_code == 201, r.text
    inst_id = r.json()["id"]
    assert set(r.json()) == {"id"}
    assert_error(
        await admin.post("/api/institutions", json={"name": name, "country": "DK"}),
        409,
        "exists",
    )
    listed = {
        i["id"]: i
        for i in (await admin.get("/api/institutions")).json()["institutions"]
    }
    assert listed[inst_id] == {
        "id": inst_id,
        "name": name,
        "country": "MX",
        "timezone": "America/Mexico_City",
    }
    r = await admin.patch(
        f"/api/institutions/{inst_id}", json={"name": name + " Norte", "country": "co"}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "id": inst_id,
        "name": name + " Norte",
        "country": "CO",
        "timezone": "America/Mexico_City",
    }
    other = await institution(admin)
    assert_error(
        await admin.patch(f"/api/institutions/{other}", json={"name": name + " Norte"}),
        409,
        "exists",
    )
    assert_error(
        await admin.patch("/api/institutions/999999999", json={"name": "Nowhere"}),
        404,
        "not_found",
    )
    assert_error(
        await admin.patch(f"/api/institutions/{inst_id}", json={"country": "COL"}),
        422,
        "invalid",
    )


# -- users --------------------------------------------------------------------------------------


async def test_users_create_duplicate_list_patch(admin: httpx.AsyncClient) -> None:
    """Admins create users (e-mail stored lower-case), a duplicate e-mail is 409, the list hides hashes, patch changes fields."""
    inst = await institution(admin)
    email = f"Mixed.{tag()}@Tests.Coilroom.test"
    body = {
        "email": email,
        "name": "Rosa Campos",
        "password": PASSWORD,
        "institution_id": inst,
        "role": "coordinator",
    }
    r = await admin.post("/api/users", json=body)
    assert r.status_code == 201, r.text
    user_id = r.json()["id"]
    assert_error(
        await admin.post("/api/users", json=body | {"email": email.lower()}),
        409,
        "exists",
    )
    assert_error(
        await admin.post("/api/users", json=body | {"email": "no-at-sign"}),
        422,
        "invalid",
    )
    assert_error(
        await admin.post(
            "/api/users", json=body | {"email": f"x{tag()}@t.test", "role": "king"}
        ),
        422,
        "invalid",
    )
    assert_error(
        await admin.post(
            "/api/users", json=body | {"email": f"x{tag()}@t.test", "password": "short"}
        ),
        422,
        "invalid",
    )
    assert_error(
        await admin.post(
            "/api/users",
            json=body | {"email": f"x{tag()}@t.test", "institution_id": 999999999},
        ),
        422,
        "invalid",
    )
    users = {u["id"]: u for u in (await admin.get("/api/users")).json()["users"]}
    assert users[user_id] == {
        "id": user_id,
        "email": email.lower(),
        "name": "Rosa Campos",
        "role": "coordinator",
        "institution_id": inst,
        "disabled": False,
    }
    assert all("password" not in k for u in users.values() for k in u)
    r = await admin.patch(
        f"/api/users/{user_id}",
        json={"name": "Rosa C. Campos", "role": "instructor", "institution_id": None},
    )
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Rosa C. Campos"
    assert r.json()["role"] == "instructor"
    assert r.json()["institution_id"] is None
    assert_error(
        await admin.patch("/api/users/999999999", json={"name": "Nobody"}),
        404,
        "not_found",
    )
    assert_error(
        await admin.patch(f"/api/users/{user_id}", json={"email": "new@t.test"}),
        422,
        "invalid",
    )


async def test_password_change_by_admin(
    admin: httpx.AsyncClient, server: ServerProcess
) -> None:
    """An admin sets a new password: the old one stops working and the new one logs in."""
    email = f"{tag()}@tests.coilroom.test"
    r = await admin.post(
        "/api/users",
        json={"email": email, "name": "Pw", "password": PASSWORD, "role": "instructor"},
    )
    user_id = r.json()["id"]
    assert (
        await admin.patch(
            f"/api/users/{user_id}", json={"password": "a-new-password-2"}
        )
    ).status_code == 200
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
        assert_error(
            await client.post(
                "/api/session", json={"email": email, "password": PASSWORD}
            ),
            401,
        )
        assert (
            await client.post(
                "/api/session", json={"email": email, "password": "a-new-password-2"}
            )
        ).status_code == 200


async def test_disabled_user_cannot_log_in_and_loses_sessions_and_sockets(
    world: World, server: ServerProcess
) -> None:
    """Disabling a user ends their sessions and live sockets (4403), refuses login and their room tokens; enabling restores login."""
    member = world.members[0]
    token = await member.token(world.room_id)
    async with await join(server, member, world.room_id) as sock:
        r = await world.admin.patch(f"/api/users/{member.id}", json={"disabled": True})
        assert r.status_code == 200, r.text
        assert r.json()["disabled"] is True
        assert await sock.close_code() == 4403
    assert_error(await member.http.get("/api/me"), 401, "not_authenticated")
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
        assert_error(
            await client.post(
                "/api/session", json={"email": member.email, "password": PASSWORD}
            ),
            401,
            "invalid_credentials",
        )
        async with room_socket(
            server, world.room_id, token=token, expect_welcome=False
        ) as refused:
            assert await refused.close_code() == 4401
        assert (
            await world.admin.patch(f"/api/users/{member.id}", json={"disabled": False})
        ).status_code == 200
        assert (
            await client.post(
                "/api/session", json={"email": member.email, "password": PASSWORD}
            )
        ).status_code == 200
        assert (await client.get("/api/me")).json()["id"] == member.id


async def test_admin_cannot_disable_or_demote_themselves(
    admin: httpx.AsyncClient,
) -> None:
    """An admin's own account cannot be disabled or demoted by that admin (409), so the last admin is not locked out."""
    me = (await admin.get("/api/me")).json()
    assert_error(
        await admin.patch(f"/api/users/{me['id']}", json={"disabled": True}),
        409,
        "self",
    )
    assert_error(
        await admin.patch(f"/api/users/{me['id']}", json={"role": "instructor"}),
        409,
        "self",
    )
    assert (await admin.get("/api/me")).json()["role"] == "admin"


# -- partnerships, stages, agreement ---------------------------------------------------------------


async def test_partnership_create_appears_in_members_rooms(world: World) -> None:
    """POST /api/partnerships returns {id, room_id}; once added, a member finds the room in GET /api/rooms."""
    r = await world.admin.post(
        "/api/partnerships",
        json={
            "title": "Water and Cities",
            "institution_ids": world.institutions,
            "goals": "Compare.",
        },
    )
    assert r.status_code == 201, r.text
    assert set(r.json()) == {"id", "room_id"}
    pid, room_id = r.json()["id"], r.json()["room_id"]
    member = world.members[0]
    assert room_id not in [
        room["id"] for room in (await member.http.get("/api/rooms")).json()["rooms"]
    ]
    assert (
        await world.admin.post(
            f"/api/partnerships/{pid}/members",
            json={"user_id": member.id, "role": "instructor"},
        )
    ).status_code == 201
    rooms = {
        room["id"]: room
        for room in (await member.http.get("/api/rooms")).json()["rooms"]
    }
    assert rooms[room_id]["name"] == "Water and Cities"
    assert rooms[room_id]["partnership"] == {
        "id": pid,
        "title": "Water and Cities",
        "stage": "planning",
    }
    detail = (await world.admin.get(f"/api/partnerships/{pid}")).json()
    assert detail["goals"] == "Compare."
    assert detail["room_id"] == room_id
    assert sorted(i["id"] for i in detail["institutions"]) == sorted(world.institutions)
    listed = [
        p["id"]
        for p in (await world.admin.get("/api/partnerships")).json()["partnerships"]
    ]
    assert pid in listed
    r = await world.admin.patch(
        f"/api/partnerships/{pid}", json={"title": "Water, Cities and People"}
    )
    assert r.status_code == 200 and r.json()["title"] == "Water, Cities and People"


async def test_partnership_needs_two_known_institutions(
    admin: httpx.AsyncClient,
) -> None:
    """A partnership needs at least two different, existing institutions (422 otherwise)."""
    a, b = await institution(admin), await institution(admin, "DK")
    assert_error(
        await admin.post(
            "/api/partnerships", json={"title": "T", "institution_ids": [a]}
        ),
        422,
        "invalid",
    )
    assert_error(
        await admin.post(
            "/api/partnerships", json={"title": "T", "institution_ids": [a, a]}
        ),
        422,
        "invalid",
    )
    assert_error(
        await admin.post(
            "/api/partnerships", json={"title": "T", "institution_ids": [a, 999999999]}
        ),
        422,
        "invalid",
    )
    assert_error(
        await admin.post(
            "/api/partnerships", json={"title": "", "institution_ids": [a, b]}
        ),
        422,
        "invalid",
    )
    assert_error(await admin.get("/api/partnerships/999999999"), 404, "not_found")


async def test_stage_changes_are_kept_with_who_and_when(
    admin: httpx.AsyncClient,
) -> None:
    """Every stage change is recorded with from, to, who, when and note; the same stage again is 409."""
    me = (await admin.get("/api/me")).json()
    p = await partnership(
        admin, [await institution(admin), await institution(admin, "DK")]
    )
    url = f"/api/partnerships/{p['id']}/stages"
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    r = await admin.post(
        url, json={"stage": "partner_identified", "note": "met at a fair"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["from"] == "planning" and r.json()["to"] == "partner_identified"
    assert (await admin.post(url, json={"stage": "meeting"})).status_code == 201
    assert_error(await admin.post(url, json={"stage": "meeting"}), 409, "unchanged")
    assert_error(await admin.post(url, json={"stage": "dreaming"}), 422, "invalid")
    history = (await admin.get(url)).json()["stages"]
    assert [(s["from"], s["to"]) for s in history] == [
        (None, "planning"),
        ("planning", "partner_identified"),
        ("partner_identified", "meeting"),
    ]
    assert all(s["changed_by"] == me["id"] for s in history)
    assert history[1]["note"] == "met at a fair"
    for s in history:
        assert (
            before
            <= dt.datetime.fromisoformat(s["changed_at"])
            <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
        )
    assert (await admin.get(f"/api/partnerships/{p['id']}")).json()[
        "stage"
    ] == "meeting"
    assert_error(
        await admin.get("/api/partnerships/999999999/stages"), 404, "not_found"
    )


async def test_agreement_record(admin: httpx.AsyncClient) -> None:
    """The agreement keeps kind, status, validity, dated signatories and funding; valid_to before valid_from is 422."""
    a, b = await institution(admin), await institution(admin, "DK")
    p = await partnership(admin, [a, b])
    url = f"/api/partnerships/{p['id']}/agreement"
    initial = (await admin.get(url)).json()
    assert initial["kind"] == "MOU" and initial["status"] == "draft"
    assert initial["valid_from"] is None and initial["signatories"] == []
    values = {
        "kind": "MOA",
        "status": "signed",
        "valid_from": "2025-01-01",
        "valid_to": "2027-12-31",
        "signatories": [
            {
                "name": "Dr. Elena Ruiz",
                "title": "Rector",
                "institution_id": a,
                "signed_on": "2024-12-10",
            },
            {"name": "Prof. Jens Holm", "institution_id": b, "signed_on": "2024-12-12"},
        ],
        "funding_terms": "Each side pays its own travel.",
    }
    r = await admin.put(url, json=values)
    assert r.status_code == 200, r.text
    me = (await admin.get("/api/me")).json()
    stored = (await admin.get(url)).json()
    assert {k: stored[k] for k in values if k != "signatories"} == {
        k: v for k, v in values.items() if k != "signatories"
    }
    assert stored["signatories"][0] == values["signatories"][0]
    assert stored["signatories"][1]["signed_on"] == "2024-12-12"
    assert stored["updated_by"] == me["id"]
    assert_error(await admin.put(url, json={"valid_to": "2024-06-30"}), 422, "invalid")
    assert_error(
        await admin.put(
            url, json={"valid_from": "2026-01-01", "valid_to": "2025-01-01"}
        ),
        422,
        "invalid",
    )
    assert_error(await admin.put(url, json={"kind": "NDA"}), 422, "invalid")
    assert_error(
        await admin.put(url, json={"valid_from": "01/02/2025"}), 422, "invalid"
    )
    assert_error(
        await admin.put(url, json={"signatories": [{"title": "no name"}]}),
        422,
        "invalid",
    )
    assert (await admin.get(url)).json()[
        "valid_to"
    ] == "2027-12-31"  # refused changes left no trace
    # Fields not sent are kept.
    r = await admin.put(url, json={"status": "expired"})
    assert r.json()["status"] == "expired" and r.json()["kind"] == "MOA"
    assert_error(
        await admin.get("/api/partnerships/999999999/agreement"), 404, "not_found"
    )


# -- members --------------------------------------------------------------------------------------------


async def test_members_add_change_remove(world: World) -> None:
    """Members are added (201), re-added with a new role (200), patched, and removed; PATCH does not add a non-member."""
    url = f"/api/partnerships/{world.partnership_id}/members"
    newcomer = await world.add_user("Newcomer", world.institutions[0])
    assert (
        await world.admin.post(url, json={"user_id": newcomer.id, "role": "observer"})
    ).status_code == 201
    r = await world.admin.post(url, json={"user_id": newcomer.id, "role": "instructor"})
    assert r.status_code == 200 and r.json() == {
        "user_id": newcomer.id,
        "role": "instructor",
    }
    r = await world.admin.patch(f"{url}/{newcomer.id}", json={"role": "coordinator"})
    assert r.status_code == 200 and r.json()["role"] == "coordinator"
    members = {m["user_id"]: m for m in (await world.admin.get(url)).json()["members"]}
    assert members[newcomer.id]["role"] == "coordinator"
    assert members[newcomer.id]["email"] == newcomer.email
    assert members[newcomer.id]["institution"]["id"] == world.institutions[0]
    assert {m.id for m in world.members} < set(members)
    assert (await world.admin.delete(f"{url}/{newcomer.id}")).json() == {"ok": True}
    assert newcomer.id not in {
        m["user_id"] for m in (await world.admin.get(url)).json()["members"]
    }
    assert (await newcomer.http.get("/api/rooms")).json()["rooms"] == []
    assert_error(
        await newcomer.http.post(f"/api/rooms/{world.room_id}/tokens"), 403, "forbidden"
    )
    assert_error(await world.admin.delete(f"{url}/{newcomer.id}"), 404, "not_found")
    # PATCH only changes roles: it must not make a non-member a member.
    assert_error(
        await world.admin.patch(f"{url}/{newcomer.id}", json={"role": "instructor"}),
        404,
        "not_found",
    )
    assert newcomer.id not in {
        m["user_id"] for m in (await world.admin.get(url)).json()["members"]
    }
    assert_error(
        await world.admin.post(url, json={"user_id": 999999999, "role": "instructor"}),
        422,
        "invalid",
    )
    assert_error(
        await world.admin.post(url, json={"user_id": newcomer.id, "role": "owner"}),
        422,
        "invalid",
    )
    assert_error(
        await world.admin.get("/api/partnerships/999999999/members"), 404, "not_found"
    )


async def test_removing_a_connected_member_closes_their_socket_4403(
    world: World, server: ServerProcess
) -> None:
    """A member removed while connected has their room socket ended with 4403; others stay connected."""
    gone, stays = world.members[0], world.members[1]
    async with (
        await join(server, gone, world.room_id) as g,
        await join(server, stays, world.room_id) as s,
    ):
        r = await world.admin.delete(
            f"/api/partnerships/{world.partnership_id}/members/{gone.id}"
        )
        assert r.status_code == 200, r.text
        assert await g.close_code() == 4403
        await s.send({"type": "chat.send", "id": "after", "text": "still here"})
        assert (await s.recv_until("chat.ack", id="after"))["id"] == "after"


# -- invitations (management) -------------------------------------------------------------------------------


async def test_invitations_create_list_revoke_resend(
    world: World, http: httpx.AsyncClient
) -> None:
    """Creating returns the code once with accept_url; the list shows states; resend gives a new code and the old stops working."""
    url = f"/api/partnerships/{world.partnership_id}/invitations"
    email = f"Guest.{tag()}@Tests.Coilroom.test"
    r = await world.admin.post(
        url,
        json={
            "email": email,
            "role": "instructor",
            "institution_id": world.institutions[1],
        },
    )
    assert r.status_code == 201, r.text
    inv = r.json()
    assert inv["email"] == email.lower() and inv["state"] == "pending"
    assert inv["accept_url"] == f"{world.server.base_url}/invite/{inv['code']}"
    expires = dt.datetime.fromisoformat(inv["expires_at"])
    assert (
        dt.timedelta(days=6, hours=23)
        < expires - dt.datetime.now(dt.UTC)
        <= dt.timedelta(days=7)
    )
    listed = {i["id"]: i for i in (await world.admin.get(url)).json()["invitations"]}
    assert listed[inv["id"]]["state"] == "pending"
    assert "code" not in listed[inv["id"]] and "code_hash" not in listed[inv["id"]]
    # Resend: a new code; the old one no longer opens anything.
    r = await world.admin.post(f"{url}/{inv['id']}/resend", json={"ttl_seconds": 7200})
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert fresh["code"] != inv["code"] and fresh["id"] == inv["id"]
    expires = dt.datetime.fromisoformat(fresh["expires_at"])
    assert (
        dt.timedelta(seconds=7100)
        < expires - dt.datetime.now(dt.UTC)
        <= dt.timedelta(seconds=7200)
    )
    assert_error(await http.get(f"/api/invitations/{inv['code']}"), 404, "not_found")
    assert (await http.get(f"/api/invitations/{fresh['code']}")).status_code == 200
    # Revoke: the state shows it and the code is gone (410).
    r = await world.admin.delete(f"{url}/{inv['id']}")
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    assert {i["id"]: i for i in (await world.admin.get(url)).json()["invitations"]}[
        inv["id"]
    ]["state"] == "revoked"
    assert_error(await http.get(f"/api/invitations/{fresh['code']}"), 410, "revoked")
    # Accepted invitations show as accepted and can be neither revoked nor resent.
    other = (
        await world.admin.post(
            url, json={"email": f"{tag()}@tests.coilroom.test", "role": "observer"}
        )
    ).json()
    r = await http.post(
        "/api/invitations/accept",
        json={"code": other["code"], "name": "Obs", "password": "observer-pass"},
    )
    assert r.status_code == 200, r.text
    assert {i["id"]: i for i in (await world.admin.get(url)).json()["invitations"]}[
        other["id"]
    ]["state"] == "accepted"
    assert_error(await world.admin.delete(f"{url}/{other['id']}"), 409, "accepted")
    assert_error(await world.admin.post(f"{url}/{other['id']}/resend"), 409, "accepted")
    assert_error(await world.admin.delete(f"{url}/999999999"), 404, "not_found")


async def test_invitation_input_is_checked(world: World) -> None:
    """Bad e-mail, role, a ttl under an hour and an institution outside the partnership are 422."""
    url = f"/api/partnerships/{world.partnership_id}/invitations"
    email = f"{tag()}@tests.coilroom.test"
    assert_error(
        await world.admin.post(url, json={"email": "nobody", "role": "instructor"}),
        422,
        "invalid",
    )
    assert_error(
        await world.admin.post(url, json={"email": email, "role": "admin"}),
        422,
        "invalid",
    )
    assert_error(
        await world.admin.post(
            url, json={"email": email, "role": "instructor", "ttl_seconds": 60}
        ),
        422,
        "invalid",
    )
    outside = await institution(world.admin)
    assert_error(
        await world.admin.post(
            url, json={"email": email, "role": "instructor", "institution_id": outside}
        ),
        422,
        "invalid",
    )
    assert_error(
        await world.admin.get("/api/partnerships/999999999/invitations"),
        404,
        "not_found",
    )
    assert (await world.admin.get(url)).json()["invitations"] == []


# -- permissions ------------------------------------------------------------------------------------------------


async def test_instructor_gets_403_on_admin_endpoints(world: World) -> None:
    """An instructor may read institutions but gets 403 on every administrative endpoint."""
    member = world.members[0]
    p = f"/api/partnerships/{world.partnership_id}"
    assert (await member.http.get("/api/institutions")).status_code == 200
    for method, path, body in [
        ("POST", "/api/institutions", {"name": f"I {tag()}", "country": "MX"}),
        ("PATCH", f"/api/institutions/{world.institutions[0]}", {"name": "Mine now"}),
        ("GET", "/api/users", None),
        (
            "POST",
            "/api/users",
            {
                "email": f"{tag()}@t.test",
                "name": "X",
                "password": PASSWORD,
                "role": "admin",
            },
        ),
        ("PATCH", f"/api/users/{member.id}", {"role": "admin"}),
        ("GET", "/api/partnerships", None),
        (
            "POST",
            "/api/partnerships",
            {"title": "Mine", "institution_ids": world.institutions},
        ),
        ("GET", p, None),
        ("PATCH", p, {"title": "Mine"}),
        ("GET", f"{p}/members", None),
        ("POST", f"{p}/members", {"user_id": member.id, "role": "coordinator"}),
        ("PATCH", f"{p}/members/{member.id}", {"role": "coordinator"}),
        ("DELETE", f"{p}/members/{world.members[1].id}", None),
        ("GET", f"{p}/stages", None),
        ("POST", f"{p}/stages", {"stage": "active"}),
        ("GET", f"{p}/agreement", None),
        ("PUT", f"{p}/agreement", {"status": "signed"}),
        ("GET", f"{p}/invitations", None),
        (
            "POST",
            f"{p}/invitations",
            {"email": f"{tag()}@t.test", "role": "instructor"},
        ),
    ]:
        r = await member.http.request(method, path, json=body)
        assert_error(r, 403, "forbidden")
    assert (await member.http.get("/api/me")).json()["role"] == "instructor"
    rooms = (await member.http.get("/api/rooms")).json()["rooms"]
    assert rooms[0]["role"] == "instructor"


async def test_coordinator_manages_only_own_partnerships(world: World) -> None:
    """A coordinator creates a partnership and coordinates it, manages it fully, and gets 403 on someone else's."""
    coord = await world.add_user(
        "Carmen Coordinator", world.institutions[0], role="coordinator"
    )
    r = await coord.http.post(
        "/api/partnerships",
        json={"title": f"Own {tag()}", "institution_ids": world.institutions},
    )
    assert r.status_code == 201, r.text
    own = r.json()
    p = f"/api/partnerships/{own['id']}"
    members = (await coord.http.get(f"{p}/members")).json()["members"]
    assert [(m["user_id"], m["role"]) for m in members] == [(coord.id, "coordinator")]
    assert [
        room["id"] for room in (await coord.http.get("/api/rooms")).json()["rooms"]
    ] == [own["room_id"]]
    listed = [
        x["id"]
        for x in (await coord.http.get("/api/partnerships")).json()["partnerships"]
    ]
    assert listed == [own["id"]]
    # Full management of its own partnership.
    member = world.members[0]
    assert (
        await coord.http.post(
            f"{p}/members", json={"user_id": member.id, "role": "instructor"}
        )
    ).status_code == 201
    assert (
        await coord.http.patch(f"{p}/members/{member.id}", json={"role": "observer"})
    ).status_code == 200
    assert (
        await coord.http.post(f"{p}/stages", json={"stage": "invited"})
    ).status_code == 201
    assert (
        await coord.http.put(f"{p}/agreement", json={"kind": "MOA"})
    ).status_code == 200
    inv = await coord.http.post(
        f"{p}/invitations",
        json={"email": f"{tag()}@tests.coilroom.test", "role": "instructor"},
    )
    assert inv.status_code == 201, inv.text
    assert (
        await coord.http.delete(f"{p}/invitations/{inv.json()['id']}")
    ).status_code == 200
    assert (await coord.http.delete(f"{p}/members/{member.id}")).status_code == 200
    # Someone else's partnership: 403 on everything.
    other = f"/api/partnerships/{world.partnership_id}"
    for method, path, body in [
        ("GET", other, None),
        ("GET", f"{other}/members", None),
        ("POST", f"{other}/members", {"user_id": coord.id, "role": "coordinator"}),
        ("DELETE", f"{other}/members/{world.members[1].id}", None),
        ("GET", f"{other}/invitations", None),
        (
            "POST",
            f"{other}/invitations",
            {"email": f"{tag()}@t.test", "role": "coordinator"},
        ),
        ("GET", f"{other}/stages", None),
        ("POST", f"{other}/stages", {"stage": "closed"}),
        ("PUT", f"{other}/agreement", {"status": "terminated"}),
        (
            "GET",
            "/api/partnerships/999999999/members",
            None,
        ),  # same answer whether it exists or not
    ]:
        assert_error(
            await coord.http.request(method, path, json=body), 403, "forbidden"
        )
    # Not an administrator: no users or institutions.
    assert_error(
        await coord.http.post(
            "/api/institutions", json={"name": f"I {tag()}", "country": "MX"}
        ),
        403,
        "forbidden",
    )
    assert_error(
        await coord.http.post(
            "/api/users",
            json={
                "email": f"{tag()}@t.test",
                "name": "X",
                "password": PASSWORD,
                "role": "instructor",
            },
        ),
        403,
        "forbidden",
    )
    assert_error(await coord.http.get("/api/users"), 403, "forbidden")
    assert_error(
        await coord.http.patch(f"/api/users/{coord.id}", json={"role": "admin"}),
        403,
        "forbidden",
    )


async def test_member_with_coordinator_role_manages_that_partnership(
    world: World,
) -> None:
    """Being a member with the coordinator role is what lets a user manage a partnership's members."""
    member = world.members[2]
    url = f"/api/partnerships/{world.partnership_id}/members"
    assert_error(await member.http.get(url), 403, "forbidden")
    assert (
        await world.admin.patch(f"{url}/{member.id}", json={"role": "coordinator"})
    ).status_code == 200
    assert (await member.http.get(url)).status_code == 200
    assert (
        await member.http.patch(
            f"{url}/{world.members[0].id}", json={"role": "observer"}
        )
    ).status_code == 200
    assert (
        await world.admin.patch(f"{url}/{member.id}", json={"role": "instructor"})
    ).status_code == 200
    assert_error(await member.http.get(url), 403, "forbidden")


# -- the documentation ---------------------------------------------------------------------------------------
