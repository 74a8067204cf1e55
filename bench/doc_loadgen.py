"""Document load generator worker (``python -m bench.doc_loadgen``), for bench.doc_fanout.

Same line protocol as ``bench.loadgen``: config line in, ``{"ready": n}`` out,
schedule (or ``{"close": true}``) in, results out.

Writers are pycrdt documents: each update appends one activity map to the
``activities`` array of the document and sends ``doc.get_update(state_before)``
as a y-websocket update ``[0, 2, update]``. The map's ``note`` field holds
``bench:<send time ns>:<writer id>:`` (Yjs stores strings as UTF-8, so the marker
is in the raw frame); receivers find it with a byte search and never decode,
except the few "full" clients that apply every update with pycrdt so convergence
can be checked at the end. A frame may hold several updates merged into one (our
server sends each stored batch that way): every marker in it is a receipt, with
its own send time. Receipts of one's own update (a server that echoes) are skipped.
Writers never apply what they receive, so each appends after its own last
activity: concurrent inserts in the middle of the merged list, not at its end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pycrdt
import uvloop

from bench.loadgen import BIN_NS, MAX_BIN, Window
from bench.wsclient import HandshakeError, LeanSocket, encode_data_frame
from rooms.ysync import SyncStep2, SyncUpdate, create_update, parse_frame

MARKER = b"bench:"
CONNECT_CONCURRENCY = 64
EMPTY_STEP1 = b"\x00\x00\x01\x00"  # sync step 1 with an empty state vector
EMPTY_STEP2 = b"\x00\x01\x02\x00\x00"  # sync step 2 carrying an empty update

OnFrame = Callable[["BinSocket", bytes, int, int, int], None]


class BinSocket(LeanSocket):
    """``LeanSocket`` for binary frames; with ``handshake`` it speaks the sync
    handshake (step 1 sent on open, the server's step 1 answered with an empty
    step 2) and ``synced`` resolves on the server's step 2."""

    def __init__(self, path: str, host: str, on_frame: OnFrame, handshake: bool):
        super().__init__(path, host, lambda *a: None)
        self.on_frame = on_frame
        self.handshake = handshake
        self.synced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.wid = -1  # writer id of this socket (to skip echoes of own updates)
        self.doc: pycrdt.Doc | None = None  # full clients apply every update
        self.apply_seconds = 0.0  # time spent decoding and applying (client side)

    def _on_upgraded(self) -> None:
        if self.handshake:
            self.send_binary(EMPTY_STEP1)

    def _on_data(self, opcode: int, buf: bytes, start: int, end: int, now: int) -> None:
        if opcode != 2:
            return
        self.frames += 1
        if buf[start] != 0 or end - start <= 1:
            return
        step = buf[start + 1]
        if step == 0 and self.handshake:
            self.send_binary(EMPTY_STEP2)
        elif step == 1:
            if self.doc is not None:
                t0 = time.perf_counter()
                frame = parse_frame(buf[start:end], max_frame_bytes=1 << 30)
                assert isinstance(frame, SyncStep2)
                self.doc.apply_update(frame.update)
                self.apply_seconds += time.perf_counter() - t0
            if not self.synced.done():
                self.synced.set_result(None)
        elif step == 2:
            self.on_frame(self, buf, start, end, now)
            if self.doc is not None:
                frame = parse_frame(buf[start:end], max_frame_bytes=1 << 30)
                assert isinstance(frame, SyncUpdate)
                self.doc.apply_update(frame.update)

    def send_binary(self, payload: bytes) -> bool:
        if self.transport is None or self.closed.done() or self.transport.is_closing():
            return False
        self.transport.write(encode_data_frame(2, payload, self.mask))
        return True

    def _fail(self, reason: str) -> None:
        if not self.synced.done():
            self.synced.set_exception(HandshakeError(reason))
            self.synced.exception()
        super()._fail(reason)


async def open_bin(
    url: str, on_frame: OnFrame, handshake: bool, limit: float = 30.0
) -> BinSocket:
    parts = urlsplit(url)
    assert parts.scheme == "ws", "plain ws:// only"
    assert parts.hostname == "127.0.0.1", "local servers only"
    timeout = limit
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    host = f"{parts.hostname}:{parts.port}"
    _, proto = await asyncio.wait_for(
        asyncio.get_running_loop().create_connection(
            lambda: BinSocket(path, host, on_frame, handshake),
            parts.hostname,
            parts.port,
        ),
        timeout,
    )
    await asyncio.wait_for(proto.opened, timeout)
    return proto


