"""A WebSocket client that completes the handshake and then misbehaves on purpose:
it stops reading (a stalled member) or never answers pings (a dead peer)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket


async def open_stalled_socket(
    host: str, port: int, path: str, *, rcvbuf: int = 4096
) -> socket.socket:
    """Open a room socket with a tiny receive buffer and return it unread after the 101."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Set before connect so the advertised window is small: the server's writes
    # back up after a few kilobytes instead of megabytes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = await loop.sock_recv(
            sock, 1
        )  # byte by byte: read nothing past the headers
        if not chunk:
            raise ConnectionError("closed during handshake")
        response += chunk
    if not response.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(response.decode(errors="replace"))
    return sock


async def send_text_frame(sock: socket.socket, text: str) -> None:
    """Send one masked text frame (RFC 6455 §5.2) on a raw client socket."""
    payload = text.encode()
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes([0x81, 0x80 | length])
    elif length < 1 << 16:
        header = bytes([0x81, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([0x81, 0x80 | 127]) + length.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    await asyncio.get_running_loop().sock_sendall(sock, header + mask + masked)
