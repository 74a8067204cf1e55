"""What the server acknowledged survives a restart and a kill -9."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from tests.conftest import dedicated_server
from tests.support import ServerProcess, World, join

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def own_server(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server these tests may stop and kill; SQLite keeps its production default (FULL)."""
    with dedicated_server(
        backend,
        tmp_path_factory,
        {
            "SQLITE_SYNCHRONOUS": "FULL",
            "MESSAGES_PER_SECOND": "5000",
            "MESSAGE_BURST": "5000",
            # The test clients read slower than two flooding senders produce; a
            # deep queue keeps them from being dropped as slow consumers.
            "SEND_QUEUE_FRAMES": "50000",
        },
    ) as proc:
        yield proc


async def history(world: World) -> list[dict]:  # type: ignore[type-arg]
    member = world.members[0]
    messages: list[dict] = []  # type: ignore[type-arg]
    before = ""
    while True:
        r = await member.http.get(
            f"/api/rooms/{world.room_id}/messages?limit=200{before}"
        )
        assert r.status_code == 200, r.text
        page = r.json()
        messages = page["messages"] + messages
        if not page["has_more"]:
            return messages
        before = f"&before={page['messages'][0]['seq']}"


async def test_restart_keeps_history_and_sequences(own_server: ServerProcess) -> None:
    """After a graceful restart, history is intact and sequences continue; live
    clients were told 1012 (restarting) and resume with nothing missed."""
    async with World.create(own_server, members=2) as world:
        ana, lars = world.members
        async with await join(own_server, ana, world.room_id) as a:
            for i in range(20):
                await a.send(
                    {"type": "chat.send", "id": f"r{i}", "text": f"before restart {i}"}
                )
            acks = await a.collect("chat.ack", 20)
            assert [x["seq"] for x in acks] == list(range(1, 21))
            own_server.stop()
            assert await a.close_code() == 1012
        own_server.start()
        # Same data folder, so the same signing key: the sessions and tokens still work.
        async with await join(
            own_server, lars, world.room_id, params={"after": 15}
        ) as b:
            replay = await b.collect("chat.message", 5)
            assert [m["seq"] for m in replay] == [16, 17, 18, 19, 20]
            await b.send({"type": "chat.send", "id": "after", "text": "after restart"})
            assert (await b.recv_until("chat.ack"))["seq"] == 21
        assert [m["seq"] for m in await history(world)] == list(range(1, 22))


@pytest.mark.slow
async def test_kill_9_loses_nothing_acknowledged(own_server: ServerProcess) -> None:
    """kill -9 while messages are in flight: every acknowledged message is stored."""
    async with World.create(own_server, members=2) as world:
        ana, lars = world.members
        acked: dict[str, int] = {}
        async with (
            await join(own_server, ana, world.room_id) as a,
            await join(own_server, lars, world.room_id) as b,
        ):

            async def send_all(sock, prefix: str) -> None:  # type: ignore[no-untyped-def]
                with contextlib.suppress(Exception):
                    for i in range(3000):
                        await sock.send(
                            {
                                "type": "chat.send",
                                "id": f"{prefix}{i}",
                                "text": f"{prefix} {i}",
                            }
                        )

            async def read_acks(sock) -> None:  # type: ignore[no-untyped-def]
                with contextlib.suppress(Exception):
                    while True:
                        frame = await sock.recv()
                        if frame["type"] == "chat.ack":
                            acked[frame["id"]] = frame["seq"]

            tasks = [
                asyncio.create_task(send_all(a, "a")),
                asyncio.create_task(send_all(b, "b")),
                asyncio.create_task(read_acks(a)),
                asyncio.create_task(read_acks(b)),
            ]
            # Kill as soon as a good number of acks came back, mid-traffic.
            async with asyncio.timeout(30):
                while len(acked) < 500:
                    await asyncio.sleep(0.005)
            own_server.kill()
            snapshot = dict(acked)
            await asyncio.gather(*tasks)
        assert len(acked) >= 500
        own_server.start()
        stored = {m["id"]: m["seq"] for m in await history(world)}
        missing = {k: v for k, v in acked.items() if stored.get(k) != v}
        assert not missing, f"{len(missing)} acknowledged messages lost or renumbered"
        # Sequences are gap-free: what was committed is numbered 1..n.
        assert sorted(stored.values()) == list(range(1, len(stored) + 1))
        assert len(snapshot) <= len(acked) <= len(stored)
