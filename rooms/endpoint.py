"""The room socket ``/ws/rooms/{room_id}``: the only module here that touches a socket.

Life of a connection: accept → authenticate and check membership (4401/4403/4404)
→ join the local room (subscribed before anything is read, so nothing published
from now on is missed) → presence → ``welcome`` → replay what a resuming client
missed → two loops: the outbox pump (room → socket) and the inbox (socket → room).
Whichever ends first ends the other; leaving the room and presence happen on exit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import anyio.abc
from starlette.websockets import WebSocket, WebSocketDisconnect

from rooms.access import Access, Authenticator
from rooms.call_messages import (
    CallIceServers,
    CallJoin,
    CallLeave,
    CallMedia,
    CallModerate,
    CallSignal,
    EchoStart,
    EchoStop,
)
from rooms.call_port import CallPort
from rooms.errors import (
    BadMessage,
    MessageTooBig,
    RateLimited,
    RoomError,
    TryAgainLater,
)
from rooms.hub import ChatRequest, LocalRoom, Member, RoomHub
from rooms.limits import TokenBucket
from rooms.messages import (
    ChatDelete,
    ChatEdit,
    ChatRead,
    ChatSend,
    ClientMessage,
    InvalidMessage,
    NotJSON,
    Ping,
    Status,
    Typing,
    create_batches,
    create_chat_change,
    create_error,
    create_stored_chat_message,
    encode,
    parse_client_message,
)
from rooms.metrics import Metrics
from rooms.outbox import Outbox
from rooms.presence import Change, PresenceStore, PresenceUser
from rooms.sending import QueuedSender, direct_writer
from rooms.socket import (
    RAW_SEND,
    Stopper,
    frame_sender,
    parse_int,
    query,
    serve_socket,
)
from storage.chat import edits_between, mark_read, messages_between, room_counters
from storage.models import MemberRole, UserRole

log = logging.getLogger(__name__)

REPLAY_PAGE = 500
# A batch frame holds at most this many frames and characters (clients commonly
# accept messages of 1 MiB).
BATCH_FRAMES = 500
BATCH_CHARS = 256 * 1024


@dataclass(frozen=True, slots=True)
class SocketLimits:
    """Per-connection limits (all settings; see the README)."""

    max_frame_bytes: int
    max_text_chars: int
    messages_per_second: float
    message_burst: int
    max_connections_per_user: int
    send_queue_frames: int
    open_timeout: float
    typing_timeout: float
    close_timeout: float


@dataclass(frozen=True, slots=True)
class RoomServices:
    """What the room socket needs, built once by the app (no module-level state)."""

    auth: Authenticator
    hub: RoomHub
    presence: PresenceStore
    metrics: Metrics
    limits: SocketLimits
    calls: CallPort


def room_socket(websocket: WebSocket) -> Awaitable[None]:
    """``/ws/rooms/{room_id}``: presence and chat (``docs/protocol.md``).

    Not a coroutine itself: it hands back ``serve_socket``'s, so no frame of its own
    (nor a closure) stays alive for the socket's lifetime."""
    services: RoomServices = websocket.app.state.room_services
    return serve_socket(websocket, services, partial(_connect, websocket, services))


def _connect(
    websocket: WebSocket, services: RoomServices, access: Access, conn_id: str
) -> Awaitable[None]:
    return Connection(websocket, services, access, conn_id).run()


