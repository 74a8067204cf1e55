"""Calls whose members are connected to different server processes (one PostgreSQL,
one Redis): real aiortc peers, concurrent joins, signals and moderation across
processes, a process killed with -9, and Redis going away (``docs/protocol.md``,
Calls; README, "Production: several processes").
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from signaling.calls import newcomer_is_polite
from tests.rtcpeer import (
    loopback_only,
    wait_for_channel_open,
    wait_for_connection_state,
)
from tests.support import TIMEOUT, Member, ServerProcess, Socket, World, join
from tests.test_call_peers import call_peer
from tests.test_multiprocess import (
    EXPIRY,
    cluster,
    private_redis,
    wait_ready,
)

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

SDP = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
CAP = 3
CALL_SETTINGS = {"CALL_MAX_PARTICIPANTS": str(CAP)}


@pytest.fixture(scope="module")
def shared_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ServerProcess]]:
    """Two processes for the tests that stop neither (a call cap of three)."""
    with cluster(tmp_path_factory.mktemp("calls-mp"), extra=CALL_SETTINGS) as procs:
        yield procs


@contextlib.asynccontextmanager
async def in_call(
    server: ServerProcess,
    member: Member,
    room_id: int,
    *,
    media: dict[str, bool] | None = None,
) -> AsyncIterator[tuple[Socket, dict[str, Any]]]:
    """A room socket of ``member`` on ``server`` that has joined the room's call."""
    async with await join(server, member, room_id) as sock:
        frame: dict[str, Any] = {"type": "call.join", "id": "j"}
        if media is not None:
            frame["media"] = media
        await sock.send(frame)
        joined = await sock.recv_until("call.joined")
        yield sock, joined


