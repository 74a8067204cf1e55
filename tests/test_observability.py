"""Health, readiness, metrics, the activity event log and the read marker."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from storage.models import ActivityEvent
from tests.support import ServerProcess, World, join

pytestmark = pytest.mark.anyio


async def test_health_and_readiness(http: httpx.AsyncClient) -> None:
    """/healthz answers; /readyz reports the database and the broker reachable."""
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"database": "ok", "broker": "ok"}}


async def test_metrics_count_connections_messages_and_errors(
    server: ServerProcess, world: World, http: httpx.AsyncClient
) -> None:
    """/metrics shows open connections, stored messages, error frames and latencies."""

    def value(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in metrics")

    before = (await http.get("/metrics")).text
    ana = world.members[0]
    async with await join(server, ana, world.room_id) as a:
        during = (await http.get("/metrics")).text
        assert value(during, "coilroom_connections") >= 1
        assert value(during, "coilroom_rooms_active") >= 1
        await a.send({"type": "chat.send", "id": "m", "text": "counted"})
        await a.recv_until("chat.ack")
        await a.send({"type": "nope", "id": "bad"})
        await a.recv_until("error")
    after = (await http.get("/metrics")).text
    # Other tests share this server, so the counter moved by at least our one.
    assert value(after, "coilroom_chat_messages_stored_total") >= (
        value(before, "coilroom_chat_messages_stored_total") + 1
    )
    assert 'coilroom_client_errors_total{code="invalid_message"}' in after
    # Frames go straight to the socket while it is writable (rooms/direct.py): if a
    # uvicorn upgrade broke that fast path, every send would fall back to a task.
    assert value(after, 'coilroom_socket_messages_sent_total{path="direct"}') > 0
    assert "coilroom_chat_commit_seconds_bucket" in after
    assert value(after, "coilroom_chat_commit_seconds_count") >= 1


async def test_activity_events_record_joins_leaves_and_messages(
    server: ServerProcess, world: World, database_url: str
) -> None:
    """Joins, leaves and messages are stored as activity events with times."""
    ana = world.members[0]
    started = time.time()
    async with await join(server, ana, world.room_id) as a:
        await a.send({"type": "chat.send", "id": "e", "text": "an event"})
        await a.recv_until("chat.ack")
    engine = create_async_engine(database_url)
    try:
        kinds: list[str] = []
        # The event writer batches in the background: wait for it, bounded.
        async with asyncio.timeout(10):
            while sorted(set(kinds)) != ["join", "leave", "message"]:
                async with engine.connect() as conn:
                    rows = await conn.execute(
                        select(
                            ActivityEvent.kind, ActivityEvent.at, ActivityEvent.user_id
                        ).where(
                            ActivityEvent.room_id == world.room_id,
                            ActivityEvent.kind.in_(["join", "leave", "message"]),
                        )
                    )
                    events = rows.all()
                kinds = [e.kind for e in events]
                await asyncio.sleep(0.05)
        assert all(e.user_id == ana.id for e in events)
        assert all(e.at.timestamp() >= started - 1 for e in events)
    finally:
        await engine.dispose()


async def test_read_marker_moves_forward_only(
    server: ServerProcess, world: World
) -> None:
    """chat.read sets the member's last read sequence, never backwards."""
    ana = world.members[0]
    async with await join(server, ana, world.room_id) as a:
        for i in range(3):
            await a.send({"type": "chat.send", "id": f"r{i}", "text": "x"})
        await a.collect("chat.ack", 3)
        await a.send({"type": "chat.read", "seq": 3})
        await a.send({"type": "chat.read", "seq": 1})
        await a.send({"type": "ping", "id": "sync"})
        await a.recv_until("pong", id="sync")

    rooms = (await ana.http.get("/api/rooms")).json()["rooms"]
    room = next(r for r in rooms if r["id"] == world.room_id)
    assert (room["last_seq"], room["last_read_seq"]) == (3, 3)


async def test_typing_clears_itself_after_silence(
    server: ServerProcess, world: World
) -> None:
    """A client that said 'typing' and went quiet stops typing after TYPING_TIMEOUT (1 s here)."""
    ana, lars = world.members[:2]
    async with (
        await join(server, ana, world.room_id) as a,
        await join(server, lars, world.room_id) as b,
    ):
        await b.send({"type": "typing", "typing": True})
        await a.recv_until("presence.update", user_id=lars.id, typing=True)
        started = time.monotonic()
        await a.recv_until("presence.update", user_id=lars.id, typing=False, timeout=5)
        assert 0.8 < time.monotonic() - started < 4
