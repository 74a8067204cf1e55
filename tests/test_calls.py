"""Calls on the room socket: membership, roles, relaying, refusals, media state,
moderation and call records, against a real server (``docs/protocol.md``, Calls).

Signals here carry well-formed but synthetic SDP: what is tested is what the server
checks and relays. Real peers connecting through the server are in test_call_peers.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.conftest import dedicated_server
from tests.rawsocket import open_stalled_socket, send_text_frame
from tests.support import Member, ServerProcess, Socket, World, join, room_socket

pytestmark = pytest.mark.anyio

SDP = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
TURN_SECRET = "turn-shared-secret-for-tests"
TURN_TTL = 600


@pytest.fixture(scope="module")
def calls_server(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Default message limits, a small call, and STUN/TURN configured."""
    with dedicated_server(
        backend,
        tmp_path_factory,
        {
            "CALL_MAX_PARTICIPANTS": "3",
            "STUN_URLS": "stun:stun.example.org:3478",
            "TURN_URLS": "turn:turn.example.org:3478?transport=udp,turns:turn.example.org:5349",
            "TURN_SECRET": TURN_SECRET,
            "TURN_TTL": str(TURN_TTL),
        },
    ) as proc:
        yield proc


@pytest.fixture
async def small(calls_server: ServerProcess) -> AsyncIterator[World]:
    async with World.create(calls_server) as w:
        yield w


@contextlib.asynccontextmanager
async def in_call(
    server: ServerProcess,
    member: Member,
    room_id: int,
    *,
    rollback: bool = True,
    media: dict[str, bool] | None = None,
) -> AsyncIterator[tuple[Socket, dict[str, Any]]]:
    """A room socket of ``member`` that has joined the room's call."""
    async with await join(server, member, room_id) as sock:
        frame: dict[str, Any] = {"type": "call.join", "id": "j", "rollback": rollback}
        if media is not None:
            frame["media"] = media
        await sock.send(frame)
        joined = await sock.recv_until("call.joined")
        yield sock, joined


async def error_for(sock: Socket, message_id: str) -> dict[str, Any]:
    return await sock.recv_until("error", id=message_id)


@pytest.fixture
async def pair(
    calls_server: ServerProcess, small: World
) -> AsyncIterator[tuple[Socket, str]]:
    """Two members of ``small`` in its call: the first one's socket, and the
    connection id of the second (a target for its signals)."""
    a, b = small.members[:2]
    async with (
        in_call(calls_server, a, small.room_id) as (sa, _ja),
        in_call(calls_server, b, small.room_id) as (_sb, jb),
    ):
        yield sa, jb["connection_id"]


async def test_join_leave_and_the_list_of_participants(
    server: ServerProcess, world: World
) -> None:
    a, b, c = world.members[:3]
    room = world.room_id
    async with await join(server, c, room) as watcher:
        assert watcher.welcome["call"] is None
        async with in_call(server, a, room) as (sa, ja):
            assert ja["participants"] == []
            assert ja["max_participants"] == 8
            assert ja["ice_servers"] == []  # no STUN/TURN configured: host candidates
            call_id = ja["call_id"]
            started = await watcher.recv_until("call.started")
            assert started["call_id"] == call_id
            assert started["by"]["id"] == a.id
            first = await watcher.recv_until("call.participant_joined")
            assert first["participant"]["connection_id"] == ja["connection_id"]
            assert first["roles"] == {}

            async with in_call(server, b, room) as (sb, jb):
                # The newcomer gets those already in the call, each with its role.
                assert [p["connection_id"] for p in jb["participants"]] == [
                    ja["connection_id"]
                ]
                assert jb["participants"][0]["user"]["id"] == a.id
                assert jb["participants"][0]["polite"] is True
                # The one already there learns of the newcomer and its own side.
                event = await sa.recv_until("call.participant_joined", call_id=call_id)
                while event["participant"]["connection_id"] != jb["connection_id"]:
                    event = await sa.recv_until("call.participant_joined")
                assert event["roles"] == {ja["connection_id"]: "impolite"}

                # A member who opens the room now sees the live call.
                async with await join(server, c, room) as late:
                    live = late.welcome["call"]
                    assert live["call_id"] == call_id
                    assert {p["connection_id"] for p in live["participants"]} == {
                        ja["connection_id"],
                        jb["connection_id"],
                    }
                await sb.send({"type": "call.leave", "id": "bye"})
                left = await sa.recv_until(
                    "call.participant_left", connection_id=jb["connection_id"]
                )
                assert left["reason"] == "left"
                assert left["user_id"] == b.id
                # Leaving twice is an error, not a crash.
                await sb.send({"type": "call.leave", "id": "again"})
                assert (await error_for(sb, "again"))["code"] == "not_in_call"
        # The last participant's socket closing leaves the call and ends it.
        gone = await watcher.recv_until(
            "call.participant_left", connection_id=ja["connection_id"]
        )
        assert gone["reason"] == "disconnected"
        ended = await watcher.recv_until("call.ended")
        assert ended["call_id"] == call_id
        assert ended["seconds"] >= 0


