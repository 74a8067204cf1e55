"""Who is in each room's call: the pure state, with the rules for joining and relaying.

``CallBook`` holds at most one live call per room and its participants (one per
connection). It decides refusals (full call, sender or target not in the call) and
the roles of each pair for perfect negotiation. Nothing here awaits or does I/O.
``signaling.store`` keeps a book for one process, or the same state in Redis for
several (with the same refusals and roles); ``signaling.service`` does the
storing and publishing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from rooms.call_messages import MediaState, SignalRefused
from rooms.presence import PresenceUser

MEDIA_KINDS = ("audio", "video", "screen")


def newcomer_is_polite(newcomer_rollback: bool, existing_rollback: bool) -> bool:
    """The role of a newcomer toward a participant already in the call.

    The newcomer makes the first offer, so glare only happens on later
    renegotiation; then the polite side rolls its offer back. The newcomer is the
    polite one unless it cannot roll back and the other can (aiortc accepts a
    rollback but does nothing, so it must be impolite whenever possible). Two
    peers that both cannot roll back get the default: they must not renegotiate
    at the same moment.
    """
    return newcomer_rollback or not existing_rollback


@dataclass(slots=True)
class Participant:
    conn_id: str
    user: PresenceUser
    media: MediaState
    rollback: bool
    joined_at: dt.datetime
    record_id: int = 0  # the participant's row in the call records
    used: set[str] = field(default_factory=set)  # media that was on at any time

    def note_media(self) -> None:
        for kind in MEDIA_KINDS:
            if getattr(self.media, kind):
                self.used.add(kind)

    def as_json(self) -> dict[str, object]:
        return {
            "connection_id": self.conn_id,
            "user": {
                "id": self.user.id,
                "name": self.user.name,
                "institution": self.user.institution,
                "country": self.user.country,
            },
            "media": self.media.as_json(),
            "joined_at": _iso(self.joined_at),
        }


@dataclass(slots=True)
class Call:
    call_id: int
    room_id: int
    started_at: dt.datetime
    started_by: int
    participants: dict[str, Participant] = field(default_factory=dict)
    # When each user's first connection joined, while any of theirs is in the call:
    # a person in the call from two tabs is there once, for call minutes.
    user_since: dict[int, dt.datetime] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {
            "call_id": self.call_id,
            "started_at": _iso(self.started_at),
            "participants": [p.as_json() for p in self.participants.values()],
        }


@dataclass(frozen=True, slots=True)
class Left:
    """A participant left; ``ended`` when it was the last one. ``user_seconds``: how
    long its user was in the call, when this was the user's last connection there
    (None while another of theirs stays)."""

    participant: Participant
    call: Call
    ended: bool
    user_seconds: float | None


class CallBook:
    """Live calls of rooms held by one process (the embedded default), by room."""

    def __init__(self) -> None:
        self._calls: dict[int, Call] = {}

    def call_of(self, room_id: int) -> Call | None:
        return self._calls.get(room_id)

    def participant(self, room_id: int, conn_id: str) -> Participant | None:
        call = self._calls.get(room_id)
        return None if call is None else call.participants.get(conn_id)

    def check_join(self, room_id: int, conn_id: str, max_participants: int) -> None:
        """Raise ``SignalRefused`` if this connection may not join now."""
        call = self._calls.get(room_id)
        if call is None:
            return
        if conn_id in call.participants:
            raise SignalRefused("already_in_call", "this connection is in the call")
        if len(call.participants) >= max_participants:
            raise SignalRefused(
                "call_full",
                f"the call is full ({max_participants} participants at most)",
            )

    def start(
        self, room_id: int, call_id: int, started_by: int, now: dt.datetime
    ) -> Call:
        assert room_id not in self._calls, "one live call per room"
        call = self._calls[room_id] = Call(call_id, room_id, now, started_by)
        return call

    def join(
        self,
        room_id: int,
        conn_id: str,
        user: PresenceUser,
        *,
        media: MediaState,
        rollback: bool,
        now: dt.datetime,
        max_participants: int,
    ) -> Participant:
        """Add a connection to the room's live call (``start`` it first)."""
        self.check_join(room_id, conn_id, max_participants)
        call = self._calls[room_id]
        participant = Participant(conn_id, user, media, rollback, now)
        participant.note_media()
        call.participants[conn_id] = participant
        call.user_since.setdefault(user.id, now)
        return participant

    def roles_toward(self, room_id: int, newcomer: Participant) -> dict[str, bool]:
        """For each other participant: is the newcomer the polite side of that pair?"""
        call = self._calls[room_id]
        return {
            other.conn_id: newcomer_is_polite(newcomer.rollback, other.rollback)
            for other in call.participants.values()
            if other is not newcomer
        }

    def leave(self, room_id: int, conn_id: str, now: dt.datetime) -> Left | None:
        """Remove a connection from the call; the call ends with its last participant."""
        call = self._calls.get(room_id)
        if call is None:
            return None
        participant = call.participants.pop(conn_id, None)
        if participant is None:
            return None
        user_id = participant.user.id
        seconds = None
        if not any(p.user.id == user_id for p in call.participants.values()):
            since = call.user_since.pop(user_id, participant.joined_at)
            seconds = max(0.0, (now - since).total_seconds())
        ended = not call.participants
        if ended:
            del self._calls[room_id]
        return Left(participant, call, ended, seconds)

    def set_media(
        self, room_id: int, conn_id: str, **changes: bool | None
    ) -> Participant:
        participant = self.sender(room_id, conn_id)
        values = participant.media.as_json()
        values.update({k: v for k, v in changes.items() if v is not None})
        participant.media = MediaState(**values)
        participant.note_media()
        return participant

    def sender(self, room_id: int, conn_id: str) -> Participant:
        """The participant behind ``conn_id``, or refuse: only participants may signal."""
        participant = self.participant(room_id, conn_id)
        if participant is None:
            raise SignalRefused("not_in_call", "join the call first")
        return participant

    def target(self, room_id: int, sender: str, to: str) -> Participant:
        """The participant a signal from ``sender`` may go to, or refuse."""
        self.sender(room_id, sender)
        if to == sender:
            raise SignalRefused("unknown_peer", "a signal cannot go to oneself")
        target = self.participant(room_id, to)
        if target is None:
            # Whether the connection exists elsewhere (another room, not in the call)
            # is not the sender's business: one answer for every case.
            raise SignalRefused("unknown_peer", "no such participant in this call")
        return target

    def rooms(self) -> list[int]:
        return list(self._calls)


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
