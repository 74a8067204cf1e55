"""A lean WebSocket client for load generation (raw asyncio protocol, no library).

One Python process must read tens of thousands of frames per second on a 2-core
machine, so this client does the bare minimum per frame: it finds frame
boundaries, looks for the benchmark marker in text frames and records the
latency. No JSON is decoded on the hot path. Frames are not fragmented by the
servers under test and no extension is negotiated (no compression).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

from websockets.speedups import apply_mask

MARKER = b"bench:"
LARGE_FRAME = 1 << 17  # frames above this are collected read by read
# A frame handler gets (connection, payload, payload start, payload end, now_ns).
OnText = Callable[["LeanSocket", bytes, int, int, int], None]


class HandshakeError(Exception):
    """The server did not answer the upgrade with 101 Switching Protocols."""


def encode_data_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """A masked, final data frame (client to server): opcode 1 text, 2 binary."""
    size, first = len(payload), 0x80 | opcode
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 65536:
        header = bytes((first, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + mask + apply_mask(payload, mask)


def encode_text_frame(payload: bytes, mask: bytes) -> bytes:
    """A masked, final text frame (client to server)."""
    return encode_data_frame(1, payload, mask)


def encode_control_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """A masked control frame (pong, close); payload under 126 bytes."""
    return (
        bytes((0x80 | opcode, 0x80 | len(payload))) + mask + apply_mask(payload, mask)
    )


class LeanSocket(asyncio.Protocol):
    """One client connection: HTTP upgrade, then frame parsing with a callback."""

    def __init__(self, path: str, host: str, on_text: OnText) -> None:
        self.path = path
        self.host = host
        self.on_text = on_text
        self.mask = os.urandom(4)
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.first_text: asyncio.Future[None] = (
            asyncio.get_running_loop().create_future()
        )
        self.frames = 0
        self._buf = b""
        # A frame larger than one read (a document's whole state) is collected as
        # a list of reads and joined once: growing one bytes object read by read
        # copies it again on every read, which a real client does not do.
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._need = 0
        self._upgraded = False

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        if self._parts:
            self._parts.append(data)
            self._parts_size += len(data)
            if self._parts_size < self._need:
                return
            buf = b"".join(self._parts)
            self._parts.clear()
        else:
            buf = self._buf + data if self._buf else data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self._fail(f"handshake refused: {status.decode(errors='replace')}")
                return
            self._upgraded = True
            self._on_upgraded()
            if not self.opened.done():
                self.opened.set_result(None)
            buf = buf[end + 4 :]
        now = time.monotonic_ns()
        pos, size, on_data = 0, len(buf), self._on_data
        while size - pos >= 2:
            b0, length = buf[pos], buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            end = start + length
            if end > size:
                if end - pos > LARGE_FRAME:
                    self._parts.append(buf[pos:])
                    self._parts_size, self._need = size - pos, end - pos
                    self._buf = b""
                    return
                break
            opcode = b0 & 0x0F
            if opcode == 1 or opcode == 2:
                on_data(opcode, buf, start, end, now)
            elif opcode == 9:
                self.send_control(10, buf[start:end])
            elif opcode == 8:
                code = int.from_bytes(buf[start : start + 2], "big")
                why = buf[start + 2 : end].decode(errors="replace")
                self._fail(f"closed by server: {code} {why}")
                return
            elif b0 & 0x80 == 0 or opcode == 0:
                self._fail(
                    "fragmented frame (not expected from the servers under test)"
                )
                return
            pos = end
        self._buf = buf[pos:]

    def _on_upgraded(self) -> None:
        """Called once the server answered 101 (subclasses send an opening frame)."""

    def _on_data(self, opcode: int, buf: bytes, start: int, end: int, now: int) -> None:
        """One data frame, ``buf[start:end]``; this client counts text frames."""
        if opcode == 1:
            self.frames += 1
            if self.frames == 1:
                self.first_text.set_result(None)
            self.on_text(self, buf, start, end, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}")

    # -- sending --------------------------------------------------------------------

    def send_text(self, payload: bytes) -> bool:
        """Send one text frame; False if the connection is already closed."""
        if self.transport is None or self.closed.done() or self.transport.is_closing():
            return False
        self.transport.write(encode_text_frame(payload, self.mask))
        return True

    def send_control(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_control_frame(opcode, payload, self.mask))

    def close(self) -> None:
        """Send a normal close frame and drop the connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.send_control(8, (1000).to_bytes(2, "big"))
            self.transport.close()

    def _fail(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(reason))
        if not self.first_text.done():
            self.first_text.set_exception(HandshakeError(reason))
            self.first_text.exception()  # retrieved: nobody may be waiting
        if not self.closed.done():
            self.closed.set_result(reason)
        if self.transport is not None:
            self.transport.close()


async def open_socket(
    url: str, on_text: OnText, open_timeout: float = 30.0
) -> LeanSocket:
    """Connect to ``ws://host:port/path?query`` and complete the upgrade."""
    parts = urlsplit(url)
    assert parts.scheme == "ws", "plain ws:// only"
    assert parts.hostname == "127.0.0.1", "local servers only"
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    host = f"{parts.hostname}:{parts.port}"
    _, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: LeanSocket(path, host, on_text), parts.hostname, parts.port
        ),
        open_timeout,
    )
    await asyncio.wait_for(proto.opened, open_timeout)
    return proto
