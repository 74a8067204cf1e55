"""Members that stop reading or die do not slow the room, and are let go."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import dedicated_server
from tests.rawsocket import open_stalled_socket
from tests.support import ServerProcess, Socket, World, join

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def small_queues(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Small send queues and slow heartbeats: only the queue bound can drop a member."""
    with dedicated_server(
        backend,
        tmp_path_factory,
        {
            "SEND_QUEUE_FRAMES": "200",
            "MESSAGES_PER_SECOND": "2000",
            "MESSAGE_BURST": "2000",
            "HEARTBEAT_INTERVAL": "60",
            "CLOSE_TIMEOUT": "1",
        },
    ) as proc:
        yield proc


async def wait_for_join(sock: Socket, user_id: int) -> None:
    async with asyncio.timeout(10):
        while True:
            frame = await sock.recv()
            if frame["type"] == "presence.join" and frame["user"]["id"] == user_id:
                return


@pytest.mark.slow
async def test_stalled_reader_is_dropped_and_others_stay_fast(
    small_queues: ServerProcess,
) -> None:
    """A member whose socket stays open but unread is disconnected once its queue is
    full, while the others keep receiving with p99 under 200 ms."""
    server = small_queues
    async with World.create(server, members=3) as world:
        sender, watcher, staller = world.members
        token = await staller.token(world.room_id)
        path = f"/ws/rooms/{world.room_id}?token={token}"
        async with (
            await join(server, watcher, world.room_id) as w,
            await join(server, sender, world.room_id) as s,
        ):
            raw = await open_stalled_socket("127.0.0.1", server.port, path)
            try:
                await wait_for_join(w, staller.id)
                latencies: list[float] = []
                staller_left = False

                def take(frame: dict) -> None:  # type: ignore[type-arg]
                    nonlocal staller_left
                    if frame["type"] == "chat.message":
                        sent = float(frame["text"].split()[0])
                        latencies.append(time.perf_counter() - sent)
                    elif (
                        frame["type"] == "presence.leave"
                        and frame["user_id"] == staller.id
                    ):
                        staller_left = True

                # 2,000 messages of 3.5 KB in bursts of 25 (7 MB: more than the kernel
                # and transport buffers can hold); the watcher reads as they come,
                # the staller reads nothing.
                for batch in range(80):
                    for i in range(25):
                        stamp = f"{time.perf_counter():.6f} "
                        await s.send(
                            {
                                "type": "chat.send",
                                "id": f"b{batch}-{i}",
                                "text": stamp + "x" * 3500,
                            }
                        )
                    while True:
                        try:
                            take(await w.recv(timeout=0.02))
                        except TimeoutError:
                            break
                while len(latencies) < 2000 or not staller_left:
                    take(await w.recv())
                assert len(latencies) == 2000
                p99 = statistics.quantiles(latencies, n=100)[98]
                assert p99 < 0.2, f"p99 {p99 * 1000:.1f} ms"
                metrics = httpx.get(f"{server.base_url}/metrics").text
                assert "coilroom_slow_consumers_total 1.0" in metrics
                assert 'coilroom_connections_closed_total{code="1013"} 1.0' in metrics
            finally:
                raw.close()


async def test_dead_peer_is_found_by_heartbeat(
    server: ServerProcess, world: World
) -> None:
    """A peer that never answers pings is dropped and announced as gone within seconds."""
    watcher, ghost = world.members[:2]
    token = await ghost.token(world.room_id)
    async with await join(server, watcher, world.room_id) as w:
        raw = await open_stalled_socket(
            "127.0.0.1",
            server.port,
            f"/ws/rooms/{world.room_id}?token={token}",
            rcvbuf=65536,
        )
        try:
            await wait_for_join(w, ghost.id)
            started = time.monotonic()
            left = await w.recv_until("presence.leave", user_id=ghost.id, timeout=10)
            assert left["user_id"] == ghost.id
            # The shared server pings every 1 s and waits 1 s for the pong.
            assert time.monotonic() - started < 5
        finally:
            raw.close()
