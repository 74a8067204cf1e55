"""Who is in each room: per connection, aggregated per user across tabs and devices.

``PresenceBook`` is the pure state. ``PresenceStore`` is the port the room socket uses;
``MemoryPresence`` keeps the book in this process (the embedded default). A shared
store (Redis, with expiry for processes that die) implements the same port.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Literal, Protocol

Status = Literal["active", "away"]


@dataclass(frozen=True, slots=True)
class PresenceUser:
    """What others see of a member: shown in the snapshot and in join events."""

    id: int
    name: str
    institution: str | None
    country: str | None


@dataclass(frozen=True, slots=True)
class ConnectionPresence:
    user: PresenceUser
    status: Status = "active"
    typing: bool = False


@dataclass(frozen=True, slots=True)
class UserPresence:
    """One user's presence in one room, over all of their connections."""

    user: PresenceUser
    status: Status
    typing: bool
    connections: int

    def as_json(self) -> dict[str, object]:
        return {
            "user": {
                "id": self.user.id,
                "name": self.user.name,
                "institution": self.user.institution,
                "country": self.user.country,
            },
            "status": self.status,
            "typing": self.typing,
            "connections": self.connections,
        }


@dataclass(frozen=True, slots=True)
class Change:
    """A user's presence before and after one connection changed."""

    before: UserPresence | None
    after: UserPresence | None

    @property
    def kind(self) -> Literal["join", "leave", "update", "none"]:
        if self.before is None and self.after is not None:
            return "join"
        if self.before is not None and self.after is None:
            return "leave"
        if self.before != self.after:
            # A new tab alone (connection count) is not news for the room.
            if (
                self.before is not None
                and self.after is not None
                and (self.before.status, self.before.typing)
                == (self.after.status, self.after.typing)
            ):
                return "none"
            return "update"
        return "none"


def aggregate(connections: list[ConnectionPresence]) -> UserPresence | None:
    """Online while any connection lives; active if any tab is; typing if any tab is."""
    if not connections:
        return None
    return UserPresence(
        user=connections[-1].user,
        status="active" if any(c.status == "active" for c in connections) else "away",
        typing=any(c.typing for c in connections),
        connections=len(connections),
    )


class PresenceBook:
    """Pure presence state for many rooms: ``room -> connection -> presence``."""

    def __init__(self) -> None:
        self._rooms: dict[int, dict[str, ConnectionPresence]] = {}

    def _user(self, room_id: int, user_id: int) -> UserPresence | None:
        conns = self._rooms.get(room_id, {})
        return aggregate([c for c in conns.values() if c.user.id == user_id])

    def add(self, room_id: int, conn_id: str, user: PresenceUser) -> Change:
        before = self._user(room_id, user.id)
        self._rooms.setdefault(room_id, {})[conn_id] = ConnectionPresence(user)
        return Change(before, self._user(room_id, user.id))

    def update(
        self,
        room_id: int,
        conn_id: str,
        *,
        status: Status | None = None,
        typing: bool | None = None,
    ) -> Change:
        conns = self._rooms.get(room_id, {})
        current = conns.get(conn_id)
        if current is None:
            return Change(None, None)
        before = self._user(room_id, current.user.id)
        conns[conn_id] = replace(
            current,
            status=current.status if status is None else status,
            typing=current.typing if typing is None else typing,
        )
        return Change(before, self._user(room_id, current.user.id))

    def remove(self, room_id: int, conn_id: str) -> Change:
        conns = self._rooms.get(room_id, {})
        current = conns.pop(conn_id, None)
        if current is None:
            return Change(None, None)
        if not conns:
            del self._rooms[room_id]
        return Change(
            aggregate(
                [*(c for c in conns.values() if c.user.id == current.user.id), current]
            ),
            self._user(room_id, current.user.id),
        )

    def snapshot(self, room_id: int) -> list[UserPresence]:
        by_user: dict[int, list[ConnectionPresence]] = {}
        for conn in self._rooms.get(room_id, {}).values():
            by_user.setdefault(conn.user.id, []).append(conn)
        return sorted(
            (p for p in map(aggregate, by_user.values()) if p is not None),
            key=lambda p: p.user.name.lower(),
        )

    def connections_of(self, user_id: int) -> int:
        return sum(
            1
            for conns in self._rooms.values()
            for c in conns.values()
            if c.user.id == user_id
        )


class PresenceStore(Protocol):
    """Where presence lives; shared by all processes that serve the same rooms."""

    async def add(self, room_id: int, conn_id: str, user: PresenceUser) -> Change: ...

    async def update(
        self,
        room_id: int,
        conn_id: str,
        *,
        status: Status | None = None,
        typing: bool | None = None,
    ) -> Change: ...

    async def remove(self, room_id: int, conn_id: str) -> Change: ...

    async def snapshot(self, room_id: int) -> list[UserPresence]: ...


class MemoryPresence:
    """The in-process presence store (one process, no expiry needed)."""

    def __init__(self) -> None:
        self.book = PresenceBook()

    async def add(self, room_id: int, conn_id: str, user: PresenceUser) -> Change:
        return self.book.add(room_id, conn_id, user)

    async def update(
        self,
        room_id: int,
        conn_id: str,
        *,
        status: Status | None = None,
        typing: bool | None = None,
    ) -> Change:
        return self.book.update(room_id, conn_id, status=status, typing=typing)

    async def remove(self, room_id: int, conn_id: str) -> Change:
        return self.book.remove(room_id, conn_id)

    async def snapshot(self, room_id: int) -> list[UserPresence]:
        return self.book.snapshot(room_id)


@contextlib.asynccontextmanager
async def open_presence(url: str) -> AsyncIterator[PresenceStore]:
    """The presence store for a broker URL: in-process when empty or ``memory://``."""
    if url in ("", "memory://"):
        yield MemoryPresence()
        return
    raise ValueError("only in-process presence is available in this version")
