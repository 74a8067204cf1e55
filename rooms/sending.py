"""Sending what a connection has queued: straight to uvicorn's WebSocket protocol
while the socket is writable, else from a task that waits for it.

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

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter
from websockets.exceptions import InvalidState
from websockets.protocol import Protocol

REQUIRED = ("conn", "transport", "writable", "disconnected", "close_sent")


class DirectWriter:
    """Frames and writes text messages on one uvicorn WebSocket, without awaiting."""

    __slots__ = ("_proto",)

    def __init__(self, proto: Any) -> None:
        self._proto = proto

    def try_write(self, message: str | bytes) -> bool:
        """Write one message now; False when it must wait (or cannot be sent)."""
        p = self._proto
        if p.disconnected or p.close_sent or not p.writable.is_set():
            return False
        transport = p.transport
        if transport.is_closing():
            return False
        try:
            if isinstance(message, str):
                p.conn.send_text(message.encode())
            else:
                p.conn.send_binary(message)
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


class QueuedSender:
    """Sends a connection's queued frames soon after they are queued: once per burst
    (a call_soon, not a task switch per frame), written directly while the socket
    is writable. When it is not (a slow client), a pump task waits for it and sends
    in order until the queue is empty; direct writes never overtake the pump. The
    pump exists only while needed: an idle connection keeps no task.
    """

    __slots__ = (
        "_on_error",
        "_pumping",
        "_running",
        "_scheduled",
        "_send",
        "_sent_by_task",
        "_sent_direct",
        "_take",
        "_task",
        "direct",
    )

    def __init__(
        self,
        *,
        direct: DirectWriter | None,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        take: Callable[[], list[str] | list[bytes]],
        sent: Counter,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.direct = direct
        self._send = send
        self._take = take
        self._sent_direct = sent.labels("direct")
        self._sent_by_task = sent.labels("task")
        self._on_error = on_error
        self._running = False
        self._scheduled = False
        self._pumping = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> QueuedSender:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        """Live frames may go out from now on (the opening frames were sent)."""
        self._running = True
        self.send_queued()

    async def stop(self) -> None:
        """No more sending; a pump still waiting on the socket is cancelled and awaited."""
        self._running = False
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def request(self) -> None:
        """Frames were queued: send them in a moment."""
        if self._running and not self._scheduled and not self._pumping:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.send_queued)

    def send_queued(self) -> None:
        self._scheduled = False
        if not self._running or self._pumping:
            return
        messages = self._take()
        if self.direct is not None:
            for i, message in enumerate(messages):
                if not self.direct.try_write(message):
                    messages = messages[i:]
                    break
                self._sent_direct.inc()
            else:
                return
        if messages:
            self._pumping = True
            self._task = asyncio.create_task(self._pump(messages))

    async def _pump(self, messages: list[str] | list[bytes]) -> None:
        try:
            while messages:
                for message in messages:
                    key = "text" if isinstance(message, str) else "bytes"
                    await self._send({"type": "websocket.send", key: message})
                    self._sent_by_task.inc()
                messages = self._take()
        except Exception as exc:  # noqa: BLE001 - handed to the connection, which ends
            self._on_error(exc)
        finally:
            self._pumping = False
