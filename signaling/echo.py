"""The echo test: the server is the other end of a call and sends back what it gets.

A user checks camera, microphone and connectivity before class by calling the
server: each audio and video track it receives is sent back (aiortc decodes and
re-encodes it, which is what costs CPU) and each data-channel message is echoed.

Signaling is non-trickle: the offer carries the client's candidates and
:meth:`EchoService.start` answers once ICE gathering is complete, so one
offer/answer exchange on the room socket sets the call up.

Bounds: one session per user, ``max_sessions`` in the process, ``max_seconds``
per session (``connect_timeout`` to get connected), and every
``RTCPeerConnection`` closed when its session ends, whatever ends it::

    start() ──> connecting ──> connected ──> closing ──> ended (on_end called once)
                    │              │
                    │              ├── stop()                     "hangup"
                    │              ├── ICE/DTLS failed, peer left "failed"
                    │              ├── max_seconds                "timeout"
                    └──────────────┴── service exit               "shutdown"
                    (never connected within connect_timeout:      "timeout")

Each session has one supervisor task, owned by the service: it waits for the
first end condition, closes the peer connection, ends the session's pump tasks
(one per echoed track, see :class:`_EchoTrack`), forgets the session and calls
``on_end``. The pyee callbacks only record state and wake the supervisor (a
data-channel echo only queues the message on the channel, which is bounded below).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

from aiortc import (
    MediaStreamTrack,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from av.frame import Frame

from signaling.rtc import (
    consent_freshness,
    create_peer_connection,
    host_address_restriction,
)

__all__ = ["EchoEnd", "EchoRefused", "EchoService"]

log = logging.getLogger(__name__)

# A browser's offer for audio + video + data is 5-10 KB; this is generous.
MAX_OFFER_BYTES: Final = 64 * 1024
# Echoes queued on one data channel beyond this are dropped: the client is not
# reading and the echo test must not buffer without bound on its behalf.
MAX_CHANNEL_BUFFERED_BYTES: Final = 1 << 20

# Frames queued per echoed track when encoding falls behind decoding (an
# overloaded CPU): the oldest are dropped. Video keeps the freshest picture;
# audio keeps 200 ms, so short stalls do not cut the sound.
MAX_QUEUED_FRAMES: Final = {"video": 2, "audio": 10}

# Exceptions that mean "stop", never "this offer is bad".
_NOT_OFFER_ERRORS = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


class EchoEnd(enum.StrEnum):
    """Why an echo session ended (the argument of ``on_end``)."""

    HANGUP = "hangup"  # stop() was called
    TIMEOUT = "timeout"  # max_seconds reached, or not connected within connect_timeout
    FAILED = "failed"  # ICE/DTLS failed, or the peer closed its connection
    SHUTDOWN = "shutdown"  # the service exited


class EchoRefused(Exception):
    """An echo session could not be started; ``code`` and ``message`` go to the user.

    Codes: ``echo_running`` (this user already has one), ``echo_busy`` (the server
    is at its cap, or shutting down; try later), ``bad_offer`` (not an SDP offer
    that aiortc accepts, or one with nothing to echo), ``echo_cancelled``
    (:meth:`EchoService.stop` or the service's exit came while answering).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"


class _EchoTrack(MediaStreamTrack):
    """The track sent back: frames of a received track, through a bounded queue.

    aiortc queues decoded frames without bound until they are read; a pump task
    (:func:`_pump`) reads them as they come, so that queue stays short, and this
    queue drops the oldest frame when the encoder is behind.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._frames: collections.deque[Frame] = collections.deque(
            maxlen=MAX_QUEUED_FRAMES[kind]
        )
        self._changed = asyncio.Event()
        self._finished = False

    def push(self, frame: Frame) -> None:
        self._frames.append(frame)
        self._changed.set()

    def finish(self) -> None:
        self._finished = True
        self._changed.set()

    async def recv(self) -> Frame:
        while not self._frames:
            if self._finished or self.readyState != "live":
                self.stop()
                raise MediaStreamError
            self._changed.clear()
            await self._changed.wait()
        return self._frames.popleft()


async def _pump(source: MediaStreamTrack, echo: _EchoTrack) -> None:
    """Move frames from a received track to its echo until the source ends."""
    try:
        while True:
            echo.push(await source.recv())
    except MediaStreamError:
        pass
    finally:
        echo.finish()


@dataclass(eq=False, slots=True)
class _Session:
    user_id: int
    pc: RTCPeerConnection
    on_end: Callable[[str], None] | None
    ended: asyncio.Future[EchoEnd]
    connected: asyncio.Future[None]
    # Done once the peer connection is closed and the session forgotten.
    closed: asyncio.Future[None]
    tracks: list[MediaStreamTrack] = field(default_factory=list)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def end(self, reason: EchoEnd) -> None:
        """Record the first end condition; later ones are ignored."""
        if not self.ended.done():
            self.ended.set_result(reason)

    def handle_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and not self.connected.done():
            self.connected.set_result(None)
        elif state in ("failed", "closed"):
            # "closed" without our close() means the peer shut DTLS down (it closed
            # its RTCPeerConnection): aiortc then closes ours by itself.
            self.end(EchoEnd.FAILED)

    def handle_datachannel(self, channel: RTCDataChannel) -> None:
        def echo(message: bytes | str) -> None:
            if (
                channel.readyState == "open"
                and channel.bufferedAmount <= MAX_CHANNEL_BUFFERED_BYTES
            ):
                channel.send(message)

        channel.on("message", echo)


class EchoService:
    """Echo-test peers for the users of this process, bounded and owned.

    Use as ``async with EchoService(...) as echo:``; leaving the block ends every
    session ("shutdown") and waits until each peer connection is closed.

    Args:
        max_sessions: sessions at once in this process (each costs CPU: decode
            and re-encode of the user's audio and video).
        max_seconds: lifetime of a session, from its answer.
        host_addresses: if given, ICE host candidates are gathered only on these
            addresses while the service is open (process-wide, see
            :func:`signaling.rtc.restrict_host_addresses`); ``None`` leaves the
            process setting alone.
        connect_timeout: seconds a session may take to connect (capped by
            ``max_seconds``), so a client that vanishes after the offer frees its
            slot early.
        consent: if given, ``(interval, failures)`` of ICE consent checks while
            the service is open (process-wide, see
            :func:`signaling.rtc.set_consent_freshness`): how fast a client that
            vanished without closing is noticed ("failed"). ``(1.0, 4)`` takes
            about 6 s; aioice's default about 30 s.
    """

    def __init__(
        self,
        *,
        max_sessions: int,
        max_seconds: float,
        host_addresses: list[str] | None = None,
        connect_timeout: float = 15.0,
        consent: tuple[float, int] | None = None,
    ) -> None:
        if max_sessions < 0 or max_seconds <= 0 or connect_timeout <= 0:
            raise ValueError(
                "max_sessions must be >= 0, max_seconds and connect_timeout > 0"
            )
        if consent is not None and (consent[0] <= 0 or consent[1] < 1):
            raise ValueError("consent interval must be > 0 and failures >= 1")
        self.max_sessions = max_sessions
        self.max_seconds = max_seconds
        self.connect_timeout = min(connect_timeout, max_seconds)
        self._host_addresses = host_addresses
        self._consent = consent
        self._sessions: dict[int, _Session] = {}
        self._state = _State.NEW
        self._exit_stack = contextlib.ExitStack()

    async def __aenter__(self) -> EchoService:
        if self._state is not _State.NEW:
            raise RuntimeError(f"EchoService entered twice (state {self._state.value})")
        if self._host_addresses is not None:
            self._exit_stack.enter_context(
                host_address_restriction(self._host_addresses)
            )
        if self._consent is not None:
            self._exit_stack.enter_context(consent_freshness(*self._consent))
        self._state = _State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """End every session ("shutdown") and wait until all are closed."""
        self._state = _State.CLOSING
        try:
            await self._end_all(self._sessions.values(), EchoEnd.SHUTDOWN)
        finally:
            self._exit_stack.close()

    def active(self) -> int:
        """Return the number of sessions, counting those still closing."""
        return len(self._sessions)

    async def start(
        self,
        user_id: int,
        offer: dict[str, str],
        on_end: Callable[[str], None] | None = None,
    ) -> dict[str, str]:
        """Answer a user's offer with the server's echo peer.

        Waits for ICE gathering, so the answer carries the server's candidates.
        If this coroutine raises (or is cancelled), no session exists and
        ``on_end`` is never called; once it returns, ``on_end`` is called exactly
        once, with an :class:`EchoEnd` value, when the session ends.

        Args:
            user_id: the caller; one session per user.
            offer: ``{"type": "offer", "sdp": ...}`` as the browser produces it,
                with the client's candidates in the SDP (non-trickle).
            on_end: called with the reason when the session ends. It runs in the
                session's supervisor task and must not block.

        Returns:
            ``{"type": "answer", "sdp": ...}``.

        Raises:
            EchoRefused: ``echo_running``, ``echo_busy``, ``bad_offer`` or
                ``echo_cancelled``.
        """
        if self._state is _State.NEW:
            raise RuntimeError("EchoService.start() before entering its context")
        sdp = _parse_offer(offer)
        if self._state is _State.CLOSING:
            raise EchoRefused(
                "echo_busy", "The echo test is restarting; try again in a minute."
            )
        if user_id in self._sessions:
            raise EchoRefused(
                "echo_running", "You already have an echo test running; hang up first."
            )
        if len(self._sessions) >= self.max_sessions:
            raise EchoRefused(
                "echo_busy",
                "Too many echo tests are running right now; try again in a minute.",
            )
        loop = asyncio.get_running_loop()
        session = _Session(
            user_id=user_id,
            pc=create_peer_connection(),
            on_end=on_end,
            ended=loop.create_future(),
            connected=loop.create_future(),
            closed=loop.create_future(),
        )
        # Reserve the slot before the first await: concurrent starts see it.
        self._sessions[user_id] = session
        try:
            answer = await self._negotiate(session, sdp)
            if session.ended.done():
                # stop() or the service's exit came while we negotiated.
                raise EchoRefused(
                    "echo_cancelled", "The echo test was ended before it started."
                )
        except BaseException:
            await self._forget(session)
            raise
        session.task = asyncio.create_task(
            self._supervise(session), name=f"echo-session-{user_id}"
        )
        log.info("echo session started for user %s", user_id)
        return answer

    async def stop(self, user_id: int) -> bool:
        """Hang up the user's session and wait until it is closed.

        Returns:
            True if the user had a session (ended now, or already ending).
        """
        session = self._sessions.get(user_id)
        if session is None:
            return False
        await self._end_all([session], EchoEnd.HANGUP)
        return True

    async def _negotiate(self, session: _Session, sdp: str) -> dict[str, str]:
        pc = session.pc
        pc.on("connectionstatechange", session.handle_connection_state)
        pc.on("datachannel", session.handle_datachannel)
        pc.on("track", session.tracks.append)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if not pc.getTransceivers() and pc.sctp is None:
                raise ValueError("offer has no media and no data channel")
            # Echo: each received track is sent back on its own transceiver.
            # aiortc's sender encodes again the frames its receiver decoded.
            echoes = [_EchoTrack(track.kind) for track in session.tracks]
            for echo in echoes:
                pc.addTrack(echo)
            await pc.setLocalDescription(await pc.createAnswer())
        except _NOT_OFFER_ERRORS:
            raise
        except BaseException as exc:
            # Any other failure is aiortc or av rejecting the SDP (ValueError,
            # InvalidStateError, codec errors); some Rust-backed libraries
            # (cryptography) raise pyo3's PanicException, a BaseException.
            log.info("echo offer of user %s refused: %r", session.user_id, exc)
            raise EchoRefused(
                "bad_offer", "The call offer could not be used; reload the page."
            ) from exc
        session.pumps.extend(
            asyncio.create_task(_pump(track, echo), name=f"echo-{track.kind}")
            for track, echo in zip(session.tracks, echoes, strict=True)
        )
        session.tracks.clear()
        local = pc.localDescription
        return {"type": local.type, "sdp": local.sdp}

    async def _supervise(self, session: _Session) -> None:
        reason = EchoEnd.SHUTDOWN  # if this task is cancelled from outside
        try:
            reason = await self._wait_for_end(session)
        finally:
            await self._forget(session)
            log.info("echo session of user %s ended: %s", session.user_id, reason)
            if session.on_end is not None:
                try:
                    session.on_end(reason)
                except Exception:
                    log.exception("echo on_end callback failed")

    async def _wait_for_end(self, session: _Session) -> EchoEnd:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout_at(started + self.max_seconds):
                async with asyncio.timeout_at(started + self.connect_timeout):
                    # asyncio.wait never cancels the futures it waits on.
                    await asyncio.wait(
                        {session.connected, session.ended},
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                await asyncio.wait({session.ended})
        except TimeoutError:
            session.end(EchoEnd.TIMEOUT)
        return session.ended.result()

    async def _forget(self, session: _Session) -> None:
        # Closing the connection ends the received tracks, which ends the pumps;
        # cancel them anyway so none can outlive the session.
        await _close_quietly(session.pc)
        for pump in session.pumps:
            pump.cancel()
        if session.pumps:
            await asyncio.wait(session.pumps)
        del self._sessions[session.user_id]
        session.closed.set_result(None)

    async def _end_all(self, sessions: Iterable[_Session], reason: EchoEnd) -> None:
        """End the sessions and wait until each is closed (negotiating ones too)."""
        waits = []
        for session in list(sessions):
            session.end(reason)
            waits.append(session.closed)
        if waits:
            # asyncio.wait, not gather(): a caller cancelled here must not cancel
            # the closing, which the supervisors (or start()) finish anyway.
            await asyncio.wait(waits)


def _parse_offer(offer: object) -> str:
    if (
        not isinstance(offer, dict)
        or offer.get("type") != "offer"
        or not isinstance(offer.get("sdp"), str)
    ):
        raise EchoRefused("bad_offer", "Expected an SDP offer.")
    sdp: str = offer["sdp"]
    if len(sdp.encode()) > MAX_OFFER_BYTES:
        raise EchoRefused("bad_offer", "The call offer is too large.")
    return sdp


async def _close_quietly(pc: RTCPeerConnection) -> None:
    """Close a peer connection; a failure here is logged, never raised."""
    try:
        await pc.close()
    except Exception:
        log.exception("closing an echo peer connection failed")
