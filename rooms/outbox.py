"""A connection's bounded send queue."""

from __future__ import annotations

import asyncio
from collections import deque

# Text frames (room socket, JSON) or binary frames (document socket, y-websocket).
Frame = str | bytes


class OutboxFull(Exception):
    """The connection fell too far behind; it must be closed and resume later."""


class Outbox:
    """Frames waiting to be written to one socket, with their chat sequence.

    ``put`` never blocks: fan-out must not wait for a slow client. When the queue
    holds ``max_frames`` the caller gets ``OutboxFull`` and ends that connection.
    """

    __slots__ = ("_closed", "_items", "_max", "_waiter")

    def __init__(self, max_frames: int) -> None:
        self._items: deque[tuple[int, Frame]] = deque()
        self._max = max_frames
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, text: Frame, seq: int = 0) -> None:
        """Queue a frame. Raises ``OutboxFull`` when the bound is reached."""
        if self._closed:
            return
        if len(self._items) >= self._max:
            raise OutboxFull
        self._items.append((seq, text))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get_batch(self) -> list[tuple[int, Frame]]:
        """Wait for frames and take all that are queued."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items

    def drain(self) -> list[tuple[int, Frame]]:
        """Take whatever is queued, without waiting."""
        items = list(self._items)
        self._items.clear()
        return items

    def close(self) -> None:
        self._closed = True
        self._items.clear()
