"""The document socket ``/ws/docs/{room_id}/{doc_name}``: y-websocket, binary frames.

A stock Yjs client connects with
``new WebsocketProvider("ws://HOST/ws/docs", ROOM_ID + "/" + DOC_NAME, ydoc, {params: {token}})``.
Access is the room socket's (cookie from an allowed Origin, or a room token; members
only); observers receive everything and their edits are refused with ``[2, 0, reason]``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable
from functools import partial

from starlette.websockets import WebSocket, WebSocketDisconnect

from rooms.access import Access
from rooms.documents import (
    DocConnection,
    DocumentLimits,
    DocumentRegistry,
    LiveDocument,
)
from rooms.endpoint import RoomServices
from rooms.errors import BadMessage, RateLimited, RoomError, RoomNotFound, TryAgainLater
from rooms.limits import TokenBucket
from rooms.outbox import Outbox
from rooms.sending import QueuedSender, direct_writer
from rooms.socket import RAW_SEND, Stopper, frame_sender, serve_socket
from rooms.ysync import (
    Auth,
    AwarenessUpdate,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    parse_frame,
)
from storage.models import MemberRole

log = logging.getLogger(__name__)

DOC_NAME = re.compile(r"[a-z0-9-]{1,64}")


def doc_socket(websocket: WebSocket) -> Awaitable[None]:
    """``/ws/docs/{room_id}/{doc_name}``: the standard y-websocket protocol.

    Not a coroutine itself: it hands back ``serve_socket``'s, so no frame of its own
    (nor a closure) stays alive for the socket's lifetime."""
    services: RoomServices = websocket.app.state.room_services
    return serve_socket(websocket, services, partial(_connect, websocket, services))


def _connect(
    websocket: WebSocket, services: RoomServices, access: Access, conn_id: str
) -> Awaitable[None]:
    name = websocket.path_params.get("doc_name", "")
    if not DOC_NAME.fullmatch(name):
        raise RoomNotFound("no such document: names are [a-z0-9-]{1,64}")
    registry: DocumentRegistry = websocket.app.state.documents
    return DocSession(websocket, services, registry, access, conn_id, name).run()


class DocSession:
    """One socket on one document."""

    # Slots: one of these lives as long as each open socket.
    __slots__ = (
        "_stopper",
        "access",
        "bucket",
        "conn",
        "limits",
        "name",
        "registry",
        "sender",
        "services",
        "ws",
    )

    def __init__(
        self,
        websocket: WebSocket,
        services: RoomServices,
        registry: DocumentRegistry,
        access: Access,
        conn_id: str,
        name: str,
    ) -> None:
        self.ws = websocket
        self.services = services
        self.registry = registry
        self.limits: DocumentLimits = registry.limits
        self.access = access
        self.name = name
        self._stopper = Stopper()
        self.conn = DocConnection(
            conn_id=conn_id,
            user_id=access.user.id,
            can_write=access.room.role != MemberRole.OBSERVER,
            outbox=Outbox(self.limits.send_queue_frames),
            on_failure=self._stopper.stop,
            limits=self.limits,
        )
        self.bucket = TokenBucket(
            self.limits.updates_per_second, self.limits.update_burst
        )
        metrics = services.metrics
        self.sender = QueuedSender(
            direct=direct_writer(websocket.scope.get(RAW_SEND)),
            send=frame_sender(websocket),
            take=self._take_frames,
            sent=metrics.doc_messages_sent,
            on_error=self._send_failed,
        )
        self.conn.on_queued = self.sender.request

    async def run(self) -> None:
        conn = self.conn
        metrics = self.services.metrics
        failure: RoomError | None = None
        async with self.registry.connect(self.access.room.room_id, self.name, conn) as (
            doc,
            opening,
        ):
            metrics.doc_connections.inc()
            try:
                for frame in opening:
                    conn.offer(frame)
                async with self._stopper, self.sender:
                    await self._pump_inbox(doc)
            except RoomError as error:
                failure = error
            finally:
                metrics.doc_connections.dec()
        failure = conn.failure or failure
        if failure is not None:
            if isinstance(failure, TryAgainLater):
                metrics.slow_consumers.inc()
            raise failure

    def _send_failed(self, error: BaseException) -> None:
        """The pump could not send: a vanished client just ends the connection."""
        if not isinstance(error, WebSocketDisconnect):
            log.error("sending failed", exc_info=error)
            self.conn.fail(RoomError())
        self._stopper.stop()

    def _take_frames(self) -> list[bytes]:
        # One y-websocket message per frame (the protocol has no batches).
        return [frame for _seq, frame in self.conn.outbox.drain()]  # type: ignore[misc]

    async def _pump_inbox(self, doc: LiveDocument) -> None:
        receive = self.ws.receive
        conn = self.conn
        limits = self.limits
        user_id = self.access.user.id
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                raise BadMessage("text frames are not accepted on this socket")
            frame = parse_frame(data, max_frame_bytes=limits.max_frame_bytes)
            match frame:
                case SyncStep1(state_vector=state_vector):
                    doc.sync(conn, state_vector)
                case SyncStep2(update=update) | SyncUpdate(update=update):
                    # Updates are never dropped (that would split the document):
                    # a client over the rate is closed, and resyncs on reconnect.
                    if not self.bucket.take(time.monotonic()):
                        raise RateLimited("too many document updates")
                    doc.submit(conn, user_id, update)
                case AwarenessUpdate(entries=entries):
                    doc.awareness_update(conn, entries)
                case QueryAwareness():
                    conn.offer(doc.awareness_snapshot())
                case Auth():
                    pass  # clients have nothing to say on the auth channel
