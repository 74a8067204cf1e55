"""Chat fan-out benchmark: the real server against a bare relay, plus idle memory.

    .venv/bin/python -m bench.chat_fanout            # full scenario (~3 minutes)
    .venv/bin/python -m bench.chat_fanout --quick    # short smoke run (~1 minute)

Scenario 1 (fan-out), run twice in the same invocation on the same load:
the bare ``websockets`` relay (``bench/relay.py``), then the real server
(``server.py serve``, SQLite, authentication and persistence on). One room,
``--members`` connections, ``--senders`` of them sending ``--rate`` chat
messages/s together; every member (senders included) receives every message.
After a warm-up, ``--reps`` windows of ``--window`` seconds are measured; figures
are medians over the windows.

Scenario 2 (idle memory): ``--idle`` room connections held open on a fresh
server; memory per connection = (RSS after - RSS before) / connections.

Results go to ``bench/results/<date>-chat_fanout.json`` and stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import BIN_NS
from bench.world import (
    ROOT,
    Relay,
    Rooms,
    Server,
    create_rooms,
    raise_nofile,
    socket_urls,
)

RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- /proc sampling ------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads), /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (all its threads)."""
    return sum(cpu_times(pid))


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB


def all_cpu() -> dict[int, float]:
    """user+system CPU seconds of every process on the machine, by pid."""
    cpu = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cpu[int(entry.name)] = cpu_seconds(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
    return cpu


def others_delta(
    before: dict[int, float], after: dict[int, float], ours: set[int]
) -> dict[int, float]:
    """CPU used between two ``all_cpu`` snapshots by processes not in ``ours``
    (new pids count in full; processes that exited in between are missed)."""
    return {
        pid: cpu - before.get(pid, 0.0)
        for pid, cpu in after.items()
        if pid not in ours and cpu > before.get(pid, 0.0)
    }


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:80]


# (target user+sys CPU, each worker's CPU, every process's CPU) at a window edge
Sample = tuple[tuple[float, float], list[float], dict[int, float]]


# -- load generator workers ----------------------------------------------------------


