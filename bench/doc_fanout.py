"""Documents benchmark: y-websocket fan-out, many small documents, joining a long
document, idle document sockets; the real server against three references.

    .venv/bin/python -m bench.doc_fanout            # full run
    .venv/bin/python -m bench.doc_fanout --quick    # smoke run (~2 minutes)

Targets, one after the other in the same invocation, under the same load:

* ``server``: ``server.py serve`` (SQLite, token auth, persistence on), doc rate
  limits raised;
* ``relay``: ``bench/doc_relay.py``, a bare ``websockets`` binary relay per path
  (no sync handshake, no state: the fan-out floor; scenario 3 does not apply);
* ``yws``: ``@y/websocket-server`` (Node, in memory), pinned in
  ``bench/docs_refs/package.json`` (``npm ci --prefix bench/docs_refs`` if missing);
* ``pycrdt``: pycrdt-websocket's ``WebsocketServer`` on uvicorn (in memory),
  ``bench/docs_refs/pycrdt_server.py`` (pip-installed into .venv if missing).

Results: ``bench/results/<date>-doc_fanout[-quick].json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pycrdt
import uvloop

from bench.chat_fanout import (
    CLK_TCK,
    Worker,
    all_cpu,
    command_line,
    cpu_seconds,
    cpu_times,
    git_state,
    machine,
    others_delta,
    percentile_ms,
    rss_kib,
    settle_rss,
    start_profile,
    window_schedule,
)
from bench.loadgen import BIN_NS
from bench.world import (
    ROOT,
    Rooms,
    Server,
    create_rooms,
    free_port,
    raise_nofile,
    stop_process,
    wait_for_port,
)

RESULTS = Path(__file__).resolve().parent / "results"
REFS = Path(__file__).resolve().parent / "docs_refs"
TARGETS = ("server", "relay", "yws", "pycrdt")
PROFILE: Path | None = None  # --profile DIR: py-spy of the server in scenarios 1-2


# -- targets -------------------------------------------------------------------------


class Target:
    """A process under test; ``url(doc, i)`` is client ``i``'s URL on document ``doc``
    (documents are ``(room index, name)``)."""

    name = "?"
    handshake = True  # speaks the y-websocket sync handshake (has state)

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def prepare(self, users: int, rooms: int) -> None:
        pass

    def url(self, doc: tuple[int, str], i: int) -> str:
        return f"ws://127.0.0.1:{self.port}/bench-{doc[0]}-{doc[1]}"

    log_path: Path | None = None

    def log_tail(self, n: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path = (
            Path(tempfile.gettempdir()) / f"doc_fanout-{self.name}-{self.port}.log"
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=raise_nofile,
            )
        wait_for_port(self.port, self.proc)

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class ServerTarget(Target):
    name = "server"

    def __init__(self, extra: dict[str, str]) -> None:
        super().__init__()
        self.server = Server(
            {
                "doc_updates_per_second": "100000",
                "doc_update_burst": "100000",
                "doc_write_queue_updates": "100000",
                "doc_send_queue_frames": "100000",
                "max_doc_connections_per_user": "100000",
                "max_connections_per_user": "100000",
                **extra,
            }
        )
        self.rooms: Rooms | None = None

    def __enter__(self) -> Target:
        self.server.__enter__()
        self.proc = self.server.proc
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def log_tail(self, n: int = 15) -> str:
        return self.server.log_tail(n)

    def prepare(self, users: int, rooms: int) -> None:
        self.rooms = asyncio.run(create_rooms(self.server, users=users, rooms=rooms))

    def url(self, doc: tuple[int, str], i: int) -> str:
        assert self.rooms is not None
        room = self.rooms.room_ids[doc[0]]
        tokens = self.rooms.tokens[room]
        return (
            f"ws://127.0.0.1:{self.server.port}/ws/docs/{room}/{doc[1]}"
            f"?token={tokens[i % len(tokens)]}"
        )


class RelayTarget(Target):
    name = "relay"
    handshake = False

    def __enter__(self) -> Target:
        self.start([sys.executable, "-m", "bench.doc_relay", "--port", str(self.port)])
        return self


class YwsTarget(Target):
    name = "yws"

    def __enter__(self) -> Target:
        entry = REFS / "node_modules/@y/websocket-server/src/server.js"
        self.start(
            ["node", str(entry)],
            env=os.environ | {"HOST": "127.0.0.1", "PORT": str(self.port)},
        )
        return self


class PycrdtTarget(Target):
    name = "pycrdt"

    def __enter__(self) -> Target:
        self.start(
            [sys.executable, str(REFS / "pycrdt_server.py"), "--port", str(self.port)]
        )
        return self


def ensure_references(wanted: list[str]) -> dict[str, str]:
    """Install missing references; returns {target: why it cannot run}."""
    broken = {}
    if "yws" in wanted and not (REFS / "node_modules/@y/websocket-server").exists():
        r = subprocess.run(
            ["npm", "ci", "--prefix", str(REFS), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if r.returncode:
            broken["yws"] = "npm ci failed: " + r.stderr[-300:]
    if "pycrdt" in wanted:
        try:
            import pycrdt.websocket  # noqa: F401
        except ImportError:
            r = subprocess.run(
                [sys.executable, "-m", "pip", "install", "pycrdt-websocket"],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if r.returncode:
                broken["pycrdt"] = "pip install failed: " + r.stderr[-300:]
    return broken


def make_target(name: str, extra: dict[str, str]) -> Target:
    return {
        "server": lambda: ServerTarget(extra),
        "relay": RelayTarget,
        "yws": YwsTarget,
        "pycrdt": PycrdtTarget,
    }[name]()


# -- fan-out (scenarios 1 and 2) -----------------------------------------------------


@dataclass
class Load:
    name: str
    docs: int
    per_doc: int
    writers_per_doc: int  # the first clients of each document write
    rate: int  # updates/s in total
    warmup: float
    window: float
    reps: int
    drain: float
    workers: int
    full_clients: int  # clients (of document 0) that apply every update with pycrdt
    rooms: int
    users: int


@dataclass
class WindowResult:
    sent: int
    expected: int
    delivered: int
    delivered_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    target_cpu_cores: float
    target_cpu_us_per_delivery: float
    target_user_us_per_delivery: float
    target_sys_us_per_delivery: float
    loadgen_cpu_cores: float
    other_processes_cores: float
    load_average_1m: float


@dataclass
class FanoutResult:
    target: str
    load: str
    windows: list[WindowResult] = field(default_factory=list)
    connected: int = 0
    rss_before_kib: int = 0
    rss_connected_kib: int = 0
    rss_after_kib: int = 0
    kib_per_client: float = 0.0
    sent_total: int = 0
    delivered_total: int = 0
    expected_total: int = 0
    echoes: int = 0
    unsent: int = 0
    lost_connections: int = 0
    lost_samples: list[str] = field(default_factory=list)
    converged: bool | None = None
    convergence: dict[str, Any] = field(default_factory=dict)
    top_other_processes: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""

    def median(self, name: str) -> float:
        if not self.windows:
            return float("nan")
        return float(statistics.median(getattr(w, name) for w in self.windows))


def doc_names(load: Load) -> list[tuple[int, str]]:
    if load.docs == 1:
        return [(0, "agreement")]
    per_room = -(-load.docs // load.rooms)
    return [(k // per_room, f"doc-{k % per_room}") for k in range(load.docs)]


def start_workers(
    target: Target, load: Load, mode: str, docs: list[tuple[int, str]], per_doc: int
) -> list[Worker]:
    """Client c of document d goes to worker (d * per_doc + c) % workers."""
    plan: list[dict[str, Any]] = [
        {
            "mode": mode,
            "handshake": target.handshake,
            "urls": [],
            "writers": [],
            "full": [],
        }
        for _ in range(load.workers)
    ]
    wid = 0
    full_left = load.full_clients
    for d, doc in enumerate(docs):
        for c in range(per_doc):
            cfg = plan[(d * per_doc + c) % load.workers]
            idx = len(cfg["urls"])
            cfg["urls"].append(target.url(doc, c))
            if mode == "fanout" and c < load.writers_per_doc:
                cfg["writers"].append((idx, wid, d))
                wid += 1
            elif mode == "fanout" and d == 0 and full_left > 0:
                cfg["full"].append(idx)
                full_left -= 1
    return [
        Worker(cfg | {"worker": k}, "bench.doc_loadgen") for k, cfg in enumerate(plan)
    ]


def run_fanout(target: Target, load: Load) -> FanoutResult:
    result = FanoutResult(target.name, load.name)
    docs = doc_names(load)
    pid = target.pid
    if target.handshake:
        uvloop.run(warm_docs(target, docs))
    result.rss_before_kib = settle_rss(pid, quiet=1.0, limit=10)
    workers = spawn(target, load, "fanout", docs, load.per_doc)
    try:
        result.connected = sum(w.read(180)["ready"] for w in workers)
        result.rss_connected_kib = settle_rss(pid, quiet=1.0, limit=15)
        clients = load.docs * load.per_doc
        result.kib_per_client = (
            result.rss_connected_kib - result.rss_before_kib
        ) / clients
        writers = load.docs * load.writers_per_doc
        schedule = window_schedule(
            lead=0.3,
            warmup=load.warmup,
            window=load.window,
            reps=load.reps,
            drain=load.drain,
        )
        schedule["rate_per_writer"] = load.rate / writers
        t0, width = schedule["t0"], schedule["window_ns"]
        for w in workers:
            w.write(schedule)
        spy = None
        if PROFILE is not None and target.name == "server":
            time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
            spy = start_profile(
                pid, PROFILE / f"{load.name}-server.txt", load.reps * load.window
            )
        samples = []
        for k in range(load.reps + 1):
            time.sleep(max(0.0, (t0 + k * width - time.monotonic_ns()) / 1e9))
            samples.append(
                (
                    tree_cpu_times(pid),
                    [cpu_seconds(w.pid) for w in workers],
                    all_cpu(),
                    os.getloadavg()[0],
                )
            )
        reports = [w.read(load.drain + 120) for w in workers]
        if spy is not None:
            spy.wait(60)
        result.rss_after_kib = rss_kib(pid)
    finally:
        for w in workers:
            w.stop()
    ours = {pid, *descendants(pid), os.getpid(), *(w.pid for w in workers)}
    fan = load.per_doc - 1
    for k in range(load.reps):
        result.windows.append(
            window_result(
                [r["windows"][k] for r in reports], samples[k : k + 2], load, fan, ours
            )
        )
    for r in reports:
        result.sent_total += r["sent_total"]
        result.delivered_total += r["deliveries"]
        result.echoes += r["echoes"]
        result.unsent += r["unsent"]
        result.lost_connections += r["lost_count"]
        result.lost_samples += r["lost"]
    result.expected_total = result.sent_total * fan
    others = others_delta(samples[0][2], samples[-1][2], ours)
    top = sorted(others, key=others.__getitem__, reverse=True)[:5]
    result.top_other_processes = [(command_line(i), round(others[i], 2)) for i in top]
    if target.handshake and load.full_clients:
        result.convergence = check_convergence(target, docs[0], reports)
        result.converged = bool(result.convergence.get("converged"))
    else:
        # No document state on the target: convergence = every update delivered
        result.converged = result.delivered_total == result.expected_total
        result.convergence = {"by": "every update delivered to every other client"}
    return result


spawn = start_workers


def descendants(pid: int) -> list[int]:
    """The pids of a process's children, theirs, and so on (/proc/<pid>/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in task.read_text().split()]
            except (OSError, ValueError):
                continue  # exited while we looked
            found.extend(kids)
            todo.extend(kids)
    return found


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process with its child processes (the
    server's document worker does the server's work): the live descendants', and
    the reaped children's (cutime, cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user = (int(fields[11]) + int(fields[13])) / CLK_TCK
    system = (int(fields[12]) + int(fields[14])) / CLK_TCK
    for child in descendants(pid):
        try:
            child_user, child_system = cpu_times(child)
        except (OSError, ValueError, IndexError):
            continue
        user, system = user + child_user, system + child_system
    return user, system


