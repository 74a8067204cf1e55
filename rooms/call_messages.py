"""Sans-I/O schemas of the call frames on the room socket (``docs/protocol.md``, Calls).

Session descriptions and ICE candidates carry the keys the browser's
``RTCSessionDescription`` and ``RTCIceCandidate`` use (``toJSON()`` of each), so a
page passes them through unchanged. Nothing here awaits, logs or reads a clock.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
ConnectionId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
# A candidate line is short (RFC 8839: well under 256 bytes); the cap is generous.
CandidateLine = Annotated[str, msgspec.Meta(max_length=1024)]
SdpMid = Annotated[str, msgspec.Meta(max_length=64)]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class SessionDescription(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``RTCSessionDescriptionInit``: ``rollback`` carries no SDP."""

    type: Literal["offer", "answer", "pranswer", "rollback"]
    sdp: str = ""


class IceCandidate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``RTCIceCandidateInit``; an empty ``candidate`` marks the end of candidates."""

    candidate: CandidateLine
    sdpMid: SdpMid | None = None  # the browser's key names
    sdpMLineIndex: Annotated[int, msgspec.Meta(ge=0, le=1024)] | None = None
    usernameFragment: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class MediaState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    audio: bool = False
    video: bool = False
    screen: bool = False
    hand: bool = False

    def as_json(self) -> dict[str, bool]:
        return {
            "audio": self.audio,
            "video": self.video,
            "screen": self.screen,
            "hand": self.hand,
        }


class CallJoin(_Msg, tag="call.join"):
    """Join the room's call, starting it if there is none.

    ``rollback``: whether this peer can roll back a local offer (browsers can; aiortc
    cannot). The server never makes a peer that cannot the polite side of a pair
    when the other one can.
    """

    media: MediaState = MediaState()
    rollback: bool = True
    id: ClientId | None = None


class CallLeave(_Msg, tag="call.leave"):
    id: ClientId | None = None


class CallSignal(_Msg, tag="call.signal"):
    """An offer, answer or ICE candidate for one other participant of the call."""

    to: ConnectionId
    description: SessionDescription | None = None
    candidate: IceCandidate | None = None
    id: ClientId | None = None


class CallMedia(_Msg, tag="call.media"):
    """Change one's own media state; fields left out keep their value."""

    audio: bool | None = None
    video: bool | None = None
    screen: bool | None = None
    hand: bool | None = None
    id: ClientId | None = None


class CallModerate(_Msg, tag="call.moderate"):
    """Coordinators: mute a participant's microphone, or remove them from the call."""

    target: ConnectionId
    action: Literal["mute", "remove"]
    id: ClientId | None = None


class CallIceServers(_Msg, tag="call.ice_servers"):
    """Ask for fresh ICE servers (new TURN credentials), e.g. before an ICE restart."""

    id: ClientId | None = None


class EchoStart(_Msg, tag="echo.start"):
    """Open an echo test with the server: ``description`` is a complete (non-trickle) offer."""

    description: SessionDescription
    id: ClientId | None = None


class EchoStop(_Msg, tag="echo.stop"):
    id: ClientId | None = None


CallMessage = (
    CallJoin
    | CallLeave
    | CallSignal
    | CallMedia
    | CallModerate
    | CallIceServers
    | EchoStart
    | EchoStop
)
CALL_MESSAGES: tuple[type, ...] = CallMessage.__args__  # type: ignore[attr-defined]


class SignalRefused(Exception):
    """A call message that breaks a rule the schema cannot express."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_signal(signal: CallSignal, *, max_sdp_bytes: int) -> None:
    """Exactly one of ``description`` and ``candidate``; SDP within its limit."""
    if (signal.description is None) == (signal.candidate is None):
        raise SignalRefused(
            "invalid_message",
            "a signal carries exactly one of description or candidate",
        )
    description = signal.description
    if description is not None:
        check_description(description, max_sdp_bytes=max_sdp_bytes)


def check_description(description: SessionDescription, *, max_sdp_bytes: int) -> None:
    if description.type == "rollback":
        return
    if not description.sdp.startswith("v=0"):
        raise SignalRefused("invalid_message", "sdp does not start with v=0")
    if len(description.sdp.encode()) > max_sdp_bytes:
        raise SignalRefused("too_large", f"sdp is over {max_sdp_bytes} bytes")
