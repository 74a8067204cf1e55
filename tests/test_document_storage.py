"""Documents survive restarts and kill -9, compact, keep named versions, and project
their activities into rows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pycrdt
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import create_async_engine

from storage.models import ActivityRow, Document, DocumentSnapshot, DocumentUpdate
from tests.conftest import dedicated_server
from tests.support import ServerProcess, World
from tests.yclient import add_activity, yclient

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def own(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server these tests stop and kill, with quick compaction and projection."""
    with dedicated_server(
        backend,
        tmp_path_factory,
        {
            "SQLITE_SYNCHRONOUS": "FULL",
            "DOC_UPDATES_PER_SECOND": "5000",
            "DOC_UPDATE_BURST": "5000",
            "DOC_COMPACT_AFTER_UPDATES": "50",
            "PROJECTION_DELAY": "0.2",
            "DOC_IDLE_UNLOAD": "0.5",
        },
    ) as proc:
        yield proc


def covered(by: pycrdt.Doc, doc: pycrdt.Doc) -> bool:
    """Everything in ``doc`` is also in ``by``."""
    return pycrdt.get_update(doc.get_update(), by.get_state()) == b"\x00\x00"


@pytest.mark.slow
async def test_kill_9_keeps_every_update_a_client_received(own: ServerProcess) -> None:
    """kill -9 during a stream of edits: all that any client received is in storage."""
    async with World.create(own, members=2) as world:
        ana, lars = world.members
        async with (
            yclient(
                own, world.room_id, "agreement", await ana.token(world.room_id)
            ) as a,
            yclient(
                own, world.room_id, "agreement", await lars.token(world.room_id)
            ) as b,
        ):

            async def stream() -> None:
                with contextlib.suppress(Exception):
                    for i in range(5000):
                        await a.edit(
                            lambda d, i=i: d.get("log", type=pycrdt.Array).append(i)
                        )
                        if i % 10 == 0:
                            await asyncio.sleep(0)

            def received_edits() -> int:
                # Counted in the document: one frame may carry many merged updates.
                return len(b.doc.get("log", type=pycrdt.Array))

            writer = asyncio.create_task(stream())
            await b.wait_for(lambda: received_edits() >= 200)
            own.kill()
            await writer
            received = pycrdt.Doc()
            received.apply_update(b.doc.get_update())
        assert received_edits() >= 200
        own.start()
        async with yclient(
            own, world.room_id, "agreement", await lars.token(world.room_id)
        ) as fresh:
            assert covered(fresh.doc, received), "an update a client received was lost"


async def test_restart_reloads_the_same_state(own: ServerProcess) -> None:
    """After a graceful restart the document reloads equal to what clients had."""
    async with World.create(own, members=2) as world:
        ana = world.members[0]
        async with yclient(
            own, world.room_id, "agreement", await ana.token(world.room_id)
        ) as a:
            for i in range(120):  # more than the compaction threshold
                await a.edit(add_activity(f"act-{i}", title=f"Activity {i}"))
            await a.edit(
                lambda d: d.get("meta", type=pycrdt.Map).update({"title": "Signed"})
            )
            before = a.doc.get_update()
            await asyncio.sleep(0.3)
        own.stop()
        own.start()
        async with yclient(
            own, world.room_id, "agreement", await ana.token(world.room_id)
        ) as b:
            expected = pycrdt.Doc()
            expected.apply_update(before)
            assert covered(b.doc, expected) and covered(expected, b.doc)
            assert len(b.activities()) == 120


async def wait_for_log(
    server: ServerProcess,
    room_id: int,
    name: str,
    done: Callable[[int | None, list[int]], bool],
) -> None:
    """Poll a document's stored form until ``done(the snapshot's last folded update
    id or None, the ids of the update rows)`` holds (10 s at most)."""
    engine = create_async_engine(server.database_url)
    try:
        async with asyncio.timeout(10):
            while True:
                async with engine.connect() as conn:
                    doc_id = (
                        await conn.execute(
                            select(Document.id).where(
                                Document.room_id == room_id, Document.name == name
                            )
                        )
                    ).scalar_one()
                    upto = (
                        await conn.execute(
                            select(DocumentSnapshot.upto_update_id).where(
                                DocumentSnapshot.document_id == doc_id
                            )
                        )
                    ).scalar_one_or_none()
                    ids = list(
                        (
                            await conn.execute(
                                select(DocumentUpdate.id).where(
                                    DocumentUpdate.document_id == doc_id
                                )
                            )
                        ).scalars()
                    )
                if done(upto, ids):
                    return
                await asyncio.sleep(0.05)
    finally:
        await engine.dispose()


