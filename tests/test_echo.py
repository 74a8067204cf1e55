"""The echo-test peer: real aiortc clients against a real EchoService, over loopback."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aioice.ice
import av
import pytest
from aiortc import MediaStreamTrack, RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from signaling.echo import EchoRefused, EchoService, _EchoTrack
from signaling.rtc import (
    consent_freshness,
    host_address_restriction,
    restrict_host_addresses,
    restricted_host_addresses,
    set_consent_freshness,
)
from tests.rtcpeer import (
    LOOPBACK,
    PatternVideoTrack,
    ToneAudioTrack,
    apply_answer,
    collect_frames,
    create_client_peer,
    dominant_frequency,
    gather_offer,
    loopback_only,
    read_frame_number,
    wait_for_channel_open,
    wait_for_connection_state,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent

TIMEOUT = 10.0


@dataclass
class Ends:
    """Records the reasons passed to on_end."""

    reasons: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.changed.set()

    async def wait(self, timeout: float = TIMEOUT) -> str:
        async with asyncio.timeout(timeout):
            while not self.reasons:
                await self.changed.wait()
        return self.reasons[0]


@dataclass
class Client:
    pc: RTCPeerConnection
    channel: RTCDataChannel
    ends: Ends
    received: dict[str, MediaStreamTrack] = field(default_factory=dict)
    messages: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)


@pytest.fixture
async def clients() -> AsyncIterator[list[RTCPeerConnection]]:
    """Client peer connections made by a test, all closed after it."""
    pcs: list[RTCPeerConnection] = []
    try:
        yield pcs
    finally:
        for pc in pcs:
            await pc.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoService]:
    """A service restricted to loopback, which (process-wide) covers the clients too."""
    async with EchoService(
        max_sessions=2, max_seconds=30, host_addresses=LOOPBACK
    ) as service:
        yield service


def offer_client(
    clients: list[RTCPeerConnection], *, media: bool, noise: bool = False
) -> tuple[RTCPeerConnection, RTCDataChannel, dict[str, MediaStreamTrack]]:
    pc = create_client_peer()
    clients.append(pc)
    if media:
        pc.addTrack(PatternVideoTrack(640, 480, fps=15, noise=noise))
        pc.addTrack(ToneAudioTrack(440.0))
    received: dict[str, MediaStreamTrack] = {}
    pc.on("track", lambda track: received.__setitem__(track.kind, track))
    return pc, pc.createDataChannel("echo"), received


async def connect(
    echo: EchoService,
    clients: list[RTCPeerConnection],
    user_id: int,
    *,
    media: bool = False,
    noise: bool = False,
) -> Client:
    """Open an echo session for ``user_id`` and wait until the client is connected."""
    pc, channel, received = offer_client(clients, media=media, noise=noise)
    client = Client(pc, channel, Ends(), received)
    channel.on("message", client.messages.put_nowait)
    answer = await echo.start(user_id, await gather_offer(pc), client.ends)
    assert answer["type"] == "answer"
    assert "a=candidate:" in answer["sdp"]  # non-trickle: candidates included
    await apply_answer(pc, answer)
    await wait_for_connection_state(pc, "connected", TIMEOUT)
    await wait_for_channel_open(channel, TIMEOUT)
    return client


def server_peer(echo: EchoService, user_id: int) -> RTCPeerConnection:
    # White-box: the test must see the server's own peer connection closed.
    return echo._sessions[user_id].pc


@pytest.mark.parametrize("noise", [False, True], ids=["flat", "noisy"])
async def test_echo_sends_back_own_video_audio_and_messages(
    echo: EchoService, clients: list[RTCPeerConnection], noise: bool
) -> None:
    """The client gets its own numbered 640x480 frames, its tone and its message back."""
    client = await connect(echo, clients, 1, media=True, noise=noise)
    client.channel.send("ping 1")
    async with asyncio.timeout(TIMEOUT):
        assert await client.messages.get() == "ping 1"

    video = await collect_frames(client.received["video"], 20, TIMEOUT)
    assert {(f.width, f.height) for f in video} == {(640, 480)}
    numbers = [read_frame_number(f) for f in video]
    seen = [n for n in numbers if n is not None]
    assert len(seen) >= len(video) * 3 // 4, numbers
    assert seen == sorted(seen), numbers  # in order, our own counter
    assert len(set(seen)) > 10, numbers  # moving, not one frozen frame

    audio = await collect_frames(client.received["audio"], 50, TIMEOUT)
    # The first frames of a decoder may be silence; the tone follows.
    assert dominant_frequency(audio[25:]) == pytest.approx(440.0, rel=0.05)


async def test_echo_hangup_closes_server_peer(
    echo: EchoService, clients: list[RTCPeerConnection]
) -> None:
    """stop() closes the server's peer connection, frees the slot and reports "hangup"."""
    client = await connect(echo, clients, 1)
    server_pc = server_peer(echo, 1)
    assert echo.active() == 1

    assert await echo.stop(1) is True
    assert server_pc.connectionState == "closed"
    assert echo.active() == 0
    assert client.ends.reasons == ["hangup"]
    assert await echo.stop(1) is False
    # The client learns it too: the server shut DTLS down.
    await wait_for_connection_state(client.pc, "closed", TIMEOUT)


