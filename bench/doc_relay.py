"""Reference relay for documents: a bare binary broadcast server (``websockets``).

Clients are grouped by URL path (one path = one document); every binary frame is
forwarded to the other clients on the same path (not back to the sender, like a
y-websocket server's update broadcast). No auth, no Yjs, no persistence, no sync
handshake: the floor that the real document fan-out is compared against.

    python -m bench.doc_relay --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve


async def relay(port: int) -> None:
    docs: dict[str, set[ServerConnection]] = {}

    async def handler(ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else "/"
        peers = docs.setdefault(path, set())
        peers.add(ws)
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    broadcast([c for c in peers if c is not ws], message)
        finally:
            peers.discard(ws)
            if not peers:
                docs.pop(path, None)

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=1 << 24):
        print("doc relay ready", flush=True)
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(relay(args.port))


if __name__ == "__main__":
    main()