async def test_an_aiortc_like_peer_is_never_the_polite_side(
    server: ServerProcess, world: World
) -> None:
    a, b, c = world.members[:3]
    room = world.room_id
    # A newcomer that cannot roll back is impolite toward one that can.
    async with (
        in_call(server, a, room, rollback=True) as (sa, ja),
        in_call(server, b, room, rollback=False) as (_sb, jb),
    ):
        assert jb["participants"][0]["polite"] is False
        event = await sa.recv_until(
            "call.participant_joined",
        )
        while event["participant"]["connection_id"] != jb["connection_id"]:
            event = await sa.recv_until("call.participant_joined")
        assert event["roles"] == {ja["connection_id"]: "polite"}
        # A newcomer that can roll back is polite toward both kinds.
        async with in_call(server, c, room) as (_sc, jc):
            roles = {p["connection_id"]: p["polite"] for p in jc["participants"]}
            assert roles == {ja["connection_id"]: True, jb["connection_id"]: True}


async def test_signals_reach_only_the_named_participant(
    server: ServerProcess, world: World
) -> None:
    a, b, c = world.members[:3]
    room = world.room_id
    async with (
        in_call(server, a, room) as (sa, ja),
        in_call(server, b, room) as (sb, jb),
        in_call(server, c, room) as (sc, _jc),
    ):
        offer = {"type": "offer", "sdp": SDP}
        await sb.send(
            {"type": "call.signal", "to": ja["connection_id"], "description": offer}
        )
        got = await sa.recv_until("call.signal")
        assert got["from"] == jb["connection_id"]
        assert got["user_id"] == b.id
        assert got["description"] == offer
        candidate = {
            "candidate": "candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
            "sdpMid": "0",
            "sdpMLineIndex": 0,
            "usernameFragment": "abcd",
        }
        await sa.send(
            {"type": "call.signal", "to": jb["connection_id"], "candidate": candidate}
        )
        got = await sb.recv_until("call.signal")
        assert got["candidate"] == candidate
        assert got["from"] == ja["connection_id"]
        # Renegotiation and ICE restart are ordinary offers; rollback passes too.
        await sa.send(
            {
                "type": "call.signal",
                "to": jb["connection_id"],
                "description": {"type": "rollback"},
            }
        )
        got = await sb.recv_until("call.signal")
        assert got["description"] == {"type": "rollback", "sdp": ""}
        # C, in the same call, saw none of the A-B signals: a ping answered after
        # them proves its queue held nothing else of that kind.
        await sc.send({"type": "ping", "id": "p"})
        while (frame := await sc.recv())["type"] != "pong":
            assert frame["type"] != "call.signal", frame


