"""The document worker: a child process for the pycrdt work that need not be done
next to the live documents (the activity projections' copies, compaction merges).

pycrdt holds the GIL through each call: a projection of a long, busy list or the
merge of 20,000 updates (30-70 ms in one call) made the event loop and the storing
thread wait. In a child process that work has its own GIL and its own core.

Requests go one at a time over a socket (bytes and plain values in, plain values out)
from one I/O thread, each with a timeout. A worker that dies, hangs or cannot start
is killed and joined; the request fails with ``WorkerFailed`` (whatever it computed
is never used) and the worker starts again on a later request, after a delay that
doubles with each failure in a row (1 s up to a minute); until then ``usable()`` is
False and callers do the work in-process. A pycrdt failure inside a healthy worker
(a panic included) is answered as ``WorkerRefused``.

The worker is a new interpreter, ``python -m rooms.worker FD PARENT_PID`` (never a
fork of a process with threads and an event loop), talking over one end of a
socket pair. It is not started through ``multiprocessing``'s spawn, which would
run the server's main module again in it: it imports pycrdt, msgspec and the
projection code only (about 28 MiB, against 120 with everything the server
imports). It ends when its socket closes or its parent changes (the server was
killed): it leaves no orphan.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 60.0  # seconds for one request (a whole read of a huge list)
START_TIMEOUT = 60.0  # for a new interpreter to import what it needs and say so
FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
PARENT_CHECK_INTERVAL = 1.0
# Where ``python -m rooms.worker`` finds the package, whatever the server's cwd.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class WorkerFailed(Exception):
    """The worker died, timed out or could not start (it was stopped; a later
    request starts a new one)."""


class WorkerRefused(Exception):
    """A healthy worker could not do the request (``kind``: what failed)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class DocumentWorker:
    """One child process and the requests to it; owned by the DocumentRegistry."""

    def __init__(
        self,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        first_restart_delay: float = FIRST_RESTART_DELAY,
    ) -> None:
        self.request_timeout = request_timeout
        self.first_restart_delay = first_restart_delay
        # Copies made in the worker are valid while the epoch stays: it moves on
        # at every failure (the worker's state is gone then).
        self.epoch = 0
        self.failures = 0  # in a row
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None  # I/O thread only
        self._conn: multiprocessing.connection.Connection | None = None
        self._retry_at = 0.0
        self._closed = False
        self._io = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="docworker"
        )
        self._turn: asyncio.Lock | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def usable(self) -> bool:
        """Running, or may be started now (not closed, not waiting to restart)."""
        return not self._closed and (
            self._process is not None or time.monotonic() >= self._retry_at
        )

    async def call(self, op: str, *args: Any, start: bool = True) -> Any:
        """Run ``op`` in the worker (started first if needed and ``start``; without
        ``start`` and no worker running, nothing is done and None returned).

        Raises:
            WorkerFailed: no worker (closed, restarting later, or it failed now).
            WorkerRefused: the worker answered that the request failed.
        """
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:  # one request at a time: callers queue here
            if self._closed:
                raise WorkerFailed("document worker closed")
            if self._process is None and not start:
                return None
            if not self.usable():
                raise WorkerFailed("document worker restarting later")
            loop = asyncio.get_running_loop()
            # The exchange runs to its end in the I/O thread even if this caller is
            # cancelled: requests and replies never interleave.
            status, value = await asyncio.shield(
                loop.run_in_executor(self._io, self._exchange, op, args)
            )
        if status == "ok":
            return value
        if status == "failed":
            raise WorkerFailed(value)
        raise WorkerRefused(status, value)

    # -- in the I/O thread ------------------------------------------------------

    def _exchange(self, op: str, args: tuple[Any, ...]) -> tuple[str, Any]:
        try:
            if self._process is None:
                self._start()
            conn = self._conn
            assert conn is not None
            conn.send((op, args))
            if not conn.poll(self.request_timeout):
                raise TimeoutError(f"no answer in {self.request_timeout:.0f}s")
            status, value = conn.recv()
        except (Exception, EOFError) as exc:  # noqa: BLE001 - whatever it was, stop it
            reason = f"document worker failed ({op}): {type(exc).__name__}: {exc}"
            self._stop(kill=True)
            self.epoch += 1
            self.failures += 1
            delay = min(
                MAX_RESTART_DELAY, self.first_restart_delay * 2 ** (self.failures - 1)
            )
            self._retry_at = time.monotonic() + delay
            log.error("%s; restarting in %.0fs at the earliest", reason, delay)
            return "failed", reason
        self.failures = 0
        return status, value

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(  # noqa: S603 - our interpreter, our module
                [
                    sys.executable,
                    "-m",
                    "rooms.worker",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                cwd=PROJECT_ROOT,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the child's end lives in the child only
        self._process = process
        self._conn = multiprocessing.connection.Connection(ours.detach())
        # Ready once it has imported pycrdt (not counted in a request's timeout).
        if not self._conn.poll(START_TIMEOUT):
            raise TimeoutError(f"not started in {START_TIMEOUT:.0f}s")
        self._conn.recv()
        if self.epoch or self.restarts:
            log.warning("document worker restarted (pid %s)", process.pid)
        self.restarts += 1

    def _stop(self, *, kill: bool) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()  # the worker sees its socket close and ends
        if process is None:
            return
        if kill:
            process.kill()
        try:
            process.wait(5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)

    async def aclose(self) -> None:
        """Stop the worker (it ends when its socket closes) and join it (once)."""
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:
            if self._closed:
                return
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(
                self._io, lambda: self._stop(kill=False)
            )
        self._io.shutdown(wait=True)


# -- in the worker process ------------------------------------------------------------


def serve(conn: multiprocessing.connection.Connection, parent_pid: int) -> None:
    """The worker's loop: answer requests until the socket closes or the parent dies."""
    # Ctrl-C goes to the whole process group: the server stops its worker itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from rooms import crdt, projection

    projection.YIELD_EVERY = 1 << 30  # nobody to give the GIL to here
    projections = projection.Projections()
    try:
        conn.send(("ready", os.getpid()))
    except (OSError, ValueError):
        return
    while True:
        try:
            if not conn.poll(PARENT_CHECK_INTERVAL):
                if os.getppid() != parent_pid:
                    return  # orphaned: the server was killed
                continue
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[str, Any] = ("ok", _run(projections, crdt, op, args))
        except projection.ProjectionFailed as exc:
            kind = "projection_lost" if exc.copy_lost else "projection_kept"
            reply = (kind, str(exc))
        except crdt.UpdateRejected as exc:
            reply = ("rejected", str(exc))
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            # A panic anywhere else: the copy may be half-changed, drop it.
            if op == "project":
                projections.drop(args[0])
            reply = ("error", f"{type(exc).__name__}: {str(exc)[:200]}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


def _run(projections: Any, crdt: Any, op: str, args: tuple[Any, ...]) -> Any:
    if op == "project":
        return projections.changes(*args)
    if op == "forget_rows":
        return projections.forget_rows(*args)
    if op == "drop":
        return projections.drop(*args)
    if op == "merge":
        return crdt.merge(*args)
    if op == "pid":
        return os.getpid()
    if op == "crash":  # tests: a worker that dies mid-request
        os._exit(70)
    if op == "sleep":  # tests: a worker that hangs
        time.sleep(args[0])
        return None
    raise ValueError(f"unknown request {op!r}")


if __name__ == "__main__":  # python -m rooms.worker FD PARENT_PID (see _start)
    serve(multiprocessing.connection.Connection(int(sys.argv[1])), int(sys.argv[2]))
