"""Test-side aiortc peers: loopback-only connections and recognisable synthetic media.

The video track paints a frame counter as 16 black/white cells across the top of
each frame above a bright-left/dark-right band, coarse enough to survive two VP8
encodes (client -> echo -> client), so a test can check that the frames it gets
back are its own and in order (:func:`read_frame_number`). The audio track is a
pure tone whose pitch survives Opus (:func:`dominant_frequency`).

Signaling is non-trickle: :func:`gather_offer` returns the local description once
ICE gathering is complete, candidates included.

``python -m tests.rtcpeer [--media]`` runs one loopback client in its own process,
speaking JSON lines: it prints its offer, reads the answer, prints ``connected``
and stays until stdin closes. Tests kill it to make a peer vanish without a
goodbye (no DTLS close_notify).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import fractions
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence

import av
from aiortc import (
    MediaStreamTrack,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)

from signaling.rtc import create_peer_connection, host_address_restriction

LOOPBACK = ["127.0.0.1"]
VIDEO_CLOCK_RATE = 90_000
AUDIO_SAMPLE_RATE = 48_000
AUDIO_PTIME = 0.02  # seconds of audio per frame (Opus' usual 20 ms)
COUNTER_BITS = 16
_WHITE, _BLACK, _BRIGHT, _DARK = 235, 16, 200, 50
# Random bytes mapped to 64..191: texture without clipping at black or white.
_MID_RANGE = bytes(64 + (i >> 1) for i in range(256))


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Gather ICE candidates only on 127.0.0.1 inside the block (process-wide)."""
    with host_address_restriction(LOOPBACK):
        yield


def create_client_peer() -> RTCPeerConnection:
    """Build a client peer with no ICE servers (use inside :func:`loopback_only`)."""
    return create_peer_connection()


async def gather_offer(pc: RTCPeerConnection) -> dict[str, str]:
    """Create an offer, wait for ICE gathering, and return it as the browser would."""
    await pc.setLocalDescription(await pc.createOffer())
    return {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp}


async def gather_answer(pc: RTCPeerConnection, offer: dict[str, str]) -> dict[str, str]:
    """Apply a remote offer and return the complete (non-trickle) answer."""
    await pc.setRemoteDescription(RTCSessionDescription(**offer))
    await pc.setLocalDescription(await pc.createAnswer())
    return {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp}


async def apply_answer(pc: RTCPeerConnection, answer: dict[str, str]) -> None:
    """Set the remote peer's answer."""
    await pc.setRemoteDescription(RTCSessionDescription(**answer))


async def wait_for_connection_state(
    pc: RTCPeerConnection, state: str = "connected", timeout: float = 10.0
) -> None:
    """Wait until ``pc.connectionState == state``.

    Raises:
        TimeoutError: not reached within ``timeout`` seconds.
    """
    reached = asyncio.Event()

    def check() -> None:
        if pc.connectionState == state:
            reached.set()

    pc.on("connectionstatechange", check)
    try:
        check()
        async with asyncio.timeout(timeout):
            await reached.wait()
    finally:
        pc.remove_listener("connectionstatechange", check)


async def wait_for_channel_open(channel: RTCDataChannel, timeout: float = 10.0) -> None:
    """Wait until a data channel can send.

    Raises:
        TimeoutError: not open within ``timeout`` seconds.
    """
    opened = asyncio.Event()
    channel.on("open", opened.set)
    try:
        if channel.readyState != "open":
            async with asyncio.timeout(timeout):
                await opened.wait()
    finally:
        channel.remove_listener("open", opened.set)


async def collect_frames(
    track: MediaStreamTrack, count: int, timeout: float = 10.0
) -> list[av.VideoFrame | av.AudioFrame]:
    """Receive ``count`` frames from a (remote) track.

    Raises:
        TimeoutError: fewer frames arrived within ``timeout`` seconds.
    """
    frames: list[av.VideoFrame | av.AudioFrame] = []
    async with asyncio.timeout(timeout):
        while len(frames) < count:
            frames.append(await track.recv())
    return frames