async def test_refusals(server: ServerProcess, world: World) -> None:
    a, b = world.members[:2]
    room = world.room_id
    async with World.create(server, members=1) as elsewhere:
        outsider = elsewhere.members[0]
        async with (
            in_call(server, a, room) as (sa, ja),
            in_call(server, outsider, elsewhere.room_id) as (so, jo),
            await join(server, b, room) as sb,
        ):
            offer = {"type": "offer", "sdp": SDP}
            big = {"type": "offer", "sdp": SDP + "a=x\r\n" * 8000}
            for sender, to, signal, code in [
                # To a participant of another room's call.
                (sa, jo["connection_id"], {"description": offer}, "unknown_peer"),
                # To a member of the room who is not in the call.
                (
                    sa,
                    sb.welcome["connection_id"],
                    {"description": offer},
                    "unknown_peer",
                ),
                # From a member who is not in the call.
                (sb, ja["connection_id"], {"description": offer}, "not_in_call"),
                # To oneself.
                (sa, ja["connection_id"], {"description": offer}, "unknown_peer"),
                # Neither description nor candidate.
                (sa, "x", {}, "invalid_message"),
                # Keys the browser does not use are refused by the schema.
                (sa, "x", {"description": {**offer, "extra": 1}}, "invalid_message"),
                # Oversized SDP (the default limit is 32 KiB, the frame limit 64 KiB).
                (sa, "x", {"description": big}, "too_large"),
            ]:
                await sender.send(
                    {"type": "call.signal", "id": "s", "to": to, **signal}
                )
                assert (await error_for(sender, "s"))["code"] == code, (to, signal)
            # Nothing of the above reached the outsider's room.
            await so.send({"type": "ping", "id": "p"})
            while (frame := await so.recv())["type"] != "pong":
                assert frame["type"] != "call.signal", frame
        # A non-member cannot open the room socket at all, so cannot signal.
        cookie = f"coilroom_session={outsider.http.cookies['coilroom_session']}"
        async with room_socket(
            server,
            room,
            headers={"Cookie": cookie, "Origin": server.base_url},
            expect_welcome=False,
        ) as s:
            assert await s.close_code() == 4403


async def test_a_signal_flood_is_refused_then_closed(pair: tuple[Socket, str]) -> None:
    sa, target = pair
    offer = {
        "type": "call.signal",
        "to": target,
        "description": {"type": "offer", "sdp": SDP},
    }
    # The burst (40 offers by default) passes; past it each is refused; a client
    # that keeps going (past the message burst, 30 by default) is closed.
    for i in range(100):
        await sa.send({**offer, "id": f"o{i}"})
    refused = []
    with contextlib.suppress(Exception):
        while True:
            frame = await sa.recv(timeout=5)
            if frame["type"] == "error":
                refused.append((frame["code"], frame["id"]))
    assert refused[0] == ("rate_limited", "o40")
    assert len(refused) == 30
    assert await sa.close_code() == 4429


async def test_a_call_is_full_at_its_maximum(
    server: ServerProcess, world: World
) -> None:
    a, b = world.members[:2]
    room = world.room_id
    async with contextlib.AsyncExitStack() as stack:
        for i in range(8):
            await stack.enter_async_context(in_call(server, a if i % 2 else b, room))
        async with await join(server, a, room) as ninth:
            await ninth.send({"type": "call.join", "id": "nine"})
            error = await error_for(ninth, "nine")
            assert error["code"] == "call_full"
            assert "8" in error["message"]


async def test_a_place_frees_when_someone_leaves(
    calls_server: ServerProcess, small: World
) -> None:
    a, b, c = small.members[:3]
    room = small.room_id
    async with await join(calls_server, a, room) as fourth:
        async with contextlib.AsyncExitStack() as stack:
            for member in (a, b, c):
                _, joined = await stack.enter_async_context(
                    in_call(calls_server, member, room)
                )
                assert joined["max_participants"] == 3
            await fourth.send({"type": "call.join", "id": "four"})
            error = await error_for(fourth, "four")
            assert error["code"] == "call_full"
            assert "3" in error["message"]
        await fourth.send({"type": "call.join", "id": "again"})
        assert (await fourth.recv_until("call.joined"))["id"] == "again"


def coturn_password(secret: str, username: str) -> str:
    """What coturn computes for ``use-auth-secret`` (TURN REST API, RFC draft
    uberti-behave-turn-rest): base64(HMAC-SHA1(static-auth-secret, username))."""
    return base64.b64encode(
        hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    ).decode()


