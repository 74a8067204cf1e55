"""Reference relay: a bare broadcast server written with the ``websockets`` library.

Every text frame received is forwarded to every connected client (the sender
included). No authentication, no parsing, no persistence: the floor that the
real server's fan-out is compared against. Runs on uvloop, like uvicorn does.

    python -m bench.relay --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve


async def relay(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    clients: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        clients.add(ws)
        try:
            async for message in ws:
                if isinstance(message, str):
                    broadcast(clients, message)
        finally:
            clients.discard(ws)

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=64 * 1024):
        print("relay ready", flush=True)
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
