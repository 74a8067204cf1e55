"""Reference: pycrdt-websocket's WebsocketServer (in memory) on uvicorn.

    .venv/bin/python bench/docs_refs/pycrdt_server.py --port 8766

Patched: a send to a client that already left is ignored (see below), else one
disconnect during a broadcast stops the server. One room per URL path (``ws://127.0.0.1:PORT/<doc>``); no auth, no persistence.
pycrdt-websocket is installed into the virtualenv by bench/doc_fanout.py if missing
(it is not a project dependency).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource

import uvicorn
import uvloop
from pycrdt.websocket import ASGIServer, WebsocketServer, asgi_server
from pycrdt.websocket.websocket_server import exception_logger
from uvicorn.protocols.utils import ClientDisconnected

_send = asgi_server.ASGIWebsocket.send


async def _send_ignoring_gone(self: asgi_server.ASGIWebsocket, message: bytes) -> None:
    # pycrdt-websocket 0.16.5 lets uvicorn's ClientDisconnected (a client that left
    # while the room broadcast to it) escape and kill the room's task group, and
    # with it the whole server. A deployment would swallow it; so do we.
    with contextlib.suppress(ClientDisconnected):
        await _send(self, message)


asgi_server.ASGIWebsocket.send = _send_ignoring_gone  # type: ignore[method-assign]


async def main(port: int) -> None:
    websocket_server = WebsocketServer(
        auto_clean_rooms=False, exception_handler=exception_logger
    )
    async with websocket_server:
        app = ASGIServer(websocket_server)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",  # as server.py serve
            ws_max_size=1 << 24,
            ws_per_message_deflate=False,
        )
        await uvicorn.Server(config).serve()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=logging.WARNING)
    uvloop.run(main(args.port))