async def test_turn_credentials_are_short_lived_and_verifiable(
    calls_server: ServerProcess, small: World
) -> None:
    a = small.members[0]
    before = int(time.time())
    async with in_call(calls_server, a, small.room_id) as (sock, joined):
        stun, turn = joined["ice_servers"]
        assert stun == {"urls": ["stun:stun.example.org:3478"]}
        assert turn["urls"] == [
            "turn:turn.example.org:3478?transport=udp",
            "turns:turn.example.org:5349",
        ]
        expiry, user = turn["username"].split(":")
        assert user == str(a.id)
        assert before + TURN_TTL <= int(expiry) <= int(time.time()) + TURN_TTL
        assert joined["ice_expires_at"] == int(expiry)
        assert turn["credential"] == coturn_password(TURN_SECRET, turn["username"])
        assert turn["credential"] != coturn_password("another", turn["username"])
        # Fresh credentials on request (for an ICE restart in a long call).
        await sock.send({"type": "call.ice_servers", "id": "ice"})
        fresh = await sock.recv_until("call.ice_servers")
        assert fresh["id"] == "ice"
        assert fresh["ice_servers"][1]["username"].endswith(f":{a.id}")
    # The secret itself never leaves the server, not even in its log.
    assert TURN_SECRET not in calls_server.log()


async def test_media_state_and_moderation(server: ServerProcess, world: World) -> None:
    instructor = world.members[0]
    coordinator = await world.add_member(
        "Coordinator", world.institutions[0], "coordinator"
    )
    room = world.room_id
    async with (
        in_call(server, instructor, room, media={"audio": True, "video": True}) as (
            si,
            ji,
        ),
        in_call(server, coordinator, room) as (sc, jc),
    ):
        assert jc["participants"][0]["media"] == {
            "audio": True,
            "video": True,
            "screen": False,
            "hand": False,
        }
        await si.send({"type": "call.media", "hand": True, "screen": True})
        media = await sc.recv_until("call.media", connection_id=ji["connection_id"])
        assert media["media"] == {
            "audio": True,
            "video": True,
            "screen": True,
            "hand": True,
        }
        # Instructors cannot moderate.
        await si.send(
            {
                "type": "call.moderate",
                "id": "m0",
                "target": jc["connection_id"],
                "action": "mute",
            }
        )
        assert (await error_for(si, "m0"))["code"] == "forbidden"
        # The coordinator mutes the instructor: told directly, and everyone sees it.
        await sc.send(
            {"type": "call.moderate", "target": ji["connection_id"], "action": "mute"}
        )
        told = await si.recv_until("call.moderated")
        assert told["action"] == "mute"
        assert told["by"]["id"] == coordinator.id
        muted = await sc.recv_until("call.media", connection_id=ji["connection_id"])
        assert muted["media"]["audio"] is False
        # ... then removes them from the call (they stay in the room).
        await sc.send(
            {"type": "call.moderate", "target": ji["connection_id"], "action": "remove"}
        )
        assert (await si.recv_until("call.moderated"))["action"] == "remove"
        left = await sc.recv_until(
            "call.participant_left", connection_id=ji["connection_id"]
        )
        assert left["reason"] == "removed"
        await si.send({"type": "call.media", "id": "m1", "audio": True})
        assert (await error_for(si, "m1"))["code"] == "not_in_call"


async def test_call_records_follow_joins_leaves_and_disconnects(
    server: ServerProcess, world: World
) -> None:
    a, b = world.members[:2]
    room = world.room_id
    async with in_call(server, a, room, media={"audio": True}) as (sa, ja):
        async with in_call(server, b, room) as (sb, jb):
            await sb.send({"type": "call.media", "video": True})
            await sa.recv_until("call.media", connection_id=jb["connection_id"])
            await sb.send({"type": "call.leave"})
            await sa.recv_until(
                "call.participant_left", connection_id=jb["connection_id"]
            )
        r = await a.http.get(f"/api/rooms/{room}/calls")
        assert r.status_code == 200, r.text
        live = r.json()["live"]
        assert live["call_id"] == ja["call_id"]
        assert [p["connection_id"] for p in live["participants"]] == [
            ja["connection_id"]
        ]
    # A's socket closed: the call ended. The records arrive in order.
    for _ in range(50):
        r = await a.http.get(f"/api/rooms/{room}/calls")
        calls = r.json()["calls"]
        if calls and calls[0]["ended_at"] is not None:
            break
        await asyncio.sleep(0.1)
    assert r.json()["live"] is None
    call = calls[0]
    assert call["id"] == ja["call_id"]
    assert call["started_by"] == a.id
    assert call["seconds"] >= 0
    stays = {p["connection_id"]: p for p in call["participants"]}
    assert stays[ja["connection_id"]]["left_reason"] == "disconnected"
    assert stays[ja["connection_id"]]["media_used"] == {
        "audio": True,
        "video": False,
        "screen": False,
    }
    assert stays[jb["connection_id"]]["left_reason"] == "left"
    assert stays[jb["connection_id"]]["media_used"]["video"] is True
    assert stays[jb["connection_id"]]["user"]["id"] == b.id
    for stay in stays.values():
        assert stay["left_at"] >= stay["joined_at"]
    # Members of other partnerships cannot read them.
    async with World.create(server, members=1) as elsewhere:
        r = await elsewhere.members[0].http.get(f"/api/rooms/{room}/calls")
        assert r.status_code == 403