def window_result(windows, edges, load: Load, fan: int, ours: set[int]) -> WindowResult:
    hist: dict[int, int] = {}
    for w in windows:
        for b, n in w["hist"].items():
            hist[int(b)] = hist.get(int(b), 0) + n
    sent = sum(w["sent"] for w in windows)
    received_in = sum(w["received_in"] for w in windows)
    (cpu_a, gen_a, all_a, _), (cpu_b, gen_b, all_b, load1) = edges
    user, system = cpu_b[0] - cpu_a[0], cpu_b[1] - cpu_a[1]
    per = 1e6 / max(received_in, 1)
    return WindowResult(
        sent=sent,
        expected=sent * fan,
        delivered=sum(w["received"] for w in windows),
        delivered_per_s=received_in / load.window,
        p50_ms=percentile_ms(hist, 0.50),
        p95_ms=percentile_ms(hist, 0.95),
        p99_ms=percentile_ms(hist, 0.99),
        max_ms=(max(hist) + 1) * BIN_NS / 1e6 if hist else float("nan"),
        target_cpu_cores=(user + system) / load.window,
        target_cpu_us_per_delivery=(user + system) * per,
        target_user_us_per_delivery=user * per,
        target_sys_us_per_delivery=system * per,
        loadgen_cpu_cores=(sum(gen_b) - sum(gen_a)) / load.window,
        other_processes_cores=sum(others_delta(all_a, all_b, ours).values())
        / load.window,
        load_average_1m=load1,
    )


