"""A connection's bounded send queue."""

from __future__ import annotations

# Text frames (room socket, JSON) or binary frames (document socket, y-websocket).
Frame = str | bytes


class OutboxFull(Exception):
    """The connection fell too far behind; it must be closed and resume later."""


class Outbox:
    """Frames waiting to be written to one socket, with their chat sequence.

    ``put`` never blocks: fan-out must not wait for a slow client. When the queue
    holds ``max_frames`` the caller gets ``OutboxFull`` and ends that connection.
    The sender takes everything at once (``drain``) when it writes. A plain list:
    an idle connection's empty queue should cost next to nothing.
    """

    __slots__ = ("_closed", "_items", "_max")

    def __init__(self, max_frames: int) -> None:
        self._items: list[tuple[int, Frame]] = []
        self._max = max_frames
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, frame: Frame, seq: int = 0) -> None:
        """Queue a frame. Raises ``OutboxFull`` when the bound is reached."""
        if self._closed:
            return
        if len(self._items) >= self._max:
            raise OutboxFull
        self._items.append((seq, frame))

    def drain(self) -> list[tuple[int, Frame]]:
        """Take whatever is queued."""
        items = self._items
        self._items = []
        return items

    def close(self) -> None:
        self._closed = True
        self._items = []
