"""Load generator worker: one process holding some of the benchmark's connections.

Started by ``bench.chat_fanout`` as ``python -m bench.loadgen``.
Protocol with the coordinator, one JSON line each way:

0. the coordinator writes the worker's config (URLs, senders, mode);
1. the worker opens its connections and prints ``{"ready": ...}``;
2. the coordinator writes the schedule (``fanout``) or ``{"close": true}`` (``idle``);
3. ``fanout``: the worker sends on schedule, drains, prints its results and exits.

Times are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by all processes).
Latency is bucketed in a histogram of ``BIN_NS`` bins, so workers can be merged.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

from bench.wsclient import MARKER, LeanSocket, open_socket

BIN_NS = 10_000  # 10 µs latency resolution
MAX_BIN = 200_000  # 2 s; slower receipts land in the last bin
CONNECT_CONCURRENCY = 64


@dataclass
class Window:
    """Counters of one measured window (receipts are attributed by send time)."""

    sent: int = 0
    received: int = 0  # receipts of messages sent in this window
    received_in: int = 0  # receipts that arrived during this window
    hist: dict[int, int] = field(default_factory=dict)


@dataclass
class Stats:
    """Everything a fan-out worker measures."""

    t0: int = 1 << 62
    window_ns: int = 1
    windows: list[Window] = field(default_factory=list)
    deliveries: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    welcomes: int = 0
    max_latency_ns: int = 0
    unsent: int = 0  # messages due on a sender the server had closed


def make_receiver(stats: Stats) -> Any:
    """The per-frame callback: count, and time every benchmark message."""
    marker, marker_len = MARKER, len(MARKER)

    def on_text(sock: LeanSocket, buf: bytes, start: int, end: int, now: int) -> None:
        # One frame may carry several messages (the server's "batch" frame): count
        # every marker in it.
        i = buf.find(marker, start, end)
        found = i >= 0
        while i >= 0:
            j = buf.find(b":", i + marker_len, end)
            sent = int(buf[i + marker_len : j])
            latency = now - sent
            stats.deliveries += 1
            if latency > stats.max_latency_ns:
                stats.max_latency_ns = latency
            windows, t0, width = stats.windows, stats.t0, stats.window_ns
            k = (sent - t0) // width
            if 0 <= k < len(windows):
                w = windows[k]
                w.received += 1
                b = min(latency // BIN_NS, MAX_BIN)
                w.hist[b] = w.hist.get(b, 0) + 1
            k = (now - t0) // width
            if 0 <= k < len(windows):
                windows[k].received_in += 1
            i = buf.find(marker, j, end)
        if found:
            return
        if buf.startswith(b'{"type":"welcome"', start):
            stats.welcomes += 1
        if buf.find(b'"type":"error"', start, end) >= 0:  # alone or inside a batch
            stats.errors += 1
            if len(stats.error_samples) < 5:
                stats.error_samples.append(buf[start:end].decode(errors="replace"))

    return on_text


async def connect_all(
    urls: list[str], stats: Stats, welcome: bool, on_text: Any = None
) -> list[LeanSocket]:
    """Open every URL (bounded concurrency); wait for each ``welcome`` if asked.
    ``on_text`` replaces the default receiver (``make_receiver(stats)``)."""
    on_text = on_text or make_receiver(stats)
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(url: str) -> LeanSocket:
        async with gate:
            sock = await open_socket(url, on_text)
            if welcome:
                await asyncio.wait_for(sock.first_text, 30)
            if sock.closed.done():
                raise ConnectionError(sock.closed.result())
            return sock

    return list(await asyncio.gather(*(one(u) for u in urls)))


async def read_command() -> dict[str, Any]:
    """One JSON line from the coordinator."""
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("coordinator went away")
    return dict(json.loads(line))


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def send_loop(
    senders: list[LeanSocket],
    stats: Stats,
    schedule: dict[str, Any],
    worker: int,
    pad: str,
) -> None:
    """Send ``rate`` messages/s spread over ``senders`` from send_start to send_stop."""
    if not senders:
        return
    rate = schedule["rate_per_sender"] * len(senders)
    start, stop = schedule["send_start"], schedule["send_stop"]
    windows, t0, width = stats.windows, stats.t0, stats.window_ns
    await asyncio.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9))
    sent = 0
    while True:
        now = time.monotonic_ns()
        if now >= stop:
            return
        due = (now - start) * rate // 1_000_000_000
        while sent < due:
            sock = senders[sent % len(senders)]
            stamp = time.monotonic_ns()
            if not sock.send_text(
                b'{"type":"chat.send","id":"w%ds%d","text":"bench:%d:%s"}'
                % (worker, sent, stamp, pad.encode())
            ):
                stats.unsent += 1
                sent += 1
                continue
            k = (stamp - t0) // width
            if 0 <= k < len(windows):
                windows[k].sent += 1
            sent += 1
        await asyncio.sleep(0.002)


async def run_fanout(config: dict[str, Any]) -> None:
    stats = Stats()
    socks = await connect_all(config["urls"], stats, config["welcome"])
    emit({"ready": len(socks)})
    schedule = await read_command()
    stats.t0 = schedule["t0"]
    stats.window_ns = schedule["window_ns"]
    stats.windows = [Window() for _ in range(schedule["windows"])]
    senders = [socks[i] for i in config["senders"]]
    pad = "x" * config["pad"]
    await send_loop(senders, stats, schedule, config["worker"], pad)
    await asyncio.sleep(max(0.0, (schedule["drain_until"] - time.monotonic_ns()) / 1e9))
    lost = [s.closed.result() for s in socks if s.closed.done()]
    for s in socks:
        s.close()
    emit(
        {
            "windows": [
                {
                    "sent": w.sent,
                    "received": w.received,
                    "received_in": w.received_in,
                    "hist": w.hist,
                }
                for w in stats.windows
            ],
            "deliveries": stats.deliveries,
            "errors": stats.errors,
            "unsent": stats.unsent,
            "error_samples": stats.error_samples,
            "max_latency_ns": stats.max_latency_ns,
            "lost": lost[:5],
            "lost_count": len(lost),
        }
    )


async def run_idle(config: dict[str, Any]) -> None:
    stats = Stats()
    socks = await connect_all(config["urls"], stats, config["welcome"])
    emit({"ready": len(socks)})
    await read_command()
    lost = sum(1 for s in socks if s.closed.done())
    frames = sum(s.frames for s in socks)
    for s in socks:
        s.close()
    emit({"lost_count": lost, "frames": frames, "errors": stats.errors})


def main() -> None:
    config = json.loads(sys.stdin.readline())
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(run_fanout(config) if config["mode"] == "fanout" else run_idle(config))


if __name__ == "__main__":
    main()
