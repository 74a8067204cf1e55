"""Several server processes sharing one PostgreSQL database and one Redis.

Each test starts its own processes on a fresh PostgreSQL database, with a Redis key
prefix of its own, so tests never see each other's channels or presence keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import POSTGRES_ADMIN_URL
from tests.support import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    TIMEOUT,
    ServerProcess,
    Socket,
    TcpProxy,
    World,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    join,
)
from tests.yclient import add_activity, yclient

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

REDIS_URL = "redis://127.0.0.1:6379/0"
EXPIRY = 3.0  # presence expiry of these tests' processes, seconds


async def wait_join(sock: Socket, user_id: int) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame = await sock.recv_until("presence.join")
            if frame["user"]["id"] == user_id:
                return frame


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Two server processes on one fresh PostgreSQL database and one Redis."""
    with cluster(tmp_path) as procs:
        yield procs


@contextlib.contextmanager
def cluster(
    tmp_path: Path,
    count: int = 2,
    redis_url: str = REDIS_URL,
    postgres_port: int | None = None,
    extra: dict[str, str] | None = None,
) -> Iterator[list[ServerProcess]]:
    """``count`` server processes on one fresh PostgreSQL database and one Redis
    (reaching PostgreSQL on ``postgres_port`` when given: a proxy)."""
    name = f"coilroom_mp_{uuid.uuid4().hex[:10]}"
    url = create_postgres_database(POSTGRES_ADMIN_URL, name)
    if postgres_port is not None:
        url = url.replace("127.0.0.1:5432", f"127.0.0.1:{postgres_port}")
    settings = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": f"coilroom-test-{uuid.uuid4().hex[:8]}:",
        "PRESENCE_EXPIRY": str(EXPIRY),
        "SECRET_KEY": secrets.token_urlsafe(48),
        "MESSAGES_PER_SECOND": "1000",
        "MESSAGE_BURST": "1000",
        "DOC_UPDATES_PER_SECOND": "5000",
        "DOC_UPDATE_BURST": "5000",
        "AUTO_MIGRATE": "false",
        **(extra or {}),
    }
    procs = [
        ServerProcess(database_url=url, data_dir=tmp_path / f"p{i}", settings=settings)
        for i in range(count)
    ]
    for p in procs:
        p.data_dir.mkdir(parents=True, exist_ok=True)
    procs[0].create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)  # migrates the database
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            if p.proc is not None:
                p.stop()
        drop_postgres_database(POSTGRES_ADMIN_URL, name)


async def test_members_on_two_processes_share_presence_and_chat(
    pair: list[ServerProcess],
) -> None:
    a, b = pair
    if True:
        async with World.create(a, members=2) as world:
            m1, m2 = world.members
            async with (
                await join(a, m1, world.room_id) as s1,
                await join(b, m2, world.room_id) as s2,
            ):
                await wait_join(s1, m2.id)
                assert {p["user"]["id"] for p in s2.welcome["presence"]} == {
                    m1.id,
                    m2.id,
                }
                # Both send at once from both processes: one gap-free sequence.
                for i in range(20):
                    await s1.send({"type": "chat.send", "id": f"a{i}", "text": f"a{i}"})
                    await s2.send({"type": "chat.send", "id": f"b{i}", "text": f"b{i}"})
                got1 = await s1.collect("chat.message", 40)
                got2 = await s2.collect("chat.message", 40)
                by_seq1 = {m["seq"]: m["text"] for m in got1}
                by_seq2 = {m["seq"]: m["text"] for m in got2}
                assert by_seq1 == by_seq2
                assert sorted(by_seq1) == list(range(1, 41))
            # m2 left on b: a announces it to whoever is still there.


async def test_yjs_clients_on_two_processes_converge(pair: list[ServerProcess]) -> None:
    a, b = pair
    if True:
        async with World.create(a, members=2) as world:
            m1, m2 = world.members
            t1, t2 = await m1.token(world.room_id), await m2.token(world.room_id)
            async with (
                yclient(a, world.room_id, "agreement", t1) as y1,
                yclient(b, world.room_id, "agreement", t2) as y2,
            ):
                for i in range(15):
                    await y1.edit(add_activity(f"a{i}", title=f"A {i}"))
                    await y2.edit(add_activity(f"b{i}", title=f"B {i}"))
                await y1.wait_for(lambda: len(y1.activities()) == 30)
                await y2.wait_for(lambda: len(y2.activities()) == 30)
                assert y1.activities() == y2.activities()
            # A third client loading from b's storage sees the same state.
            async with yclient(b, world.room_id, "agreement", t2) as y3:
                await y3.wait_for(lambda: len(y3.activities()) == 30)


