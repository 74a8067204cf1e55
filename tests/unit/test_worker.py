"""The document worker: the same results as in-process, survives its own death, and
leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pycrdt
import pytest

from rooms import crdt
from rooms.projection import ProjectionFailed, Projector
from rooms.worker import DocumentWorker, WorkerFailed, WorkerRefused
from tests.unit.test_projection import ROOM, Table, expected

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.anyio


def gone(pid: int) -> bool:
    """The process has ended (a zombie nobody reaps counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return False


def activity_doc(n: int, start: int = 0, doc: pycrdt.Doc | None = None) -> pycrdt.Doc:
    doc = doc if doc is not None else pycrdt.Doc()
    activities = doc.get("activities", type=pycrdt.Array)
    for i in range(start, start + n):
        activities.append(pycrdt.Map({"id": f"a{i}", "title": f"t{i}"}))
    return doc


@pytest.fixture
async def worker() -> AsyncIterator[DocumentWorker]:
    w = DocumentWorker(first_restart_delay=0.0)
    try:
        yield w
    finally:
        await w.aclose()


async def test_results_equal_the_in_process_results(worker: DocumentWorker) -> None:
    """Projection changes and compaction merges: the worker's equal the thread's."""
    client = activity_doc(30)
    remote, local = Projector(worker), Projector()
    try:
        first = [client.get_update()]
        assert await remote.changes("d", ROOM, first) == await local.changes(
            "d", ROOM, first
        )
        before = client.get_state()
        activity_doc(5, 30, client)
        client.get("activities", type=pycrdt.Array)[3]["title"] = "edited"
        later = [client.get_update(before)]
        assert await remote.changes("d", ROOM, later) == await local.changes(
            "d", ROOM, later
        )
    finally:
        remote.close()
        local.close()
    parts = [client.get_update(), activity_doc(3).get_update()]
    assert await worker.call("merge", parts) == crdt.merge(parts)


async def test_a_bad_update_is_refused_and_the_worker_carries_on(
    worker: DocumentWorker,
) -> None:
    with pytest.raises(WorkerRefused):
        await worker.call("merge", [b"\xff\xff\xff"])
    pid = await worker.call("pid")
    projector = Projector(worker)
    try:
        with pytest.raises(ProjectionFailed) as failed:
            await projector.changes("d", ROOM, [b"\xff\xff\xff"])
        assert failed.value.copy_lost
    finally:
        projector.close()
    assert await worker.call("pid") == pid  # the same worker


async def test_a_worker_killed_mid_request_is_replaced(worker: DocumentWorker) -> None:
    pid = await worker.call("pid")
    with pytest.raises(WorkerFailed):
        await worker.call("crash")
    assert wait_gone(pid)
    epoch = worker.epoch
    assert epoch == 1
    new = await worker.call("pid")
    assert new != pid and worker.epoch == epoch


async def test_a_hung_worker_times_out_and_is_replaced() -> None:
    worker = DocumentWorker(request_timeout=0.5, first_restart_delay=0.0)
    try:
        pid = await worker.call("pid")
        with pytest.raises(WorkerFailed):
            await worker.call("sleep", 30)
        assert wait_gone(pid, 2.0)
        assert await worker.call("pid") != pid
    finally:
        await worker.aclose()


async def test_after_a_failure_the_worker_waits_and_callers_work_in_process() -> None:
    worker = DocumentWorker(first_restart_delay=30.0)
    projector = Projector(worker)
    client = activity_doc(10)
    table = Table()
    try:
        table.write(await projector.changes("d", ROOM, [client.get_update()]))
        os.kill(await worker.call("pid"), signal.SIGKILL)
        before = client.get_state()
        activity_doc(4, 10, client)
        # The copy died with the worker: the caller must start from the whole state.
        with pytest.raises(ProjectionFailed) as failed:
            await projector.changes("d", ROOM, [client.get_update(before)])
        assert failed.value.copy_lost
        assert not worker.usable()  # waiting 30 s: the thread takes over meanwhile
        table.write(await projector.changes("d", ROOM, [client.get_update()]))
        assert table.rows == expected(client)
        with pytest.raises(WorkerFailed):
            await worker.call("pid")
    finally:
        projector.close()
        await worker.aclose()


async def test_killed_mid_projection_the_rows_still_equal_the_document(
    worker: DocumentWorker,
) -> None:
    """The worker dies while it projects: nothing half-done is used, and the rows
    made from the whole state afterwards equal the document."""
    projector = Projector(worker)
    client = activity_doc(2000)
    table = Table()
    try:
        table.write(await projector.changes("d", ROOM, [client.get_update()]))
        pid = await worker.call("pid")
        before = client.get_state()
        activity_doc(3000, 2000, client)
        task = asyncio.create_task(
            projector.changes("d", ROOM, [client.get_update(before)])
        )
        await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        (result,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(result, ProjectionFailed):
            assert result.copy_lost
            table.write(await projector.changes("d", ROOM, [client.get_update()]))
        else:  # finished before the kill: fine too
            table.write(result)
        assert table.rows == expected(client)
    finally:
        projector.close()


async def test_close_leaves_no_process(worker: DocumentWorker) -> None:
    pid = await worker.call("pid")
    await worker.aclose()
    assert gone(pid)
    with pytest.raises(WorkerFailed):
        await worker.call("pid")


async def test_the_worker_imports_only_what_it_needs(worker: DocumentWorker) -> None:
    """Not the server's main module nor its web and database stack: a worker that
    did (multiprocessing's spawn) held about 120 MiB; this one about 30."""
    pid = await worker.call("pid")
    await worker.call("merge", [activity_doc(50).get_update()])
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(status.split("VmRSS:")[1].split()[0])
    assert rss_kib < 64 * 1024, f"worker RSS {rss_kib} KiB"
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "pycrdt" in maps  # it did load what it works with
    # (packages with compiled parts, so an import shows in the memory map)
    for heavy in ("sqlalchemy", "httptools", "asyncpg"):
        assert heavy not in maps, f"{heavy} loaded in the worker"


def test_every_name_the_rooms_package_lists_loads() -> None:
    """``rooms`` loads its names lazily (so the worker stays small); each listed
    name must still resolve."""
    import rooms

    for name in rooms.__all__:
        assert getattr(rooms, name) is not None, name


def test_the_worker_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, os, signal, sys
            from rooms.worker import DocumentWorker

            async def main():
                worker = DocumentWorker()
                print(await worker.call("pid"), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

            if __name__ == "__main__":
                asyncio.run(main())
            """
        )
    )
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert wait_gone(int(run.stdout.split()[0])), "the worker outlived its parent"