def check_convergence(
    target: Target, doc: tuple[int, str], reports: list[dict[str, Any]]
) -> dict[str, Any]:
    """Union of the writers' documents vs. every full client's document vs. a fresh
    client synced from the target at the end: equal state, same activities."""
    union = pycrdt.Doc()
    for r in reports:
        for d, u in r["writer_updates"]:
            if d == 0:  # the full clients are on document 0
                union.apply_update(base64.b64decode(u))
    expected = len(union.get("activities", type=pycrdt.Array))
    docs = []
    for r in reports:
        for u in r["full_updates"]:
            d = pycrdt.Doc()
            d.apply_update(base64.b64decode(u))
            docs.append(d)
    fresh, _, _ = uvloop.run(join_once(target.url(doc, 0)))
    docs.append(fresh)

    def same(a: pycrdt.Doc, b: pycrdt.Doc) -> bool:
        return (
            a.get_update(b.get_state()) == b"\x00\x00"
            and b.get_update(a.get_state()) == b"\x00\x00"
        )

    counts = [len(d.get("activities", type=pycrdt.Array)) for d in docs]
    equal = [same(union, d) for d in docs]
    return {
        "converged": all(equal) and all(c == expected for c in counts),
        "writers_union_activities": expected,
        "clients_checked": len(docs),
        "client_activities": counts,
        "client_equal_to_union": equal,
        "last_is_fresh_client": True,
    }


