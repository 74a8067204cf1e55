"""Load generator worker for ``bench.cross_process`` (``python -m bench.cross_loadgen``).

Same line protocol as ``bench.loadgen`` (config in, ``{"ready": n}`` out,
schedule in, results out) and the same sending code: chat through
``bench.loadgen.send_loop``, document updates through ``bench.doc_loadgen``'s
``Writer`` and ``send_loop``. What differs is the receiver: every receipt is
sorted by the process its sender was connected to, *same* (the receiver's own
process, ``home``) or *cross* (another process), each with its own windows and
latency histogram.

Every socket of a worker is on the one server process ``home``, so its senders'
origin is ``home`` too; the origin rides in the marker:

* chat: ``bench:<send ns>:o<origin>:xxx...`` (the pad after the send time);
* documents: the writer id in ``bench:<send ns>:<writer id>:`` is
  ``origin * 1000 + worker * 100 + k``, so origin = writer id // 1000.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

import uvloop

from bench import doc_loadgen, loadgen
from bench.loadgen import BIN_NS, MAX_BIN, Window
from bench.wsclient import MARKER, LeanSocket

SAME, CROSS = 0, 1
WID_PER_ORIGIN = 1000


class Stats:
    """What the send loops of ``loadgen``/``doc_loadgen`` use (``windows`` count what
    was sent, ``unsent``, ``sent_total``), plus receipts sorted same/cross."""

    def __init__(self) -> None:
        self.t0 = 1 << 62
        self.window_ns = 1
        self.windows: list[Window] = []  # sent counts, by send time
        self.recv: list[list[Window]] = [[], []]  # [SAME], [CROSS]
        self.deliveries = [0, 0]  # every receipt, warm-up and drain included
        self.max_latency_ns = [0, 0]
        self.unsent = 0
        self.sent_total = 0
        self.echoes = 0
        self.errors = 0
        self.error_samples: list[str] = []


def count(stats: Stats, cls: int, sent: int, now: int) -> None:
    """One receipt of class ``cls`` (sent at ``sent``, read at ``now``)."""
    latency = now - sent
    stats.deliveries[cls] += 1
    if latency > stats.max_latency_ns[cls]:
        stats.max_latency_ns[cls] = latency
    windows, t0, width = stats.recv[cls], stats.t0, stats.window_ns
    k = (sent - t0) // width
    if 0 <= k < len(windows):
        w = windows[k]
        w.received += 1
        b = min(latency // BIN_NS, MAX_BIN)
        w.hist[b] = w.hist.get(b, 0) + 1
    k = (now - t0) // width
    if 0 <= k < len(windows):
        windows[k].received_in += 1


def chat_receiver(stats: Stats, home: int) -> Any:
    """Every marker in a frame (a ``batch`` frame carries several), sorted by the
    origin after the send time."""
    marker, mlen = MARKER, len(MARKER)
    home_byte = ord(str(home))

    def on_text(sock: LeanSocket, buf: bytes, start: int, end: int, now: int) -> None:
        i = buf.find(marker, start, end)
        found = i >= 0
        while i >= 0:
            j = buf.find(b":", i + mlen, end)
            cls = SAME if buf[j + 2] == home_byte else CROSS
            count(stats, cls, int(buf[i + mlen : j]), now)
            i = buf.find(marker, j, end)
        if found:
            return
        if buf.find(b'"type":"error"', start, end) >= 0:  # alone or inside a batch
            stats.errors += 1
            if len(stats.error_samples) < 5:
                stats.error_samples.append(buf[start:end].decode(errors="replace"))

    return on_text


def doc_receiver(stats: Stats, home: int) -> doc_loadgen.OnFrame:
    """Every marker in an update frame (merged updates carry several); one's own
    updates coming back (a server that echoes) are counted apart."""
    marker, mlen = doc_loadgen.MARKER, len(doc_loadgen.MARKER)

    def on_frame(
        sock: doc_loadgen.BinSocket, buf: bytes, start: int, end: int, now: int
    ) -> None:
        i = buf.find(marker, start, end)
        while i >= 0:
            j = buf.find(b":", i + mlen, end)
            k2 = buf.find(b":", j + 1, end)
            wid = int(buf[j + 1 : k2])
            if wid == sock.wid:
                stats.echoes += 1
            else:
                cls = SAME if wid // WID_PER_ORIGIN == home else CROSS
                count(stats, cls, int(buf[i + mlen : j]), now)
            i = buf.find(marker, k2, end)

    return on_frame


def window_dicts(windows: list[Window]) -> list[dict[str, Any]]:
    return [
        {
            "sent": w.sent,
            "received": w.received,
            "received_in": w.received_in,
            "hist": w.hist,
        }
        for w in windows
    ]


async def run(config: dict[str, Any]) -> None:
    stats = Stats()
    home, worker = config["home"], config["worker"]
    if config["kind"] == "chat":
        socks: list[Any] = await loadgen.connect_all(
            config["urls"], loadgen.Stats(), True, chat_receiver(stats, home)
        )
    else:
        socks = await doc_loadgen.connect_all(
            config["urls"], doc_receiver(stats, home), True
        )
        writers = [
            doc_loadgen.Writer(socks[i], home * WID_PER_ORIGIN + worker * 100 + k)
            for k, i in enumerate(config["senders"])
        ]
    loadgen.emit({"ready": len(socks)})
    schedule = await loadgen.read_command()
    stats.t0 = schedule["t0"]
    stats.window_ns = schedule["window_ns"]
    n = schedule["windows"]
    stats.windows = [Window() for _ in range(n)]
    stats.recv = [[Window() for _ in range(n)], [Window() for _ in range(n)]]
    if config["kind"] == "chat":
        senders = [socks[i] for i in config["senders"]]
        pad = f"o{home}:" + "x" * config["pad"]
        await loadgen.send_loop(senders, stats, schedule, worker, pad)  # type: ignore[arg-type]
    else:
        doc_schedule = schedule | {"rate_per_writer": schedule["rate_per_sender"]}
        await doc_loadgen.send_loop(writers, stats, doc_schedule)  # type: ignore[arg-type]
    await asyncio.sleep(max(0.0, (schedule["drain_until"] - time.monotonic_ns()) / 1e9))
    lost = [s.closed.result() for s in socks if s.closed.done()]
    for s in socks:
        s.close()
    loadgen.emit(
        {
            "sent": [w.sent for w in stats.windows],
            "same": window_dicts(stats.recv[SAME]),
            "cross": window_dicts(stats.recv[CROSS]),
            "deliveries": stats.deliveries,
            "max_latency_ns": stats.max_latency_ns,
            "echoes": stats.echoes,
            "unsent": stats.unsent,
            "sent_total": stats.sent_total,
            "errors": stats.errors,
            "error_samples": stats.error_samples,
            "lost": lost[:5],
            "lost_count": len(lost),
        }
    )


def main() -> None:
    config = json.loads(sys.stdin.readline())
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(run(config))


if __name__ == "__main__":
    main()
