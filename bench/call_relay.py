"""Reference relay for call signaling: a JSON frame to a named connection, nothing else.

Each connection gets an id, sent on connect as ``{"type": "welcome",
"connection_id": ...}``. A text frame ``{"type": "call.signal", "to": ID, ...}`` is
decoded (msgspec, as the server does), given ``"from"`` and re-encoded, and sent
to connection ``ID``; anything else is dropped. No authentication, rooms, calls,
schema, limits or persistence: the floor that Coilroom's signaling is compared
against. ``websockets`` on uvloop, like ``bench/relay.py``.

    python -m bench.call_relay --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid

import msgspec
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

from bench.world import raise_nofile


async def relay(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    clients: dict[str, ServerConnection] = {}
    decode, encode = msgspec.json.decode, msgspec.json.encode

    async def handler(ws: ServerConnection) -> None:
        conn_id = uuid.uuid4().hex
        clients[conn_id] = ws
        try:
            await ws.send(
                encode({"type": "welcome", "connection_id": conn_id}).decode()
            )
            async for message in ws:
                try:
                    frame = decode(message)
                    target = clients.get(frame.get("to", ""))
                except (msgspec.DecodeError, AttributeError, TypeError):
                    continue
                if frame.get("type") != "call.signal" or target is None:
                    continue
                del frame["to"]
                frame["from"] = conn_id
                # Non-blocking write, as the server's outbox (and bench/relay.py).
                broadcast([target], encode(frame).decode())
        finally:
            del clients[conn_id]

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=64 * 1024):
        print("call relay ready", flush=True)
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile()
    uvloop.run(relay(args.port))


if __name__ == "__main__":
    main()