class Worker:
    """A load generator child process (``bench.loadgen`` unless told) and its line
    protocol."""

    def __init__(self, config: dict[str, Any], module: str = "bench.loadgen") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=raise_nofile,
        )
        self._buf = b""
        self.write(config)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line, waiting at most ``timeout`` seconds."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"load generator {self.pid} silent for {timeout} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise RuntimeError(
                    f"load generator {self.pid} exited ({self.proc.wait()})"
                )
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def write(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_workers(
    urls: list[str], workers: int, config: dict[str, Any], senders: int = 0
) -> list[Worker]:
    """Split ``urls`` round-robin over ``workers``; the first ``senders`` URLs send."""
    procs = []
    for w in range(workers):
        mine = list(range(w, len(urls), workers))
        procs.append(
            Worker(
                config
                | {
                    "worker": w,
                    "urls": [urls[i] for i in mine],
                    "senders": [k for k, i in enumerate(mine) if i < senders],
                }
            )
        )
    return procs


# -- scenario 1: fan-out -------------------------------------------------------------


@dataclass
class Params:
    """Scenario size and timing (see ``main`` for the defaults)."""

    members: int
    senders: int
    rate: int
    warmup: float
    window: float
    reps: int
    drain: float
    workers: int
    pad: int
    users: int
    idle: int
    idle_rooms: int
    idle_users: int


@dataclass
class WindowResult:
    """One measured window of one target."""

    sent: int
    expected: int
    delivered: int  # receipts of the messages sent in the window
    received_in_window: int
    delivered_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    target_cpu_s: float
    target_cpu_cores: float
    target_cpu_us_per_delivery: float
    target_user_us_per_delivery: float
    target_sys_us_per_delivery: float
    loadgen_cpu_cores: float
    other_processes_cores: float  # everything but the target and load generator


@dataclass
class FanoutResult:
    """All windows of one target, plus anything that went wrong."""

    target: str
    windows: list[WindowResult] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    lost_connections: int = 0
    lost_samples: list[str] = field(default_factory=list)
    unsent: int = 0  # due on a sender connection the target had already closed
    top_other_processes: list[tuple[str, float]] = field(default_factory=list)
    server_metrics: dict[str, float] = field(default_factory=dict)
    log_warnings: list[str] = field(default_factory=list)

    def median(self, name: str) -> float:
        return float(statistics.median(getattr(w, name) for w in self.windows))


def add_report_counts(result: Any, reports: list[dict[str, Any]]) -> None:
    """Add the load generators' error, lost-connection and unsent counts (and
    samples) to a result that has those fields."""
    for r in reports:
        result.errors += r["errors"]
        result.error_samples += r["error_samples"]
        result.lost_connections += r["lost_count"]
        result.lost_samples += r["lost"]
        result.unsent += r["unsent"]


def window_schedule(
    *, lead: float, warmup: float, window: float, reps: int, drain: float
) -> dict[str, Any]:
    """When the load generators send and count, in ``time.monotonic_ns()`` (the same
    clock in every process): sending starts ``lead`` s from now, windows of
    ``window`` s start after ``warmup`` s, receipts are counted ``drain`` s more."""
    width = int(window * 1e9)
    send_start = time.monotonic_ns() + int(lead * 1e9)
    t0 = send_start + int(warmup * 1e9)
    send_stop = t0 + reps * width
    return {
        "send_start": send_start,
        "t0": t0,
        "window_ns": width,
        "windows": reps,
        "send_stop": send_stop,
        "drain_until": send_stop + int(drain * 1e9),
    }


def percentile_ms(hist: dict[int, int], q: float) -> float:
    total = sum(hist.values())
    if not total:
        return float("nan")
    rank, seen = q * total, 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return (b + 0.5) * BIN_NS / 1e6
    return float("nan")


def run_fanout(
    target: str,
    pid: int,
    urls: list[str],
    p: Params,
    welcome: bool,
    profile: Path | None = None,
) -> FanoutResult:
    """Drive the fan-out load at the process ``pid`` through ``urls``; with
    ``profile``, py-spy samples ``pid`` over the measured windows (perturbs them)."""
    config = {"mode": "fanout", "welcome": welcome, "pad": p.pad}
    workers = start_workers(urls, p.workers, config, senders=p.senders)
    try:
        ready = sum(w.read(120)["ready"] for w in workers)
        assert ready == len(urls), f"{ready} of {len(urls)} connected"
        time.sleep(0.5)  # let presence traffic settle
        schedule = window_schedule(
            lead=0.2, warmup=p.warmup, window=p.window, reps=p.reps, drain=p.drain
        )
        schedule["rate_per_sender"] = p.rate / p.senders
        t0, width = schedule["t0"], schedule["window_ns"]
        for w in workers:
            w.write(schedule)
        if profile is not None:
            time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
            spy = start_profile(pid, profile, p.reps * p.window)
        samples: list[Sample] = []
        for k in range(p.reps + 1):
            time.sleep(max(0.0, (t0 + k * width - time.monotonic_ns()) / 1e9))
            samples.append(
                (
                    cpu_times(pid),
                    [cpu_seconds(w.pid) for w in workers],
                    all_cpu(),
                )
            )
        reports = [w.read(p.drain + 60) for w in workers]
        if profile is not None:
            spy.wait(60)
    finally:
        for w in workers:
            w.stop()
    result = FanoutResult(target)
    add_report_counts(result, reports)
    ours = {pid, os.getpid(), *(w.pid for w in workers)}
    result.windows = [
        window_result(
            [r["windows"][k] for r in reports], samples[k : k + 2], p, len(urls), ours
        )
        for k in range(p.reps)
    ]
    others = others_delta(samples[0][2], samples[-1][2], ours)
    top = sorted(others, key=others.__getitem__, reverse=True)[:5]
    result.top_other_processes = [(command_line(i), round(others[i], 2)) for i in top]
    return result


def window_result(
    windows: list[dict[str, Any]],
    edges: list[Sample],
    p: Params,
    members: int,
    ours: set[int],
) -> WindowResult:
    """Merge the workers' counters of one window with the CPU samples at its edges."""
    hist: dict[int, int] = {}
    for w in windows:
        for b, n in w["hist"].items():
            hist[int(b)] = hist.get(int(b), 0) + n
    sent = sum(w["sent"] for w in windows)
    received_in = sum(w["received_in"] for w in windows)
    (cpu_a, gen_a, all_a), (cpu_b, gen_b, all_b) = edges
    user, system = cpu_b[0] - cpu_a[0], cpu_b[1] - cpu_a[1]
    target_cpu, loadgen_cpu = user + system, sum(gen_b) - sum(gen_a)
    per_delivery = 1e6 / max(received_in, 1)
    return WindowResult(
        sent=sent,
        expected=sent * members,
        delivered=sum(w["received"] for w in windows),
        received_in_window=received_in,
        delivered_per_s=received_in / p.window,
        p50_ms=percentile_ms(hist, 0.50),
        p99_ms=percentile_ms(hist, 0.99),
        max_ms=(max(hist) + 1) * BIN_NS / 1e6 if hist else float("nan"),
        target_cpu_s=target_cpu,
        target_cpu_cores=target_cpu / p.window,
        target_cpu_us_per_delivery=target_cpu * per_delivery,
        target_user_us_per_delivery=user * per_delivery,
        target_sys_us_per_delivery=system * per_delivery,
        loadgen_cpu_cores=loadgen_cpu / p.window,
        other_processes_cores=sum(others_delta(all_a, all_b, ours).values()) / p.window,
    )


def start_profile(pid: int, path: Path, seconds: float) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` for ``seconds`` (flame graph if ``.svg``, else
    collapsed stacks); py-spy must be installed in the virtualenv."""
    fmt = "flamegraph" if path.suffix == ".svg" else "raw"
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            fmt,
            "--output",
            str(path),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def fanout_relay(p: Params, profile: Path | None = None) -> FanoutResult:
    with Relay() as relay:
        assert relay.proc is not None
        urls = [relay.url] * p.members
        return run_fanout(
            "relay", relay.proc.pid, urls, p, welcome=False, profile=profile
        )


# Extra server settings from --server-setting NAME=VALUE (to compare variants).
EXTRA_SETTINGS: dict[str, str] = {}


def server_settings(max_connections_per_user: int) -> dict[str, str]:
    return {
        "messages_per_second": "1000",
        "message_burst": "1000",
        "max_connections_per_user": str(max_connections_per_user),
        **EXTRA_SETTINGS,
    }


def fanout_server(p: Params, profile: Path | None = None) -> FanoutResult:
    per_user = -(-p.members // p.users)
    with Server(server_settings(max(per_user, 10))) as server:
        assert server.proc is not None
        rooms = asyncio.run(create_rooms(server, users=p.users, rooms=1))
        urls = socket_urls(server, rooms, p.members)
        try:
            result = run_fanout(
                "server", server.proc.pid, urls, p, welcome=True, profile=profile
            )
        except Exception:
            print(server.log_tail(), file=sys.stderr)
            raise
        result.server_metrics = chat_metrics(server.base_url)
        result.log_warnings = [
            line
            for line in server.log_tail(100_000).splitlines()
            if " WARNING " in line or " ERROR " in line or " closed: " in line
        ][-20:]
        return result


def chat_metrics(base_url: str) -> dict[str, float]:
    """Means of the server's own chat histograms over the whole run (warm-up too):
    receive-to-commit time and messages per transaction, from ``/metrics``."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(
            ("coilroom_chat_commit_seconds_", "coilroom_chat_batch_size_")
        ):
            values[name] = float(value)
    commits = values.get("coilroom_chat_batch_size_count", 0.0)
    messages = values.get("coilroom_chat_commit_seconds_count", 0.0)
    return {
        "messages": messages,
        "transactions": commits,
        "mean_receive_to_commit_ms": 1e3
        * values.get("coilroom_chat_commit_seconds_sum", 0.0)
        / max(messages, 1.0),
        "mean_messages_per_transaction": values.get("coilroom_chat_batch_size_sum", 0.0)
        / max(commits, 1.0),
    }


# -- scenario 2: idle memory ---------------------------------------------------------


@dataclass
class IdleResult:
    """Memory and connect cost of idle connections held open on one target."""

    target: str
    connections: int
    rooms: int
    rss_before_kib: int
    rss_after_kib: int
    kib_per_connection: float
    connect_seconds: float
    cpu_s_connecting: float
    lost_connections: int


def settle_rss(pid: int, quiet: float = 2.0, limit: float = 30.0) -> int:
    """RSS once it has not changed by more than 1% for ``quiet`` seconds."""
    deadline, last, since = time.monotonic() + limit, rss_kib(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss_kib(pid)
        if abs(now - last) > last // 100:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return rss_kib(pid)


def hold_idle(
    target: str,
    pid: int,
    urls: list[str],
    warm_urls: list[str],
    p: Params,
    welcome: bool,
    profile: Path | None = None,
) -> IdleResult:
    """Open ``urls`` (after opening and closing ``warm_urls`` once), measure RSS."""
    config = {"mode": "idle", "welcome": welcome}
    warm = start_workers(warm_urls, 1, config)
    try:
        warm[0].read(120)
        warm[0].write({"close": True})
        warm[0].read(60)
    finally:
        warm[0].stop()
    before = settle_rss(pid)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    workers = start_workers(urls, p.workers, config)
    spy = start_profile(pid, profile, 600) if profile else None
    try:
        ready = sum(w.read(300)["ready"] for w in workers)
        connect_s = time.monotonic() - t0
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it has
            spy.wait(60)
        assert ready == len(urls), f"{ready} of {len(urls)} connected"
        after = settle_rss(pid)
        cpu1 = cpu_seconds(pid)
        for w in workers:
            w.write({"close": True})
        lost = sum(w.read(60)["lost_count"] for w in workers)
    finally:
        for w in workers:
            w.stop()
    return IdleResult(
        target=target,
        connections=len(urls),
        rooms=len(warm_urls),
        rss_before_kib=before,
        rss_after_kib=after,
        kib_per_connection=(after - before) / len(urls),
        connect_seconds=connect_s,
        cpu_s_connecting=cpu1 - cpu0,
        lost_connections=lost,
    )


def idle_server(p: Params, profile: Path | None = None) -> IdleResult:
    """``--idle`` sockets spread evenly over ``--idle-rooms`` rooms of a fresh server."""
    per_room = -(-p.idle // p.idle_rooms)
    with Server(server_settings(p.idle)) as server:
        assert server.proc is not None
        rooms: Rooms = asyncio.run(
            create_rooms(server, users=p.idle_users, rooms=p.idle_rooms)
        )
        urls = socket_urls(server, rooms, per_room)[: p.idle]
        warm = socket_urls(server, rooms, 1)
        return hold_idle("server", server.proc.pid, urls, warm, p, True, profile)


def idle_uvicorn_floor(p: Params) -> IdleResult:
    """The same idle sockets on the smallest ASGI app under uvicorn (bench/uvicorn_floor.py)."""
    with Relay("bench.uvicorn_floor") as floor:
        assert floor.proc is not None
        return hold_idle(
            "uvicorn floor", floor.proc.pid, [floor.url] * p.idle, [floor.url], p, False
        )


def idle_relay(p: Params) -> IdleResult:
    """The same number of idle sockets on the bare relay (the library's own cost)."""
    with Relay() as relay:
        assert relay.proc is not None
        return hold_idle(
            "relay", relay.proc.pid, [relay.url] * p.idle, [relay.url], p, False
        )


# -- report --------------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit measured and how many files differed from it (shared tree)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.rstrip("\n")

    changed = [
        line[3:] for line in git("status", "--porcelain").splitlines() if line[3:]
    ]
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted_files": changed}


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(
            os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1
        ),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def fanout_table(server: FanoutResult, relay: FanoutResult) -> str:
    """The fan-out results as a Markdown table (medians over the windows)."""

    def row(
        label: str, name: str, fmt: str, goal: str = "", ratio: bool = False
    ) -> str:
        s, r = server.median(name), relay.median(name)
        q = f"{s / r:.2f}x" if ratio and r else ""
        return f"| {label} | {s:{fmt}} | {r:{fmt}} | {q} | {goal} |"

    def ratio_delivered(res: FanoutResult) -> str:
        d = sum(w.delivered for w in res.windows)
        e = sum(w.expected for w in res.windows)
        return f"{d}/{e} ({d / max(e, 1):.4%})"

    lines = [
        "| metric (median of windows) | server | relay | server/relay | goal |",
        "|---|---|---|---|---|",
        row("delivered/s", "delivered_per_s", ",.0f"),
        f"| delivered/expected (all windows) | {ratio_delivered(server)} "
        f"| {ratio_delivered(relay)} | | all |",
        row("latency p50, ms", "p50_ms", ".2f", ratio=True),
        row("latency p99, ms", "p99_ms", ".2f", "server ≤ 25 ms", ratio=True),
        row("latency max, ms", "max_ms", ".1f"),
        row(
            "target CPU per delivery, µs",
            "target_cpu_us_per_delivery",
            ".2f",
            "≤ 1.5x relay",
            ratio=True,
        ),
        row("  of which user, µs", "target_user_us_per_delivery", ".2f", ratio=True),
        row("  of which system, µs", "target_sys_us_per_delivery", ".2f", ratio=True),
        row("target CPU, cores", "target_cpu_cores", ".2f"),
        row("load generator CPU, cores", "loadgen_cpu_cores", ".2f"),
        row("other processes, cores", "other_processes_cores", ".2f"),
    ]
    return "\n".join(lines)


def idle_table(idle: list[IdleResult]) -> str:
    """The idle-memory results as a Markdown table."""
    lines = [
        "| idle connections | target | RSS before | RSS after | per connection "
        "| connect CPU | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in idle:
        before, after = i.rss_before_kib / 1024, i.rss_after_kib / 1024
        goal = "≤ 16 KiB" if i.target == "server" else ""
        lines.append(
            f"| {i.connections} in {i.rooms} rooms | {i.target} | {before:.1f} MiB "
            f"| {after:.1f} MiB | {i.kib_per_connection:.1f} KiB "
            f"| {i.cpu_s_connecting:.1f} s | {goal} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Chat fan-out benchmark (bench/README.md)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="short run: 3 windows of 2 s"
    )
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--rate", type=int, default=500, help="messages/s, all senders")
    parser.add_argument(
        "--window", type=float, default=None, help="seconds (10; quick 2)"
    )
    parser.add_argument("--reps", type=int, default=None, help="windows (5; quick 3)")
    parser.add_argument(
        "--workers", type=int, default=2, help="load generator processes"
    )
    parser.add_argument(
        "--users", type=int, default=20, help="accounts for the members"
    )
    parser.add_argument(
        "--idle", type=int, default=5000, help="idle connections (0: skip)"
    )
    parser.add_argument("--idle-rooms", type=int, default=50)
    parser.add_argument(
        "--only", choices=["server", "relay", "idle"], help="one part only"
    )
    parser.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting for this run, e.g. chat_linger=0.01 (repeatable)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the server into this folder (perturbs the figures)",
    )
    parser.add_argument(
        "--out", type=Path, help="results JSON (default bench/results/)"
    )
    args = parser.parse_args()
    p = Params(
        members=args.members,
        senders=args.senders,
        rate=args.rate,
        warmup=2.0 if args.quick else 5.0,
        window=args.window or (2.0 if args.quick else 10.0),
        reps=args.reps or (3 if args.quick else 5),
        drain=3.0,
        workers=args.workers,
        pad=64,
        users=args.users,
        idle=(1000 if args.quick else args.idle) if args.idle else 0,
        idle_rooms=10 if args.quick else args.idle_rooms,
        idle_users=10,
    )
    raise_nofile()
    for item in args.server_setting:
        name, _, value = item.partition("=")
        EXTRA_SETTINGS[name.strip().lower()] = value.strip()
    started = dt.datetime.now(dt.UTC)
    info = machine()
    prof = args.profile
    if prof:
        prof.mkdir(parents=True, exist_ok=True)
    relay = (
        fanout_relay(p, prof / "relay-fanout.svg" if prof else None)
        if args.only in (None, "relay")
        else None
    )
    server = (
        fanout_server(p, prof / "server-fanout.txt" if prof else None)
        if args.only in (None, "server")
        else None
    )
    idle = []
    if p.idle and args.only in (None, "idle"):
        idle.append(idle_server(p, prof / "server-connect.svg" if prof else None))
        idle.append(idle_uvicorn_floor(p))
        idle.append(idle_relay(p))
    info["load_average_at_end"] = os.getloadavg()
    report: dict[str, Any] = {
        "started": started.isoformat(),
        "quick": args.quick,
        "profiled": bool(prof),
        "server_settings": dict(EXTRA_SETTINGS),
        "params": asdict(p),
        "machine": info,
        "git": git_state(),
        "relay": asdict(relay) if relay else None,
        "server": asdict(server) if server else None,
        "idle": [asdict(i) for i in idle],
    }
    if relay and server:
        report["summary"] = {
            "cpu_ratio_server_to_relay": server.median("target_cpu_us_per_delivery")
            / relay.median("target_cpu_us_per_delivery"),
            "server_p99_ms": server.median("p99_ms"),
            "relay_p99_ms": relay.median("p99_ms"),
        }
        print(fanout_table(server, relay) + "\n")
    if idle:
        print(idle_table(idle) + "\n")
    out = args.out or RESULTS / (
        f"{started:%Y-%m-%d}-chat_fanout{'-quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for res in (relay, server):
        if res and (res.errors or res.lost_connections):
            print(
                f"{res.target}: {res.errors} error frames {res.error_samples[:2]}, "
                f"{res.lost_connections} lost connections {res.lost_samples[:2]}"
            )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
