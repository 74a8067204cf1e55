"""Bad input gets a clear error frame or a documented close code, and the room carries on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest
from websockets.exceptions import ConnectionClosedError

from tests.conftest import dedicated_server
from tests.support import ServerProcess, Socket, World, join

pytestmark = pytest.mark.anyio

LIMITS = {
    "MAX_FRAME_BYTES": "4096",
    "MAX_TEXT_CHARS": "500",
    "MESSAGES_PER_SECOND": "5",
    "MESSAGE_BURST": "10",
    "MAX_CONNECTIONS_PER_USER": "3",
}


@pytest.fixture(scope="module")
def tight(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server with small limits, so tests reach them quickly."""
    with dedicated_server(backend, tmp_path_factory, LIMITS) as proc:
        yield proc


@pytest.fixture
async def room(tight: ServerProcess) -> AsyncIterator[World]:
    async with World.create(tight) as w:
        yield w


async def still_serving(server: ServerProcess, world: World, watcher: Socket) -> None:
    """Another member's message still reaches the watcher."""
    async with await join(server, world.members[2], world.room_id) as other:
        await other.send({"type": "chat.send", "id": "alive", "text": "still working?"})
        got = await watcher.recv_until("chat.message", id="alive")
        assert got["text"] == "still working?"


async def test_non_json_closes_4400_and_room_carries_on(
    tight: ServerProcess, room: World
) -> None:
    """Text that is not a JSON object closes that socket with 4400 only."""
    async with await join(tight, room.members[0], room.room_id) as watcher:
        for bad in ("not json", "[1, 2]", '"a string"', "{unterminated"):
            async with await join(tight, room.members[1], room.room_id) as sock:
                await sock.ws.send(bad)
                assert await sock.close_code() == 4400
        await still_serving(tight, room, watcher)


async def test_binary_frame_closes_4400(tight: ServerProcess, room: World) -> None:
    """A binary frame on the JSON socket closes it with 4400."""
    async with await join(tight, room.members[0], room.room_id) as watcher:
        async with await join(tight, room.members[1], room.room_id) as sock:
            await sock.ws.send(b"\x00\x01binary")
            assert await sock.close_code() == 4400
        await still_serving(tight, room, watcher)


async def test_schema_errors_get_error_frames_with_the_id(
    tight: ServerProcess, room: World
) -> None:
    """Wrong types, unknown types, missing fields: an error frame naming the message id."""
    async with await join(tight, room.members[0], room.room_id) as sock:
        cases = [
            ({"type": "chat.send", "id": "t1", "text": 42}, "invalid_message"),
            ({"type": "launch.rockets", "id": "t2"}, "invalid_message"),
            ({"type": "chat.send", "id": "t3"}, "invalid_message"),
            (
                {"type": "chat.send", "id": "t4", "text": "x", "extra": True},
                "invalid_message",
            ),
            ({"type": "chat.send", "id": "t5", "text": "x" * 501}, "too_long"),
            ({"type": "chat.send", "id": "t6", "text": "   "}, "invalid_message"),
            (
                {"type": "chat.edit", "id": "t7", "seq": -1, "text": "x"},
                "invalid_message",
            ),
            (
                {"type": "chat.edit", "id": "t8", "seq": 999999, "text": "x"},
                "not_found",
            ),
        ]
        for frame, code in cases:
            await sock.send(frame)
            error = await sock.recv_until("error", id=frame["id"])
            assert error["code"] == code, (frame, error)
            assert error["message"]
        # A message without a usable id still gets an error, without an id.
        await sock.send({"type": "typing"})
        error = await sock.recv_until("error")
        assert "id" not in error
        # The connection is still open and working.
        await sock.send({"type": "ping", "id": "p"})
        assert (await sock.recv_until("pong"))["id"] == "p"


async def test_oversized_frame_closes_1009(tight: ServerProcess, room: World) -> None:
    """A frame over MAX_FRAME_BYTES (our 4 KiB, not uvicorn's 16 MiB) closes with 1009."""
    async with await join(tight, room.members[0], room.room_id) as watcher:
        async with await join(tight, room.members[1], room.room_id) as sock:
            text = "x" * 4000
            await sock.send({"type": "chat.send", "id": "ok", "text": text[:400]})
            await sock.recv_until("chat.ack", id="ok")
            await sock.ws.send(
                json.dumps({"type": "chat.send", "id": "big", "text": text + "y" * 200})
            )
            assert await sock.close_code() == 1009
        await still_serving(tight, room, watcher)


async def test_flood_gets_rate_limited_then_closed_4429(
    tight: ServerProcess, room: World
) -> None:
    """Past the burst, messages are refused with rate_limited; a client that keeps on is closed."""
    async with await join(tight, room.members[0], room.room_id) as watcher:
        async with await join(tight, room.members[1], room.room_id) as sock:
            for i in range(40):
                await sock.send({"type": "chat.send", "id": f"f{i}", "text": "flood"})
            codes = []

            async def read_until_closed() -> None:
                while True:
                    frame = await sock.recv()
                    if frame["type"] in ("chat.ack", "error"):
                        codes.append(frame.get("code", "ack"))

            with pytest.raises(ConnectionClosedError):
                await read_until_closed()
            assert sock.ws.close_code == 4429
            assert codes.count("ack") == 10  # the burst got through
            assert "rate_limited" in codes
        await still_serving(tight, room, watcher)


async def test_too_many_connections_per_user_4429(
    tight: ServerProcess, room: World
) -> None:
    """A user's fourth simultaneous socket is refused with 4429."""
    ana = room.members[0]
    # Entered in order: the fourth opens while the first three are connected.
    async with (
        await join(tight, ana, room.room_id),
        await join(tight, ana, room.room_id),
        await join(tight, ana, room.room_id),
        await join(tight, ana, room.room_id, expect_welcome=False) as fourth,
    ):
        assert await fourth.close_code() == 4429
