"""Join → connected data channel for aiortc peers, through the server and directly.

One *run* starts some peers at once and ends when every pair's data channel is
open on both sides. The same peer code runs over two transports:

* **server**: each peer has a room socket (opened before the clock starts); the
  joiners send ``call.join`` at t0, and each one, on ``call.joined``, offers to the
  participants listed there (the newcomer offers, as the protocol says); offers
  and answers go through ``call.signal``. Non-trickle, as ``tests/rtcpeer.py``:
  each description carries its candidates, gathered on 127.0.0.1.
* **direct** (the floor): the same peers hand their descriptions to each other
  in-process; at t0 joiner *k* offers to every peer before it, the order the
  server would give them.

Cases: **pair** (one peer already in the call, one joins: its ``call.join`` →
both ends of the channel open) and **mesh** (four peers send ``call.join`` at the
same moment → all 12 channel ends of the 6 pairs open). No media tracks: the data
channel alone (ICE, DTLS, SCTP). Runs alternate between the transports; one
untimed warm-up run of each comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection
from websockets.asyncio.client import ClientConnection, connect

from bench.world import Rooms, Server
from tests.rtcpeer import (
    apply_answer,
    create_client_peer,
    gather_answer,
    gather_offer,
    loopback_only,
)

Send = Callable[[str, dict[str, str]], Awaitable[None]]
CASES = {"pair": (1, 1), "mesh": (0, 4)}  # (already in the call, joining at t0)
RUN_TIMEOUT = 30.0


class Tracker:
    """Counts channel ends that opened; done when all expected ones have."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.opened: dict[tuple[str, str], float] = {}
        self.done = asyncio.get_running_loop().create_future()

    def open(self, peer: str, remote: str) -> None:
        self.opened.setdefault((peer, remote), time.perf_counter())
        if len(self.opened) == self.expected and not self.done.done():
            self.done.set_result(None)


class Peer:
    """One participant: a peer connection per remote, an inbox handled in order."""

    def __init__(self, name: str, tracker: Tracker) -> None:
        self.name = name
        self.tracker = tracker
        self.send: Send | None = None
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.inbox: asyncio.Queue[tuple[str, dict[str, str]]] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()

    def _pc(self, remote: str) -> RTCPeerConnection:
        pc = self.pcs[remote] = create_client_peer()

        @pc.on("datachannel")
        def on_channel(channel: RTCDataChannel) -> None:
            self._watch(remote, channel)

        return pc

    def _watch(self, remote: str, channel: RTCDataChannel) -> None:
        if channel.readyState == "open":
            self.tracker.open(self.name, remote)
        else:
            channel.on("open", lambda: self.tracker.open(self.name, remote))

    def start(self) -> None:
        self._spawn(self._run_inbox())

    def offer_to(self, remote: str) -> None:
        self._spawn(self._offer(remote))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _offer(self, remote: str) -> None:
        assert self.send is not None
        pc = self._pc(remote)
        self._watch(remote, pc.createDataChannel("chat"))
        await self.send(remote, await gather_offer(pc))

    async def _run_inbox(self) -> None:
        assert self.send is not None
        while True:
            remote, description = await self.inbox.get()
            if description["type"] == "offer":
                answer = await gather_answer(self._pc(remote), description)
                await self.send(remote, answer)
            else:
                await apply_answer(self.pcs[remote], description)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(pc.close() for pc in self.pcs.values()))