async def answer_to(sock: Socket, message_id: str) -> dict[str, Any]:
    """The ``call.joined`` or ``error`` that answers the message ``message_id``."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame = await sock.recv()
            if (
                frame["type"] in ("call.joined", "error")
                and frame.get("id") == message_id
            ):
                return frame


async def calls_of(member: Member, room_id: int) -> dict[str, Any]:
    r = await member.http.get(f"/api/rooms/{room_id}/calls")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def records_when(
    member: Member, room_id: int, done: Any, timeout: float = TIMEOUT
) -> dict[str, Any]:
    """The room's call records once ``done(records)`` holds (they are written just
    after the frames go out)."""
    async with asyncio.timeout(timeout):
        while not done(records := await calls_of(member, room_id)):
            await asyncio.sleep(0.1)
    return records


async def test_aiortc_peers_on_two_processes_call_each_other(
    shared_pair: list[ServerProcess],
) -> None:
    """Two aiortc peers, each on its own process, negotiate through both servers and
    open a data channel; media state crosses, and both welcomes show the call."""
    a, b = shared_pair
    with loopback_only():
        async with World.create(a, members=3) as world:
            m1, m2, m3 = world.members
            room = world.room_id
            async with (
                call_peer(a, m1, room, "a") as pa,
                call_peer(b, m2, room, "b") as pb,
            ):
                await pa.join()
                joined = await pb.join()  # the newcomer offers, across processes
                assert [p["connection_id"] for p in joined["participants"]] == [
                    pa.conn_id
                ]
                for peer, other in ((pa, pb), (pb, pa)):
                    async with asyncio.timeout(30):
                        while other.conn_id not in peer.pcs:
                            await asyncio.sleep(0.05)
                    await wait_for_connection_state(
                        peer.pcs[other.conn_id], "connected", timeout=30
                    )
                for peer, other in ((pa, pb), (pb, pa)):
                    async with asyncio.timeout(15):
                        while other.conn_id not in peer.channels:
                            await asyncio.sleep(0.05)
                    channel = peer.channels[other.conn_id]
                    await wait_for_channel_open(channel, timeout=15)
                    channel.send(f"hello from {peer.name}")
                for peer, other in ((pa, pb), (pb, pa)):
                    async with asyncio.timeout(15):
                        text = await peer.messages[other.conn_id].get()
                    assert text == f"hello from {other.name}"
                # Media state set on one process reaches the other.
                await pb.sock.send({"type": "call.media", "screen": True})
                media = await pa.event("call.media", connection_id=pb.conn_id)
                assert media["media"]["screen"] is True
                # A member arriving on either process is told of the same call.
                for server in (a, b):
                    async with await join(server, m3, room) as sock:
                        call = sock.welcome["call"]
                        assert call["call_id"] == joined["call_id"]
                        assert [p["connection_id"] for p in call["participants"]] == [
                            pa.conn_id,
                            pb.conn_id,
                        ]
                        assert call["participants"][1]["media"]["screen"] is True


async def test_concurrent_joins_on_two_processes_keep_the_cap_and_one_call(
    shared_pair: list[ServerProcess],
) -> None:
    """Six members join at once, three on each process, for several rounds: each
    round exactly ``CAP`` get in, all to one call with one record, and the
    roles of every pair agree."""
    a, b = shared_pair
    rounds = 4
    async with World.create(a, members=7) as world:
        room = world.room_id
        joiners, watcher_member = world.members[:6], world.members[6]
        async with contextlib.AsyncExitStack() as stack:
            socks = [
                await stack.enter_async_context(await join(a if i % 2 else b, m, room))
                for i, m in enumerate(joiners)
            ]
            watcher = await stack.enter_async_context(
                await join(a, watcher_member, room)
            )
            # Half of them cannot roll back: roles then depend on both sides.
            rollback = {i: i % 3 != 0 for i in range(len(socks))}
            call_ids: list[int] = []
            for n in range(rounds):
                await asyncio.gather(
                    *(
                        s.send(
                            {
                                "type": "call.join",
                                "id": f"r{n}",
                                "rollback": rollback[i],
                            }
                        )
                        for i, s in enumerate(socks)
                    )
                )
                answers = await asyncio.gather(*(answer_to(s, f"r{n}") for s in socks))
                inside = [
                    i for i, f in enumerate(answers) if f["type"] == "call.joined"
                ]
                refused = [f for f in answers if f["type"] == "error"]
                assert len(inside) == CAP, answers
                assert {f["code"] for f in refused} == {"call_full"}
                (call_id,) = {answers[i]["call_id"] for i in inside}
                call_ids.append(call_id)
                conn_of = {answers[i]["connection_id"]: i for i in inside}
                # One order of joining that everyone agrees on: of any two, exactly
                # one found the other there, and took the side the rule gives it.
                earlier = {
                    i: {
                        p["connection_id"]: p["polite"]
                        for p in answers[i]["participants"]
                    }
                    for i in inside
                }
                for i in inside:
                    for j in inside:
                        if i < j:
                            ci, cj = (
                                answers[i]["connection_id"],
                                answers[j]["connection_id"],
                            )
                            assert (cj in earlier[i]) != (ci in earlier[j])
                for i in inside:
                    for conn, polite in earlier[i].items():
                        j = conn_of[conn]
                        assert polite == newcomer_is_polite(rollback[i], rollback[j])
                # The room hears each joiner once, with the same roles.
                announced = await watcher.collect("call.participant_joined", CAP)
                for frame in announced:
                    assert frame["call_id"] == call_id
                    i = conn_of[frame["participant"]["connection_id"]]
                    for conn, role in frame["roles"].items():
                        assert (role == "impolite") == earlier[i][conn]
                for i in inside:
                    await socks[i].send({"type": "call.leave"})
                await watcher.recv_until("call.ended", call_id=call_id)
            assert len(set(call_ids)) == rounds
            records = await records_when(
                joiners[0],
                room,
                lambda r: (
                    r["live"] is None
                    and len(r["calls"]) == rounds
                    and all(c["ended_at"] for c in r["calls"])
                ),
            )
            # One record per call, with exactly its participants, each closed once.
            assert sorted(c["id"] for c in records["calls"]) == sorted(call_ids)
            for call in records["calls"]:
                assert len(call["participants"]) == CAP
                assert {p["left_reason"] for p in call["participants"]} == {"left"}


async def test_signals_and_moderation_reach_the_other_process(
    shared_pair: list[ServerProcess],
) -> None:
    """Offers, candidates, media state and moderation go between participants on
    different processes; a connection outside the call is refused as on one."""
    a, b = shared_pair
    async with World.create(a, members=3) as world:
        m1, m2, outsider = world.members
        coordinator = await world.add_member(
            "Coordinator", world.institutions[0], "coordinator"
        )
        room = world.room_id
        async with (
            in_call(a, m1, room) as (s1, j1),
            in_call(b, m2, room, media={"audio": True}) as (s2, j2),
            in_call(a, coordinator, room) as (sc, _jc),
            await join(b, outsider, room) as so,
        ):
            c1, c2 = j1["connection_id"], j2["connection_id"]
            offer = {"type": "offer", "sdp": SDP}
            await s1.send({"type": "call.signal", "to": c2, "description": offer})
            got = await s2.recv_until("call.signal")
            assert got["from"] == c1
            assert got["user_id"] == m1.id
            assert got["description"] == offer
            candidate = {
                "candidate": "candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
            }
            await s2.send({"type": "call.signal", "to": c1, "candidate": candidate})
            got = await s1.recv_until("call.signal")
            assert got["from"] == c2
            assert got["candidate"]["candidate"] == candidate["candidate"]
            # Not a participant, on this or the other process: one answer.
            outsider_conn = so.welcome["connection_id"]
            await s1.send(
                {
                    "type": "call.signal",
                    "id": "x1",
                    "to": outsider_conn,
                    "description": offer,
                }
            )
            assert (await s1.recv_until("error", id="x1"))["code"] == "unknown_peer"
            await so.send(
                {"type": "call.signal", "id": "x2", "to": c1, "description": offer}
            )
            assert (await so.recv_until("error", id="x2"))["code"] == "not_in_call"
            # A coordinator on one process moderates a participant on the other.
            await sc.send({"type": "call.moderate", "target": c2, "action": "mute"})
            told = await s2.recv_until("call.moderated")
            assert told["action"] == "mute"
            assert told["by"]["id"] == coordinator.id
            muted = await s1.recv_until("call.media", connection_id=c2)
            assert muted["media"]["audio"] is False
            await sc.send({"type": "call.moderate", "target": c2, "action": "remove"})
            assert (await s2.recv_until("call.moderated"))["action"] == "remove"
            left = await s1.recv_until("call.participant_left", connection_id=c2)
            assert left["reason"] == "removed"
            await s2.send(
                {"type": "call.signal", "id": "x3", "to": c1, "description": offer}
            )
            assert (await s2.recv_until("error", id="x3"))["code"] == "not_in_call"
            # The removed participant's place is free for someone on either side.
            await so.send({"type": "call.join", "id": "j"})
            assert (await answer_to(so, "j"))["type"] == "call.joined"


@pytest.fixture
def three(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    with cluster(tmp_path, count=3, extra=CALL_SETTINGS) as procs:
        yield procs


async def test_participants_of_a_killed_process_leave_once(
    three: list[ServerProcess],
) -> None:
    """kill -9 of the process holding the call's last participants: both survivors'
    members hear each leave and the end exactly once, in time, and the records
    are closed."""
    a, b, c = three
    async with World.create(a, members=4) as world:
        m1, m2, m3, m4 = world.members
        room = world.room_id
        async with (
            in_call(a, m1, room) as (s1, j1),
            await join(c, m3, room) as s3,
        ):
            dead = contextlib.AsyncExitStack()
            _, j2 = await dead.enter_async_context(in_call(b, m2, room))
            _, j4 = await dead.enter_async_context(in_call(b, m4, room))
            gone = {j2["connection_id"], j4["connection_id"]}
            await s1.send({"type": "call.leave"})
            await s1.recv_until(
                "call.participant_left", connection_id=j1["connection_id"]
            )
            await s3.recv_until(
                "call.participant_left", connection_id=j1["connection_id"]
            )
            b.kill()
            killed_at = time.monotonic()
            seen: dict[Socket, list[dict[str, Any]]] = {s1: [], s3: []}

            async def read(sock: Socket) -> None:
                # Until the call ended, then a while longer for duplicates.
                quiet_until: float | None = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(EXPIRY + 5) as scope:
                        while True:
                            frame = await sock.recv()
                            if frame["type"] in ("call.participant_left", "call.ended"):
                                frame["_at"] = time.monotonic()
                                seen[sock].append(frame)
                            if frame["type"] == "call.ended" and quiet_until is None:
                                quiet_until = time.monotonic() + EXPIRY / 2
                                scope.reschedule(
                                    asyncio.get_running_loop().time() + EXPIRY / 2
                                )

            await asyncio.gather(read(s1), read(s3))
            for frames in seen.values():
                lefts = [f for f in frames if f["type"] == "call.participant_left"]
                ended = [f for f in frames if f["type"] == "call.ended"]
                assert sorted(f["connection_id"] for f in lefts) == sorted(gone), frames
                assert {f["reason"] for f in lefts} == {"disconnected"}
                assert [f["call_id"] for f in ended] == [j1["call_id"]], frames
                assert all(f["_at"] - killed_at <= EXPIRY + 1.5 for f in frames)
            with contextlib.suppress(Exception):
                await dead.aclose()
        records = await records_when(
            m1, room, lambda r: r["calls"] and r["calls"][0]["ended_at"]
        )
        assert records["live"] is None
        stays = {p["connection_id"]: p for p in records["calls"][0]["participants"]}
        assert len(records["calls"]) == 1
        assert {stays[conn]["left_reason"] for conn in gone} == {"disconnected"}
        assert all(p["left_at"] for p in stays.values())
        async with await join(c, m3, room) as sock:
            assert sock.welcome["call"] is None


@pytest.fixture
def pair_on_own_redis(tmp_path: Path) -> Iterator[tuple[list[ServerProcess], int]]:
    from tests.support import free_port

    port = free_port()
    with (
        private_redis(port),
        cluster(
            tmp_path, redis_url=f"redis://127.0.0.1:{port}/0", extra=CALL_SETTINGS
        ) as procs,
    ):
        yield procs, port


async def test_redis_outage_refuses_call_changes_and_ends_lost_calls(
    pair_on_own_redis: tuple[list[ServerProcess], int],
) -> None:
    """While Redis is down, joins and signals are refused with ``unavailable`` (no
    hang, no crash, welcomes still come); when it is back empty, the calls it
    lost end cleanly (announced, records closed) and new ones start."""
    (a, b), port = pair_on_own_redis
    async with World.create(a, members=3) as world:
        m1, m2, m3 = world.members
        room = world.room_id
        async with (
            in_call(a, m1, room) as (s1, j1),
            in_call(b, m2, room) as (_s2, j2),
            await join(a, m3, room) as s3,
        ):
            c1, c2 = j1["connection_id"], j2["connection_id"]
            subprocess.run(
                ["redis-cli", "-p", str(port), "shutdown", "nosave"],
                capture_output=True,
                check=False,
            )
            await wait_ready(a, False)
            started = time.monotonic()
            await s3.send({"type": "call.join", "id": "j-down"})
            refused = await answer_to(s3, "j-down")
            assert refused["code"] == "unavailable", refused
            await s1.send(
                {
                    "type": "call.signal",
                    "id": "s-down",
                    "to": c2,
                    "description": {"type": "offer", "sdp": SDP},
                }
            )
            assert (await s1.recv_until("error", id="s-down"))["code"] == "unavailable"
            assert time.monotonic() - started < TIMEOUT
            async with await join(b, m3, room) as late:
                assert late.welcome["call"] is None  # not known while Redis is away
            with private_redis(port):
                await wait_ready(a, True)
                await wait_ready(b, True)
                # Redis came back without the call: it ends, announced once.
                lefts: set[str] = set()
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        frame = await s3.recv()
                        if frame["type"] == "call.participant_left":
                            assert frame["reason"] == "disconnected"
                            lefts.add(frame["connection_id"])
                        if frame["type"] == "call.ended":
                            assert frame["call_id"] == j1["call_id"]
                            break
                assert lefts == {c1, c2}
                records = await records_when(
                    m1, room, lambda r: r["calls"] and r["calls"][0]["ended_at"]
                )
                stays = records["calls"][0]["participants"]
                assert {p["left_reason"] for p in stays} == {"interrupted"}
                # Calls work again (once this process's heartbeat is back).
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        await s3.send({"type": "call.join", "id": "j-up"})
                        answer = await answer_to(s3, "j-up")
                        if answer["type"] == "call.joined":
                            break
                        assert answer["code"] == "unavailable"
                        await asyncio.sleep(0.2)
                assert answer["call_id"] != j1["call_id"]
                async with httpx.AsyncClient(base_url=b.base_url) as http:
                    assert (await http.get("/healthz")).status_code == 200
