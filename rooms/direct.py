"""Writing data frames straight to uvicorn's WebSocket protocol, when it is safe.

Through ASGI every frame costs an ``await send(...)``: the connection's task must be
woken, and uvicorn checks its state before framing. In a busy room that is most of
the server's CPU. uvicorn's ``websockets-sansio`` protocol keeps a sans-I/O
``websockets`` connection and an asyncio transport; when the transport is writable,
framing and writing there directly is exactly what uvicorn's ``send`` would do, minus
the task switch. When it is not writable (a slow client), or the server is not that
protocol, callers fall back to the ASGI ``send`` in a task, which waits.

This reaches into uvicorn's protocol object (pinned versions; ``direct_writer``
returns None when the attributes are not there, and the fallback is always correct).
"""

from __future__ import annotations

from typing import Any

from websockets.exceptions import InvalidState
from websockets.protocol import Protocol

REQUIRED = ("conn", "transport", "writable", "disconnected", "close_sent")


class DirectWriter:
    """Frames and writes text messages on one uvicorn WebSocket, without awaiting."""

    __slots__ = ("_proto",)

    def __init__(self, proto: Any) -> None:
        self._proto = proto

    def try_write(self, text: str) -> bool:
        """Write one text message now; False when it must wait (or cannot be sent)."""
        p = self._proto
        if p.disconnected or p.close_sent or not p.writable.is_set():
            return False
        transport = p.transport
        if transport.is_closing():
            return False
        try:
            p.conn.send_text(text.encode())
        except InvalidState:
            return False
        transport.write(b"".join(p.conn.data_to_send()))
        return True


def direct_writer(raw_send: Any) -> DirectWriter | None:
    """A direct writer for the socket whose ASGI send this is, if it is uvicorn's."""
    proto = getattr(raw_send, "__self__", None)
    if proto is None or not all(hasattr(proto, name) for name in REQUIRED):
        return None
    if not isinstance(proto.conn, Protocol):
        return None
    return DirectWriter(proto)
