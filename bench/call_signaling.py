"""Call signaling benchmark: relay latency and CPU per signal, and join → data channel.

    .venv/bin/python -m bench.call_signaling            # full run, about 1 minute
    .venv/bin/python -m bench.call_signaling --quick    # smoke run, about 20 s

Part 1 (``--part 1``), relay: ``--calls`` calls of ``--peers`` peers (32 room
sockets over 8 rooms by default), every peer negotiating with every other of its
call with Chromium-sized offers and answers (``bench/call_sdp.py``) and trickled
ICE candidates, paced below the server's default signal limits. The same load
runs, one after the other, against the minimal relay (``bench/call_relay.py``)
and the real server (``server.py serve`` via ``bench/world.py``, default
settings). Measured: offer sent → offer received at the target (and the same for
answers and candidates), and user+system CPU of the target process per relayed
signal, medians over windows.

Part 2 (``--part 2``), join → connected data channel for aiortc peers
(``bench/call_connect.py``): through the server, and the same peers exchanging
their SDP directly in-process (the floor), alternating, for a pair and a 4-peer
mesh.

Results go to ``bench/results/<date>-call_signaling.json`` (``--quick``:
``...-call_signaling-quick.json``) and stdout; bench/README.md explains them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import uvloop

from bench.call_sdp import ChromiumPeer, sent_ns_of_candidate, sent_ns_of_sdp
from bench.chat_fanout import (
    RESULTS,
    all_cpu,
    command_line,
    cpu_times,
    git_state,
    machine,
    others_delta,
)
from bench.echo_cost import machine_busy
from bench.world import Relay, Rooms, Server, create_rooms, raise_nofile, socket_urls
from bench.wsclient import LeanSocket, open_socket

# The pairs of a 4-peer call in an order where consecutive negotiations involve
# different peers; the offering side alternates every round.
PAIRS = ((0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2))
KINDS = ("offer", "answer", "candidate")


@dataclass
class Params:
    calls: int
    peers: int
    rate: float  # negotiations per second per call
    warmup: float
    window: float
    windows: int
    drain: float
    idle: float


@dataclass
class Window:
    """One measured window of one target (latencies attributed by send time,
    counts of relayed signals by arrival time)."""

    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    arrived: int = 0  # every signal (end-of-candidates too) received in the window
    latency_ns: dict[str, list[int]] = field(
        default_factory=lambda: {k: [] for k in KINDS}
    )
    target_cpu_s: float = 0.0  # schedstat, exact
    target_user_s: float = 0.0
    target_sys_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    machine_busy_s: float = 0.0


@dataclass
class RelayResult:
    target: str
    windows: list[Window]
    idle_cores: float
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    lost_connections: list[str] = field(default_factory=list)
    top_other_processes: list[tuple[str, float]] = field(default_factory=list)
    server_signals_counted: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    batched_frames: int = 0


def cpu_ns(pid: int) -> int:
    """CPU time of a process, ns: the sum of its threads' ``schedstat`` run time
    (exact, unlike the 10 ms ticks of ``/proc/<pid>/stat``; threads that exited
    in between are missed)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):
            continue
    return total


