"""Bad input on the document socket: the offender gets a clear close code, the
document and every other connection carry on, and storage keeps only valid updates."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pycrdt
import pytest

from rooms.ysync import (
    AwarenessEntry,
    create_awareness,
    create_sync_step2,
    create_update,
    write_var_uint,
)
from tests.conftest import dedicated_server
from tests.support import ServerProcess, World
from tests.yclient import YClient, add_activity, yclient

pytestmark = pytest.mark.anyio

LIMITS = {
    "DOC_MAX_FRAME_BYTES": "8192",
    "AWARENESS_MAX_BYTES": "512",
    "AWARENESS_PER_SECOND": "5",
    "DOC_UPDATES_PER_SECOND": "20",
    "DOC_UPDATE_BURST": "20",
    "MAX_DOCUMENTS_PER_ROOM": "3",
    "MAX_DOC_CONNECTIONS_PER_USER": "4",
}


@pytest.fixture(scope="module")
def strict(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with dedicated_server(backend, tmp_path_factory, LIMITS) as proc:
        yield proc


@pytest.fixture
async def room(strict: ServerProcess) -> AsyncIterator[World]:
    async with World.create(strict) as w:
        yield w


def valid_update() -> bytes:
    doc = pycrdt.Doc()
    doc.get("activities", type=pycrdt.Array).append(
        pycrdt.Map({"id": "q", "title": "ok"})
    )
    return doc.get_update()


# A valid update by client 4242 (an activity map), and updates that pycrdt refuses
# after it in different ways: found by mutating a valid follow-up edit.
BASE = bytes.fromhex(
    "010392210007010a61637469766974696573012800922100026964017701782800922100057469746c65"
    "01770568656c6c6f00"
)
# RuntimeError: "block parent <4242#3> must be deleted or shared ref type".
BAD_PARENT = bytes.fromhex(
    "0103922103a89221020177076368616e6765648792210001280092210302696401770179019221010201"
)


def mutated_updates() -> list[bytes]:
    """Updates pycrdt refuses once BASE is applied: undecodable, truncated, bad parent."""
    good = bytes.fromhex(
        "0103922103a89221020177076368616e6765648792210001280092210302696401770179019221010202"
    )
    return [b"\xff\xff\xff", good[: len(good) // 2], BAD_PARENT, b"\x01\x01\x92\x21"]


async def others_still_work(
    server: ServerProcess, world: World, watcher: YClient
) -> None:
    """A fresh writer's edit reaches the watcher: the document is alive."""
    writer = world.members[2]
    async with yclient(
        server, world.room_id, "agreement", await writer.token(world.room_id)
    ) as w:
        marker = f"alive-{len(watcher.activities())}"
        await w.edit(add_activity(marker, title="still alive"))
        await watcher.wait_for(
            lambda: marker in [a["id"] for a in watcher.activities()]
        )


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"", 4400),  # empty frame
        (b"\x07", 4400),  # unknown message type
        (b"\x00\x09\x00", 4400),  # unknown sync step
        (b"\x00\x02\x05ab", 4400),  # truncated: says 5 bytes, has 2
        (b"\x00\x02\x00trailing", 4400),  # bytes after the message
        (b"\x00\x02" + b"\xff" * 12, 4400),  # varint too long
        (b"\x01\x05\x01\x01\x01\x01{", 4400),  # awareness state not JSON
        (
            b"\x00\x02" + write_var_uint(9000) + b"x" * 9000,
            1009,
        ),  # over the frame limit
    ],
)
async def test_malformed_frames_close_the_offender_only(
    strict: ServerProcess, room: World, frame: bytes, code: int
) -> None:
    """Each malformed frame closes its sender with the documented code."""
    ana, lars = room.members[:2]
    async with yclient(
        strict, room.room_id, "agreement", await ana.token(room.room_id)
    ) as watcher:
        async with yclient(
            strict, room.room_id, "agreement", await lars.token(room.room_id)
        ) as bad:
            await bad.ws.send(frame)
            assert await bad.close_code() == code
        await others_still_work(strict, room, watcher)


async def test_text_frame_closes_4400(strict: ServerProcess, room: World) -> None:
    """A text frame on the binary protocol socket is refused with 4400."""
    ana = room.members[0]
    async with yclient(
        strict, room.room_id, "agreement", await ana.token(room.room_id)
    ) as bad:
        await bad.ws.send("hello")
        assert await bad.close_code() == 4400