async def test_echo_client_closing_ends_session_as_failed(
    echo: EchoService, clients: list[RTCPeerConnection]
) -> None:
    """A client that closes its connection without hanging up ends the session quickly."""
    client = await connect(echo, clients, 1)
    server_pc = server_peer(echo, 1)
    await client.pc.close()

    assert await client.ends.wait(timeout=3.0) == "failed"
    assert server_pc.connectionState == "closed"
    assert echo.active() == 0


async def test_echo_time_limit_ends_session(clients: list[RTCPeerConnection]) -> None:
    """A session is ended with "timeout" when its time is up."""
    with loopback_only():
        async with EchoService(max_sessions=1, max_seconds=1.5) as echo:
            client = await connect(echo, clients, 1)
            server_pc = server_peer(echo, 1)
            assert await client.ends.wait() == "timeout"
            assert server_pc.connectionState == "closed"
            assert echo.active() == 0


async def test_echo_never_connected_times_out(
    clients: list[RTCPeerConnection],
) -> None:
    """A client that takes the answer but never connects frees its slot ("timeout")."""
    with loopback_only():
        async with EchoService(
            max_sessions=1, max_seconds=30, connect_timeout=0.5
        ) as echo:
            pc, _, _ = offer_client(clients, media=False)
            ends = Ends()
            await echo.start(1, await gather_offer(pc), ends)
            assert await ends.wait() == "timeout"
            assert echo.active() == 0


async def test_echo_second_session_for_user_refused(
    echo: EchoService, clients: list[RTCPeerConnection]
) -> None:
    """One echo session per user: a second start() is refused, the first goes on."""
    await connect(echo, clients, 1)
    pc, _, _ = offer_client(clients, media=False)
    with pytest.raises(EchoRefused) as refused:
        await echo.start(1, await gather_offer(pc))
    assert refused.value.code == "echo_running"
    assert refused.value.message
    assert echo.active() == 1
    assert server_peer(echo, 1).connectionState == "connected"


async def test_echo_global_cap_refused(
    echo: EchoService, clients: list[RTCPeerConnection]
) -> None:
    """Beyond max_sessions, start() is refused with "echo_busy"."""
    await connect(echo, clients, 1)
    await connect(echo, clients, 2)
    pc, _, _ = offer_client(clients, media=False)
    with pytest.raises(EchoRefused) as refused:
        await echo.start(3, await gather_offer(pc))
    assert refused.value.code == "echo_busy"
    assert echo.active() == 2


async def test_echo_shutdown_closes_every_session(
    clients: list[RTCPeerConnection],
) -> None:
    """Leaving the service ends every session with "shutdown" and closes its peer."""
    with loopback_only():
        async with EchoService(max_sessions=2, max_seconds=30) as echo:
            first = await connect(echo, clients, 1)
            second = await connect(echo, clients, 2)
            server_pcs = [server_peer(echo, 1), server_peer(echo, 2)]
        assert first.ends.reasons == second.ends.reasons == ["shutdown"]
        assert [pc.connectionState for pc in server_pcs] == ["closed", "closed"]
        assert echo.active() == 0
        pc, _, _ = offer_client(clients, media=False)
        with pytest.raises(EchoRefused) as refused:
            await echo.start(3, await gather_offer(pc))
        assert refused.value.code == "echo_busy"