async def test_kill_9_one_process(pair: list[ServerProcess]) -> None:
    a, b = pair
    if True:
        async with World.create(a, members=3) as world:
            m1, m2, m3 = world.members
            t3 = await m3.token(world.room_id)
            async with (
                await join(a, m1, world.room_id) as s1,
                yclient(a, world.room_id, "notes", t3) as y_a,
            ):
                dead = await join(b, m2, world.room_id)
                s2 = await dead.__aenter__()
                y_b_ctx = yclient(b, world.room_id, "notes", t3)
                y_b = await y_b_ctx.__aenter__()
                await wait_join(s1, m2.id)
                for i in range(10):
                    await s2.send({"type": "chat.send", "id": f"b{i}", "text": f"b{i}"})
                    await y_b.edit(add_activity(f"b{i}"))
                    await s1.send({"type": "chat.send", "id": f"a{i}", "text": f"a{i}"})
                got = await s1.collect("chat.message", 20)
                seen = max(m["seq"] for m in got)
                await y_a.wait_for(lambda: len(y_a.activities()) == 10)
                b.kill()
                killed_at = time.monotonic()
                # Traffic on the survivor goes on.
                for i in range(10, 15):
                    await s1.send({"type": "chat.send", "id": f"a{i}", "text": f"a{i}"})
                # The survivor's member loses nothing and hears m2 leave in time.
                after_kill: list[int] = []
                left_at = None
                async with asyncio.timeout(EXPIRY + 5):
                    while left_at is None or len(after_kill) < 5:
                        frame = await s1.recv()
                        if frame["type"] == "chat.message":
                            after_kill.append(frame["seq"])
                        elif (
                            frame["type"] == "presence.leave"
                            and frame["user_id"] == m2.id
                        ):
                            left_at = time.monotonic()
                assert left_at - killed_at <= EXPIRY + 1.5
                assert sorted(after_kill) == list(range(21, 26))
                assert sorted(m["seq"] for m in got) == list(range(1, 21))
                with contextlib.suppress(Exception):
                    await y_b_ctx.__aexit__(None, None, None)
                with contextlib.suppress(Exception):
                    await dead.__aexit__(None, None, None)
                # m2 reconnects to the survivor and resumes after what it saw.
                async with await join(
                    a, m2, world.room_id, params={"after": seen - 5}
                ) as again:
                    replay = await again.collect("chat.message", 25 - (seen - 5))
                    assert [m["seq"] for m in replay] == list(range(seen - 4, 26))
                    resumed = await again.recv_until("chat.resumed")
                    assert resumed["last_seq"] == 25
                async with yclient(a, world.room_id, "notes", t3) as y_again:
                    await y_again.wait_for(lambda: len(y_again.activities()) == 10)
                assert len(y_a.activities()) == 10


async def test_document_loaded_while_another_process_edits(
    pair: list[ServerProcess],
) -> None:
    a, b = pair
    if True:
        async with World.create(a, members=2) as world:
            m1, m2 = world.members
            t1, t2 = await m1.token(world.room_id), await m2.token(world.room_id)
            async with yclient(a, world.room_id, "plan", t1) as y1:

                async def edit() -> None:
                    for i in range(60):
                        await y1.edit(add_activity(f"x{i}"))
                        await asyncio.sleep(0.005)

                task = asyncio.create_task(edit())
                await asyncio.sleep(0.05)
                async with yclient(b, world.room_id, "plan", t2) as y2:
                    await task
                    await y2.wait_for(lambda: len(y2.activities()) == 60)
                    await y1.wait_for(lambda: len(y1.activities()) == 60)
                    assert y1.activities() == y2.activities()


@contextlib.contextmanager
def private_redis(port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), 0.2),
        ):
            break
        time.sleep(0.02)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def wait_ready(server: ServerProcess, ready: bool) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=2) as http:
        async with asyncio.timeout(TIMEOUT):
            while (await http.get("/readyz")).status_code != (200 if ready else 503):
                await asyncio.sleep(0.05)


@pytest.fixture
def redis_port() -> Iterator[int]:
    port = free_port()
    with private_redis(port):
        yield port


@pytest.fixture
def pair_on_private_redis(
    tmp_path: Path, redis_port: int
) -> Iterator[list[ServerProcess]]:
    with cluster(tmp_path, redis_url=f"redis://127.0.0.1:{redis_port}/0") as procs:
        yield procs


async def test_redis_restarted_during_traffic(
    pair_on_private_redis: list[ServerProcess], redis_port: int
) -> None:
    a, b = pair_on_private_redis
    await _redis_restart_scenario(a, b, redis_port)