async def test_compaction_folds_the_log_into_a_snapshot(
    own: ServerProcess, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Past the threshold the log is folded into a snapshot; loading gives the same state."""
    async with World.create(own, members=1) as world:
        ana = world.members[0]
        async with yclient(
            own, world.room_id, "compact", await ana.token(world.room_id)
        ) as a:
            for i in range(200):
                await a.edit(
                    lambda d, i=i: d.get("t", type=pycrdt.Text).insert(0, f"{i % 10}")
                )
            text = str(a.doc.get("t", type=pycrdt.Text))
        await wait_for_log(
            own,
            world.room_id,
            "compact",
            lambda upto, ids: upto is not None and len(ids) < 50,
        )
        async with yclient(
            own, world.room_id, "compact", await ana.token(world.room_id)
        ) as b:
            assert str(b.doc.get("t", type=pycrdt.Text)) == text


async def test_edits_after_a_compaction_survive_a_restart(own: ServerProcess) -> None:
    """Edits stored after the whole log was folded reload after a restart (on SQLite
    a deleted highest row id is handed out again: folded rows must not take it)."""
    async with World.create(own, members=1) as world:
        ana = world.members[0]
        token = await ana.token(world.room_id)
        async with yclient(own, world.room_id, "refold", token) as a:
            for i in range(200):
                await a.edit(lambda d, i=i: d.get("log", type=pycrdt.Array).append(i))
        # Idle past the unload (0.5 s here), which folds the whole log (while
        # connected, rows under the compaction threshold may stay unfolded).
        await wait_for_log(
            own,
            world.room_id,
            "refold",
            # everything stored is folded
            lambda upto, ids: upto is not None and (not ids or max(ids) <= upto),
        )
        async with yclient(own, world.room_id, "refold", token) as a:
            for i in range(200, 205):
                await a.edit(lambda d, i=i: d.get("log", type=pycrdt.Array).append(i))
            async with yclient(own, world.room_id, "refold", token) as b:
                await b.wait_for(
                    lambda: len(b.doc.get("log", type=pycrdt.Array)) == 205
                )
        own.stop()
        own.start()
        token = await ana.token(world.room_id)
        async with yclient(own, world.room_id, "refold", token) as c:
            assert c.doc.get("log", type=pycrdt.Array).to_py() == list(range(205))


async def test_corrupt_storage_refuses_instead_of_serving_empty(
    own: ServerProcess,
) -> None:
    """A document whose stored log cannot load is refused (1013), never replaced by an empty one."""
    async with World.create(own, members=1) as world:
        ana = world.members[0]
        async with yclient(
            own, world.room_id, "fragile", await ana.token(world.room_id)
        ) as a:
            await a.edit(lambda d: d.get("t", type=pycrdt.Text).insert(0, "precious"))
        # Past the idle unload (0.5 s here), so the next connection loads it again.
        await asyncio.sleep(1.0)
        engine = create_async_engine(own.database_url)
        try:
            async with engine.begin() as conn:
                doc_id = (
                    await conn.execute(
                        select(Document.id).where(
                            Document.room_id == world.room_id,
                            Document.name == "fragile",
                        )
                    )
                ).scalar_one()
                # Damage every stored form of it (log and snapshot, whichever exists).
                await conn.execute(
                    update(DocumentUpdate)
                    .where(DocumentUpdate.document_id == doc_id)
                    .values(data=b"\xff\xff\xff")
                )
                await conn.execute(
                    update(DocumentSnapshot)
                    .where(DocumentSnapshot.document_id == doc_id)
                    .values(state=b"\xff\xff\xff")
                )
        finally:
            await engine.dispose()
        async with yclient(
            own, world.room_id, "fragile", await ana.token(world.room_id), sync=False
        ) as c:
            assert await c.close_code() == 1013


async def test_a_reload_rewrites_only_the_activity_rows_that_differ(
    own: ServerProcess,
) -> None:
    """Loading a document projects it again. Rows that already match are left as
    they are (a long list is not rewritten at every load); a row changed or lost
    behind the server's back (a projection a kill -9 cut short) is put right."""
    async with World.create(own, members=1) as world:
        ana = world.members[0]
        token = await ana.token(world.room_id)
        async with yclient(own, world.room_id, "agreement", token) as a:
            for i in range(40):
                await a.edit(
                    add_activity(
                        f"r{i}",
                        title=f"Row {i}",
                        owner=ana.id,
                        people=[ana.id],
                        institutions=[world.institutions[0]],
                        starts_on="2026-03-01",
                    )
                )
            expected = [x["id"] for x in a.activities()]

        async def overview() -> dict[str, dict]:  # type: ignore[type-arg]
            r = await ana.http.get(f"/api/rooms/{world.room_id}/activities")
            assert r.status_code == 200
            return {x["id"]: x for x in r.json()["activities"]}

        async with asyncio.timeout(10):
            while list(await overview()) != expected:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # past the idle unload (0.5 s here)
        before = await overview()
        engine = create_async_engine(own.database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    update(ActivityRow)
                    .where(
                        ActivityRow.room_id == world.room_id,
                        ActivityRow.activity_id == "r3",
                    )
                    .values(title="wrong")
                )
                await conn.execute(
                    delete(ActivityRow).where(
                        ActivityRow.room_id == world.room_id,
                        ActivityRow.activity_id == "r7",
                    )
                )
        finally:
            await engine.dispose()
        async with yclient(own, world.room_id, "agreement", token):
            async with asyncio.timeout(10):
                while (rows := await overview()).get("r3", {}).get(
                    "title"
                ) != "Row 3" or "r7" not in rows:
                    await asyncio.sleep(0.05)
        after = await overview()
        assert list(after) == expected
        rewritten = {
            k for k in after if after[k]["updated_at"] != before[k]["updated_at"]
        }
        assert rewritten == {"r3", "r7"}
        for key in expected:
            assert {**after[key], "updated_at": None} == {
                **before[key],
                "updated_at": None,
            }


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def document_worker_pid(server: ServerProcess) -> int:
    """The server's document worker (``python -m rooms.worker``, its only child)."""
    assert server.proc is not None
    for task in Path(f"/proc/{server.proc.pid}/task").glob("*/children"):
        for pid in task.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if cmdline[1:3] == [b"-m", b"rooms.worker"]:
                return int(pid)
    raise AssertionError("no document worker")


async def test_a_killed_document_worker_loses_nothing(own: ServerProcess) -> None:
    """kill -9 of the document worker while activities are added: the server carries
    on, the activity rows catch up with the document, compaction still keeps every
    edit (a restart reloads them all), and a stopped server leaves no child."""
    async with World.create(own, members=1) as world:
        ana = world.members[0]
        token = await ana.token(world.room_id)

        async def overview() -> list[str]:
            r = await ana.http.get(f"/api/rooms/{world.room_id}/activities")
            assert r.status_code == 200
            return [x["id"] for x in r.json()["activities"]]

        async with yclient(own, world.room_id, "agreement", token) as a:
            for i in range(60):
                await a.edit(add_activity(f"w{i}", title=f"Activity {i}"))
            killed = None
            async with asyncio.timeout(15):
                while killed is None:
                    with contextlib.suppress(AssertionError, OSError):
                        killed = document_worker_pid(own)
                    await asyncio.sleep(0.05)
            os.kill(killed, signal.SIGKILL)
            for i in range(60, 180):  # past the compaction threshold again
                await a.edit(add_activity(f"w{i}", title=f"Activity {i}"))
            # A new worker takes over at a projection after its restart delay (1 s):
            # keep editing until it has.
            replaced = None
            n = 180
            async with asyncio.timeout(30):
                while replaced is None or replaced == killed:
                    await a.edit(add_activity(f"w{n}", title=f"Activity {n}"))
                    n += 1
                    await asyncio.sleep(0.2)
                    with contextlib.suppress(AssertionError, OSError):
                        replaced = document_worker_pid(own)
            for i in range(n, n + 10):
                await a.edit(add_activity(f"w{i}", title=f"Activity {i}"))
            n += 10
            ids = [x["id"] for x in a.activities()]
            assert len(ids) == n
            async with asyncio.timeout(20):
                while await overview() != ids:
                    await asyncio.sleep(0.1)
            before = a.doc.get_update()
        assert own.proc is not None
        server_pid = own.proc.pid
        children = [
            int(pid)
            for task in Path(f"/proc/{server_pid}/task").glob("*/children")
            for pid in task.read_text().split()
        ]
        assert children, "the server had no document worker"
        own.stop()
        # The worker is waited for before the server exits.
        async with asyncio.timeout(10):
            while any(map(running, children)):
                await asyncio.sleep(0.05)
        own.start()
        async with yclient(own, world.room_id, "agreement", token) as b:
            expected = pycrdt.Doc()
            expected.apply_update(before)
            assert covered(b.doc, expected) and covered(expected, b.doc)
            assert len(b.activities()) == n
