"""The rooms of this process and the connections in them.

``RoomHub`` owns every ``LocalRoom`` with members on this process. A local room
holds its members' outboxes, a broker subscription (while it has members) and a
chat writer: the room's single writer task, which stores messages in batches
(group commit), acknowledges them, then publishes them. Nothing here is reached
from another process except through the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from rooms.broker import Broker, Envelope
from rooms.errors import Forbidden, RoomError, SlowConsumer
from rooms.messages import (
    create_chat_ack,
    create_chat_change,
    create_chat_message,
    create_error,
    create_stored_chat_message,
    encode,
)
from rooms.metrics import Metrics
from rooms.outbox import Outbox, OutboxFull
from rooms.presence import Change, PresenceStore, PresenceUser
from rooms.resync import Resync
from storage.chat import (
    ChatEditRefused,
    NewMessage,
    append_messages,
    change_message,
    edits_between,
    messages_between,
    room_counters,
)
from storage.database import Database
from storage.events import EventRow, insert_events

log = logging.getLogger(__name__)


RESYNC_PAGE = 500


def room_topic(room_id: int) -> str:
    return f"room:{room_id}"


class SeqWindow:
    """Which sequences (chat ``seq`` or edit ``edit_seq``) a room has delivered.

    Everything up to ``mark`` was delivered (or predates every member); above it,
    ``seen`` holds what arrived out of order. A resync sends what is in neither.
    """

    __slots__ = ("mark", "seen")

    def __init__(self) -> None:
        self.mark: int | None = None
        self.seen: set[int] = set()

    def start(self, mark: int) -> None:
        """Set the mark when the first member got its welcome (its floor)."""
        if self.mark is None:
            self.advance_to(mark)

    # A sequence that never arrives (lost with no resync to follow) must not make
    # ``seen`` grow for the room's life: past this many, the mark skips the hole.
    MAX_SEEN = 4096

    def note(self, seq: int) -> None:
        if self.mark is None or seq > self.mark:
            self.seen.add(seq)
            self._advance()
            if self.mark is not None and len(self.seen) > self.MAX_SEEN:
                log.warning("sequence window: skipping missing %d", self.mark + 1)
                self.advance_to(min(self.seen) - 1)

    def has(self, seq: int) -> bool:
        return (self.mark is not None and seq <= self.mark) or seq in self.seen

    def advance_to(self, mark: int) -> None:
        """Everything up to ``mark`` is now delivered."""
        if self.mark is None or mark > self.mark:
            self.mark = mark
            self.seen = {s for s in self.seen if s > mark}
        self._advance()

    def _advance(self) -> None:
        if self.mark is None:
            return
        while self.mark + 1 in self.seen:
            self.seen.remove(self.mark + 1)
            self.mark += 1


@dataclass(eq=False, slots=True)
class Member:
    """One connection in a room: what the room needs to reach it."""

    conn_id: str
    user: PresenceUser
    outbox: Outbox
    on_failure: Callable[[], None]
    # Chat sequences up to ``floor`` were sent from the database on resume; live
    # copies of them are skipped so nothing arrives twice.
    floor: int = 0
    failure: RoomError | None = None
    # Chat requests handed to the writer and not yet answered (ack or error).
    in_flight: int = 0
    settled: asyncio.Event | None = None  # made only when someone waits for it
    # Told when frames are queued, so the connection sends them soon (once per
    # burst, not per frame).
    on_queued: Callable[[], None] | None = None

    def offer(self, text: str, seq: int = 0) -> None:
        """Queue a frame for this connection without waiting."""
        try:
            self.outbox.put(text, seq)
        except OutboxFull:
            self.fail(SlowConsumer())
            return
        if self.on_queued is not None:
            self.on_queued()

    def submitted(self) -> None:
        self.in_flight += 1

    def answered(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0 and self.settled is not None:
            self.settled.set()

    async def wait_answered(self) -> None:
        """Until every submitted chat request has its ack or error."""
        if self.in_flight > 0:
            self.settled = self.settled or asyncio.Event()
            self.settled.clear()
            await self.settled.wait()

    def fail(self, error: RoomError) -> None:
        """End this connection with ``error``'s close code (first failure wins)."""
        if self.failure is None:
            self.failure = error
            self.outbox.close()
            self.on_failure()


@dataclass(frozen=True, slots=True)
class ChatRequest:
    member: Member
    kind: Literal["send", "edit", "delete"]
    client_id: str | None
    text: str | None = None
    seq: int = 0
    received: float = field(default_factory=time.perf_counter)


