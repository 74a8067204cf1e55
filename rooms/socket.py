"""What every socket of a room shares: accept, authenticate, map errors to close codes.

``serve_socket`` runs one session with the error handling in one place: each
``RoomError`` carries its close code; anything unexpected closes with 1011 and no
details (the log has the traceback and the connection id).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from rooms.access import Access
from rooms.errors import (
    BadMessage,
    CloseCode,
    MessageTooBig,
    RateLimited,
    RoomError,
    TryAgainLater,
)

if TYPE_CHECKING:
    from rooms.endpoint import RoomServices

log = logging.getLogger(__name__)

Session = Callable[[Access, str], Awaitable[None]]

# Where ``SocketFront`` keeps the server's own ASGI send for a socket.
RAW_SEND = "coilroom.raw_send"


class SocketFront:
    """The app's front door: WebSocket connections go straight to their endpoints,
    everything else (HTTP, lifespan, unknown socket paths) to the Starlette app.

    A socket lives for hours; every layer of middleware and routing it passes
    through stays on its stack the whole time (a coroutine frame, closures, a
    wrapped ``send``), and those layers do nothing for sockets. Skipping them is
    most of a connection's memory. The server's own ``send`` is kept in the scope
    so data frames can bypass Starlette's per-call checks too.
    """

    def __init__(
        self, app: Starlette, sockets: dict[str, Callable[[WebSocket], Awaitable[None]]]
    ) -> None:
        self.app = app
        self._sockets = [
            (_compile(path), endpoint) for path, endpoint in sockets.items()
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)  # state, routes, url_path_for, ...

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            path = scope["path"]
            for pattern, endpoint in self._sockets:
                match = pattern.fullmatch(path)
                if match is not None:
                    scope["app"] = self.app
                    scope["path_params"] = match.groupdict()
                    scope[RAW_SEND] = send
                    del match  # this frame lives as long as the socket
                    await endpoint(WebSocket(scope, receive, send))
                    return
        await self.app(scope, receive, send)


def _compile(path: str) -> re.Pattern[str]:
    """``/ws/rooms/{room_id}`` -> a pattern with named groups (digits for ``*_id``)."""

    def group(m: re.Match[str]) -> str:
        name = m.group(1)
        return f"(?P<{name}>[0-9]+)" if name.endswith("_id") else f"(?P<{name}>[^/]+)"

    return re.compile(re.sub(r"\{(\w+)\}", group, path))


def frame_sender(websocket: WebSocket) -> Callable[[dict[str, Any]], Awaitable[None]]:
    """The fastest way to send data frames on this socket; a vanished client raises
    ``WebSocketDisconnect`` as Starlette's own send does."""
    raw = websocket.scope.get(RAW_SEND)
    if raw is None:
        return websocket.send  # type: ignore[return-value]
    return FrameSender(raw)


class FrameSender:
    """The server's ASGI send for one socket, with uvicorn's disconnect error mapped
    to Starlette's (a slotted object: one lives as long as each socket)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: Send) -> None:
        self._raw = raw

    async def __call__(self, message: dict[str, Any]) -> None:
        try:
            await self._raw(message)  # type: ignore[arg-type]
        except OSError:  # uvicorn's ClientDisconnected
            raise WebSocketDisconnect(1006) from None


def parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise BadMessage("bad query parameter") from None
    if number < 0:
        raise BadMessage("bad query parameter")
    return number


class Stopper:
    """``async with stopper:`` a block that ``stop()`` (from any callback: a failed
    send, a full outbox) ends early, as if it had returned; like
    ``anyio.CancelScope().cancel()``, at a third of its memory (one per socket).

    Built on ``asyncio.timeout``, whose expiry is exactly "cancel this task's block
    and swallow that cancellation, but not anyone else's". ``stop()`` before the
    block ends it as soon as it starts; after the block it does nothing.
    """

    __slots__ = ("_stopped", "_timeout")

    def __init__(self) -> None:
        self._stopped = False
        self._timeout: asyncio.Timeout | None = None

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._timeout is not None:
            self._timeout.reschedule(asyncio.get_running_loop().time())

    async def __aenter__(self) -> Stopper:
        timeout = asyncio.timeout(None)
        await timeout.__aenter__()
        self._timeout = timeout
        if self._stopped:
            timeout.reschedule(asyncio.get_running_loop().time())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        timeout, self._timeout = self._timeout, None
        self._stopped = True  # from now on stop() has nothing to end
        assert timeout is not None
        try:
            await timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            if timeout.expired():
                return True  # stopped: the block just ends
            raise
        return False


def forget_handshake(websocket: WebSocket) -> None:
    """Drop the upgrade request's headers (cookies, Origin, user agent...) once the
    member is admitted: nothing reads them again, and an idle socket would keep
    them for hours. The query string stays (``query``)."""
    websocket.scope["headers"] = []
    for cached in ("_headers", "_cookies", "_query_params", "_url"):
        websocket.__dict__.pop(cached, None)


def query(websocket: WebSocket) -> QueryParams:
    """The socket's query parameters, parsed afresh (not kept on the socket)."""
    return QueryParams(websocket.scope.get("query_string", b""))


async def close_with(
    websocket: WebSocket, code: int, reason: str, grace: float
) -> None:
    """Close the socket once; gives up after ``grace`` seconds (a client that stopped reading
    cannot receive a close frame; the server drops it when the function returns)."""
    if websocket.application_state != WebSocketState.CONNECTED:
        return
    with anyio.move_on_after(grace):
        try:
            await websocket.close(code, reason)
        except Exception:  # noqa: BLE001 - the peer is already gone; nothing to tell it
            return


async def serve_socket(
    websocket: WebSocket, services: RoomServices, session: Session
) -> None:
    """Accept, admit the member of ``{room_id}``, run ``session``, close with the right code."""
    metrics = services.metrics
    conn_id = uuid.uuid4().hex
    # Accept first, so a browser sees our close code rather than a bare 1006.
    await websocket.accept()
    code: int = CloseCode.NORMAL
    reason = ""
    try:
        with anyio.fail_after(services.limits.open_timeout):
            room_id = parse_int(websocket.path_params.get("room_id"))
            assert room_id is not None
            access = await services.auth.admit(
                room_id,
                token=websocket.query_params.get("token"),
                cookies=websocket.cookies,
                origin=websocket.headers.get("origin"),
                host=websocket.headers.get("host"),
                scheme=websocket.url.scheme,
            )
        metrics.connections_total.inc()
        forget_handshake(websocket)
        await session(access, conn_id)
    except TimeoutError:
        code, reason = TryAgainLater.close_code, "open timed out"
    except RoomError as error:
        code, reason = error.close_code, error.reason
        if isinstance(error, RateLimited | BadMessage | MessageTooBig):
            log.info("conn %s closed: %s", conn_id, error.reason)
    except WebSocketDisconnect:
        return  # the client left; its state was cleaned up on the way out
    except Exception:
        log.exception("conn %s: socket failed", conn_id)
        metrics.internal_errors.inc()
        code, reason = CloseCode.INTERNAL_ERROR, "internal error"
    metrics.closes.labels(str(int(code))).inc()
    await close_with(websocket, code, reason, services.limits.close_timeout)