class Connection:
    """One member's socket in one room."""

    # Slots: one of these lives as long as each open socket.
    __slots__ = (
        "_frames_sent",
        "_send",
        "_stopper",
        "access",
        "bucket",
        "candidate_bucket",
        "conn_id",
        "echo_running",
        "limits",
        "member",
        "room_id",
        "sender",
        "services",
        "signal_bucket",
        "strikes",
        "typing_deadline",
        "user",
        "ws",
    )

    def __init__(
        self, websocket: WebSocket, services: RoomServices, access: Access, conn_id: str
    ) -> None:
        self.ws = websocket
        self.services = services
        self.limits = services.limits
        self.access = access
        self.conn_id = conn_id
        self.room_id = access.room.room_id
        user = access.user
        self.user = PresenceUser(user.id, user.name, user.institution, user.country)
        self.bucket = TokenBucket(
            self.limits.messages_per_second, self.limits.message_burst
        )
        # Made on first use: most connections never signal, and idle ones should
        # cost little memory.
        self.signal_bucket: TokenBucket | None = None
        self.candidate_bucket: TokenBucket | None = None
        self.echo_running = False
        self.strikes: dict[int, int] | None = None  # refusals in a row, per bucket
        self.typing_deadline: float | None = None
        self._stopper = Stopper()
        self.member = Member(
            conn_id,
            self.user,
            outbox=Outbox(self.limits.send_queue_frames),
            on_failure=self._stopper.stop,
        )
        self._send = frame_sender(websocket)
        self._frames_sent = services.metrics.frames_sent
        self.sender = QueuedSender(
            direct=direct_writer(websocket.scope.get(RAW_SEND)),
            send=self._send,
            take=self._take_messages,
            sent=services.metrics.socket_messages_sent,
            on_error=self._send_failed,
        )
        self.member.on_queued = self.sender.request

    async def send_text(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def run(self) -> None:
        params = query(self.ws)
        after = parse_int(params.get("after"))
        edits_after = parse_int(params.get("edits_after"))
        del params  # this frame lives as long as the socket
        hub = self.services.hub
        if hub.connections_of(self.user.id) >= self.limits.max_connections_per_user:
            raise RateLimited("too many connections for this user")
        async with hub.join(self.room_id, self.member) as room:
            failure: RoomError | None = None
            try:
                async with self._stopper:
                    await self._enter(room, after, edits_after)
                    # The sender starts with what arrived during the welcome.
                    async with self.sender:
                        await self._pump_inbox(room)
            except RoomError as error:
                failure = error
            finally:
                with anyio.CancelScope(shield=True):
                    await self._leave()
            failure = self.member.failure or failure
            if failure is None:
                return
            if isinstance(failure, TryAgainLater):
                self.services.metrics.slow_consumers.inc()
            else:
                # Let the client read the answers to what it sent (acks, errors)
                # before the close frame that explains why it is being closed.
                await self._answer_before_close()
            raise failure

    async def _answer_before_close(self) -> None:
        with anyio.move_on_after(self.limits.close_timeout):
            await self.member.wait_answered()
            for _seq, text in self.member.outbox.drain():
                await self.send_text(text)

    async def _enter(
        self, room: LocalRoom, after: int | None, edits_after: int | None
    ) -> None:
        services = self.services
        change = await services.presence.add(self.room_id, self.conn_id, self.user)
        await self._announce(change)
        async with services.hub.sessions() as session:
            last_seq, last_edit = await room_counters(session, self.room_id)
        snapshot = await services.presence.snapshot(self.room_id)
        access = self.access
        await self.send_text(
            encode(
                {
                    "type": "welcome",
                    "connection_id": self.conn_id,
                    "user": access.user.as_json(),
                    "room": {
                        "id": access.room.room_id,
                        "name": access.room.room_name,
                        "partnership": {
                            "id": access.room.partnership_id,
                            "title": access.room.partnership_title,
                        },
                        "role": access.room.role.value,
                    },
                    "presence": [p.as_json() for p in snapshot],
                    "call": await services.calls.snapshot(self.room_id),
                    "chat": {"last_seq": last_seq, "last_edit": last_edit},
                    "limits": {
                        "max_frame_bytes": self.limits.max_frame_bytes,
                        "max_text_chars": self.limits.max_text_chars,
                        "messages_per_second": self.limits.messages_per_second,
                        "message_burst": self.limits.message_burst,
                    },
                }
            )
        )
        self.member.floor = last_seq
        room.started_at(last_seq, last_edit)
        if after is not None:
            await self._replay(after, edits_after, last_seq, last_edit)

    async def _replay(
        self, after: int, edits_after: int | None, last_seq: int, last_edit: int
    ) -> None:
        """Send what a reconnecting client missed: messages ``after < seq <= last_seq``,
        then changes to older messages made after ``edits_after``."""
        sessions = self.services.hub.sessions
        cursor, count = min(after, last_seq), 0
        while cursor < last_seq:
            async with sessions() as session:
                page = await messages_between(
                    session,
                    self.room_id,
                    after=cursor,
                    upto=last_seq,
                    limit=REPLAY_PAGE,
                )
            if not page:
                break
            for m in page:
                await self.send_text(create_stored_chat_message(m))
            cursor, count = page[-1].seq, count + len(page)
        edits = 0
        if edits_after is not None and edits_after < last_edit:
            async with sessions() as session:
                changed = await edits_between(
                    session,
                    self.room_id,
                    edits_after=edits_after,
                    upto_edit=last_edit,
                    upto_seq=min(after, last_seq),
                )
            for m in changed:
                assert m.edit_seq is not None
                await self.send_text(
                    create_chat_change(
                        seq=m.seq,
                        edit_seq=m.edit_seq,
                        text=m.text,
                        edited_at=m.edited_at or m.created_at,
                        deleted=m.deleted,
                    )
                )
            edits = len(changed)
        await self.send_text(
            encode(
                {
                    "type": "chat.resumed",
                    "after": after,
                    "last_seq": last_seq,
                    "messages": count,
                    "edits": edits,
                }
            )
        )

    async def _leave(self) -> None:
        calls = self.services.calls
        try:
            if self.echo_running:
                await calls.echo_stop(self.member)
            await calls.leave(self.room_id, self.member, "disconnected")
        except Exception:
            log.exception("conn %s: leaving the call failed", self.conn_id)
        try:
            change = await self.services.presence.remove(self.room_id, self.conn_id)
            await self._announce(change)
        except Exception:
            log.exception("conn %s: leaving presence failed", self.conn_id)

    async def _announce(self, change: Change) -> None:
        await self.services.hub.announce(self.room_id, change, self.conn_id)

    def _send_failed(self, error: BaseException) -> None:
        """The pump could not send: a vanished client just ends the connection."""
        if not isinstance(error, WebSocketDisconnect):
            log.error("sending failed", exc_info=error)
            self.member.fail(RoomError())
        self._stopper.stop()

    def _take_messages(self) -> list[str]:
        """Everything queued, as WebSocket messages (batched when there are several)."""
        floor = self.member.floor
        # Chat sequences up to the floor were already sent from the database.
        texts = [
            t for seq, t in self.member.outbox.drain() if not (seq and seq <= floor)
        ]
        if not texts:
            return []
        self._frames_sent.inc(len(texts))
        return create_batches(texts, max_frames=BATCH_FRAMES, max_chars=BATCH_CHARS)  # type: ignore[arg-type]

    async def _pump_inbox(self, room: LocalRoom) -> None:
        receive = self.ws.receive
        limits = self.limits
        while True:
            if self.typing_deadline is None:
                message = await receive()
            else:
                message = None
                with anyio.move_on_after(
                    max(0.0, self.typing_deadline - time.monotonic())
                ):
                    message = await receive()
                if message is None:
                    # The client said it was typing and then went quiet: clear it.
                    self.typing_deadline = None
                    await self._set_presence(typing=False)
                    continue
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                raise BadMessage("binary frames are not accepted on this socket")
            if (
                len(text) * 4 > limits.max_frame_bytes
                and len(text.encode()) > limits.max_frame_bytes
            ):
                raise MessageTooBig(f"frame over {limits.max_frame_bytes} bytes")
            try:
                msg = parse_client_message(text, max_text_chars=limits.max_text_chars)
            except NotJSON as exc:
                raise BadMessage(str(exc)) from None
            except InvalidMessage as exc:
                if self._charge(self.bucket, exc.message_id):
                    self._error(exc.code, exc.detail, exc.message_id)
                continue
            if not self._charge(self._bucket_for(msg), getattr(msg, "id", None)):
                continue
            await self._handle(room, msg)

    def _bucket_for(self, msg: ClientMessage) -> TokenBucket:
        """Signals have their own limits: a call's ICE candidates come in bursts
        that chat-sized limits would refuse."""
        if isinstance(msg, CallSignal):
            calls = self.services.calls.limits
            if msg.candidate is not None:
                if self.candidate_bucket is None:
                    self.candidate_bucket = TokenBucket(
                        calls.candidates_per_second, calls.candidate_burst
                    )
                return self.candidate_bucket
            if self.signal_bucket is None:
                self.signal_bucket = TokenBucket(
                    calls.signals_per_second, calls.signal_burst
                )
            return self.signal_bucket
        return self.bucket

    def _charge(self, bucket: TokenBucket, message_id: str | None) -> bool:
        """Take a token for a message; without one it is refused with an error frame,
        and a client that keeps going past the burst is closed with 4429."""
        # Strikes count per kind of message, so accepted chat in between does not
        # wash out a flood of candidates.
        strikes_by_bucket = self.strikes
        if bucket.take(time.monotonic()):
            if strikes_by_bucket:
                strikes_by_bucket.pop(id(bucket), None)
            return True
        if strikes_by_bucket is None:
            strikes_by_bucket = self.strikes = {}
        key = id(bucket)
        strikes_by_bucket[key] = strikes = strikes_by_bucket.get(key, 0) + 1
        if strikes > self.limits.message_burst:
            raise RateLimited("too many messages")
        self._error("rate_limited", "slow down: message ignored", message_id)
        return False

    def _error(self, code: str, message: str, message_id: str | None = None) -> None:
        self.services.metrics.client_errors.labels(code).inc()
        self.member.offer(create_error(code, message, message_id))

    async def _handle(self, room: LocalRoom, msg: ClientMessage) -> None:
        match msg:
            case ChatSend(id=client_id, text=text):
                self._submit(room, ChatRequest(self.member, "send", client_id, text))
            case ChatEdit(id=client_id, seq=seq, text=text):
                self._submit(
                    room, ChatRequest(self.member, "edit", client_id, text, seq)
                )
            case ChatDelete(id=client_id, seq=seq):
                self._submit(
                    room, ChatRequest(self.member, "delete", client_id, None, seq)
                )
            case ChatRead(seq=seq):
                await mark_read(
                    self.services.hub.sessions,
                    self.access.room.partnership_id,
                    self.user.id,
                    seq,
                )
            case Typing(typing=typing):
                self.typing_deadline = (
                    time.monotonic() + self.limits.typing_timeout if typing else None
                )
                await self._set_presence(typing=typing)
            case Status(status=status):
                await self._set_presence(status=status)
            case CallJoin():
                await self.services.calls.join(self.room_id, self.member, msg)
            case CallLeave(id=message_id):
                await self.services.calls.leave(
                    self.room_id, self.member, "left", message_id
                )
            case CallSignal():
                await self.services.calls.signal(self.room_id, self.member, msg)
            case CallMedia():
                await self.services.calls.media(self.room_id, self.member, msg)
            case CallModerate():
                await self.services.calls.moderate(
                    self.room_id, self.member, msg, allowed=self._coordinates()
                )
            case CallIceServers(id=message_id):
                await self.services.calls.ice_servers(
                    self.room_id, self.member, message_id
                )
            case EchoStart():
                if await self.services.calls.echo_start(
                    self.member, msg, on_end=self._echo_ended
                ):
                    self.echo_running = True
            case EchoStop():
                if self.echo_running:
                    await self.services.calls.echo_stop(self.member)
            case Ping(id=message_id):
                frame: dict[str, Any] = {"type": "pong"}
                if message_id is not None:
                    frame["id"] = message_id
                self.member.offer(encode(frame))

    def _coordinates(self) -> bool:
        return (
            self.access.room.role == MemberRole.COORDINATOR
            or self.access.user.role == UserRole.ADMIN
        )

    def _echo_ended(self, reason: str) -> None:
        self.echo_running = False

    def _submit(self, room: LocalRoom, request: ChatRequest) -> None:
        if not room.chat.submit(request):
            self._error(
                "busy", "the room is busy: send it again shortly", request.client_id
            )

    async def _set_presence(self, **change: Any) -> None:
        result = await self.services.presence.update(
            self.room_id, self.conn_id, **change
        )
        await self._announce(result)