@pytest.mark.parametrize(
    "offer",
    [
        {"type": "offer", "sdp": "garbage"},
        {"type": "offer", "sdp": ""},
        {"type": "offer", "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"},
        {"type": "answer", "sdp": "v=0\r\n"},
        {"type": "offer"},
        {"type": "offer", "sdp": "v=0\r\n" + "a=x\r\n" * 20_000},
    ],
    ids=["garbage", "empty", "no-ice", "answer", "no-sdp", "huge"],
)
async def test_echo_bad_offer_refused(echo: EchoService, offer: dict[str, str]) -> None:
    """An offer aiortc cannot use is refused with "bad_offer" and leaves nothing open."""
    with pytest.raises(EchoRefused) as refused:
        await echo.start(1, offer)
    assert refused.value.code == "bad_offer"
    assert echo.active() == 0


async def test_echo_hangup_while_answering_cancels_start(
    echo: EchoService, clients: list[RTCPeerConnection]
) -> None:
    """stop() during start() makes start() raise "echo_cancelled" and leaves nothing."""
    pc, _, _ = offer_client(clients, media=False)
    ends = Ends()
    starting = asyncio.create_task(echo.start(1, await gather_offer(pc), ends))
    await asyncio.sleep(0)  # a yield, not a wait: start() reserves the slot first
    assert echo.active() == 1
    assert await echo.stop(1) is True
    with pytest.raises(EchoRefused) as refused:
        await starting
    assert refused.value.code == "echo_cancelled"
    assert echo.active() == 0
    assert ends.reasons == []  # no session was ever started


async def test_echo_track_drops_oldest_frames_when_behind() -> None:
    """An echoed video track keeps only the newest frames when encoding lags."""
    track = _EchoTrack("video")
    frames = [av.VideoFrame(32, 16, "yuv420p") for _ in range(5)]
    for frame in frames:
        track.push(frame)
    track.finish()
    assert [await track.recv(), await track.recv()] == frames[-2:]
    with pytest.raises(MediaStreamError):
        await track.recv()


async def test_echo_start_outside_context_is_a_bug() -> None:
    """start() before entering the service is a programming error, not a refusal."""
    with pytest.raises(RuntimeError):
        await EchoService(max_sessions=1, max_seconds=1).start(1, {})


def test_host_address_restriction_includes_loopback() -> None:
    """The restriction makes aioice offer 127.0.0.1, which it otherwise leaves out."""
    with loopback_only():
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == LOOPBACK
        assert aioice.ice.get_host_addresses(use_ipv4=False, use_ipv6=True) == []
        with host_address_restriction(["::1", "127.0.0.1"]):
            assert aioice.ice.get_host_addresses(False, True) == ["::1"]
        assert restricted_host_addresses() == ("127.0.0.1",)
    assert restricted_host_addresses() is None
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(True, True)


@pytest.mark.parametrize("addresses", [[], ["localhost"], ["10.0.0.300"]])
def test_host_address_restriction_rejects_non_addresses(addresses: list[str]) -> None:
    """Only IP literals are accepted, and at least one."""
    with pytest.raises(ValueError, match="address"):
        restrict_host_addresses(addresses)
    assert restricted_host_addresses() is None


def test_consent_freshness_is_restored() -> None:
    """The consent knob applies inside the block and aioice's defaults come back."""
    with consent_freshness(1.0, 4):
        assert (aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES) == (1.0, 4)
    assert (aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES) == (5, 6)
    with pytest.raises(ValueError, match="consent"):
        set_consent_freshness(0.0, 4)


@pytest.mark.slow
async def test_echo_vanished_client_ends_session_as_failed() -> None:
    """A client killed without a goodbye is noticed by ICE consent checks ("failed")."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.rtcpeer",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        async with EchoService(
            max_sessions=1, max_seconds=60, host_addresses=LOOPBACK, consent=(1.0, 4)
        ) as echo:
            ends = Ends()
            async with asyncio.timeout(TIMEOUT):
                offer = json.loads(await child.stdout.readline())
                answer = await echo.start(1, offer, ends)
                child.stdin.write(json.dumps(answer).encode() + b"\n")
                assert await child.stdout.readline() == b"connected\n"
            server_pc = server_peer(echo, 1)
            child.kill()
            killed = time.monotonic()
            assert await ends.wait(timeout=12.0) == "failed"
            noticed = time.monotonic() - killed
            assert server_pc.connectionState == "closed"
            assert echo.active() == 0
            # about 4 x (1 s + 0.5 s): see signaling.rtc.set_consent_freshness
            assert noticed < 9.0, noticed
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
