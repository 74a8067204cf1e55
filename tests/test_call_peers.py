"""Real WebRTC peers (aiortc) calling through a running server: a three-way mesh, and
the echo test with the server's own peer.

The peers run in this test process and gather ICE candidates on 127.0.0.1 only
(``loopback_only``); the server runs in its own process with its echo peer
restricted to 127.0.0.1 too (``COILROOM_RTC_HOST_ADDRESSES``). Not database tests:
one server on SQLite serves them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from aiortc import MediaStreamTrack, RTCDataChannel, RTCPeerConnection
from aiortc.sdp import candidate_from_sdp

from tests.conftest import dedicated_server
from tests.rtcpeer import (
    PatternVideoTrack,
    ToneAudioTrack,
    apply_answer,
    collect_frames,
    create_client_peer,
    gather_answer,
    gather_offer,
    loopback_only,
    read_frame_number,
    wait_for_channel_open,
    wait_for_connection_state,
)
from tests.support import Member, ServerProcess, Socket, World, join

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# Small pictures: six peer connections encode video at once on two cores.
WIDTH, HEIGHT, FPS = 160, 120, 10


@pytest.fixture(scope="module")
def rtc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with dedicated_server(
        "sqlite",
        tmp_path_factory,
        {"RTC_HOST_ADDRESSES": "127.0.0.1", "ECHO_MAX_SECONDS": "60"},
    ) as proc:
        yield proc


@pytest.fixture
async def rtc_world(rtc_server: ServerProcess) -> AsyncIterator[World]:
    with loopback_only():
        async with World.create(rtc_server) as w:
            yield w


class CallPeer:
    """One participant: a room socket and one aiortc peer connection per other
    participant. The newcomer offers to those already in the call; the others
    answer. Signals are read by a task that this object owns."""

    def __init__(self, name: str, sock: Socket) -> None:
        self.name = name
        self.sock = sock
        self.conn_id = ""
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.channels: dict[str, RTCDataChannel] = {}
        self.tracks: dict[str, list[MediaStreamTrack]] = {}
        self.messages: dict[str, asyncio.Queue[str]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    def _peer(self, remote: str) -> RTCPeerConnection:
        pc = create_client_peer()
        self.pcs[remote] = pc
        self.tracks[remote] = []
        self.messages[remote] = asyncio.Queue()
        pc.addTrack(PatternVideoTrack(WIDTH, HEIGHT, FPS))
        pc.addTrack(ToneAudioTrack())

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.tracks[remote].append(track)

        @pc.on("datachannel")
        def on_channel(channel: RTCDataChannel) -> None:
            self._channel(remote, channel)

        return pc

    def _channel(self, remote: str, channel: RTCDataChannel) -> None:
        self.channels[remote] = channel
        channel.on("message", self.messages[remote].put_nowait)

    async def join(self) -> dict[str, Any]:
        # aiortc accepts a rollback but does nothing: it says so, and the server
        # makes it the impolite side wherever it can.
        await self.sock.send({"type": "call.join", "rollback": False})
        joined = await self.sock.recv_until("call.joined")
        self.conn_id = joined["connection_id"]
        self._reader = asyncio.create_task(self._read())
        for other in joined["participants"]:
            remote = other["connection_id"]
            pc = self._peer(remote)
            self._channel(remote, pc.createDataChannel("chat"))
            offer = await gather_offer(pc)
            await self.sock.send(
                {"type": "call.signal", "to": remote, "description": offer}
            )
        return joined

    async def _read(self) -> None:
        while True:
            frame = await self.sock.recv(timeout=3600)
            kind = frame["type"]
            if kind != "call.signal":
                await self.events.put(frame)
                continue
            remote = frame["from"]
            description = frame.get("description")
            if description is None:
                candidate = frame["candidate"]
                if candidate["candidate"]:
                    ice = candidate_from_sdp(
                        candidate["candidate"].removeprefix("candidate:")
                    )
                    ice.sdpMid = candidate["sdpMid"]
                    ice.sdpMLineIndex = candidate["sdpMLineIndex"]
                    await self.pcs[remote].addIceCandidate(ice)
            elif description["type"] == "offer":
                pc = self.pcs.get(remote) or self._peer(remote)
                answer = await gather_answer(pc, description)
                await self.sock.send(
                    {"type": "call.signal", "to": remote, "description": answer}
                )
            elif description["type"] == "answer":
                await apply_answer(self.pcs[remote], description)

    async def event(self, kind: str, **match: Any) -> dict[str, Any]:
        async with asyncio.timeout(15):
            while True:
                frame = await self.events.get()
                if frame["type"] == kind and all(
                    frame.get(k) == v for k, v in match.items()
                ):
                    return frame

    async def close(self) -> None:
        if self._reader is not None:
            # Closing the socket ends the reader (cancelling a websockets recv inside
            # wait_for can hang on Python 3.11).
            await self.sock.ws.close()
            with contextlib.suppress(Exception):
                await self._reader
        for pc in self.pcs.values():
            await pc.close()


@contextlib.asynccontextmanager
async def call_peer(
    server: ServerProcess, member: Member, room_id: int, name: str
) -> AsyncIterator[CallPeer]:
    async with await join(server, member, room_id) as sock:
        peer = CallPeer(name, sock)
        try:
            yield peer
        finally:
            await peer.close()


async def test_three_aiortc_peers_call_each_other_through_the_server(
    rtc_server: ServerProcess, rtc_world: World
) -> None:
    a, b, c = rtc_world.members[:3]
    room = rtc_world.room_id
    async with (
        call_peer(rtc_server, a, room, "a") as pa,
        call_peer(rtc_server, b, room, "b") as pb,
        call_peer(rtc_server, c, room, "c") as pc_,
    ):
        peers = [pa, pb, pc_]
        for peer in peers:
            await peer.join()  # each newcomer offers to those already there
        # Every pair connects, both ways.
        for peer in peers:
            others = [p for p in peers if p is not peer]
            async with asyncio.timeout(30):
                while set(peer.pcs) != {o.conn_id for o in others}:
                    await asyncio.sleep(0.05)
            for pc in peer.pcs.values():
                await wait_for_connection_state(pc, "connected", timeout=30)
        # Data channels carry messages both ways in every pair (the answering side
        # learns of the channel when it opens).
        for peer in peers:
            async with asyncio.timeout(15):
                while set(peer.channels) != set(peer.pcs):
                    await asyncio.sleep(0.05)
            for remote, channel in peer.channels.items():
                await wait_for_channel_open(channel, timeout=15)
                channel.send(f"hello {remote} from {peer.name}")
        for peer in peers:
            for other in peers:
                if other is peer:
                    continue
                async with asyncio.timeout(15):
                    text = await peer.messages[other.conn_id].get()
                assert text == f"hello {peer.conn_id} from {other.name}"
        # Audio and video frames arrive from every other participant.
        for peer in peers:
            for remote, tracks in peer.tracks.items():
                kinds = {t.kind: t for t in tracks}
                assert set(kinds) == {"audio", "video"}, (peer.name, remote)
                video = await collect_frames(kinds["video"], 5, timeout=20)
                assert (video[-1].width, video[-1].height) == (WIDTH, HEIGHT)
                audio = await collect_frames(kinds["audio"], 5, timeout=20)
                assert all(f.sample_rate > 0 for f in audio)
        # One leaves: the others are told, and the call goes on without them.
        await pc_.sock.send({"type": "call.leave"})
        for peer in (pa, pb):
            left = await peer.event("call.participant_left", connection_id=pc_.conn_id)
            assert left["reason"] == "left"
            assert left["user_id"] == c.id
        assert pa.pcs[pb.conn_id].connectionState == "connected"
        assert pb.pcs[pa.conn_id].connectionState == "connected"


async def test_echo_sends_back_what_it_receives(
    rtc_server: ServerProcess, rtc_world: World
) -> None:
    a = rtc_world.members[0]
    async with await join(rtc_server, a, rtc_world.room_id) as sock:
        pc = create_client_peer()
        video = PatternVideoTrack(WIDTH * 2, HEIGHT * 2, 15)
        pc.addTrack(video)
        pc.addTrack(ToneAudioTrack(660))
        back: dict[str, MediaStreamTrack] = {}
        pc.on("track", lambda t: back.__setitem__(t.kind, t))
        channel = pc.createDataChannel("echo")
        try:
            await sock.send(
                {"type": "echo.start", "id": "e", "description": await gather_offer(pc)}
            )
            answer = await sock.recv_until("echo.answer")
            assert answer["id"] == "e"
            await apply_answer(pc, answer["description"])
            await wait_for_connection_state(pc, "connected", timeout=20)
            # A second echo for the same user is refused while this one runs.
            other = create_client_peer()
            other.addTrack(ToneAudioTrack())
            await sock.send(
                {
                    "type": "echo.start",
                    "id": "e2",
                    "description": await gather_offer(other),
                }
            )
            assert (await sock.recv_until("error", id="e2"))["code"] == "echo_running"
            await other.close()
            # Our own frames come back: their painted numbers are ones we sent.
            frames = await collect_frames(back["video"], 10, timeout=20)
            numbers = [read_frame_number(f) for f in frames]
            seen = [n for n in numbers if n is not None]
            assert len(seen) >= 5, numbers
            assert seen == sorted(seen)
            assert await collect_frames(back["audio"], 10, timeout=20)
            await wait_for_channel_open(channel)
            got: asyncio.Queue[str] = asyncio.Queue()
            channel.on("message", got.put_nowait)
            channel.send("ping 1")
            async with asyncio.timeout(10):
                assert await got.get() == "ping 1"
            assert await echo_sessions(rtc_server) == 1
            # Hang-up: the server ends the session and closes its peer connection.
            await sock.send({"type": "echo.stop"})
            ended = await sock.recv_until("echo.ended")
            assert ended["reason"] == "hangup"
            await wait_until_closed(pc)
            assert await echo_sessions(rtc_server) == 0
        finally:
            await pc.close()


async def test_echo_ends_when_the_socket_goes(
    rtc_server: ServerProcess, rtc_world: World
) -> None:
    a = rtc_world.members[0]
    pc = create_client_peer()
    pc.addTrack(PatternVideoTrack(WIDTH, HEIGHT, FPS))
    try:
        async with await join(rtc_server, a, rtc_world.room_id) as sock:
            await sock.send(
                {"type": "echo.start", "description": await gather_offer(pc)}
            )
            answer = await sock.recv_until("echo.answer")
            await apply_answer(pc, answer["description"])
            await wait_for_connection_state(pc, "connected", timeout=20)
            assert await echo_sessions(rtc_server) == 1
        # The tab closed without hanging up: the server closes the echo peer
        # at once (its DTLS goodbye reaches us), leaving nothing open.
        await wait_until_closed(pc)
        async with asyncio.timeout(10):
            while await echo_sessions(rtc_server):
                await asyncio.sleep(0.1)
    finally:
        await pc.close()


async def wait_until_closed(pc: RTCPeerConnection) -> None:
    async with asyncio.timeout(10):
        while pc.connectionState not in ("closed", "failed"):
            await asyncio.sleep(0.05)


async def echo_sessions(server: ServerProcess) -> int:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        text = (await client.get("/metrics")).text
    match = re.search(r"^coilroom_echo_sessions (\S+)$", text, re.M)
    assert match, "the echo gauge is exported"
    return int(float(match.group(1)))
