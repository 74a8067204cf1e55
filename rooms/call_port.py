"""What the room socket needs from calls: the port that ``signaling.CallService``
implements. Rooms sit below signaling, so the socket knows calls only by this."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from rooms.call_messages import CallJoin, CallMedia, CallModerate, CallSignal, EchoStart

if TYPE_CHECKING:
    from rooms.hub import Member

LeaveReason = Literal["left", "disconnected", "removed"]


@dataclass(frozen=True, slots=True)
class CallLimits:
    """Call limits (all settings; see the README)."""

    max_participants: int
    max_sdp_bytes: int
    signals_per_second: float
    signal_burst: int
    candidates_per_second: float
    candidate_burst: int


class CallPort(Protocol):
    limits: CallLimits

    async def snapshot(self, room_id: int) -> dict[str, object] | None:
        """The room's live call for the welcome frame, or None (the call state may
        be shared by several processes, so reading it can wait on Redis)."""
        ...

    async def join(self, room_id: int, member: Member, msg: CallJoin) -> None: ...

    async def leave(
        self,
        room_id: int,
        member: Member,
        reason: LeaveReason,
        message_id: str | None = None,
    ) -> bool: ...

    async def signal(self, room_id: int, member: Member, msg: CallSignal) -> None: ...

    async def media(self, room_id: int, member: Member, msg: CallMedia) -> None: ...

    async def moderate(
        self, room_id: int, member: Member, msg: CallModerate, *, allowed: bool
    ) -> None: ...

    async def ice_servers(
        self, room_id: int, member: Member, message_id: str | None
    ) -> None: ...

    async def echo_start(
        self, member: Member, msg: EchoStart, on_end: Callable[[str], None]
    ) -> bool: ...

    async def echo_stop(self, member: Member) -> bool: ...