class ChatWriter:
    """The room's one writer: stores chat in batches, acks, then publishes."""

    def __init__(
        self,
        room: LocalRoom,
        *,
        max_queue: int,
        max_batch: int,
        linger: float = 0.0,
    ) -> None:
        self.room = room
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.linger = linger
        self._queue: deque[ChatRequest] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self.done = asyncio.Event()

    def submit(self, request: ChatRequest) -> bool:
        """Queue a request; False when the queue is full (the client is told to retry)."""
        if len(self._queue) >= self.max_queue or self._stopping:
            return False
        self._queue.append(request)
        request.member.submitted()
        self._wake.set()
        return True

    def stop(self) -> None:
        """Finish what is queued, then end ``run``."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        queue = self._queue
        try:
            while True:
                while not queue:
                    if self._stopping:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                if queue[0].kind != "send":
                    await self._write_change(queue.popleft())
                    continue
                if (
                    self.linger > 0
                    and len(queue) < self.max_batch
                    and not self._stopping
                ):
                    # Linger a moment so a busy room's messages share one commit and
                    # reach each member as one frame (Kafka's linger.ms): a few
                    # milliseconds of latency for far fewer transactions and sends.
                    await asyncio.sleep(self.linger)
                # Group commit: every send already waiting, up to the batch limit,
                # goes into one transaction (in arrival order).
                batch: list[ChatRequest] = []
                while queue and queue[0].kind == "send" and len(batch) < self.max_batch:
                    batch.append(queue.popleft())
                await self._write_sends(batch)
        finally:
            self.done.set()

    async def _write_sends(self, batch: list[ChatRequest]) -> None:
        room = self.room
        hub = room.hub
        names = {r.member.user.id: r.member.user.name for r in batch}
        try:
            stored = await append_messages(
                hub.db,
                room.room_id,
                [
                    NewMessage(r.member.user.id, r.client_id or "", r.text or "")
                    for r in batch
                ],
                names,
            )
        except Exception:
            log.exception(
                "room %s: storing %d chat messages failed", room.room_id, len(batch)
            )
            hub.metrics.internal_errors.inc()
            for r in batch:
                r.member.offer(
                    create_error(
                        "unavailable", "message not stored; send it again", r.client_id
                    )
                )
                r.member.answered()
            return
        now = time.perf_counter()
        hub.metrics.chat_batch_size.observe(len(batch))
        for request, message in zip(batch, stored, strict=True):
            hub.metrics.chat_commit_seconds.observe(now - request.received)
            request.member.offer(
                create_chat_ack(
                    message.client_id, message.seq, duplicate=message.duplicate
                )
            )
            request.member.answered()
            if message.duplicate:
                continue
            hub.metrics.messages.inc()
            await hub.broker.publish(
                room_topic(room.room_id),
                Envelope(
                    text=create_chat_message(
                        seq=message.seq,
                        client_id=message.client_id,
                        author={
                            "id": request.member.user.id,
                            "name": request.member.user.name,
                        },
                        text=message.text,
                        created_at=message.created_at,
                    ),
                    seq=message.seq,
                ),
            )

    async def _write_change(self, request: ChatRequest) -> None:
        try:
            await self._apply_change(request)
        finally:
            request.member.answered()

    async def _apply_change(self, request: ChatRequest) -> None:
        room = self.room
        try:
            changed = await change_message(
                room.hub.sessions,
                room.room_id,
                request.seq,
                request.member.user.id,
                request.text if request.kind == "edit" else None,
            )
        except ChatEditRefused as refused:
            request.member.offer(
                create_error(refused.code, refused.message, request.client_id)
            )
            return
        except Exception:
            log.exception(
                "room %s: changing message %s failed", room.room_id, request.seq
            )
            room.hub.metrics.internal_errors.inc()
            request.member.offer(
                create_error(
                    "unavailable", "change not stored; try again", request.client_id
                )
            )
            return
        assert changed.edit_seq is not None
        frame = create_chat_change(
            seq=changed.seq,
            edit_seq=changed.edit_seq,
            text=changed.text,
            edited_at=changed.edited_at or changed.created_at,
            deleted=changed.deleted,
        )
        await room.hub.broker.publish(
            room_topic(room.room_id), Envelope(text=frame, edit=changed.edit_seq)
        )


class LocalRoom:
    """A room as this process sees it: its local members and its writer."""

    def __init__(self, hub: RoomHub, room_id: int) -> None:
        self.hub = hub
        self.room_id = room_id
        self.members: dict[str, Member] = {}
        self.lock = asyncio.Lock()
        self.closed = False
        self.started = False
        self.chat = ChatWriter(
            self,
            max_queue=hub.chat_queue_size,
            max_batch=hub.chat_batch_size,
            linger=hub.chat_linger,
        )
        self._stack = contextlib.AsyncExitStack()
        # What this room delivered, for resyncs after broker outages.
        self.chat_seen = SeqWindow()
        self.edits_seen = SeqWindow()
        self.resync = Resync(
            f"room {room_id}",
            self._catch_up,
            spawn=hub.spawn,
            closed=lambda: self.closed,
        )

    def started_at(self, last_seq: int, last_edit: int) -> None:
        """A member got its welcome with these counters (its floor)."""
        self.chat_seen.start(last_seq)
        self.edits_seen.start(last_edit)

    def deliver(self, envelope: Envelope) -> None:
        """Broker callback: hand one envelope to every local member, never waiting."""
        if envelope.seq:
            if self.chat_seen.has(envelope.seq):
                return  # already sent by a resync
            self.chat_seen.note(envelope.seq)
        elif envelope.edit:
            if self.edits_seen.has(envelope.edit):
                return
            self.edits_seen.note(envelope.edit)
        if envelope.control == "revoke":
            for member in list(self.members.values()):
                if member.user.id == envelope.user_id:
                    member.fail(Forbidden("membership revoked"))
            return
        if envelope.to:
            target = self.members.get(envelope.to)
            if target is not None:
                target.offer(envelope.text)
            return
        for member in list(self.members.values()):
            member.offer(envelope.text, envelope.seq)

    def on_resync(self) -> None:
        """Broker hook: envelopes may have been lost; catch up from the database."""
        if not self.closed and self.resync.request():
            self.hub.resyncs += 1

    async def _catch_up(self) -> None:
        """Send each member the chat messages and edits it missed, then presence.

        Counters are read first: everything up to them is either already
        delivered (the windows say so) or sent now, so the windows move up to them.
        Members' floors drop what a resuming member already got from its replay.
        """
        hub = self.hub
        async with hub.sessions() as session:
            last_seq, last_edit = await room_counters(session, self.room_id)
        chat = self.chat_seen
        if chat.mark is not None:
            cursor = chat.mark
            while cursor < last_seq:
                async with hub.sessions() as session:
                    page = await messages_between(
                        session,
                        self.room_id,
                        after=cursor,
                        upto=last_seq,
                        limit=RESYNC_PAGE,
                    )
                if not page:
                    break
                for m in page:
                    if chat.has(m.seq):
                        continue
                    chat.note(m.seq)
                    frame = create_stored_chat_message(m)
                    for member in list(self.members.values()):
                        member.offer(frame, m.seq)
                cursor = page[-1].seq
            chat.advance_to(last_seq)
        edits = self.edits_seen
        if edits.mark is not None and edits.mark < last_edit:
            async with hub.sessions() as session:
                changed = await edits_between(
                    session,
                    self.room_id,
                    edits_after=edits.mark,
                    upto_edit=last_edit,
                    upto_seq=last_seq,
                )
            for m in changed:
                assert m.edit_seq is not None
                if edits.has(m.edit_seq):
                    continue
                frame = create_chat_change(
                    seq=m.seq,
                    edit_seq=m.edit_seq,
                    text=m.text,
                    edited_at=m.edited_at or m.created_at,
                    deleted=m.deleted,
                )
                for member in list(self.members.values()):
                    member.offer(frame)
            edits.advance_to(last_edit)
        if hub.presence is not None:
            snapshot = await hub.presence.snapshot(self.room_id)
            frame = encode(
                {
                    "type": "presence.snapshot",
                    "presence": [p.as_json() for p in snapshot],
                }
            )
            for member in list(self.members.values()):
                member.offer(frame)

    async def _start(self) -> None:
        await self._stack.enter_async_context(
            self.hub.broker.subscribe(
                room_topic(self.room_id), self.deliver, self.on_resync
            )
        )
        self.hub.spawn(self.chat.run)
        self.started = True
        self.hub.metrics.rooms.inc()

    async def _close(self) -> None:
        self.closed = True
        self.chat.stop()
        try:
            await self.chat.done.wait()
        finally:
            await self._stack.aclose()
            self.hub.metrics.rooms.dec()


class RoomHub:
    """Owner of this process's local rooms, their tasks and the activity event writer."""

    def __init__(
        self,
        *,
        db: Database,
        broker: Broker,
        metrics: Metrics,
        chat_queue_size: int = 1000,
        chat_batch_size: int = 100,
        chat_linger: float = 0.0,
        event_queue_size: int = 10_000,
    ) -> None:
        self.db = db
        self.sessions = db.sessions
        self.broker = broker
        self.metrics = metrics
        self.chat_queue_size = chat_queue_size
        self.chat_batch_size = chat_batch_size
        self.chat_linger = chat_linger
        self._rooms: dict[int, LocalRoom] = {}
        self._user_connections: dict[int, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events: asyncio.Queue[EventRow | None] = asyncio.Queue()
        self._event_queue_size = event_queue_size
        self._event_writer: asyncio.Task[None] | None = None
        # Set once the presence store is open (it is opened after the hub, so that
        # its expiry hook can announce through the hub).
        self.presence: PresenceStore | None = None
        self.resyncs = 0

    async def __aenter__(self) -> RoomHub:
        self._event_writer = asyncio.create_task(self._write_events())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Connections have ended by now (the server closed them with 1012); the
        # rooms' writers have drained. Anything left is abandoned with a log line.
        if self._tasks:
            log.warning("cancelling %d room tasks at shutdown", len(self._tasks))
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._events.put_nowait(None)
        if self._event_writer is not None:
            await self._event_writer

    def spawn(self, func: Callable[[], Any]) -> None:
        """Run a room task owned by the hub (cancelled and awaited at shutdown)."""
        task = asyncio.create_task(func())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def connections_of(self, user_id: int) -> int:
        return self._user_connections.get(user_id, 0)

    def join(self, room_id: int, member: Member) -> Membership:
        """Be a member of the local room for the duration of an ``async with`` block."""
        return Membership(self, room_id, member)

    async def _enter(self, room_id: int, member: Member) -> LocalRoom:
        while True:
            room = self._rooms.get(room_id)
            if room is None:
                room = self._rooms[room_id] = LocalRoom(self, room_id)
            async with room.lock:
                if room.closed:
                    continue  # it closed while we waited: make a fresh one
                if not room.started:
                    try:
                        await room._start()
                    except BaseException:
                        room.closed = True
                        self._rooms.pop(room_id, None)
                        raise
                room.members[member.conn_id] = member
                break
        user_id = member.user.id
        self._user_connections[user_id] = self._user_connections.get(user_id, 0) + 1
        self.metrics.connections.inc()
        return room

    async def _exit(self, room: LocalRoom, member: Member) -> None:
        self.metrics.connections.dec()
        user_id = member.user.id
        left = self._user_connections.get(user_id, 1) - 1
        if left:
            self._user_connections[user_id] = left
        else:
            self._user_connections.pop(user_id, None)
        room.members.pop(member.conn_id, None)
        if not room.members:
            # Leaving must complete even when the connection is being cancelled.
            with anyio.CancelScope(shield=True):
                async with room.lock:
                    if not room.members and not room.closed:
                        if self._rooms.get(room.room_id) is room:
                            del self._rooms[room.room_id]
                        await room._close()

    async def publish(self, room_id: int, envelope: Envelope) -> None:
        await self.broker.publish(room_topic(room_id), envelope)

    async def announce(
        self, room_id: int, change: Change, conn_id: str | None = None
    ) -> None:
        """Publish a presence change as ``presence.join/leave/update`` and record
        joins and leaves (``conn_id`` None: a change no local connection made,
        such as a dead process's connections expiring)."""
        kind = change.kind
        if kind == "none":
            return
        details: dict[str, Any] = {"conn": conn_id}
        if conn_id is None:
            details["expired"] = True
        if kind == "join":
            assert change.after is not None
            frame = {"type": "presence.join", **change.after.as_json()}
            self.record(EventRow("join", room_id, change.after.user.id, details))
        elif kind == "leave":
            assert change.before is not None
            user_id = change.before.user.id
            frame = {"type": "presence.leave", "user_id": user_id}
            self.record(EventRow("leave", room_id, user_id, details))
        else:
            assert change.after is not None
            after = change.after
            frame = {
                "type": "presence.update",
                "user_id": after.user.id,
                "status": after.status,
                "typing": after.typing,
                "connections": after.connections,
            }
        await self.publish(room_id, Envelope(text=encode(frame)))

    def record(self, row: EventRow) -> None:
        """Queue an activity event; dropped (and counted) if the writer is far behind."""
        if self._events.qsize() >= self._event_queue_size:
            self.metrics.events_dropped.inc()
            return
        self._events.put_nowait(row)

    async def _write_events(self) -> None:
        stopping = False
        while not stopping:
            first = await self._events.get()
            if first is None:
                return
            batch = [first]
            while not self._events.empty() and len(batch) < 500:
                nxt = self._events.get_nowait()
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                await insert_events(self.sessions, batch)
            except Exception:
                log.exception("writing %d activity events failed", len(batch))
                self.metrics.events_dropped.inc(len(batch))


class Membership:
    """``async with hub.join(room_id, member) as room``: a member of the local room
    inside the block. A class, not a generator-based context manager: it lives as
    long as the socket, and a suspended generator frame costs several times more."""

    __slots__ = ("_hub", "_member", "_room", "_room_id")

    def __init__(self, hub: RoomHub, room_id: int, member: Member) -> None:
        self._hub = hub
        self._room_id = room_id
        self._member = member
        self._room: LocalRoom | None = None

    async def __aenter__(self) -> LocalRoom:
        self._room = await self._hub._enter(self._room_id, self._member)
        return self._room

    async def __aexit__(self, *exc: object) -> None:
        room, self._room = self._room, None
        if room is not None:
            await self._hub._exit(room, self._member)
