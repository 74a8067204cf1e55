"""Several processes: cross-process delivery latency, throughput of one room spread
over two processes, Redis commands per delivered message.

    .venv/bin/python -m bench.cross_process            # full run, about 8 minutes
    .venv/bin/python -m bench.cross_process --quick    # smoke run, about 3 minutes

Deployments, one after the other in the same invocation (``--deployments``):

* ``two``: two ``server.py serve`` processes (two ports) sharing one PostgreSQL
  database and one Redis, as README "Production: several processes";
* ``one``: one such process, same PostgreSQL + Redis configuration (the baseline);
* ``sqlite``: one process with the embedded defaults (SQLite, in-process broker),
  for context.

On each: chat latency (one room, members split evenly over the processes, senders
on every process, ``--rate`` messages/s in all) and document latency (one
document, clients split the same way, ``--doc-rate`` y-websocket updates/s).
Every receipt is sorted by the sender's process (the marker carries it, see
``bench/cross_loadgen.py``): *same* process or *cross* process. On ``two`` and
``one``: a throughput ramp, the chat rate raised step by step until delivery falls
behind. Redis ``INFO commandstats`` is read at every window edge.

Results: ``bench/results/<date>-cross_process[-quick].json`` and tables on stdout.
See bench/README.md, "Several processes: cross-process delivery".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pycrdt
import redis
import uvloop

from bench.chat_fanout import (
    Worker,
    add_report_counts,
    all_cpu,
    chat_metrics,
    command_line,
    cpu_seconds,
    git_state,
    machine,
    others_delta,
    percentile_ms,
    window_schedule,
)
from bench.doc_fanout import descendants, tree_cpu_times
from bench.loadgen import BIN_NS
from bench.world import (
    Rooms,
    Server,
    create_rooms,
    free_port,
    raise_nofile,
    stop_process,
    wait_for_port,
)

RESULTS = Path(__file__).resolve().parent / "results"
POSTGRES_ADMIN_URL = os.environ.get(
    "BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
KINDS = ("chat", "doc")
DEPLOYMENTS = {  # name: (processes, PostgreSQL + Redis?)
    "two": (2, True),
    "one": (1, True),
    "sqlite": (1, False),
}
LABELS = {
    "two": "two processes (PostgreSQL + Redis)",
    "one": "one process (PostgreSQL + Redis)",
    "sqlite": "one process (SQLite + in-process broker)",
}
# Limits out of the way of the load (rate limits, connection caps, queues);
# everything else is the server's default.
SERVER_SETTINGS = {
    "messages_per_second": "100000",
    "message_burst": "100000",
    "max_connections_per_user": "100000",
    "doc_updates_per_second": "100000",
    "doc_update_burst": "100000",
    "doc_write_queue_updates": "100000",
    "doc_send_queue_frames": "100000",
    "max_doc_connections_per_user": "100000",
}


# -- services ------------------------------------------------------------------------


class RedisService:
    """A private ``redis-server`` on a free port (default: ``INFO commandstats``
    then counts this benchmark's commands only), or a shared one by URL."""

    def __init__(self, url: str | None) -> None:
        self.shared_url = url
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self.url = url or ""
        self.pid = 0
        self.client: redis.Redis | None = None

    def __enter__(self) -> RedisService:
        if self.shared_url is None:
            port = free_port()
            self.dir = Path(tempfile.mkdtemp(prefix="coilroom-bench-redis-"))
            self.proc = subprocess.Popen(
                [
                    shutil.which("redis-server") or "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for_port(port, self.proc)
            self.url = f"redis://127.0.0.1:{port}/0"
        self.client = redis.Redis.from_url(self.url, socket_timeout=10)
        self.pid = int(self.client.info("server")["process_id"])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.proc is not None:
            stop_process(self.proc)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def commandstats(self) -> dict[str, int]:
        """Calls per command since Redis started (our own INFO calls left out)."""
        assert self.client is not None
        stats = self.client.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(v["calls"])
            for name, v in stats.items()
            if name != "cmdstat_info"
        }

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (a shared Redis after a run)."""
        assert self.client is not None
        keys = list(self.client.scan_iter(match=f"{prefix}*", count=1000))
        return int(self.client.delete(*keys)) if keys else 0


def postgres(statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=30)
        try:
            await conn.execute(statement, timeout=60)
        finally:
            await conn.close()

    asyncio.run(run())


class Deployment:
    """``processes`` servers on one database (a fresh PostgreSQL database and a
    Redis prefix of their own, or SQLite), accounts and ``rooms`` rooms."""

    def __init__(
        self,
        name: str,
        redis_service: RedisService | None,
        users: int,
        rooms: int,
    ) -> None:
        self.name = name
        processes, shared = DEPLOYMENTS[name]
        self.processes = processes
        self.shared = shared
        self.redis = redis_service if shared else None
        self.users, self.room_count = users, rooms
        self.db_name = f"coilroom_bench_{os.getpid()}_{name}"
        self.prefix = f"coilroom-bench-{os.getpid()}-{name}:"
        self.servers: list[Server] = []
        self.rooms: Rooms | None = None
        self._stack = contextlib.ExitStack()

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers if s.proc is not None]

    def children(self) -> list[int]:
        """The servers' child processes (the document worker): server CPU too."""
        return [kid for pid in self.pids for kid in descendants(pid)]

    def __enter__(self) -> Deployment:
        try:
            settings = dict(SERVER_SETTINGS)
            if self.shared:
                assert self.redis is not None
                postgres(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
                postgres(f'CREATE DATABASE "{self.db_name}"')
                self._stack.callback(
                    postgres, f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'
                )
                self._stack.callback(self.redis.delete_prefix, self.prefix)
                base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
                settings |= {
                    "database_url": base.replace(
                        "postgresql://", "postgresql+asyncpg://"
                    )
                    + f"/{self.db_name}",
                    "redis_url": self.redis.url,
                    "redis_prefix": self.prefix,
                    "secret_key": secrets.token_hex(32),
                }
            for i in range(self.processes):
                # One after the other: the first creates the schema and the admin.
                server = Server(settings, create_admin=i == 0)
                self.servers.append(self._stack.enter_context(server))
            self.rooms = asyncio.run(
                create_rooms(self.servers[0], users=self.users, rooms=self.room_count)
            )
        except BaseException:
            for server in self.servers:
                print(server.log_tail(), file=sys.stderr)
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def url(self, kind: str, process: int, room: int, i: int) -> str:
        """Member ``i``'s socket URL on ``process``, in room number ``room``."""
        assert self.rooms is not None
        room_id = self.rooms.room_ids[room]
        tokens = self.rooms.tokens[room_id]
        port = self.servers[process].port
        path = f"rooms/{room_id}" if kind == "chat" else f"docs/{room_id}/agreement"
        return f"ws://127.0.0.1:{port}/ws/{path}?token={tokens[i % len(tokens)]}"

    def log_problems(self) -> list[str]:
        lines = []
        for k, server in enumerate(self.servers):
            lines += [
                f"[{k}] {line}"
                for line in server.log_tail(100_000).splitlines()
                if " WARNING " in line or " ERROR " in line
            ]
        return lines[-20:]


# -- one measured run ----------------------------------------------------------------


@dataclass
class Timing:
    warmup: float
    window: float
    reps: int
    drain: float


@dataclass
class WindowResult:
    """One window; *same*/*cross* = receiver on the sender's process or another."""

    sent: int
    expected_same: int
    expected_cross: int
    delivered_same: int  # receipts (after the drain) of what was sent in the window
    delivered_cross: int
    delivered_per_s: float  # receipts during the window
    p50_same_ms: float
    p99_same_ms: float
    max_same_ms: float
    p50_cross_ms: float
    p99_cross_ms: float
    max_cross_ms: float
    p50_ms: float  # both classes together
    p99_ms: float
    server_cpu_cores: list[float]  # per process
    server_cpu_us_per_delivery: list[float]  # per process: its CPU / its receipts
    server_cpu_us_per_delivery_all: float  # all servers' CPU / all receipts
    redis_cpu_cores: float
    postgres_cpu_cores: float
    loadgen_cpu_cores: float
    other_processes_cores: float
    redis_calls: dict[str, int]
    redis_publish_per_message: float
    redis_commands_per_message: float
    redis_publish_per_delivery: float
    redis_commands_per_delivery: float
    load_average_1m: float

    @property
    def expected(self) -> int:
        return self.expected_same + self.expected_cross

    @property
    def delivered(self) -> int:
        return self.delivered_same + self.delivered_cross


@dataclass
class RunResult:
    deployment: str
    kind: str
    rate: int
    members: int
    senders: int
    members_per_process: list[int]
    windows: list[WindowResult] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    lost_connections: int = 0
    lost_samples: list[str] = field(default_factory=list)
    unsent: int = 0
    echoes: int = 0
    convergence: dict[str, Any] = field(default_factory=dict)
    top_other_processes: list[tuple[str, float]] = field(default_factory=list)
    # per process, this run only: chat messages stored, transactions, means
    server_metrics: list[dict[str, float]] = field(default_factory=list)
    kept_up: bool = False  # see judge()
    settle: dict[str, float] = field(default_factory=dict)  # see settle()

    def median(self, name: str, index: int | None = None) -> float:
        values = [getattr(w, name) for w in self.windows]
        if index is not None:
            values = [v[index] for v in values]
        values = [v for v in values if not math.isnan(v)]
        return float(statistics.median(values)) if values else float("nan")

    def totals(self, cls: str = "") -> tuple[int, int]:
        """(delivered, expected) over every window, for ``same``, ``cross`` or both."""
        d = sum(
            getattr(w, f"delivered_{cls}") if cls else w.delivered for w in self.windows
        )
        e = sum(
            getattr(w, f"expected_{cls}") if cls else w.expected for w in self.windows
        )
        return d, e

    def judge(self) -> bool:
        """Everything delivered, p99 of every window ≤ 1 s, nothing refused or lost."""
        d, e = self.totals()
        worst = max((w.p99_ms for w in self.windows), default=math.inf)
        return (
            d == e
            and e > 0
            and worst <= 1000
            and not self.errors
            and not self.lost_connections
            and not self.unsent
        )


def plan_workers(
    dep: Deployment, kind: str, room: int, members: int, senders: int, workers: int
) -> tuple[list[dict[str, Any]], list[int]]:
    """Member i is on process i % P (senders are the first ``senders`` members, so
    split evenly too); each worker holds members of one process (its ``home``)."""
    procs = dep.processes
    assert workers >= procs
    assert workers % procs == 0
    configs: list[dict[str, Any]] = [
        {
            "kind": kind,
            "home": w % procs,
            "worker": w,
            "urls": [],
            "senders": [],
            "pad": 60,
        }
        for w in range(workers)
    ]
    on_process = [0] * procs
    for i in range(members):
        home = i % procs
        on_process[home] += 1
        cfg = configs[home + procs * ((i // procs) % (workers // procs))]
        if i < senders:
            cfg["senders"].append(len(cfg["urls"]))
        cfg["urls"].append(dep.url(kind, home, room, i))
    return configs, on_process


def merge_hist(windows: list[dict[str, Any]]) -> dict[int, int]:
    hist: dict[int, int] = {}
    for w in windows:
        for b, n in w["hist"].items():
            hist[int(b)] = hist.get(int(b), 0) + n
    return hist


def max_ms(hist: dict[int, int]) -> float:
    return (max(hist) + 1) * BIN_NS / 1e6 if hist else float("nan")


def measure(
    dep: Deployment,
    kind: str,
    room: int,
    rate: int,
    members: int,
    senders: int,
    timing: Timing,
    workers: int = 2,
) -> RunResult:
    """``rate`` chat messages or document updates per second from ``senders`` of
    ``members`` sockets spread over the deployment's processes."""
    configs, on_process = plan_workers(dep, kind, room, members, senders, workers)
    result = RunResult(dep.name, kind, rate, members, senders, on_process)
    result.settle = settle(dep)
    metrics_before = [chat_metrics(s.base_url) for s in dep.servers]
    procs = [Worker(cfg, "bench.cross_loadgen") for cfg in configs]
    pids = dep.pids
    try:
        ready = sum(w.read(180)["ready"] for w in procs)
        assert ready == members, f"{ready} of {members} connected"
        time.sleep(0.5)  # presence traffic of the joins settles
        schedule = window_schedule(
            lead=0.3,
            warmup=timing.warmup,
            window=timing.window,
            reps=timing.reps,
            drain=timing.drain,
        )
        schedule["rate_per_sender"] = rate / senders
        t0, width = schedule["t0"], schedule["window_ns"]
        for w in procs:
            w.write(schedule)
        edges = []
        for k in range(timing.reps + 1):
            time.sleep(max(0.0, (t0 + k * width - time.monotonic_ns()) / 1e9))
            edges.append(
                {
                    # with their child processes (the document worker)
                    "servers": [tree_cpu_times(pid) for pid in pids],
                    "workers": [cpu_seconds(w.pid) for w in procs],
                    "all": all_cpu(),
                    "redis": dep.redis.commandstats() if dep.redis else {},
                    "load": os.getloadavg()[0],
                }
            )
        reports = [w.read(timing.drain + 120) for w in procs]
    finally:
        for w in procs:
            w.stop()
    ours = {*pids, *dep.children(), os.getpid(), *(w.pid for w in procs)}
    add_report_counts(result, reports)
    result.echoes += sum(r["echoes"] for r in reports)
    for k in range(timing.reps):
        result.windows.append(
            window_result(
                dep, kind, configs, reports, on_process, edges, k, timing, ours
            )
        )
    others = others_delta(edges[0]["all"], edges[-1]["all"], ours)
    top = sorted(others, key=others.__getitem__, reverse=True)[:5]
    result.top_other_processes = [(command_line(i), round(others[i], 2)) for i in top]
    if kind == "chat":
        result.server_metrics = [
            run_metrics(before, chat_metrics(s.base_url))
            for before, s in zip(metrics_before, dep.servers, strict=True)
        ]
    else:
        result.convergence = check_documents(dep, room, configs, reports)
    result.kept_up = result.judge()
    return result


class Quiet:
    """How long ``settle`` may wait: per run, and in all (set by ``main``)."""

    per_run = 30.0
    budget = 150.0


def settle(dep: Deployment, quiet_cores: float = 0.2) -> dict[str, float]:
    """Before a run: wait until the servers and PostgreSQL are idle (the previous
    run's background work, e.g. a document's compaction, done: under 0.1 core
    together over a second) and other processes take under ``quiet_cores``
    (the machine is shared), at most ``Quiet.per_run`` seconds and ``Quiet.budget``
    over the whole invocation. Returns what the last second looked like."""
    start = time.monotonic()
    ours = {*dep.pids, *dep.children(), os.getpid()}
    while True:
        a, trees_a = all_cpu(), [sum(tree_cpu_times(pid)) for pid in dep.pids]
        time.sleep(1.0)
        b, trees_b = all_cpu(), [sum(tree_cpu_times(pid)) for pid in dep.pids]
        servers = sum(trees_b) - sum(trees_a)
        _, pg, rest = split_others(dep, others_delta(a, b, ours))
        waited = time.monotonic() - start
        quiet = servers + pg < 0.1 and rest < quiet_cores
        if quiet or waited >= min(Quiet.per_run, Quiet.budget):
            Quiet.budget = max(0.0, Quiet.budget - waited)
            return {
                "waited_s": round(waited, 1),
                "quiet": quiet,
                "servers_and_postgres_cores": round(servers + pg, 3),
                "other_processes_cores": round(rest, 3),
            }


def run_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``chat_metrics`` of one run from two readings (they count since start)."""
    messages = after["messages"] - before["messages"]
    commits = after["transactions"] - before["transactions"]
    return {
        "messages": messages,
        "transactions": commits,
        "mean_receive_to_commit_ms": (
            after["mean_receive_to_commit_ms"] * after["messages"]
            - before["mean_receive_to_commit_ms"] * before["messages"]
        )
        / max(messages, 1.0),
        "mean_messages_per_transaction": messages / max(commits, 1.0),
    }


def split_others(
    dep: Deployment, others: dict[int, float]
) -> tuple[float, float, float]:
    """(Redis, PostgreSQL, everything else) CPU seconds among other processes:
    PostgreSQL = its background processes and the backends of our database."""
    redis_cpu = pg = rest = 0.0
    for pid, cpu in others.items():
        if dep.redis is not None and pid == dep.redis.pid:
            redis_cpu += cpu
            continue
        line = command_line(pid)
        if "postgres" in line and (dep.db_name in line or "(" not in line):
            pg += cpu
        else:
            rest += cpu
    return redis_cpu, pg, rest


def window_result(
    dep: Deployment,
    kind: str,
    configs: list[dict[str, Any]],
    reports: list[dict[str, Any]],
    on_process: list[int],
    edges: list[dict[str, Any]],
    k: int,
    timing: Timing,
    ours: set[int],
) -> WindowResult:
    members = sum(on_process)
    own = 0 if kind == "chat" else 1  # a document writer does not get its own update
    expected = [0, 0]
    receipts = [0] * dep.processes  # during the window, by the receiver's process
    for cfg, r in zip(configs, reports, strict=True):
        home, sent = cfg["home"], r["sent"][k]
        expected[0] += sent * (on_process[home] - own)
        expected[1] += sent * (members - on_process[home])
        receipts[home] += r["same"][k]["received_in"] + r["cross"][k]["received_in"]
    same = merge_hist([r["same"][k] for r in reports])
    cross = merge_hist([r["cross"][k] for r in reports])
    both = merge_hist([{"hist": same}, {"hist": cross}])
    a, b = edges[k], edges[k + 1]
    cpu = [
        (ub + sb) - (ua + sa)
        for (ua, sa), (ub, sb) in zip(a["servers"], b["servers"], strict=True)
    ]
    redis_cpu, pg_cpu, rest = split_others(dep, others_delta(a["all"], b["all"], ours))
    calls = {
        name: n - a["redis"].get(name, 0)
        for name, n in b["redis"].items()
        if n - a["redis"].get(name, 0)
    }
    sent = sum(r["sent"][k] for r in reports)
    total = sum(receipts)
    publish, commands = calls.get("publish", 0), sum(calls.values())
    return WindowResult(
        sent=sent,
        expected_same=expected[0],
        expected_cross=expected[1],
        delivered_same=sum(r["same"][k]["received"] for r in reports),
        delivered_cross=sum(r["cross"][k]["received"] for r in reports),
        delivered_per_s=total / timing.window,
        p50_same_ms=percentile_ms(same, 0.50),
        p99_same_ms=percentile_ms(same, 0.99),
        max_same_ms=max_ms(same),
        p50_cross_ms=percentile_ms(cross, 0.50),
        p99_cross_ms=percentile_ms(cross, 0.99),
        max_cross_ms=max_ms(cross),
        p50_ms=percentile_ms(both, 0.50),
        p99_ms=percentile_ms(both, 0.99),
        server_cpu_cores=[c / timing.window for c in cpu],
        server_cpu_us_per_delivery=[
            c * 1e6 / max(n, 1) for c, n in zip(cpu, receipts, strict=True)
        ],
        server_cpu_us_per_delivery_all=sum(cpu) * 1e6 / max(total, 1),
        redis_cpu_cores=redis_cpu / timing.window,
        postgres_cpu_cores=pg_cpu / timing.window,
        loadgen_cpu_cores=(sum(b["workers"]) - sum(a["workers"])) / timing.window,
        other_processes_cores=rest / timing.window,
        redis_calls=calls,
        redis_publish_per_message=publish / max(sent, 1) if dep.redis else math.nan,
        redis_commands_per_message=commands / max(sent, 1) if dep.redis else math.nan,
        redis_publish_per_delivery=publish / max(total, 1) if dep.redis else math.nan,
        redis_commands_per_delivery=commands / max(total, 1) if dep.redis else math.nan,
        load_average_1m=b["load"],
    )


def check_documents(
    dep: Deployment,
    room: int,
    configs: list[dict[str, Any]],
    reports: list[dict[str, Any]],
) -> dict[str, Any]:
    """A fresh client on every process, after the drain: does each hold one
    activity per update sent (the writers' updates, warm-up and drain included)?"""
    from bench.doc_fanout import join_once

    sent = sum(r["sent_total"] for r in reports)
    seen = []
    for p in range(dep.processes):
        doc, _, _ = uvloop.run(join_once(dep.url("doc", p, room, 0)))
        seen.append(len(doc.get("activities", type=pycrdt.Array)))
    return {
        "converged": all(n == sent for n in seen),
        "updates_sent": sent,
        "activities_per_process": seen,
    }


# -- the parts -----------------------------------------------------------------------


@dataclass
class Params:
    members: int
    senders: int
    rate: int
    doc_clients: int
    doc_writers: int
    doc_rate: int
    latency: Timing
    ramp: Timing
    ramp_start: int
    ramp_factor: float
    ramp_steps: int
    users: int
    workers: int


def run_deployment(
    name: str, redis_service: RedisService | None, p: Params, parts: set[str]
) -> dict[str, Any]:
    """Chat latency, the chat ramp (``two`` and ``one`` only), document latency;
    each run after ``settle``."""
    ramp = "ramp" in parts and name in ("two", "one")
    retries = 2  # a ramp step behind while others took > 0.2 core runs again
    rooms = 2 + (p.ramp_steps + retries if ramp else 0)
    out: dict[str, Any] = {"deployment": name, "label": LABELS[name]}
    t = time.monotonic()
    with Deployment(name, redis_service, p.users, rooms) as dep:
        out["setup_seconds"] = round(time.monotonic() - t, 1)
        print(f"{name}: up in {out['setup_seconds']} s", flush=True)
        if "chat" in parts:
            out["chat"] = measure(
                dep, "chat", 0, p.rate, p.members, p.senders, p.latency, p.workers
            )
            print(f"{name}: chat {brief(out['chat'])}", flush=True)
        if ramp:
            out["ramp"] = []
            rate, step, room = float(p.ramp_start), 0, 2
            while step < p.ramp_steps:
                r = measure(
                    dep,
                    "chat",
                    room,
                    int(rate),
                    p.members,
                    p.senders,
                    p.ramp,
                    p.workers,
                )
                room += 1
                out["ramp"].append(r)
                print(
                    f"{name}: ramp {int(rate)}/s {'ok' if r.kept_up else 'BEHIND'} "
                    f"{brief(r)}",
                    flush=True,
                )
                if r.kept_up:
                    step += 1
                    rate *= p.ramp_factor
                elif retries and r.median("other_processes_cores") > 0.2:
                    retries -= 1  # maybe the others' fault: the same rate once more
                else:
                    break
        if "doc" in parts:  # last: its compaction is not in a chat run
            out["doc"] = measure(
                dep,
                "doc",
                1,
                p.doc_rate,
                p.doc_clients,
                p.doc_writers,
                p.latency,
                p.workers,
            )
            print(f"{name}: doc {brief(out['doc'])}", flush=True)
        out["log_problems"] = dep.log_problems()
    return out


def brief(r: RunResult) -> str:
    d, e = r.totals()
    return (
        f"delivered {d}/{e}, p50 same {r.median('p50_same_ms'):.2f} cross "
        f"{r.median('p50_cross_ms'):.2f} ms, p99 same {r.median('p99_same_ms'):.2f} "
        f"cross {r.median('p99_cross_ms'):.2f} ms, server CPU "
        f"{r.median('server_cpu_us_per_delivery_all'):.2f} µs/delivery, redis "
        f"{r.median('redis_commands_per_message'):.2f} cmd/msg, errors {r.errors}, "
        f"lost {r.lost_connections}, loadgen {r.median('loadgen_cpu_cores'):.2f} cores"
    )


# -- report --------------------------------------------------------------------------


def fmt(v: float, spec: str = ".2f") -> str:
    return "—" if v is None or math.isnan(v) else f"{v:{spec}}"


def ratio(a: float, b: float) -> str:
    if any(math.isnan(x) for x in (a, b)) or not b:
        return ""
    return f"{a / b:.2f}x"


def latency_table(kind: str, runs: dict[str, RunResult]) -> str:
    """Two processes (same / cross), one process and the ratio, SQLite for context."""
    two, one, lite = runs.get("two"), runs.get("one"), runs.get("sqlite")
    nan = float("nan")

    def m(r: RunResult | None, name: str, index: int | None = None) -> float:
        return r.median(name, index) if r else nan

    def pct(r: RunResult | None, cls: str = "") -> str:
        if r is None:
            return ""
        d, e = r.totals(cls)
        return f"{d:,}/{e:,} ({d / e:.2%})" if e else "—"

    lines = [
        f"| {kind} (median of windows) | two: same process | two: cross process "
        "| one process | cross/one | SQLite + memory |",
        "|---|---:|---:|---:|---:|---:|",
        f"| delivered/expected (all windows) | {pct(two, 'same')} | {pct(two, 'cross')} "
        f"| {pct(one)} | | {pct(lite)} |",
    ]
    for label, q in (("p50", "p50"), ("p99", "p99"), ("max", "max")):
        s, c, o = (
            m(two, f"{q}_same_ms"),
            m(two, f"{q}_cross_ms"),
            m(one, f"{q}_same_ms"),
        )
        lines.append(
            f"| latency {label}, ms | {fmt(s)} | {fmt(c)} | {fmt(o)} | {ratio(c, o)} "
            f"| {fmt(m(lite, f'{q}_same_ms'))} |"
        )

    def row(label: str, name: str, spec: str = ".2f") -> str:
        t, o = m(two, name), m(one, name)
        return (
            f"| {label} | {fmt(t, spec)} (both) | | {fmt(o, spec)} | {ratio(t, o)} "
            f"| {fmt(m(lite, name), spec)} |"
        )

    per = ""
    if two:
        per = " / ".join(fmt(m(two, "server_cpu_us_per_delivery", i)) for i in range(2))
    lines += [
        row("delivered/s", "delivered_per_s", ",.0f"),
        row(
            "server CPU per delivery, µs (all servers)",
            "server_cpu_us_per_delivery_all",
        ),
        f"| server CPU per delivery by process, µs | {per} | | "
        f"{fmt(m(one, 'server_cpu_us_per_delivery', 0))} | | "
        f"{fmt(m(lite, 'server_cpu_us_per_delivery', 0))} |",
        "| server CPU by process, cores | "
        + (
            " / ".join(fmt(m(two, "server_cpu_cores", i)) for i in range(2))
            if two
            else ""
        )
        + f" | | {fmt(m(one, 'server_cpu_cores', 0))} | | "
        f"{fmt(m(lite, 'server_cpu_cores', 0))} |",
        row("Redis PUBLISH per message", "redis_publish_per_message"),
        row("Redis commands per message", "redis_commands_per_message"),
        row("Redis PUBLISH per delivery", "redis_publish_per_delivery", ".4f"),
        row("Redis commands per delivery", "redis_commands_per_delivery", ".4f"),
        row("Redis CPU, cores", "redis_cpu_cores"),
        row("PostgreSQL CPU, cores", "postgres_cpu_cores"),
        row("load generator CPU, cores", "loadgen_cpu_cores"),
        row("other processes, cores", "other_processes_cores"),
    ]

    def faults(r: RunResult | None) -> str:
        return f"{r.errors} / {r.lost_connections} / {r.unsent}" if r else ""

    lines.append(
        f"| error frames / lost sockets / unsent | {faults(two)} | | {faults(one)} "
        f"| | {faults(lite)} |"
    )
    if kind == "chat":

        def per_commit(r: RunResult | None) -> str:
            if r is None:
                return ""
            msgs = sum(m["messages"] for m in r.server_metrics)
            commits = sum(m["transactions"] for m in r.server_metrics)
            return f"{msgs / max(commits, 1):.1f}"

        lines.append(
            f"| messages per commit (server's metrics) | {per_commit(two)} | "
            f"| {per_commit(one)} | | {per_commit(lite)} |"
        )
    else:

        def converged(r: RunResult | None) -> str:
            if r is None:
                return ""
            c = r.convergence
            seen = "/".join(str(n) for n in c.get("activities_per_process", []))
            return f"{'yes' if c.get('converged') else 'NO'} ({seen} of {c.get('updates_sent')})"

        lines.append(
            f"| converged: a fresh client per process | {converged(two)} | "
            f"| {converged(one)} | | {converged(lite)} |"
        )
    return "\n".join(lines)


def ramp_table(ramps: dict[str, list[RunResult]]) -> str:
    lines = [
        "| deployment | rate msg/s | deliveries/s | delivered/expected | p99 ms (worst window) "
        "| server CPU cores | Redis cores | PostgreSQL cores | load gen cores "
        "| other processes cores | kept up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, steps in ramps.items():
        for r in steps:
            d, e = r.totals()
            worst = max((w.p99_ms for w in r.windows), default=math.nan)
            cores = sum(
                r.median("server_cpu_cores", i)
                for i in range(len(r.members_per_process))
            )
            lines.append(
                f"| {name} | {r.rate:,} | {r.median('delivered_per_s'):,.0f} "
                f"| {d / max(e, 1):.2%} | {fmt(worst, '.1f')} | {cores:.2f} "
                f"| {r.median('redis_cpu_cores'):.2f} | {r.median('postgres_cpu_cores'):.2f} "
                f"| {r.median('loadgen_cpu_cores'):.2f} "
                f"| {r.median('other_processes_cores'):.2f} | {'yes' if r.kept_up else 'no'} |"
            )
    return "\n".join(lines)


def sustained(steps: list[RunResult]) -> int:
    ok = [r.rate for r in steps if r.kept_up]
    return max(ok) if ok else 0


def render(results: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """The Markdown tables and the summary ratios (two processes over one)."""
    summary: dict[str, Any] = {}
    tables = []
    for kind in KINDS:
        runs = {n: r[kind] for n, r in results.items() if kind in r}
        if runs:
            tables.append(latency_table(kind, runs))
        two, one = runs.get("two"), runs.get("one")
        if two and one:
            summary[kind] = {
                "p50_cross_over_one": two.median("p50_cross_ms")
                / one.median("p50_same_ms"),
                "p99_cross_over_one": two.median("p99_cross_ms")
                / one.median("p99_same_ms"),
                "p50_same_over_one": two.median("p50_same_ms")
                / one.median("p50_same_ms"),
                "p99_same_over_one": two.median("p99_same_ms")
                / one.median("p99_same_ms"),
                "cpu_per_delivery_two_over_one": two.median(
                    "server_cpu_us_per_delivery_all"
                )
                / one.median("server_cpu_us_per_delivery_all"),
            }
    ramps = {n: r["ramp"] for n, r in results.items() if "ramp" in r}
    if ramps:
        tables.append(ramp_table(ramps))
        summary["sustained_messages_per_s"] = {
            n: sustained(s) for n, s in ramps.items()
        }
    return tables, summary


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """A results JSON's runs back as ``RunResult`` (to print its tables again)."""

    def run(d: dict[str, Any]) -> RunResult:
        windows = [WindowResult(**w) for w in d.pop("windows")]
        return RunResult(**d, windows=windows)

    out: dict[str, dict[str, Any]] = {}
    for name, parts in json.loads(path.read_text())["results"].items():
        out[name] = dict(parts)
        for kind in KINDS:
            if kind in parts:
                out[name][kind] = run(dict(parts[kind]))
        if "ramp" in parts:
            out[name]["ramp"] = [run(dict(r)) for r in parts["ramp"]]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Cross-process delivery benchmark (bench/README.md)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run, ~3 minutes")
    parser.add_argument("--members", type=int, default=20, help="chat room members")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--rate", type=int, default=1000, help="chat messages/s")
    parser.add_argument("--doc-clients", type=int, default=20)
    parser.add_argument("--doc-writers", type=int, default=4)
    parser.add_argument("--doc-rate", type=int, default=1000, help="updates/s")
    parser.add_argument("--window", type=float, help="seconds (5; quick 2)")
    parser.add_argument("--reps", type=int, help="windows (5; quick 3)")
    parser.add_argument("--ramp-start", type=int, default=1000, help="messages/s")
    parser.add_argument("--ramp-factor", type=float, help="(1.5; quick 2)")
    parser.add_argument("--ramp-steps", type=int, help="at most (8; quick 4)")
    parser.add_argument("--workers", type=int, default=2, help="load generators")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument(
        "--deployments",
        default="two,one,sqlite",
        help="of two, one, sqlite (comma-separated)",
    )
    parser.add_argument(
        "--parts", default="chat,doc,ramp", help="of chat, doc, ramp (comma-separated)"
    )
    parser.add_argument(
        "--redis-url",
        help="use this Redis (INFO commandstats then counts everyone's commands); "
        "default: a private redis-server on a free port",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds a run may wait for an idle machine (30; quick 10), "
        "at most 5x that in all",
    )
    parser.add_argument("--tag", help="suffix of the results file name")
    parser.add_argument(
        "--table", type=Path, help="print the tables of this results JSON and stop"
    )
    parser.add_argument(
        "--out", type=Path, help="results JSON (default bench/results/)"
    )
    args = parser.parse_args()
    if args.table:
        tables, summary = render(load_results(args.table))
        print("\n\n".join(tables))
        print(json.dumps(summary, indent=2))
        return 0
    q = args.quick
    p = Params(
        members=args.members,
        senders=args.senders,
        rate=args.rate,
        doc_clients=args.doc_clients,
        doc_writers=args.doc_writers,
        doc_rate=args.doc_rate,
        latency=Timing(
            warmup=2.0 if q else 3.0,
            window=args.window or (2.0 if q else 5.0),
            reps=args.reps or (3 if q else 5),
            drain=3.0,
        ),
        ramp=Timing(warmup=2.0, window=2.0 if q else 3.0, reps=2, drain=3.0),
        ramp_start=args.ramp_start,
        ramp_factor=args.ramp_factor or (2.0 if q else 1.5),
        ramp_steps=args.ramp_steps or (4 if q else 8),
        users=args.users,
        workers=args.workers,
    )
    Quiet.per_run = (
        args.quiet_wait if args.quiet_wait is not None else 10.0 if q else 30.0
    )
    Quiet.budget = 5 * Quiet.per_run
    names = [n.strip() for n in args.deployments.split(",") if n.strip()]
    parts = {n.strip() for n in args.parts.split(",") if n.strip()}
    assert set(names) <= set(DEPLOYMENTS), names
    raise_nofile()
    started = dt.datetime.now(dt.UTC)
    info = machine()
    info["uptime_at_start"] = subprocess.run(
        ["uptime"], capture_output=True, text=True, check=False
    ).stdout.strip()
    results: dict[str, dict[str, Any]] = {}
    with RedisService(args.redis_url) as redis_service:
        for name in names:
            results[name] = run_deployment(name, redis_service, p, parts)
    info["load_average_at_end"] = os.getloadavg()
    elapsed = (dt.datetime.now(dt.UTC) - started).total_seconds()
    tables, summary = render(results)
    report = {
        "started": started.isoformat(),
        "elapsed_seconds": round(elapsed),
        "command": " ".join([".venv/bin/python -m bench.cross_process", *sys.argv[1:]]),
        "quick": q,
        "params": asdict(p),
        "server_settings": SERVER_SETTINGS,
        "redis": args.redis_url or "private redis-server",
        "machine": info,
        "git": git_state(),
        "summary": summary,
        "results": {
            n: {
                k: (
                    asdict(v)
                    if isinstance(v, RunResult)
                    else [asdict(x) for x in v]
                    if k == "ramp"
                    else v
                )
                for k, v in r.items()
            }
            for n, r in results.items()
        },
    }
    print()
    for t in tables:
        print(t + "\n")
    print(json.dumps(summary, indent=2))
    tag = f"-{args.tag}" if args.tag else ""
    out = args.out or RESULTS / (
        f"{started:%Y-%m-%d}-cross_process{'-quick' if q else ''}{tag}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