async def run_direct(existing: int, joining: int) -> dict[str, float]:
    """The floor: descriptions handed over in-process."""
    n = existing + joining
    tracker = Tracker(2 * (n * (n - 1) // 2 - existing * (existing - 1) // 2))
    peers = {f"p{i}": Peer(f"p{i}", tracker) for i in range(n)}
    for peer in peers.values():

        async def send(to: str, d: dict[str, str], me: Peer = peer) -> None:
            peers[to].inbox.put_nowait((me.name, d))

        peer.send = send
        peer.start()
    try:
        t0 = time.perf_counter()
        for k in range(existing, n):
            for j in range(k):
                peers[f"p{k}"].offer_to(f"p{j}")
        await asyncio.wait_for(tracker.done, RUN_TIMEOUT)
        return {"total_ms": 1e3 * (max(tracker.opened.values()) - t0)}
    finally:
        await asyncio.gather(*(p.close() for p in peers.values()))


class RoomSocket:
    """A peer's room socket: a reader task feeding its inbox and join future."""

    def __init__(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.conn_id: str = welcome["connection_id"]
        self.joined: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self.peer: Peer | None = None
        self.errors: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self.ws:
            frame = json.loads(text)
            frames = frame["frames"] if frame["type"] == "batch" else [frame]
            for f in frames:
                if f["type"] == "call.joined" and not self.joined.done():
                    self.joined.set_result(f)
                elif f["type"] == "call.signal" and self.peer is not None:
                    self.peer.inbox.put_nowait((f["from"], f["description"]))
                elif f["type"] == "error":
                    self.errors.append(str(f))

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await self.reader


async def open_room_socket(url: str) -> RoomSocket:
    """A room socket of a room with no live call (a previous run's call may take a
    moment to end after its sockets closed)."""
    for _ in range(50):
        ws = await connect(url, compression=None, max_size=1 << 20)
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if welcome["type"] == "welcome" and welcome["call"] is None:
            return RoomSocket(ws, welcome)
        await ws.close()
        await asyncio.sleep(0.1)
    raise RuntimeError("the room's call did not end")


async def run_server(
    urls: list[str], existing: int, joining: int
) -> dict[str, float | list[str]]:
    """Through the server: ``existing`` peers join untimed, then ``joining`` at t0."""
    n = existing + joining
    tracker = Tracker(2 * (n * (n - 1) // 2 - existing * (existing - 1) // 2))
    socks = [await open_room_socket(url) for url in urls[:n]]
    peers = []
    for sock in socks:
        peer = Peer(sock.conn_id, tracker)

        async def send(to: str, d: dict[str, str], s: RoomSocket = sock) -> None:
            await s.send({"type": "call.signal", "to": to, "description": d})

        peer.send = send
        sock.peer = peer
        peer.start()
        peers.append(peer)
    join = {"type": "call.join", "rollback": False}
    try:
        for sock in socks[:existing]:
            await sock.send(join)
            await asyncio.wait_for(sock.joined, 10)
        joined_at: list[float] = []

        async def join_and_offer(sock: RoomSocket, peer: Peer) -> None:
            await sock.send(join)
            answer = await sock.joined
            joined_at.append(time.perf_counter())
            for other in answer["participants"]:
                peer.offer_to(other["connection_id"])

        t0 = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    join_and_offer(s, p)
                    for s, p in zip(socks[existing:], peers[existing:], strict=True)
                )
            ),
            RUN_TIMEOUT,
        )
        await asyncio.wait_for(tracker.done, RUN_TIMEOUT)
        return {
            "total_ms": 1e3 * (max(tracker.opened.values()) - t0),
            "last_joined_ms": 1e3 * (max(joined_at) - t0),
            "errors": [e for s in socks for e in s.errors],
        }
    finally:
        await asyncio.gather(*(p.close() for p in peers))
        for sock in socks:
            await sock.close()


async def _connect_runs(urls: list[str], runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with loopback_only():
        for case, (existing, joining) in CASES.items():
            await run_direct(existing, joining)  # warm-up, untimed
            await run_server(urls, existing, joining)
            direct, server = [], []
            for i in range(runs):
                order = ("direct", "server") if i % 2 == 0 else ("server", "direct")
                for which in order:
                    if which == "direct":
                        direct.append(await run_direct(existing, joining))
                    else:
                        server.append(await run_server(urls, existing, joining))
            d = statistics.median(r["total_ms"] for r in direct)
            s = statistics.median(r["total_ms"] for r in server)
            out[case] = {
                "existing": existing,
                "joining": joining,
                "direct_ms": [round(r["total_ms"], 2) for r in direct],
                "server_ms": [round(r["total_ms"], 2) for r in server],
                "server_last_joined_ms": [
                    round(r["last_joined_ms"], 2) for r in server
                ],
                "server_errors": [e for r in server for e in r["errors"]],
                "direct_median_ms": d,
                "server_median_ms": s,
                "server_last_joined_median_ms": statistics.median(
                    r["last_joined_ms"] for r in server
                ),
                "ratio": s / d,
                "server_share_ms": s - d,
            }
            print(f"{case}: direct {d:.0f} ms, server {s:.0f} ms", flush=True)
    return out


def connect_runs(server: Server, rooms: Rooms, runs: int) -> dict[str, Any]:
    """Part 2 against a running server, in the first room, one user per peer."""
    room = rooms.room_ids[0]
    base = f"ws://127.0.0.1:{server.port}/ws/rooms/{room}?token="
    urls = [base + token for token in rooms.tokens[room][:4]]
    result = asyncio.run(_connect_runs(urls, runs))
    result["runs"] = runs
    return result


def part2_table(r: dict[str, Any]) -> str:
    lines = [
        "| case | direct (floor) median ms | server median ms | server/direct "
        "| server - direct, ms | last call.joined, ms | runs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in CASES:
        c = r[case]
        lines.append(
            f"| {case} | {c['direct_median_ms']:.0f} | {c['server_median_ms']:.0f} "
            f"| {c['ratio']:.2f}x | {c['server_share_ms']:.0f} "
            f"| {c['server_last_joined_median_ms']:.1f} | {r['runs']} |"
        )
    return "\n".join(lines)
