"""CPU cost of the echo-test peer: N concurrent sessions of 640x480 at 15 fps.

```
.venv/bin/python -m bench.echo_cost                     # N = 1, 2, 3; about 2 minutes
.venv/bin/python -m bench.echo_cost --sessions 1 --window 2 --windows 2 --warmup 2
```

Three processes, so each CPU figure is clean:

* **server**: ``EchoService`` alone in its process (``--role server``), host
  candidates on 127.0.0.1 only; it reads offers on stdin and prints answers;
* **clients**: N aiortc peers in one process (``--role clients``), each sending
  ``tests.rtcpeer.PatternVideoTrack`` (640x480, 15 fps) and a 440 Hz Opus tone and
  reading (decoding) everything echoed back; it counts frames received;
* **this process** relays the offers and answers, then samples user+system CPU of
  the other two from ``/proc/<pid>/stat`` (all threads: aiortc encodes and
  decodes in worker threads) and the whole machine from ``/proc/stat``.

After a warm-up (encoders ramp their bitrate up), ``--windows`` windows of
``--window`` seconds are measured; the table quotes the median over the windows.
Results go to ``bench/results/<date>-echo_cost.json`` and stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from bench.chat_fanout import RESULTS, ROOT, cpu_seconds, git_state, machine

LOOPBACK = ["127.0.0.1"]


# -- the two child roles -----------------------------------------------------------


async def run_server(max_sessions: int) -> None:
    """Answer offers read from stdin (one JSON line each) until stdin closes."""
    from signaling.echo import EchoService

    loop = asyncio.get_running_loop()
    async with EchoService(
        max_sessions=max_sessions, max_seconds=3600, host_addresses=LOOPBACK
    ) as echo:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            answer = await echo.start(request["user"], request["offer"])
            print(json.dumps(answer), flush=True)


async def run_clients(
    sessions: int, width: int, height: int, fps: float, noise: bool
) -> None:
    """Connect ``sessions`` client peers through stdin/stdout, then report counts.

    Prints one offer per peer and reads its answer, prints ``connected``, then
    answers each ``stats`` line with the frames received so far.
    """
    from aiortc import MediaStreamTrack

    from tests.rtcpeer import (
        PatternVideoTrack,
        ToneAudioTrack,
        apply_answer,
        create_client_peer,
        gather_offer,
        loopback_only,
        wait_for_connection_state,
    )

    loop = asyncio.get_running_loop()
    received = {"video": 0, "audio": 0}
    drains: set[asyncio.Task[None]] = set()

    async def drain(track: MediaStreamTrack) -> None:
        # Read (and so decode) every echoed frame, as a browser shows them.
        while True:
            await track.recv()
            received[track.kind] += 1

    with loopback_only():
        pcs = []
        try:
            for user in range(sessions):
                pc = create_client_peer()
                pcs.append(pc)
                pc.addTrack(PatternVideoTrack(width, height, fps, noise=noise))
                pc.addTrack(ToneAudioTrack())

                @pc.on("track")
                def on_track(track: MediaStreamTrack) -> None:
                    drains.add(asyncio.create_task(drain(track)))

                offer = await gather_offer(pc)
                print(json.dumps({"user": user, "offer": offer}), flush=True)
                line = await loop.run_in_executor(None, sys.stdin.readline)
                await apply_answer(pc, json.loads(line))
            for pc in pcs:
                await wait_for_connection_state(pc, "connected", 30.0)
            print("connected", flush=True)
            while await loop.run_in_executor(None, sys.stdin.readline):
                print(json.dumps(received), flush=True)
        finally:
            for task in drains:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
            for pc in pcs:
                await pc.close()


# -- the driver --------------------------------------------------------------------


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def child(role: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.echo_cost", "--role", role, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_line(stream: IO[str] | None, what: str) -> str:
    assert stream is not None
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what}: child exited")
    return line


def write_line(stream: IO[str] | None, line: str) -> None:
    assert stream is not None
    stream.write(line + "\n")
    stream.flush()


@dataclass
class Window:
    seconds: float
    server_cores: float
    clients_cores: float
    machine_busy_cores: float
    video_fps_back: float  # per session
    audio_fps_back: float  # per session


@dataclass
class Run:
    content: str
    sessions: int
    windows: list[Window]

    def median(self, name: str) -> float:
        return statistics.median(getattr(w, name) for w in self.windows)


def measure(content: str, sessions: int, args: argparse.Namespace) -> Run:
    """Run one scenario of ``sessions`` concurrent echo sessions."""
    size = [str(args.width), str(args.height), str(args.fps), content]
    server = child("server", "--sessions", str(sessions))
    clients = child("clients", "--sessions", str(sessions), "--size", *size)
    try:
        for _ in range(sessions):
            write_line(
                server.stdin,
                json.dumps(json.loads(read_line(clients.stdout, "clients"))),
            )
            write_line(clients.stdin, read_line(server.stdout, "server").strip())
        assert read_line(clients.stdout, "clients").strip() == "connected"
        time.sleep(args.warmup)

        def sample() -> tuple[float, float, float, float, dict[str, int]]:
            write_line(clients.stdin, "stats")
            counts = json.loads(read_line(clients.stdout, "clients"))
            return (
                time.monotonic(),
                cpu_seconds(server.pid),
                cpu_seconds(clients.pid),
                machine_busy()[0],
                counts,
            )

        windows = []
        before = sample()
        for _ in range(args.windows):
            time.sleep(args.window)
            after = sample()
            elapsed = after[0] - before[0]
            windows.append(
                Window(
                    seconds=round(elapsed, 3),
                    server_cores=(after[1] - before[1]) / elapsed,
                    clients_cores=(after[2] - before[2]) / elapsed,
                    machine_busy_cores=(after[3] - before[3]) / elapsed,
                    video_fps_back=(after[4]["video"] - before[4]["video"])
                    / elapsed
                    / sessions,
                    audio_fps_back=(after[4]["audio"] - before[4]["audio"])
                    / elapsed
                    / sessions,
                )
            )
            before = after
        return Run(content, sessions, windows)
    finally:
        for proc in (clients, server):
            if proc.stdin:
                proc.stdin.close()
        for proc in (clients, server):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def table(runs: list[Run]) -> str:
    lines = [
        "| video content | sessions | server cores | server cores / session | "
        "clients cores | video fps back / session | audio fps back / session | "
        "machine busy cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        server = run.median("server_cores")
        lines.append(
            f"| {run.content} | {run.sessions} | {server:.2f} | {server / run.sessions:.2f} | "
            f"{run.median('clients_cores'):.2f} | {run.median('video_fps_back'):.1f} | "
            f"{run.median('audio_fps_back'):.1f} | {run.median('machine_busy_cores'):.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--role", choices=["driver", "server", "clients"], default="driver"
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--size", nargs=4, metavar=("W", "H", "FPS", "CONTENT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument(
        "--content",
        nargs="+",
        choices=["flat", "noise"],
        default=["flat", "noise"],
        help="video below the frame counter: flat grey (cheap to encode) or fresh "
        "random texture every frame (a worst case); default: both",
    )
    parser.add_argument(
        "--warmup", type=float, default=8.0, help="seconds before measuring"
    )
    parser.add_argument("--window", type=float, default=5.0, help="seconds per window")
    parser.add_argument("--windows", type=int, default=4, help="windows per scenario")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default bench/results/)"
    )
    args = parser.parse_args()
    if args.role == "server":
        asyncio.run(run_server(args.sessions[0]))
        return 0
    if args.role == "clients":
        width, height, fps, content = args.size
        asyncio.run(
            run_clients(
                args.sessions[0],
                int(width),
                int(height),
                float(fps),
                content == "noise",
            )
        )
        return 0

    started = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "benchmark": "echo_cost",
        "started": started.isoformat(),
        "command": " ".join(
            [Path(sys.executable).name, "-m", "bench.echo_cost", *sys.argv[1:]]
        ),
        "machine": machine(),
        "git": git_state(),
        "params": {
            k: getattr(args, k)
            for k in (
                "width",
                "height",
                "fps",
                "warmup",
                "window",
                "windows",
                "content",
            )
        },
        "runs": [],
    }
    runs = []
    for content in args.content:
        for sessions in args.sessions:
            run = measure(content, sessions, args)
            runs.append(run)
            report["runs"].append(asdict(run))
            print(
                f"{content}, {sessions} session(s): "
                f"server {run.median('server_cores'):.2f} cores",
                flush=True,
            )
    print(table(runs))
    out = args.out or RESULTS / f"{started.date()}-echo_cost.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
