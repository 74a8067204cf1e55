"""uvicorn's ``websockets-sansio`` WebSocket protocol, trimmed for many idle sockets.

A room keeps its members' sockets open for hours, mostly idle, so what one open
socket costs in memory is what a server's capacity is. uvicorn's protocol is
written for the general case and keeps, per socket and for its whole life:

* an ``asyncio.Queue`` for the ASGI ``receive`` events: four ``deque``\\ s (its
  items, getters, putters and an ``Event`` for ``join``), about 3 KiB while empty;
* an ``asyncio.Event`` for "the transport is writable": one more ``deque``;
* the parsed upgrade request and the prepared response, with all their headers
  (about 2.5 KiB), long after the handshake that needed them.

``LeanWebSocketProtocol`` changes only that: an inbox and a gate that allocate a
waiter only while someone waits, and the handshake's request and response dropped
once the handshake is done. Everything else (framing, keepalive pings, closing,
back-pressure) is uvicorn's own code. Select it with ``uvicorn.Config(ws=...)``.

It relies on attribute names of uvicorn's protocol (``queue``, ``writable``,
``request``, ``response``), pinned with uvicorn in ``pyproject.toml``;
``tests/test_ws_protocol.py`` checks them, and the whole suite runs on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import (
    WebSocketsSansIOProtocol,
)


class Inbox:
    """The ASGI receive queue of one socket: unbounded (uvicorn pauses reading while
    anything is queued), one reader at a time (the app's ``receive``)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            if self._waiter is not None:
                raise RuntimeError("another task is already waiting on this socket")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class Gate:
    """``asyncio.Event`` for "the transport is writable", with no waiter list until
    a writer actually has to wait (only slow clients ever make one)."""

    __slots__ = ("_open", "_waiters")

    def __init__(self) -> None:
        self._open = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> None:
        if self._open:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with the per-socket overhead above removed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Gate()  # type: ignore[assignment]

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.handshake_complete:
            self._forget_handshake()

    def _forget_handshake(self) -> None:
        # The handshake is over (accepted, refused or failed): its request and
        # response are never read again. The headers are emptied, not just
        # unreferenced, because websockets' parser generator keeps the request
        # in a local variable for as long as the socket is open.
        for name in ("request", "response"):
            message = getattr(self, name, None)
            if message is not None:
                message.headers.clear()
                setattr(self, name, None)