async def test_a_dead_connection_leaves_the_call(
    server: ServerProcess, world: World
) -> None:
    """A participant whose connection stops answering pings is taken out of the call."""
    a, ghost = world.members[:2]
    token = await ghost.token(world.room_id)
    async with in_call(server, a, world.room_id) as (sa, _ja):
        raw = await open_stalled_socket(
            "127.0.0.1", server.port, f"/ws/rooms/{world.room_id}?token={token}"
        )
        try:
            await send_text_frame(raw, json.dumps({"type": "call.join"}))
            joined = await sa.recv_until("call.participant_joined")
            while joined["participant"]["user"]["id"] != ghost.id:
                joined = await sa.recv_until("call.participant_joined")
            started = time.monotonic()
            left = await sa.recv_until(
                "call.participant_left",
                connection_id=joined["participant"]["connection_id"],
            )
            assert left["reason"] == "disconnected"
            # The shared server pings every 1 s and waits 1 s for the pong.
            assert time.monotonic() - started < 5
        finally:
            raw.close()


@pytest.mark.slow
async def test_call_minutes_on_the_dashboard_match_the_records(
    server: ServerProcess, world: World
) -> None:
    """A real call, with one person in it from two tabs: the dashboard counts each
    person's time once, and it agrees with the call records."""
    a, b = world.members[:2]
    room = world.room_id
    # Long enough to show: the dashboard gives minutes to one decimal (6 s).
    async with in_call(server, a, room):
        async with in_call(server, b, room), in_call(server, b, room):
            await asyncio.sleep(7)
        await asyncio.sleep(3)
    for _ in range(50):
        calls = (await a.http.get(f"/api/rooms/{room}/calls")).json()["calls"]
        if calls and calls[0]["ended_at"]:
            break
        await asyncio.sleep(0.1)
    call = calls[0]

    def seconds(stay: dict[str, Any]) -> float:
        joined, left = (
            dt.datetime.fromisoformat(stay[k].replace("Z", "+00:00"))
            for k in ("joined_at", "left_at")
        )
        return (left - joined).total_seconds()

    by_user: dict[int, list[float]] = {}
    for stay in call["participants"]:
        by_user.setdefault(stay["user"]["id"], []).append(seconds(stay))
    assert len(by_user[b.id]) == 2  # two tabs, two stays
    # B's two tabs overlapped: B was in the call for about as long as one stay.
    expected = {a.id: by_user[a.id][0], b.id: max(by_user[b.id])}
    institutions = {a.id: world.institutions[0], b.id: world.institutions[1]}
    for _ in range(50):  # activity events are written in the background
        r = await world.admin.get(
            "/api/dashboard/institutions",
            params={"partnership_id": world.partnership_id},
        )
        assert r.status_code == 200, r.text
        minutes = {
            row["institution_id"]: row["call_minutes"] for row in r.json()["rows"]
        }
        if all(minutes.get(institutions[u]) for u in expected):
            break
        await asyncio.sleep(0.1)
    for user, secs in expected.items():
        assert minutes[institutions[user]] == pytest.approx(secs / 60, abs=0.05), user


async def test_chat_in_between_does_not_excuse_a_candidate_flood(
    pair: tuple[Socket, str],
) -> None:
    sa, target = pair
    candidate = {
        "type": "call.signal",
        "to": target,
        "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"},
    }
    # 300 candidates pass (the burst); then each refused one is followed by an
    # accepted ping, which must not reset the count of refusals.
    for i in range(300 + 40):
        await sa.send({**candidate, "id": f"c{i}"})
        if i >= 300:
            await sa.send({"type": "ping"})
    assert await sa.close_code() == 4429
