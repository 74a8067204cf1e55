"""The trimmed uvicorn WebSocket protocol: its inbox and gate, and a real socket on it."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect

from rooms.ws_protocol import Gate, Inbox, LeanWebSocketProtocol

pytestmark = pytest.mark.anyio


async def test_inbox_hands_items_over_in_order_and_wakes_the_reader() -> None:
    inbox = Inbox()
    assert inbox.empty()
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert not reader.done()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert await reader == 1
    assert inbox.qsize() == 1
    assert await inbox.get() == 2
    assert inbox.empty()


async def test_inbox_refuses_a_second_reader() -> None:
    inbox = Inbox()
    first = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await inbox.get()
    inbox.put_nowait("x")
    assert await first == "x"


async def test_inbox_reader_cancelled_leaves_it_usable() -> None:
    inbox = Inbox()
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    inbox.put_nowait("after")
    assert await asyncio.wait_for(inbox.get(), 1) == "after"


async def test_gate_blocks_writers_only_while_closed() -> None:
    gate = Gate()
    assert gate.is_set()
    await asyncio.wait_for(gate.wait(), 1)  # open: no wait
    gate.clear()
    waiters = [asyncio.create_task(gate.wait()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    # A cancelled waiter is forgotten.
    gate.clear()
    waiter = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.set()
    assert gate.is_set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_real_socket_echoes_and_forgets_its_handshake() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        assert (await receive())["type"] == "websocket.connect"
        seen["headers_at_connect"] = dict(scope["headers"])
        await send({"type": "websocket.accept"})
        proto = send.__self__
        seen["protocol"] = type(proto)
        seen["request"] = proto.request
        seen["response"] = proto.response
        seen["inbox"] = type(proto.queue)
        seen["gate"] = type(proto.writable)
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": message["text"].upper()})

    port = _free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        ws=LeanWebSocketProtocol,
        ws_per_message_deflate=False,
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(100):
            if server.started:
                break
            await asyncio.sleep(0.02)
        async with connect(
            f"ws://127.0.0.1:{port}/", additional_headers={"X-Probe": "yes"}
        ) as ws:
            for word in ("one", "two", "three"):
                await ws.send(word)
                assert await asyncio.wait_for(ws.recv(), 5) == word.upper()
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
    assert seen["headers_at_connect"][b"x-probe"] == b"yes"
    assert seen["protocol"] is LeanWebSocketProtocol
    assert seen["request"] is None and seen["response"] is None
    assert seen["inbox"] is Inbox and seen["gate"] is Gate