async def warm_docs(target: Target, docs: list[tuple[int, str]]) -> None:
    """Open (sync) and close one socket per document before the clients come, all
    targets alike. Needed by pycrdt-websocket 0.16.5: when many sockets create a
    room at the same moment, some never get their sync step 2."""
    gate = asyncio.Semaphore(32)

    async def one(doc: tuple[int, str]) -> None:
        async with gate:
            await join_once(target.url(doc, 0))

    await asyncio.gather(*(one(d) for d in docs))


# -- joining a long document (scenario 3) ------------------------------------------


async def join_once(url: str) -> tuple[pycrdt.Doc, float, float]:
    """Connect, sync (step 2 applied with pycrdt); returns (doc, seconds, of which
    the client's own decoding and applying of the step 2)."""
    from bench.doc_loadgen import open_bin

    doc = pycrdt.Doc()
    t0 = time.perf_counter()
    sock = await open_bin(url, lambda *a: None, True)
    sock.doc = doc
    await asyncio.wait_for(sock.synced, 60)
    elapsed = time.perf_counter() - t0
    sock.close()
    return doc, elapsed, sock.apply_seconds


async def build_history(url: str, updates: int, rate: int) -> float:
    """One writer sends ``updates`` activity updates at ``rate``/s; seconds taken."""
    from bench.doc_loadgen import Writer, open_bin

    sock = await open_bin(url, lambda *a: None, True)
    await asyncio.wait_for(sock.synced, 60)
    writer = Writer(sock, 999_999)
    t0 = time.monotonic()
    for n in range(updates):
        sock.send_binary(writer.update(time.monotonic_ns()))
        if n % 50 == 49:
            await asyncio.sleep(max(0.0, t0 + (n + 1) / rate - time.monotonic()))
    await asyncio.sleep(0.5)
    if sock.closed.done():
        raise RuntimeError(f"writer closed while building: {sock.closed.result()}")
    sock.close()
    return time.monotonic() - t0