async def test_invalid_updates_are_rejected_and_never_stored(
    strict: ServerProcess, room: World
) -> None:
    """Updates pycrdt cannot apply close their sender (4400); the stored document
    stays valid: a restart loads it, with every good edit and none of the bad."""
    ana, lars = room.members[:2]
    async with yclient(
        strict, room.room_id, "agreement", await ana.token(room.room_id)
    ) as watcher:
        await watcher.edit(add_activity("before", title="good"))
        await watcher.ws.send(create_update(BASE))
        for bad_update in mutated_updates():
            async with yclient(
                strict, room.room_id, "agreement", await lars.token(room.room_id)
            ) as bad:
                await bad.ws.send(create_update(bad_update))
                assert await bad.close_code() == 4400
        await others_still_work(strict, room, watcher)
    strict.stop()
    strict.start()
    async with yclient(
        strict, room.room_id, "agreement", await ana.token(room.room_id)
    ) as fresh:
        ids = [a["id"] for a in fresh.activities()]
        assert "before" in ids
        assert "x" in ids  # BASE was stored
        assert all(i in ("before", "x") or i.startswith("alive-") for i in ids)


async def test_update_rate_limit_closes_4429(
    strict: ServerProcess, room: World
) -> None:
    """A client that floods updates past the limit is closed with 4429 (never dropped silently)."""
    ana = room.members[0]
    async with yclient(
        strict, room.room_id, "agreement", await ana.token(room.room_id)
    ) as c:
        for i in range(60):
            await c.edit(lambda d, i=i: d.get("flood", type=pycrdt.Array).append(i))
        assert await c.close_code() == 4429


async def test_awareness_limits(strict: ServerProcess, room: World) -> None:
    """An awareness state over its size limit closes with 1009; too many with 4429."""
    ana, lars = room.members[:2]
    async with yclient(
        strict, room.room_id, "agreement", await ana.token(room.room_id)
    ) as watcher:
        async with yclient(
            strict, room.room_id, "agreement", await lars.token(room.room_id)
        ) as c:
            await c.set_awareness(1, '{"big":"' + "x" * 600 + '"}')
            assert await c.close_code() == 1009
        async with yclient(
            strict, room.room_id, "agreement", await lars.token(room.room_id)
        ) as c:
            for clock in range(1, 40):
                await c.ws.send(
                    create_awareness(
                        [AwarenessEntry(c.doc.client_id, clock, '{"n":1}')]
                    )
                )
            assert await c.close_code() == 4429
        await others_still_work(strict, room, watcher)


async def test_sync_step2_with_foreign_items_is_accepted(
    strict: ServerProcess, room: World
) -> None:
    """A client may restore what the server lacks: updates holding others' items are fine."""
    ana, lars = room.members[:2]
    other = pycrdt.Doc()
    other.get("activities", type=pycrdt.Array).append(
        pycrdt.Map({"id": "restored", "title": "from a peer"})
    )
    async with (
        yclient(
            strict, room.room_id, "agreement", await ana.token(room.room_id)
        ) as watcher,
        yclient(strict, room.room_id, "agreement", await lars.token(room.room_id)) as c,
    ):
        await c.ws.send(create_sync_step2(other.get_update()))
        await watcher.wait_for(
            lambda: "restored" in [a["id"] for a in watcher.activities()]
        )


def test_mutations_are_really_refused_by_pycrdt() -> None:
    """Each mutated update fails to apply after BASE (else the test above proves nothing)."""
    kinds = set()
    for update in mutated_updates():
        doc = pycrdt.Doc()
        doc.apply_update(BASE)
        with pytest.raises((ValueError, RuntimeError)) as caught:
            doc.apply_update(update)
        kinds.add(type(caught.value).__name__)
    assert kinds == {"ValueError", "RuntimeError"}


async def test_document_count_per_room_is_limited(
    strict: ServerProcess, room: World
) -> None:
    """A room may hold MAX_DOCUMENTS_PER_ROOM documents; one more is refused with 4403."""
    ana = room.members[0]
    token = await ana.token(room.room_id)
    for name in ("agreement", "notes", "plan"):
        async with yclient(strict, room.room_id, name, token):
            pass
    async with yclient(strict, room.room_id, "one-too-many", token, sync=False) as c:
        assert await c.close_code() == 4403
    async with yclient(strict, room.room_id, "notes", token) as again:
        assert again.synced.is_set()  # existing documents still open


async def test_document_connections_per_user_are_limited(
    strict: ServerProcess, room: World
) -> None:
    """A user's fifth simultaneous document socket is refused with 4429."""
    ana = room.members[0]
    token = await ana.token(room.room_id)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(4):
            await stack.enter_async_context(
                yclient(strict, room.room_id, "agreement", token)
            )
        async with yclient(
            strict, room.room_id, "agreement", token, sync=False
        ) as fifth:
            assert await fifth.close_code() == 4429