def quantile_ms(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


class Load:
    """The peers of every call, their sockets, and what they measure."""

    def __init__(self, p: Params, t0: int) -> None:
        self.p = p
        self.t0 = t0
        self.width = int(p.window * 1e9)
        self.windows = [Window() for _ in range(p.windows)]
        self.errors = 0
        self.error_samples: list[str] = []
        self.socks: list[LeanSocket] = []
        self.lost: list[str] = []
        self.batches = 0  # the server's "batch" frames (several frames in one)
        self.batched_frames = 0
        self.conn_ids: list[str] = []
        self.identity = [ChromiumPeer(i) for i in range(p.calls * p.peers)]
        self.by_conn: dict[str, int] = {}
        self.welcomed: list[asyncio.Future[str]] = []
        self.joined: list[asyncio.Future[None]] = []
        self._decode = msgspec.json.decode
        self._encode = msgspec.json.encode

    # -- connections ------------------------------------------------------------

    async def connect(self, urls: list[str]) -> None:
        loop = asyncio.get_running_loop()
        for index, url in enumerate(urls):
            self.welcomed.append(loop.create_future())
            self.joined.append(loop.create_future())

            def on_text(
                sock: LeanSocket, buf: bytes, s: int, e: int, now: int, i: int = index
            ) -> None:
                self.on_text(i, buf[s:e], now)

            self.socks.append(await open_socket(url, on_text))
        self.conn_ids = list(await asyncio.wait_for(asyncio.gather(*self.welcomed), 30))
        self.by_conn = {c: i for i, c in enumerate(self.conn_ids)}

    async def join_calls(self) -> None:
        """Every socket joins its room's call (the server serialises each room)."""
        join = {
            "type": "call.join",
            "rollback": True,
            "media": {"audio": True, "video": True},
        }
        for sock in self.socks:
            sock.send_text(self._encode(join))
        await asyncio.wait_for(asyncio.gather(*self.joined), 30)

    def close(self) -> list[str]:
        lost = [s.closed.result() for s in self.socks if s.closed.done()]
        for s in self.socks:
            s.close()
        return lost

    # -- receiving ----------------------------------------------------------------

    def on_text(self, index: int, payload: bytes, now: int) -> None:
        frame = self._decode(payload)
        if frame.get("type") == "batch":
            frames = frame["frames"]
            self.batches += 1
            self.batched_frames += len(frames)
        else:
            frames = (frame,)
        for f in frames:
            kind = f.get("type")
            if kind == "call.signal":
                self.on_signal(index, f, now)
            elif kind == "welcome":
                self.welcomed[index].set_result(f["connection_id"])
            elif kind == "call.joined" and not self.joined[index].done():
                self.joined[index].set_result(None)
            elif kind == "error":
                self.errors += 1
                if len(self.error_samples) < 5:
                    self.error_samples.append(payload.decode()[:200])

    def on_signal(self, index: int, f: dict[str, Any], now: int) -> None:
        description = f.get("description")
        if description is not None:
            kind = description["type"]
            sent = sent_ns_of_sdp(description["sdp"])
        else:
            kind = "candidate"
            sent = sent_ns_of_candidate(f["candidate"]["candidate"])
        k = (now - self.t0) // self.width
        if 0 <= k < len(self.windows):
            self.windows[k].arrived += 1
        if sent is not None:
            k = (sent - self.t0) // self.width
            if 0 <= k < len(self.windows):
                w = self.windows[k]
                w.received[kind] += 1
                w.latency_ns[kind].append(now - sent)
        if kind == "offer":
            # As a browser does: answer, then trickle its own candidates.
            self.negotiate(index, self.by_conn[f["from"]], "answer")

    # -- sending --------------------------------------------------------------------

    def negotiate(self, sender: int, target: int, kind: str) -> None:
        """Send an offer or answer, then the sender's candidates, to ``target``."""
        me, to, sock = self.identity[sender], self.conn_ids[target], self.socks[sender]
        now = time.monotonic_ns()
        k = (now - self.t0) // self.width
        w = self.windows[k] if 0 <= k < len(self.windows) else None
        encode = self._encode
        sock.send_text(
            encode(
                {
                    "type": "call.signal",
                    "to": to,
                    "description": me.description(kind, now),
                }
            )
        )
        for candidate in me.candidates(now):
            sock.send_text(
                encode({"type": "call.signal", "to": to, "candidate": candidate})
            )
        if w is not None:
            w.sent[kind] += 1
            w.sent["candidate"] += 4

    async def drive(self, send_start: int, send_stop: int) -> None:
        """Start negotiations at ``calls x rate`` per second in total, round-robin
        over the calls, each call cycling through its pairs."""
        p = self.p
        interval = int(1e9 / (p.calls * p.rate))
        k = 0
        while True:
            due = send_start + k * interval
            if due >= send_stop:
                return
            delay = (due - time.monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            call, turn = k % p.calls, k // p.calls
            a, b = PAIRS[turn % len(PAIRS)]
            if (turn // len(PAIRS)) % 2:
                a, b = b, a
            base = call * p.peers
            self.negotiate(base + a, base + b, "offer")
            k += 1


async def drive_target(
    pid: int, urls: list[str], p: Params, join: bool
) -> tuple[Load, float, dict[int, float], dict[int, float]]:
    """Connect, (join,) measure idle CPU, run the paced load, sample each window."""
    load = Load(p, t0=1 << 62)
    await load.connect(urls)
    if join:
        await load.join_calls()
    await asyncio.sleep(0.5)  # join/presence traffic settles
    c0 = cpu_ns(pid)
    await asyncio.sleep(p.idle)
    idle_cores = (cpu_ns(pid) - c0) / 1e9 / p.idle
    send_start = time.monotonic_ns() + 100_000_000
    load.t0 = t0 = send_start + int(p.warmup * 1e9)
    send_stop = t0 + p.windows * load.width
    driver = asyncio.create_task(load.drive(send_start, send_stop))
    me = os.getpid()

    def sample() -> tuple[tuple[float, float], float, float, float]:
        return cpu_times(pid), cpu_ns(me) / 1e9, machine_busy()[0], cpu_ns(pid) / 1e9

    await asyncio.sleep((t0 - time.monotonic_ns()) / 1e9)
    before_all = await asyncio.to_thread(all_cpu)
    edges = [sample()]
    for k in range(1, p.windows + 1):
        await asyncio.sleep(max(0.0, (t0 + k * load.width - time.monotonic_ns()) / 1e9))
        edges.append(sample())
    after_all = await asyncio.to_thread(all_cpu)
    await driver
    await asyncio.sleep(p.drain)
    for w, (a, b) in zip(load.windows, itertools.pairwise(edges), strict=True):
        w.target_user_s = b[0][0] - a[0][0]
        w.target_sys_s = b[0][1] - a[0][1]
        w.target_cpu_s = b[3] - a[3]
        w.loadgen_cpu_s = b[1] - a[1]
        w.machine_busy_s = b[2] - a[2]
    load.lost = load.close()
    await asyncio.sleep(0.2)  # close frames out before the loop ends
    return load, idle_cores, before_all, after_all


def measure(
    target: str, pid: int, urls: list[str], p: Params, join: bool
) -> RelayResult:
    load, idle, before_all, after_all = uvloop.run(drive_target(pid, urls, p, join))
    lost = load.lost
    others = others_delta(before_all, after_all, {pid, os.getpid()})
    top = sorted(others, key=others.__getitem__, reverse=True)[:5]
    return RelayResult(
        target=target,
        windows=load.windows,
        idle_cores=idle,
        batches=load.batches,
        batched_frames=load.batched_frames,
        errors=load.errors,
        error_samples=load.error_samples,
        lost_connections=lost,
        top_other_processes=[(command_line(i), round(others[i], 2)) for i in top],
    )


def relay_reference(p: Params) -> RelayResult:
    with Relay("bench.call_relay") as relay:
        assert relay.proc is not None
        n = p.calls * p.peers
        return measure("relay", relay.proc.pid, [relay.url] * n, p, join=False)


def server_metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("coilroom_call_signals") or line.startswith(
            "coilroom_signals"
        ):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def summarise(res: RelayResult, p: Params) -> dict[str, Any]:
    """Pooled latency quantiles over every window, medians of per-window rates."""
    out: dict[str, Any] = {"target": res.target}
    for kind in KINDS:
        pooled = [x for w in res.windows for x in w.latency_ns[kind]]
        out[kind] = {
            "n": len(pooled),
            "p50_ms": quantile_ms(pooled, 0.50),
            "p99_ms": quantile_ms(pooled, 0.99),
            "max_ms": max(pooled) / 1e6 if pooled else float("nan"),
            "window_p50_ms_median": statistics.median(
                quantile_ms(w.latency_ns[kind], 0.5) for w in res.windows
            ),
            "window_p99_ms_median": statistics.median(
                quantile_ms(w.latency_ns[kind], 0.99) for w in res.windows
            ),
            "sent": sum(w.sent[kind] for w in res.windows),
            "received": sum(w.received[kind] for w in res.windows),
        }

    def med(f: Any) -> float:
        return float(statistics.median(f(w) for w in res.windows))

    out["signals_per_s"] = med(lambda w: w.arrived / p.window)
    out["target_cores"] = med(lambda w: w.target_cpu_s / p.window)
    out["target_cpu_us_per_signal"] = med(lambda w: 1e6 * w.target_cpu_s / w.arrived)
    # user/system from 10 ms ticks: only over the whole span, as shares of the total
    arrived = sum(w.arrived for w in res.windows)
    user = sum(w.target_user_s for w in res.windows)
    system = sum(w.target_sys_s for w in res.windows)
    total = out["target_cpu_us_per_signal"]
    out["target_user_us_per_signal"] = total * user / max(user + system, 1e-9)
    out["target_sys_us_per_signal"] = total * system / max(user + system, 1e-9)
    out["target_cpu_us_per_signal_whole_span"] = (
        1e6 * sum(w.target_cpu_s for w in res.windows) / arrived
    )
    out["target_idle_cores"] = res.idle_cores
    out["loadgen_cores"] = med(lambda w: w.loadgen_cpu_s / p.window)
    out["machine_busy_cores"] = med(lambda w: w.machine_busy_s / p.window)
    out["errors"] = res.errors
    out["batch_frames_received"] = res.batches
    out["frames_inside_batches"] = res.batched_frames
    out["lost_connections"] = len(res.lost_connections)
    return out


def part1_table(s: dict[str, Any], r: dict[str, Any]) -> str:
    def row(label: str, sv: float, rv: float, fmt: str, ratio: bool = True) -> str:
        q = f"{sv / rv:.2f}x" if ratio and rv else ""
        return f"| {label} | {sv:{fmt}} | {rv:{fmt}} | {q} |"

    lines = [
        "| metric | server | relay | server/relay |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        row(f"{kind} latency {q}, ms", s[kind][f"{q}_ms"], r[kind][f"{q}_ms"], ".2f")
        for kind in KINDS
        for q in ("p50", "p99")
    ]
    lines += [
        row("offer latency max, ms", s["offer"]["max_ms"], r["offer"]["max_ms"], ".1f"),
        row("offers timed", s["offer"]["n"], r["offer"]["n"], ",d", ratio=False),
        row("signals relayed/s", s["signals_per_s"], r["signals_per_s"], ",.0f", False),
        row(
            "target CPU per signal, µs",
            s["target_cpu_us_per_signal"],
            r["target_cpu_us_per_signal"],
            ".1f",
        ),
        row(
            "  of which user, µs",
            s["target_user_us_per_signal"],
            r["target_user_us_per_signal"],
            ".1f",
        ),
        row(
            "  of which system, µs",
            s["target_sys_us_per_signal"],
            r["target_sys_us_per_signal"],
            ".1f",
        ),
        row("target CPU, cores", s["target_cores"], r["target_cores"], ".3f", False),
        row(
            "target idle CPU before load, cores",
            s["target_idle_cores"],
            r["target_idle_cores"],
            ".3f",
            False,
        ),
        row(
            "load generator CPU, cores",
            s["loadgen_cores"],
            r["loadgen_cores"],
            ".2f",
            False,
        ),
        row(
            "machine busy, cores",
            s["machine_busy_cores"],
            r["machine_busy_cores"],
            ".2f",
            False,
        ),
    ]
    return "\n".join(lines)


def echo_reference() -> dict[str, Any] | None:
    """The echo test's CPU per session, from bench/echo_cost.py's latest results
    (measured there, not here: it takes minutes)."""
    found = sorted(RESULTS.glob("*-echo_cost.json"))
    if not found:
        return None
    data = json.loads(found[-1].read_text())
    return {
        "file": str(found[-1].relative_to(RESULTS.parent.parent)),
        "server_cores_per_session": {
            f"{r['content']} x{r['sessions']}": round(
                statistics.median(w["server_cores"] for w in r["windows"])
                / r["sessions"],
                3,
            )
            for r in data["runs"]
        },
    }


def uptime() -> str:
    return subprocess.run(
        ["uptime"], capture_output=True, text=True, check=False
    ).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, about 20 s")
    parser.add_argument("--part", choices=["1", "2"], help="one part only")
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--peers", type=int, default=4, choices=[4])
    parser.add_argument(
        "--rate",
        type=float,
        default=8.0,
        help="negotiations/s per call (8: each peer sends 4 offers or answers and "
        "20 candidates a second, under the default limits of 5 and 40)",
    )
    parser.add_argument("--window", type=float, help="seconds (4; quick 1)")
    parser.add_argument("--windows", type=int, help="windows (5; quick 3)")
    parser.add_argument("--runs", type=int, help="part 2 runs per case (7; quick 2)")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default bench/results/)"
    )
    args = parser.parse_args()
    quick = args.quick
    p = Params(
        calls=args.calls,
        peers=args.peers,
        rate=args.rate,
        warmup=1.0 if quick else 2.0,
        window=args.window or (1.0 if quick else 4.0),
        windows=args.windows or (3 if quick else 5),
        drain=1.0,
        idle=1.0 if quick else 2.0,
    )
    runs = args.runs or (2 if quick else 7)
    raise_nofile()
    started = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "benchmark": "call_signaling",
        "started": started.isoformat(),
        "command": " ".join(
            [".venv/bin/python", "-m", "bench.call_signaling", *sys.argv[1:]]
        ),
        "quick": quick,
        "uptime_at_start": uptime(),
        "machine": machine(),
        "git": git_state(),
        "params": asdict(p) | {"part2_runs": runs},
        "server_settings": "defaults (call_signals_per_second 5, call_signal_burst 40, "
        "call_candidates_per_second 40, call_candidate_burst 300)",
    }
    if args.part in (None, "1"):
        relay = relay_reference(p)
        print("relay done", flush=True)
        with Server({}) as server:
            assert server.proc is not None
            users = p.peers
            rooms: Rooms = asyncio.run(create_rooms(server, users=users, rooms=p.calls))
            urls = socket_urls(server, rooms, p.peers)
            try:
                ours = measure("server", server.proc.pid, urls, p, join=True)
            except Exception:
                print(server.log_tail(), file=sys.stderr)
                raise
            ours.server_signals_counted = server_metrics(server.base_url)
            warnings = [
                line
                for line in server.log_tail(100_000).splitlines()
                if " WARNING " in line or " ERROR " in line
            ][-20:]
            if args.part is None:
                from bench.call_connect import connect_runs

                report["part2"] = connect_runs(server, rooms, runs)
        s, r = summarise(ours, p), summarise(relay, p)
        report["part1"] = {
            "server": s,
            "relay": r,
            "server_log_warnings": warnings,
            "server_signal_metrics": ours.server_signals_counted,
            "top_other_processes": {
                "server": ours.top_other_processes,
                "relay": relay.top_other_processes,
            },
            "windows": {
                "server": [asdict(w) for w in ours.windows],
                "relay": [asdict(w) for w in relay.windows],
            },
        }
        for w in report["part1"]["windows"].values():
            for x in w:
                del x["latency_ns"]
        print(part1_table(s, r) + "\n")
    elif args.part == "2":
        from bench.call_connect import connect_runs

        with Server({}) as server:
            rooms = asyncio.run(create_rooms(server, users=4, rooms=2))
            report["part2"] = connect_runs(server, rooms, runs)
    if "part2" in report:
        from bench.call_connect import part2_table

        print(part2_table(report["part2"]) + "\n")
    report["echo_cost_reference"] = echo_reference()
    report["uptime_at_end"] = uptime()
    report["machine"]["load_average_at_end"] = os.getloadavg()
    out = args.out or RESULTS / (
        f"{started:%Y-%m-%d}-call_signaling{'-quick' if quick else ''}.json"
    )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load: {report['uptime_at_start']} -> {report['uptime_at_end']}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