@dataclass
class JoinResult:
    target: str
    history: int
    build_seconds: float = 0.0
    activities_seen: list[int] = field(default_factory=list)
    join_ms: list[float] = field(default_factory=list)
    client_apply_ms: list[float] = field(default_factory=list)
    median_ms: float = float("nan")
    # join minus the client's own decode and apply: connect, admission, the
    # server's step 2 and the transfer
    median_server_ms: float = float("nan")
    median_client_apply_ms: float = float("nan")
    # joins right after an edit (the server's cached step 2 is stale then)
    edited_join_ms: list[float] = field(default_factory=list)
    edited_missing: int = 0  # activities a join after an edit did not see
    median_edited_ms: float = float("nan")
    # joins of the document when it is not loaded (ours only)
    cold_join_ms: list[float] = field(default_factory=list)
    cold_missing: int = 0
    median_cold_ms: float = float("nan")
    p95_ms: float = float("nan")
    max_ms: float = float("nan")
    rss_kib: int = 0
    load_average_1m: float = 0.0
    error: str = ""


def run_join(
    target: Target, history: int, joins: int, rate: int, cold_joins: int = 0
) -> JoinResult:
    result = JoinResult(target.name, history)
    url = target.url((0, "agreement"), 0)

    async def go() -> None:
        result.build_seconds = await build_history(url, history, rate)
        # wait until a fresh client sees the whole history (stored + loaded)
        deadline = time.monotonic() + 120
        while True:
            doc, _, _ = await join_once(url)
            n = len(doc.get("activities", type=pycrdt.Array))
            del doc
            if n >= history or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        # keep one client connected so the document stays loaded (warm joins)
        from bench.doc_loadgen import open_bin

        holder = await open_bin(target.url((0, "agreement"), 1), lambda *a: None, True)
        await asyncio.wait_for(holder.synced, 60)
        for _ in range(joins):
            doc, seconds, applying = await join_once(url)
            result.join_ms.append(seconds * 1e3)
            result.client_apply_ms.append(applying * 1e3)
            result.activities_seen.append(len(doc.get("activities", type=pycrdt.Array)))
            # Each join is a fresh client: the previous one's 20,000-activity
            # document is gone before the next connects, as it would be in
            # another process (holding it made the next apply page-fault in
            # fresh memory: 45-55 ms instead of 27 for the same bytes).
            del doc
            await asyncio.sleep(0.05)
        # Then joins that each follow one edit, so no server can answer from
        # what it sent the previous joiner.
        from bench.doc_loadgen import Writer

        writer = Writer(holder, 1)
        for k in range(1, joins // 3 + 1):
            holder.send_binary(writer.update(time.monotonic_ns()))
            await asyncio.sleep(0.05)
            doc, seconds, _ = await join_once(url)
            result.edited_join_ms.append(seconds * 1e3)
            seen = len(doc.get("activities", type=pycrdt.Array))
            result.edited_missing += max(0, history + k - seen)
            del doc
            await asyncio.sleep(0.05)
        holder.close()
        # Cold joins (ours only: the references keep documents in memory alone,
        # and y-websocket's drops one when its last client leaves): nobody is
        # connected for longer than the idle unload, so each join loads the
        # document from storage.
        for _ in range(cold_joins):
            await asyncio.sleep(2.5)
            doc, seconds, _ = await join_once(url)
            result.cold_join_ms.append(seconds * 1e3)
            result.cold_missing += max(
                0, history + joins // 3 - len(doc.get("activities", type=pycrdt.Array))
            )
            del doc

    uvloop.run(go())
    ms = sorted(result.join_ms)
    result.median_ms = statistics.median(ms)
    result.p95_ms = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
    result.max_ms = ms[-1]
    result.median_server_ms = statistics.median(
        j - a for j, a in zip(result.join_ms, result.client_apply_ms, strict=True)
    )
    result.median_client_apply_ms = statistics.median(result.client_apply_ms)
    result.median_edited_ms = statistics.median(result.edited_join_ms)
    if result.cold_join_ms:
        result.median_cold_ms = statistics.median(result.cold_join_ms)
    result.rss_kib = rss_kib(target.pid)
    result.load_average_1m = os.getloadavg()[0]
    return result


# -- idle document sockets (scenario 4) ----------------------------------------------


@dataclass
class IdleResult:
    target: str
    connections: int
    docs: int
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    kib_per_connection: float = 0.0
    connect_seconds: float = 0.0
    # the target's CPU while they connected (upgrade, admission, sync), per socket
    connect_cpu_ms_per_connection: float = float("nan")
    lost_connections: int = 0
    error: str = ""


def run_idle(target: Target, load: Load) -> IdleResult:
    docs = doc_names(load)
    result = IdleResult(target.name, load.docs * load.per_doc, load.docs)
    # warm: one socket per document opened and closed
    w0 = start_workers(target, Load(**{**asdict(load), "workers": 1}), "idle", docs, 1)
    try:
        w0[0].read(120)
        w0[0].write({"close": True})
        w0[0].read(60)
    finally:
        w0[0].stop()
    result.rss_before_kib = settle_rss(target.pid)
    t0 = time.monotonic()
    cpu0 = sum(tree_cpu_times(target.pid))
    workers = start_workers(target, load, "idle", docs, load.per_doc)
    try:
        ready = sum(w.read(300)["ready"] for w in workers)
        result.connect_seconds = time.monotonic() - t0
        result.connect_cpu_ms_per_connection = (
            (sum(tree_cpu_times(target.pid)) - cpu0) / result.connections * 1e3
        )
        assert ready == result.connections, f"{ready} of {result.connections}"
        result.rss_after_kib = settle_rss(target.pid)
        for w in workers:
            w.write({"close": True})
        result.lost_connections = sum(w.read(60)["lost_count"] for w in workers)
    finally:
        for w in workers:
            w.stop()
    result.kib_per_connection = (
        result.rss_after_kib - result.rss_before_kib
    ) / result.connections
    return result


# -- main ----------------------------------------------------------------------------


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"


def cold_missing(r: dict[str, Any]) -> str:
    return f" ({r.get('cold_missing')})" if r.get("cold_join_ms") else ""


def tables(out: dict[str, Any]) -> str:
    lines = []
    goals = out["goals"]
    for key, title in (("s1", "Scenario 1"), ("s2", "Scenario 2")):
        res = out.get(key, {})
        if not res:
            continue
        lines.append(f"\n{title}: {out['loads'][key]['desc']}\n")
        names = list(res)
        lines.append(
            "| metric (median of windows) | " + " | ".join(names) + " | goal |"
        )
        lines.append("|---|" + "---|" * (len(names) + 1))
        rows = [
            ("delivered/s", "delivered_per_s", 0),
            ("latency p50 ms", "p50_ms", 2),
            ("latency p95 ms", "p95_ms", 2),
            ("latency p99 ms", "p99_ms", 2),
            ("latency max ms", "max_ms", 1),
            ("target CPU cores", "target_cpu_cores", 2),
            ("target CPU µs/delivery", "target_cpu_us_per_delivery", 2),
            ("load generator CPU cores", "loadgen_cpu_cores", 2),
            ("other processes cores", "other_processes_cores", 2),
            ("load average 1 min", "load_average_1m", 2),
        ]
        for label, attr, digits in rows:
            cells = [
                fmt(res[n]["medians"].get(attr, float("nan")), digits) for n in names
            ]
            lines.append(
                f"| {label} | " + " | ".join(cells) + f" | {goals[key].get(attr, '')} |"
            )
        for label, attr in (
            ("delivered/expected (all)", "delivery"),
            ("converged", "converged"),
            ("RSS connected MiB", "rss_mib"),
            ("memory KiB/client", "kib_per_client"),
            ("lost connections", "lost_connections"),
        ):
            cells = [str(res[n].get(attr, "")) for n in names]
            lines.append(
                f"| {label} | " + " | ".join(cells) + f" | {goals[key].get(attr, '')} |"
            )
    if out.get("s3"):
        lines.append(f"\nScenario 3: {out['loads']['s3']['desc']}\n")
        lines.append(
            "| target | history | join median ms | p95 ms | max ms "
            "| of which client apply ms | the rest ms | activities seen "
            "| join after an edit, median ms (missed activities) "
            "| cold join, median ms (missed) | goal |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for n, r in out["s3"].items():
            lines.append(
                f"| {n} | {r.get('history', '')} | {fmt(r.get('median_ms', float('nan')))} | "
                f"{fmt(r.get('p95_ms', float('nan')))} | {fmt(r.get('max_ms', float('nan')))} | "
                f"{fmt(r.get('median_client_apply_ms', float('nan')))} | "
                f"{fmt(r.get('median_server_ms', float('nan')))} | "
                f"{sorted(set(r.get('activities_seen', [])))} | "
                f"{fmt(r.get('median_edited_ms', float('nan')))} "
                f"({r.get('edited_missing', '')}) | "
                f"{fmt(r.get('median_cold_ms', float('nan')))}"
                f"{cold_missing(r)} "
                f"| {goals['s3']} |"
            )
    if out.get("s4"):
        lines.append(f"\nScenario 4: {out['loads']['s4']['desc']}\n")
        lines.append(
            "| target | connections | KiB/connection | connect s "
            "| target CPU ms per connect | lost | goal |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for n, r in out["s4"].items():
            lines.append(
                f"| {n} | {r.get('connections', '')} | {fmt(r.get('kib_per_connection', float('nan')), 1)} | "
                f"{fmt(r.get('connect_seconds', float('nan')), 1)} | "
                f"{fmt(r.get('connect_cpu_ms_per_connection', float('nan')), 2)} | "
                f"{r.get('lost_connections', '')} | {goals['s4']} |"
            )
    return "\n".join(lines)


def summarize(r: FanoutResult) -> dict[str, Any]:
    attrs = [f for f in WindowResult.__dataclass_fields__]
    return {
        **asdict(r),
        "medians": {a: r.median(a) for a in attrs},
        "delivery": f"{r.delivered_total}/{r.expected_total}",
        "rss_mib": round(r.rss_connected_kib / 1024, 1),
        "kib_per_client": round(r.kib_per_client, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--scenarios", default="1,2,3,4")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--server-setting", action="append", default=[], metavar="NAME=VALUE"
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=2.0,
        help="seconds after the last send before receipts are counted and "
        "convergence is checked (scenarios 1-2)",
    )
    parser.add_argument(
        "--tag", default="", help="suffix of the result file name (-TAG.json)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy (raw stacks) of the server over the measured "
        "windows of scenarios 1 and 2; perturbs the figures",
    )
    args = parser.parse_args()
    global PROFILE
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        PROFILE = args.profile
    raise_nofile()
    q = args.quick
    extra = dict(s.split("=", 1) for s in args.server_setting)
    wanted = args.targets.split(",")
    broken = ensure_references(wanted)
    scen = set(args.scenarios.split(","))
    s1 = Load(
        "s1",
        docs=1,
        per_doc=50,
        writers_per_doc=10,
        rate=1000,
        warmup=2 if q else 3,
        window=4 if q else 8,
        reps=3 if q else 5,
        drain=args.drain,
        workers=args.workers,
        full_clients=2,
        rooms=1,
        users=10,
    )
    s2 = Load(
        "s2",
        docs=500,
        per_doc=4,
        writers_per_doc=1,
        rate=250,
        warmup=2 if q else 3,
        window=4 if q else 8,
        reps=3 if q else 5,
        drain=args.drain,
        workers=args.workers,
        full_clients=1,
        rooms=10,
        users=4,
    )
    s4 = Load(
        "s4",
        docs=50,
        per_doc=100,
        writers_per_doc=0,
        rate=0,
        warmup=0,
        window=1,
        reps=0,
        drain=0,
        workers=args.workers,
        full_clients=0,
        rooms=10,
        users=10,
    )
    history, joins = (20_000, 10 if q else 30)
    out: dict[str, Any] = {
        "command": " ".join([".venv/bin/python -m bench.doc_fanout", *sys.argv[1:]]),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_state(),
        "references": {
            "yws": "@y/websocket-server "
            + json.loads((REFS / "package.json").read_text())["dependencies"][
                "@y/websocket-server"
            ],
            "pycrdt": "pycrdt-websocket " + pkg_version("pycrdt-websocket"),
            "relay": "bench/doc_relay.py (websockets "
            + pkg_version("websockets")
            + ")",
        },
        "broken_references": broken,
        "server_settings_extra": extra,
        "loads": {
            "s1": asdict(s1)
            | {"desc": "1 document, 50 clients, 10 writers, 1,000 updates/s"},
            "s2": asdict(s2)
            | {"desc": "500 documents x 4 clients (1 writer each), 250 updates/s"},
            "s3": {
                "history": history,
                "joins": joins,
                "desc": f"fresh client joining a document of {history:,} updates (warm: document loaded; ours also cold)",
            },
            "s4": asdict(s4)
            | {"desc": "5,000 idle document sockets over 50 documents"},
        },
        "goals": {
            "s1": {
                "p99_ms": "≤ 25",
                "delivery": "all",
                "converged": "yes",
                "target_cpu_us_per_delivery": "≤ 1.3x relay",
            },
            "s2": {"p99_ms": "≤ 5", "kib_per_client": "≤ 20"},
            "s3": "median ≤ 50 ms",
            "s4": "≤ 16 KiB",
        },
        "s1": {},
        "s2": {},
        "s3": {},
        "s4": {},
    }
    for name in [t for t in wanted if t not in broken]:
        for key, load in (("s1", s1), ("s2", s2)):
            if key[1] not in scen:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {key} {name}", flush=True)
            with make_target(name, extra) as target:
                try:
                    target.prepare(load.users, load.rooms)
                    out[key][name] = summarize(run_fanout(target, load))
                except Exception as exc:  # noqa: BLE001 - recorded, run goes on
                    alive = target.proc is not None and target.proc.poll() is None
                    out[key][name] = {
                        "error": repr(exc),
                        "target_alive": alive,
                        "target_log_tail": target.log_tail(),
                        "medians": {},
                    }
                    print(f"  failed: {exc!r} (target alive: {alive})", flush=True)
                    print(target.log_tail(), flush=True)
        if "3" in scen and name != "relay":
            print(f"[{time.strftime('%H:%M:%S')}] s3 {name}", flush=True)
            # Ours unloads an idle document after 1 s here, for the cold joins.
            cold = {"doc_idle_unload": "1"} if name == "server" else {}
            with make_target(name, {**extra, **cold}) as target:
                try:
                    target.prepare(2, 1)
                    out["s3"][name] = asdict(
                        run_join(
                            target, history, joins, 2000, joins // 4 if cold else 0
                        )
                    )
                except Exception as exc:  # noqa: BLE001
                    out["s3"][name] = {"error": repr(exc)}
                    print(f"  failed: {exc!r}", flush=True)
        if "4" in scen:
            print(f"[{time.strftime('%H:%M:%S')}] s4 {name}", flush=True)
            with make_target(name, extra) as target:
                try:
                    target.prepare(s4.users, s4.rooms)
                    out["s4"][name] = asdict(run_idle(target, s4))
                except Exception as exc:  # noqa: BLE001
                    out["s4"][name] = {"error": repr(exc)}
                    print(f"  failed: {exc!r}", flush=True)
    out["load_average_at_end"] = os.getloadavg()
    s1r = out["s1"]
    if (
        "server" in s1r
        and "relay" in s1r
        and s1r["server"]["medians"]
        and s1r["relay"]["medians"]
    ):
        for ref in ("relay", "yws", "pycrdt"):
            if ref in s1r and s1r[ref].get("medians"):
                out.setdefault("ratios", {})[f"s1 server/{ref} CPU per delivery"] = (
                    s1r["server"]["medians"]["target_cpu_us_per_delivery"]
                    / s1r[ref]["medians"]["target_cpu_us_per_delivery"]
                )
    table = tables(out)
    out["table"] = table
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.date.today().isoformat()
    tag = ("-quick" if q else "") + (f"-{args.tag}" if args.tag else "")
    path = RESULTS / f"{stamp}-doc_fanout{tag}.json"
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(table)
    print("ratios:", json.dumps(out.get("ratios", {}), indent=1))
    print("written", path.relative_to(ROOT))


def pkg_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