async def _redis_restart_scenario(
    a: ServerProcess, b: ServerProcess, port: int
) -> None:
    async with World.create(a, members=2) as world:
        m1, m2 = world.members
        t1, t2 = await m1.token(world.room_id), await m2.token(world.room_id)
        async with (
            await join(a, m1, world.room_id) as s1,
            await join(b, m2, world.room_id) as s2,
            yclient(a, world.room_id, "plan", t1) as y1,
            yclient(b, world.room_id, "plan", t2) as y2,
        ):
            await wait_join(s1, m2.id)
            # Redis goes away: both sides keep working on their own.
            subprocess.run(
                ["redis-cli", "-p", str(port), "shutdown", "nosave"],
                capture_output=True,
                check=False,
            )
            await wait_ready(a, False)
            for i in range(10):
                await s1.send({"type": "chat.send", "id": f"a{i}", "text": f"a{i}"})
                await s2.send({"type": "chat.send", "id": f"b{i}", "text": f"b{i}"})
                await y1.edit(add_activity(f"a{i}"))
                await y2.edit(add_activity(f"b{i}"))
            seen: dict[Socket, list[int]] = {s1: [], s2: []}

            async def read(sock: Socket, until: Callable[[], bool]) -> None:
                acks = 0
                async with asyncio.timeout(TIMEOUT):
                    while not until():
                        frame = await sock.recv()
                        if frame["type"] == "chat.message":
                            seen[sock].append(frame["seq"])
                        elif frame["type"] == "chat.ack":
                            acks += 1
                        if acks == 10 and until is never:
                            return

            def never() -> bool:
                return False

            await read(s1, never)
            await read(s2, never)
            # Redis comes back (empty): reconnect, resync.
            with private_redis(port):
                await wait_ready(a, True)
                await wait_ready(b, True)
                await y1.wait_for(lambda: len(y1.activities()) == 20)
                await y2.wait_for(lambda: len(y2.activities()) == 20)
                assert y1.activities() == y2.activities()
                for sock in (s1, s2):
                    await read(sock, lambda s=sock: set(seen[s]) == set(range(1, 21)))
                    assert sorted(seen[sock]) == list(range(1, 21)), "duplicates"
                async with httpx.AsyncClient(base_url=a.base_url) as http:
                    metrics = (await http.get("/metrics")).text
                assert "coilroom_broker_up 1.0" in metrics
                assert "coilroom_room_resyncs_total 0.0" not in metrics
                assert "coilroom_broker_reconnects_total 0.0" not in metrics


@pytest.fixture
def postgres_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy("127.0.0.1", 5432)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def pair_behind_proxy(
    tmp_path: Path, postgres_proxy: TcpProxy
) -> Iterator[list[ServerProcess]]:
    with cluster(
        tmp_path,
        postgres_port=postgres_proxy.port,
        extra={"DOC_WRITE_QUEUE_UPDATES": "8"},
    ) as procs:
        yield procs


async def test_postgres_cut_and_restored(
    pair_behind_proxy: list[ServerProcess], postgres_proxy: TcpProxy
) -> None:
    a, b = pair_behind_proxy
    async with World.create(a, members=2) as world:
        m1, m2 = world.members
        t1, t2 = await m1.token(world.room_id), await m2.token(world.room_id)
        async with (
            await join(a, m1, world.room_id) as s1,
            await join(b, m2, world.room_id) as s2,
            yclient(a, world.room_id, "plan", t1) as y1,
            yclient(b, world.room_id, "plan", t2) as y2,
            yclient(a, world.room_id, "busy", t1) as y3,
        ):
            acked: set[str] = set()
            errors: list[dict[str, Any]] = []

            async def send(sock: Socket, client_id: str) -> bool:
                """Send one message; True when acknowledged, False on an error."""
                await sock.send(
                    {"type": "chat.send", "id": client_id, "text": client_id}
                )
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        frame = await sock.recv()
                        if frame["type"] == "chat.ack" and frame["id"] == client_id:
                            acked.add(client_id)
                            return True
                        if frame["type"] == "error" and frame.get("id") == client_id:
                            errors.append(frame)
                            return False

            for i in range(3):
                assert await send(s1, f"before-a{i}")
                assert await send(s2, f"before-b{i}")
            postgres_proxy.cut()
            await wait_ready(a, False)
            # Meanwhile: chat answers with a clear error (or an ack if stored);
            # document edits wait in their queue.
            for i in range(3):
                await send(s1, f"during-a{i}")
                await send(s2, f"during-b{i}")
                await y1.edit(add_activity(f"a{i}"))
                await y2.edit(add_activity(f"b{i}"))
            assert errors and all(e["code"] == "unavailable" for e in errors)
            # A document whose queue is full refuses further edits clearly (1013).
            with contextlib.suppress(Exception):
                for i in range(40):
                    await y3.edit(add_activity(f"busy{i}"))
                    await asyncio.sleep(0.01)
            assert await y3.close_code() == 1013
            postgres_proxy.restore()
            await wait_ready(a, True)
            await wait_ready(b, True)
            for sock, tag in ((s1, "a"), (s2, "b")):
                async with asyncio.timeout(TIMEOUT):
                    while not await send(sock, f"after-{tag}-{len(errors)}"):
                        await asyncio.sleep(0.2)
            # The queued document edits were stored and reached the other side.
            await y1.wait_for(lambda: len(y1.activities()) == 6)
            await y2.wait_for(lambda: len(y2.activities()) == 6)
            assert y1.activities() == y2.activities()
        # Every acknowledged message is stored, in one gap-free sequence.
        r = await m1.http.get(f"/api/rooms/{world.room_id}/messages?limit=100")
        assert r.status_code == 200, r.text
        stored = r.json()["messages"]
        assert acked <= {m["id"] for m in stored}
        assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    for proc in (a, b):
        assert proc.proc is not None and proc.proc.poll() is None
