"""A small y-websocket client in Python (pycrdt + websockets) for tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pycrdt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rooms.ysync import (
    Auth,
    AwarenessEntry,
    AwarenessUpdate,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    create_awareness,
    create_sync_step1,
    create_sync_step2,
    create_update,
    parse_frame,
)
from tests.support import TIMEOUT, ServerProcess


class YClient:
    """Speaks the protocol like a stock provider: step 1 on open, answers the
    server's step 1, applies updates, sends its own edits as updates."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.doc = pycrdt.Doc()
        self.synced = asyncio.Event()
        self.updates_received: list[bytes] = []
        self.duplicates = 0  # live updates that held nothing new
        self.denied: list[str] = []
        self.awareness: dict[int, AwarenessEntry] = {}
        self.awareness_frames = 0
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.error: Exception | None = None

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read())
        with contextlib.suppress(
            ConnectionClosed
        ):  # refused at the door: tests read why
            await self.ws.send(create_sync_step1(self.doc.get_state()))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                assert isinstance(raw, bytes)
                frame = parse_frame(raw, max_frame_bytes=1 << 30)
                match frame:
                    case SyncStep1(state_vector=sv):
                        await self.ws.send(create_sync_step2(self.doc.get_update(sv)))
                    case SyncStep2(update=update):
                        self.doc.apply_update(update)
                        self.synced.set()
                    case SyncUpdate(update=update):
                        self.updates_received.append(update)
                        if (
                            pycrdt.get_update(update, self.doc.get_state())
                            == b"\x00\x00"
                        ):
                            self.duplicates += 1
                        self.doc.apply_update(update)
                    case AwarenessUpdate(entries=entries):
                        self.awareness_frames += 1
                        for e in entries:
                            current = self.awareness.get(e.client_id)
                            if current is None or e.clock >= current.clock:
                                self.awareness[e.client_id] = e
                    case Auth(reason=reason):
                        self.denied.append(reason)
        except ConnectionClosed:
            pass  # the close code is what the tests read
        except Exception as exc:  # noqa: BLE001 - kept for the test to inspect
            self.error = exc
        finally:
            self.closed.set()

    async def edit(self, change: Callable[[pycrdt.Doc], Any]) -> bytes:
        """Make a local change and send it as one update; returns the update."""
        before = self.doc.get_state()
        with self.doc.transaction():
            change(self.doc)
        update = self.doc.get_update(before)
        await self.ws.send(create_update(update))
        return update

    async def set_awareness(self, clock: int, state: str) -> None:
        await self.ws.send(
            create_awareness([AwarenessEntry(self.doc.client_id, clock, state)])
        )

    def activities(self) -> list[dict[str, Any]]:
        return self.doc.get("activities", type=pycrdt.Array).to_py() or []

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = TIMEOUT
    ) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)

    async def close_code(self, timeout: float = TIMEOUT) -> int | None:
        async with asyncio.timeout(timeout):
            await self.closed.wait()
        await self.ws.wait_closed()
        return self.ws.close_code


@contextlib.asynccontextmanager
async def yclient(
    server: ServerProcess, room_id: int, name: str, token: str, *, sync: bool = True
) -> AsyncIterator[YClient]:
    url = f"{server.ws_url}/ws/docs/{room_id}/{name}?token={token}"
    ws = await connect(url, max_queue=None, max_size=None, open_timeout=TIMEOUT)
    client = YClient(ws)
    try:
        await client.start()
        if sync:
            async with asyncio.timeout(TIMEOUT):
                await client.synced.wait()
        yield client
    finally:
        if client._reader is not None:
            client._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client._reader
        # The server may have closed it already (that is what some tests check).
        with contextlib.suppress(ConnectionClosed):
            await ws.close()


def add_activity(activity_id: str, **fields: Any) -> Callable[[pycrdt.Doc], None]:
    def change(doc: pycrdt.Doc) -> None:
        doc.get("activities", type=pycrdt.Array).append(
            pycrdt.Map({"id": activity_id, "status": "planned", **fields})
        )

    return change