class Stats:
    def __init__(self) -> None:
        self.t0 = 1 << 62
        self.window_ns = 1
        self.windows: list[Window] = []
        self.deliveries = 0  # every non-echo receipt, warm-up and drain included
        self.echoes = 0
        self.max_latency_ns = 0
        self.unsent = 0
        self.sent_total = 0


def make_receiver(stats: Stats) -> OnFrame:
    marker, mlen = MARKER, len(MARKER)

    def on_frame(sock: BinSocket, buf: bytes, start: int, end: int, now: int) -> None:
        i = buf.find(marker, start, end)
        while i >= 0:
            j = buf.find(b":", i + mlen, end)
            k2 = buf.find(b":", j + 1, end)
            sent = int(buf[i + mlen : j])
            if int(buf[j + 1 : k2]) == sock.wid:
                stats.echoes += 1
                i = buf.find(marker, k2, end)
                continue
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
            i = buf.find(marker, k2, end)

    return on_frame


async def connect_all(
    urls: list[str], on_frame: OnFrame, handshake: bool
) -> list[BinSocket]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(url: str) -> BinSocket:
        async with gate:
            sock = await open_bin(url, on_frame, handshake)
            if handshake:
                await asyncio.wait_for(sock.synced, 60)
            if sock.closed.done():
                raise ConnectionError(sock.closed.result())
            return sock

    return list(await asyncio.gather(*(one(u) for u in urls)))


async def read_command() -> dict[str, Any]:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("coordinator went away")
    return dict(json.loads(line))


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Writer:
    """A pycrdt document whose every edit appends one activity."""

    def __init__(self, sock: BinSocket, wid: int, doc: int = 0) -> None:
        self.sock, self.wid, self.n, self.doc_index = sock, wid, 0, doc
        sock.wid = wid
        self.doc = pycrdt.Doc()
        self.activities = self.doc.get("activities", type=pycrdt.Array)

    def update(self, stamp: int) -> bytes:
        before = self.doc.get_state()
        self.activities.append(
            pycrdt.Map(
                {
                    "id": f"w{self.wid}-{self.n}",
                    "status": "planned",
                    "note": f"bench:{stamp}:{self.wid}:",
                }
            )
        )
        self.n += 1
        return create_update(self.doc.get_update(before))


async def send_loop(writers: list[Writer], stats: Stats, schedule: dict[str, Any]):
    if not writers:
        return
    rate = schedule["rate_per_writer"] * len(writers)
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
            w = writers[sent % len(writers)]
            stamp = time.monotonic_ns()
            sent += 1
            if not w.sock.send_binary(w.update(stamp)):
                stats.unsent += 1
                continue
            stats.sent_total += 1
            k = (stamp - t0) // width
            if 0 <= k < len(windows):
                windows[k].sent += 1
        await asyncio.sleep(0.002)


async def run_fanout(config: dict[str, Any]) -> None:
    stats = Stats()
    on_frame = make_receiver(stats)
    socks = await connect_all(config["urls"], on_frame, config["handshake"])
    for i in config["full"]:
        socks[i].doc = pycrdt.Doc()
    writers = [Writer(socks[i], wid, d) for i, wid, d in config["writers"]]
    emit({"ready": len(socks)})
    schedule = await read_command()
    stats.t0 = schedule["t0"]
    stats.window_ns = schedule["window_ns"]
    stats.windows = [Window() for _ in range(schedule["windows"])]
    await send_loop(writers, stats, schedule)
    await asyncio.sleep(max(0.0, (schedule["drain_until"] - time.monotonic_ns()) / 1e9))
    lost = [s.closed.result() for s in socks if s.closed.done()]
    full = []
    for i in config["full"]:
        doc = socks[i].doc
        assert doc is not None
        full.append(base64.b64encode(doc.get_update()).decode())
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
            "echoes": stats.echoes,
            "sent_total": stats.sent_total,
            "unsent": stats.unsent,
            "max_latency_ns": stats.max_latency_ns,
            "writer_updates": [
                (w.doc_index, base64.b64encode(w.doc.get_update()).decode())
                for w in writers
            ],
            "full_updates": full,
            "lost": lost[:5],
            "lost_count": len(lost),
        }
    )


async def run_idle(config: dict[str, Any]) -> None:
    socks = await connect_all(config["urls"], lambda *a: None, config["handshake"])
    emit({"ready": len(socks)})
    await read_command()
    lost = [s.closed.result() for s in socks if s.closed.done()]
    for s in socks:
        s.close()
    emit({"lost_count": len(lost), "lost": lost[:5]})


def main() -> None:
    config = json.loads(sys.stdin.readline())
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(run_fanout(config) if config["mode"] == "fanout" else run_idle(config))


if __name__ == "__main__":
    main()