class _PacedTrack(MediaStreamTrack):
    """A track that produces frames in real time at a fixed rate."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self._period = 1.0 / rate
        self._start: float | None = None
        self.sent = 0

    async def _pace(self) -> int:
        """Sleep until the next frame is due; return its index."""
        if self._start is None:
            self._start = time.monotonic()
        index = self.sent
        delay = self._start + index * self._period - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self.sent += 1
        return index


class PatternVideoTrack(_PacedTrack):
    """Video whose frames carry their own number (see :func:`read_frame_number`).

    Layout, top to bottom: the frame number as 16 black/white cells (a quarter of
    the height), a bright-left/dark-right marker band (a quarter), then the
    "scene" (half): flat grey, or with ``noise=True`` fresh random texture every
    frame, which no encoder can predict (a worst case, like a dark, grainy webcam;
    for benchmarks).
    """

    kind = "video"

    def __init__(
        self,
        width: int = 640,
        height: int = 480,
        fps: float = 15.0,
        *,
        noise: bool = False,
    ) -> None:
        super().__init__(fps)
        if width % (2 * COUNTER_BITS) or height % 8:
            raise ValueError("width must be a multiple of 32, height of 8")
        self.width, self.height, self.fps, self.noise = width, height, fps, noise

    async def recv(self) -> av.VideoFrame:
        index = await self._pace()
        frame = av.VideoFrame(self.width, self.height, "yuv420p")
        luma = frame.planes[0]
        band = self.height // 4
        cell = self.width // COUNTER_BITS
        counter = index % (1 << COUNTER_BITS)
        top = b"".join(
            bytes([_WHITE if counter >> (COUNTER_BITS - 1 - bit) & 1 else _BLACK])
            * cell
            for bit in range(COUNTER_BITS)
        )
        half = self.width // 2
        marker = bytes([_BRIGHT]) * half + bytes([_DARK]) * half
        pad = bytes(luma.line_size - self.width)
        rows = [(top + pad) * band, (marker + pad) * band]
        scene_rows = self.height - 2 * band
        if self.noise:
            texture = os.urandom(self.width * scene_rows).translate(_MID_RANGE)
            rows += [
                texture[y * self.width : (y + 1) * self.width] + pad
                for y in range(scene_rows)
            ]
        else:
            rows.append((bytes([128]) * self.width + pad) * scene_rows)
        luma.update(b"".join(rows))
        for chroma in frame.planes[1:]:
            row = bytes([128]) * half + bytes(chroma.line_size - half)
            chroma.update(row * (self.height // 2))
        frame.pts = round(index / self.fps * VIDEO_CLOCK_RATE)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        return frame


def _mean_luma(frame: av.VideoFrame, x0: int, y0: int, x1: int, y1: int) -> float:
    plane = frame.planes[0]
    data = bytes(plane)
    stride = plane.line_size
    total = count = 0
    for y in range(y0, y1, 2):
        row = data[y * stride + x0 : y * stride + x1 : 2]
        total += sum(row)
        count += len(row)
    return total / count


def read_frame_number(frame: av.VideoFrame) -> int | None:
    """Return the number painted by :class:`PatternVideoTrack`, or None if absent.

    Reads the middle of each cell (edges blur when encoded) and requires the
    bright/dark marker band, so an unrelated picture does not pass.
    """
    width, height = frame.width, frame.height
    band, cell = height // 4, width // COUNTER_BITS
    y0, y1 = band + band // 4, band + band * 3 // 4
    if not (
        _mean_luma(frame, width // 8, y0, width * 3 // 8, y1) > 150
        and _mean_luma(frame, width * 5 // 8, y0, width * 7 // 8, y1) < 100
    ):
        return None
    number = 0
    for bit in range(COUNTER_BITS):
        x = bit * cell
        mean = _mean_luma(
            frame, x + cell // 4, band // 4, x + cell * 3 // 4, band * 3 // 4
        )
        if _BLACK + 40 < mean < _WHITE - 40:
            return None  # neither black nor white: not our pattern
        number = number << 1 | (mean > 128)
    return number


class ToneAudioTrack(_PacedTrack):
    """A mono sine tone, 20 ms frames at 48 kHz (what Opus encodes natively)."""

    kind = "audio"

    def __init__(self, frequency: float = 440.0, amplitude: int = 8000) -> None:
        super().__init__(1 / AUDIO_PTIME)
        self.frequency = frequency
        self._samples = round(AUDIO_SAMPLE_RATE * AUDIO_PTIME)
        self._amplitude = amplitude

    async def recv(self) -> av.AudioFrame:
        index = await self._pace()
        first = index * self._samples
        step = 2 * math.pi * self.frequency / AUDIO_SAMPLE_RATE
        pcm = array.array(
            "h",
            (
                round(self._amplitude * math.sin(step * (first + n)))
                for n in range(self._samples)
            ),
        )
        frame = av.AudioFrame(format="s16", layout="mono", samples=self._samples)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = AUDIO_SAMPLE_RATE
        frame.pts = first
        frame.time_base = fractions.Fraction(1, AUDIO_SAMPLE_RATE)
        return frame


def dominant_frequency(frames: Sequence[av.AudioFrame]) -> float:
    """Estimate the pitch of packed s16 audio (first channel) from zero crossings.

    Returns 0.0 for silence (nothing above a small noise floor).
    """
    samples: list[int] = []
    rate = frames[0].sample_rate
    for frame in frames:
        if frame.format.name != "s16":
            raise ValueError(f"expected packed s16 audio, got {frame.format.name}")
        pcm = array.array("h", bytes(frame.planes[0]))
        channels = len(frame.layout.channels)
        samples.extend(pcm[: frame.samples * channels : channels])
    crossings, sign = 0, 0
    for sample in samples:
        # Hysteresis: noise around zero is not a crossing.
        if sample > 500 and sign <= 0:
            crossings, sign = crossings + (sign < 0), 1
        elif sample < -500 and sign >= 0:
            crossings, sign = crossings + (sign > 0), -1
    return crossings / 2 / (len(samples) / rate)


async def _run_stdio_peer(media: bool) -> None:
    """Run one loopback client peer over JSON lines on stdin/stdout."""
    loop = asyncio.get_running_loop()
    with loopback_only():
        pc = create_client_peer()
        try:
            if media:
                pc.addTrack(PatternVideoTrack())
                pc.addTrack(ToneAudioTrack())
            pc.createDataChannel("echo")
            print(json.dumps(await gather_offer(pc)), flush=True)
            answer = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
            await apply_answer(pc, answer)
            await wait_for_connection_state(pc, "connected")
            print("connected", flush=True)
            await loop.run_in_executor(None, sys.stdin.read)  # until stdin closes
        finally:
            await pc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=_run_stdio_peer.__doc__)
    parser.add_argument("--media", action="store_true", help="send video and audio")
    asyncio.run(_run_stdio_peer(parser.parse_args().media))
