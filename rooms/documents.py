"""Live CRDT documents of this process: load, validate, persist, broadcast, unload.

One ``LiveDocument`` per (room, name) is shared by every connection of this process.
Its single writer task owns the write path::

    client update → size/permission checks → queue (bounded)
      → writer: apply to the shadow copy (a failure rejects that update only)
      → append the batch to the update log (one transaction: group commit)
      → apply to the live document and queue one merged update frame per live
        connection (a chunk of the batch at a time), in one step with no await in
        between

Across processes, each live copy subscribes to its document's topic
(``doc:{room}:{name}``) before loading (updates commute, so anything published
while it loads is applied afterwards) and publishes every update once it is
stored. A copy that may have missed some (the broker's ``on_resync``: a Redis
outage) catches up by a state-vector exchange with storage: it loads the stored
snapshot and log, applies what the live copy lacks and sends that difference to
its connections. Awareness crosses processes as the flushed frames.

So the live document always equals what is stored: a joining client's sync step 2
never holds anything unstored, and nothing is broadcast before it is stored. Because
apply-and-broadcast is one step, a client that completes its handshake (sync step 1
answered from the live document, then marked live, also in one step) gets every
update exactly once: either in its step 2 or as a live frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from rooms import crdt
from rooms.broker import Broker, Envelope, MemoryBroker
from rooms.errors import Forbidden, MessageTooBig, RateLimited, RoomError, TryAgainLater
from rooms.hub import room_topic
from rooms.limits import TokenBucket
from rooms.metrics import Metrics
from rooms.outbox import Outbox, OutboxFull
from rooms.projection import ProjectionFailed, Projector
from rooms.resync import Resync
from rooms.step2_cache import Step2Cache
from rooms.worker import DocumentWorker, WorkerFailed, WorkerRefused
from rooms.ysync import (
    AwarenessEntry,
    ProtocolViolation,
    create_awareness,
    create_permission_denied,
    create_sync_step1,
    create_sync_step2,
    create_update,
)
from storage import documents as store
from storage.database import Database
from storage.events import EventRow

log = logging.getLogger(__name__)

# An update that changes nothing (no structs, empty delete set) is two zero bytes.
EMPTY_UPDATE = b"\x00\x00"
# The state vector of a client that has nothing yet (no clients: varUint 0).
EMPTY_STATE_VECTOR = b"\x00"
# Updates applied and broadcast (merged into one frame) between two yields to the
# event loop.
YIELD_EVERY = 32


def doc_topic(room_id: int, name: str) -> str:
    return f"doc:{room_id}:{name}"


class _Feed:
    """A document's broker subscription: holds what arrives until the copy is built."""

    def __init__(self) -> None:
        self.doc: LiveDocument | None = None
        self.early: list[Envelope] = []
        self.resync_wanted = False

    def deliver(self, envelope: Envelope) -> None:
        if self.doc is None:
            self.early.append(envelope)
        else:
            self.doc.receive(envelope)

    def on_resync(self) -> None:
        if self.doc is None:
            self.resync_wanted = True
        else:
            self.doc.request_resync()

    def attach(self, doc: LiveDocument) -> None:
        self.doc = doc
        early, self.early = self.early, []
        for envelope in early:
            doc.receive(envelope)
        if self.resync_wanted:
            doc.request_resync()


@dataclass(frozen=True, slots=True)
class DocumentLimits:
    """Per-document and per-connection limits (settings; see the README)."""

    max_frame_bytes: int = 1 << 20
    max_document_bytes: int = 32 << 20
    max_awareness_bytes: int = 8 << 10
    awareness_per_second: float = 20.0
    awareness_burst: int = 60
    updates_per_second: float = 100.0
    update_burst: int = 500
    write_queue_updates: int = 10_000
    write_batch_updates: int = 500
    write_interval: float = 0.005  # group commit: one batch per interval under load
    send_queue_frames: int = 4096
    awareness_flush_interval: float = 0.02
    idle_unload: float = 30.0
    compact_after_updates: int = 500
    projection_delay: float = 1.0
    edit_event_interval: float = 60.0
    shutdown_store_timeout: float = 5.0
    max_documents_per_room: int = 100
    max_connections_per_user: int = 20


@dataclass(eq=False, slots=True)
class DocConnection:
    """One socket on one document."""

    conn_id: str
    user_id: int
    can_write: bool
    outbox: Outbox
    on_failure: Callable[[], None]
    limits: DocumentLimits
    live: bool = False
    client_id: int | None = None  # the awareness client this connection speaks for
    failure: RoomError | None = None
    on_queued: Callable[[], None] | None = None  # told when frames are queued
    awareness_bucket: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        self.awareness_bucket = TokenBucket(
            self.limits.awareness_per_second, self.limits.awareness_burst
        )

    def offer(self, frame: bytes) -> None:
        try:
            self.outbox.put(frame)
        except OutboxFull:
            self.fail(TryAgainLater("send queue full: reconnect and resync"))
            return
        if self.on_queued is not None:
            self.on_queued()

    def fail(self, error: RoomError) -> None:
        if self.failure is None:
            self.failure = error
            self.outbox.close()
            self.on_failure()


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    conn: DocConnection | None  # None: made by the server (a version restore)
    user_id: int | None
    update: bytes
    done: asyncio.Future[None] | None = None  # resolved once stored and broadcast

    def settle(self, error: Exception | None = None) -> None:
        if self.done is not None and not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)


class DocumentUnavailable(TryAgainLater):
    default_reason = "document unavailable: try again later"


class LiveDocument:
    """A document loaded in this process, with its connections and its writer."""

    def __init__(
        self,
        registry: DocumentRegistry,
        room_id: int,
        name: str,
        document_id: int,
        stored: store.StoredDocument,
    ) -> None:
        self.registry = registry
        self.limits = registry.limits
        self.room_id = room_id
        self.name = name
        self.document_id = document_id
        parts = ([stored.snapshot] if stored.snapshot else []) + stored.updates
        try:
            self.doc = crdt.build(parts)
            self.shadow = crdt.copy(self.doc)
        except crdt.UpdateRejected as exc:
            # Never serve an empty document in place of stored state.
            log.error("document %s/%s does not load: %s", room_id, name, exc)
            raise DocumentUnavailable() from None
        # What a client that has nothing yet (every fresh join) is sent, kept
        # between joins; ``_apply_live`` tells it every change. A stored snapshot
        # is such a step 2 already.
        self._fresh_sync = Step2Cache()
        if stored.snapshot:
            self._fresh_sync.seed(stored.snapshot, stored.updates)
        self.stored_bytes = stored.stored_bytes
        self.snapshot_bytes = len(stored.snapshot or b"")
        self.log_rows = len(stored.updates)
        self.conns: dict[str, DocConnection] = {}
        self.awareness: dict[int, AwarenessEntry] = {}
        self.awareness_owner: dict[int, str] = {}
        self._pending_awareness: dict[int, AwarenessEntry] = {}
        self._awareness_timer: asyncio.TimerHandle | None = None
        self._queue: deque[PendingUpdate] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self.done = asyncio.Event()  # the writer has ended
        self.closed = asyncio.Event()  # unloaded: a new live copy may be loaded
        self.idle_since: float | None = None
        self.unloading = False
        self._edits: dict[
            int, list[int]
        ] = {}  # user -> [updates, bytes] since last event
        self._edits_flushed = time.monotonic()
        self._projection_due: float | None = None
        # The updates applied since the last projection (agreement documents only):
        # the projector's copy takes just those, never the whole state again.
        self._projection_feed: list[bytes] | None = (
            list(parts) if name == "agreement" else None
        )
        # The earliest time of the next projection (large lists are read less often).
        self.projection_not_before = 0.0
        self.instance = uuid.uuid4().hex  # skips its own envelopes
        self.topic = doc_topic(room_id, name)
        self.subscription: contextlib.AsyncExitStack | None = None
        self.resync = Resync(
            f"document {room_id}/{name}",
            self.catch_up,
            spawn=lambda run: registry._spawn(run()),
            closed=self.closed.is_set,
        )

    # -- connections and the handshake ------------------------------------------

    def attach(self, conn: DocConnection) -> list[bytes]:
        """Register a connection (not yet live); returns the server's opening frames."""
        self.conns[conn.conn_id] = conn
        self.idle_since = None
        frames = [create_sync_step1(self.doc.get_state())]
        if self.awareness:
            frames.append(create_awareness(list(self.awareness.values())))
        return frames

    def sync(self, conn: DocConnection, state_vector: bytes) -> None:
        """Answer a client's sync step 1 and make the connection live, in one step."""
        if state_vector == EMPTY_STATE_VECTOR:
            for frame in self._fresh_sync.frames(self.doc.get_update):
                conn.offer(frame)
            conn.live = True
            return
        try:
            diff = self.doc.get_update(state_vector)
        except BaseException as exc:
            if not crdt._is_crdt_failure(exc):
                raise
            raise ProtocolViolation("bad state vector") from None
        conn.offer(create_sync_step2(diff))
        conn.live = True

    def _apply_live(self, update: bytes) -> None:
        """Every change to the live copy goes through here, so the kept step 2
        for fresh clients follows it (raises ``crdt.UpdateRejected``)."""
        try:
            crdt.apply(self.doc, update)
        except BaseException:
            self._fresh_sync.drop()  # the copy may be half-changed
            raise
        self._fresh_sync.applied(update)

    def detach(self, conn: DocConnection) -> None:
        """Forget a connection; its awareness state is announced as removed."""
        self.conns.pop(conn.conn_id, None)
        if (
            conn.client_id is not None
            and self.awareness_owner.get(conn.client_id) == conn.conn_id
        ):
            del self.awareness_owner[conn.client_id]
            current = self.awareness.pop(conn.client_id, None)
            clock = current.clock + 1 if current else 1
            # clock + 1 with a null state: every client drops the cursor now.
            self._queue_awareness(AwarenessEntry(conn.client_id, clock, "null"))
        if not self.conns:
            self.idle_since = time.monotonic()

    # -- document updates ---------------------------------------------------------

    def submit(
        self,
        conn: DocConnection | None,
        user_id: int | None,
        update: bytes,
        *,
        done: asyncio.Future[None] | None = None,
    ) -> None:
        """Queue an update for the writer.

        Raises:
            TryAgainLater: the write queue is full (storage is slow or down).
        """
        if update == EMPTY_UPDATE:
            if done is not None:
                done.set_result(None)
            return
        if conn is not None and not conn.can_write:
            conn.offer(create_permission_denied("read-only: observers cannot edit"))
            return
        if self.stored_bytes + len(update) > self.limits.max_document_bytes:
            # Refused like an observer's edit: the client is told and nothing changes.
            if conn is not None:
                conn.offer(create_permission_denied("document size limit reached"))
            if done is not None:
                done.set_exception(TryAgainLater("document size limit reached"))
            return
        if len(self._queue) >= self.limits.write_queue_updates or self._stopping:
            raise TryAgainLater("document storage is busy")
        self._queue.append(PendingUpdate(conn, user_id, update, done))
        self._wake.set()

    async def write(self, user_id: int, update: bytes) -> None:
        """A server-made edit (a version restore): queued like a client's; returns
        once it is stored and broadcast.

        Raises:
            TryAgainLater: the write queue is full, or the edit was not stored.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit(None, user_id, update, done=done)
        await done

    async def run(self) -> None:
        """The writer: validate, store, apply and broadcast, batch by batch."""
        queue = self._queue
        loop = asyncio.get_running_loop()
        last_batch = -self.limits.write_interval
        try:
            while True:
                while not queue:
                    if self._stopping:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                # Group commit: while updates keep coming, at most one batch per
                # write_interval. Each batch costs a commit and a frame per
                # connection whatever its size, so under load this is most of the
                # CPU; a lone edit after a pause is not delayed.
                wait = last_batch + self.limits.write_interval - loop.time()
                if (
                    wait > 0
                    and len(queue) < self.limits.write_batch_updates
                    and not self._stopping
                ):
                    await asyncio.sleep(wait)
                last_batch = loop.time()
                batch = [
                    queue.popleft()
                    for _ in range(min(len(queue), self.limits.write_batch_updates))
                ]
                accepted = self._validate(batch)
                if not accepted:
                    continue
                if await self._store(accepted):
                    await self._apply_and_broadcast(accepted)
                else:
                    for pending in accepted:
                        pending.settle(
                            TryAgainLater("not stored: server shutting down")
                        )
        finally:
            self.done.set()

    def _validate(self, batch: list[PendingUpdate]) -> list[PendingUpdate]:
        accepted: list[PendingUpdate] = []
        for pending in batch:
            try:
                crdt.apply(self.shadow, pending.update)
            except crdt.UpdateRejected as exc:
                log.warning(
                    "document %s/%s: update rejected (%s)", self.room_id, self.name, exc
                )
                self.registry.metrics.doc_updates_rejected.inc()
                pending.settle(TryAgainLater("update rejected"))
                if pending.conn is not None:
                    pending.conn.fail(
                        ProtocolViolation("update rejected: not a valid Yjs update")
                    )
                # The shadow may be half-changed: rebuild it from the live document
                # plus what this batch has accepted so far.
                self.shadow = crdt.build(
                    [self.doc.get_update(), *(p.update for p in accepted)]
                )
                continue
            accepted.append(pending)
        return accepted

    async def _store(self, accepted: list[PendingUpdate]) -> bool:
        """Store a batch, retrying while storage is down; False if abandoned at shutdown."""
        items = [(p.update, p.user_id) for p in accepted]
        delay = 0.1
        give_up: float | None = None
        while True:
            try:
                await store.append_updates(self.registry.db, self.document_id, items)
                return True
            except Exception:
                # Keep the batch and retry: nothing is broadcast until it is stored.
                log.exception(
                    "document %s/%s: storing %d updates failed; retrying in %.1fs",
                    self.room_id,
                    self.name,
                    len(items),
                    delay,
                )
            if self._stopping:
                give_up = (
                    give_up or time.monotonic() + self.limits.shutdown_store_timeout
                )
                if time.monotonic() >= give_up:
                    log.error(
                        "document %s/%s: abandoning %d unstored updates at shutdown "
                        "(their clients still hold them and resend them on their next sync)",
                        self.room_id,
                        self.name,
                        len(items),
                    )
                    return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _apply_and_broadcast(self, accepted: list[PendingUpdate]) -> None:
        for start in range(0, len(accepted), YIELD_EVERY):
            if start:
                # Let the sockets write and read between chunks of a big batch.
                # Safe: each chunk's apply and broadcast is one step, so a
                # handshake in between sees it either in its step 2 or live.
                await asyncio.sleep(0)
            chunk = accepted[start : start + YIELD_EVERY]
            for pending in chunk:
                try:
                    self._apply_live(pending.update)
                except crdt.UpdateRejected:
                    # The shadow accepted it, so this should not happen; the live
                    # copy may be damaged: reload it from storage on the next
                    # connection (every client resyncs then; all of it is stored).
                    log.error(
                        "document %s/%s: live apply failed after validation",
                        self.room_id,
                        self.name,
                    )
                    for stored in accepted[start:]:
                        stored.settle()
                    self._poisoned()
                    return
            merged = self._broadcast(chunk)
            if self._projection_feed is not None:
                if merged is None:
                    self._projection_feed.extend(p.update for p in chunk)
                else:
                    self._projection_feed.append(merged)
            for pending in chunk:
                pending.settle()
                if self.registry.shared:
                    await self.registry.broker.publish(
                        self.topic, Envelope(data=pending.update, source=self.instance)
                    )
                self.stored_bytes += len(pending.update)
                self.log_rows += 1
                if pending.user_id is not None:
                    tally = self._edits.setdefault(pending.user_id, [0, 0])
                    tally[0] += 1
                    tally[1] += len(pending.update)
        self.registry.metrics.doc_updates.inc(len(accepted))
        if self.name == "agreement" and self._projection_due is None:
            self._projection_due = max(
                time.monotonic() + self.limits.projection_delay,
                self.projection_not_before,
            )
        if self.compaction_due():
            self.registry.request_compaction(self)

    def _broadcast(self, chunk: list[PendingUpdate]) -> bytes | None:
        """Queue a chunk of applied updates for every live connection as one merged
        update: one frame per connection, not one per update (y-websocket has one
        message per frame; Yjs updates merge into one). A connection that sent some
        of them gets the merge of the others only, so nobody hears its own edits
        back (applying them again would be a no-op, but costs the client).

        Returns the merged update, or None if pycrdt could not merge (then each
        update went out in its own frame)."""
        updates = [p.update for p in chunk]
        merged = crdt.merge_updates(updates)
        if merged is None:
            # pycrdt could not merge (it should, they were all applied): send them
            # one by one, which every client can take.
            for pending in chunk:
                frame = create_update(pending.update)
                for conn in self.conns.values():
                    if conn.live and conn is not pending.conn:
                        conn.offer(frame)
            return None
        senders = {p.conn for p in chunk if p.conn is not None}
        frame = create_update(merged)
        for conn in self.conns.values():
            if conn.live and conn not in senders:
                conn.offer(frame)
        for sender in senders:
            if not sender.live or self.conns.get(sender.conn_id) is not sender:
                continue
            others = [p.update for p in chunk if p.conn is not sender]
            if others:
                own = crdt.merge_updates(others)
                if own is None:
                    for update in others:
                        sender.offer(create_update(update))
                else:
                    sender.offer(create_update(own))
        return merged

    # -- other processes ------------------------------------------------------------

    def receive(self, envelope: Envelope) -> None:
        """Broker callback: another process's stored update or awareness frame."""
        if envelope.source == self.instance or not envelope.data:
            return
        if envelope.control == "awareness":
            for conn in self.conns.values():
                conn.offer(envelope.data)
            return
        try:
            self._apply_live(envelope.data)
            crdt.apply(self.shadow, envelope.data)
        except crdt.UpdateRejected as exc:
            log.error(
                "document %s/%s: update from another process rejected (%s)",
                self.room_id,
                self.name,
                exc,
            )
            self.request_resync()
            return
        frame = create_update(envelope.data)
        for conn in self.conns.values():
            if conn.live:
                conn.offer(frame)
        self.stored_bytes += len(envelope.data)
        self._feed_projection(envelope.data)

    def request_resync(self) -> None:
        """Updates may have been missed: catch up from storage (coalesced)."""
        self.resync.request()

    async def catch_up(self) -> None:
        """State-vector exchange with storage: apply and broadcast what is missing."""
        stored = await store.load_document(self.registry.db, self.document_id)
        parts = ([stored.snapshot] if stored.snapshot else []) + stored.updates
        if not parts:
            return
        kept = crdt.build(parts)
        diff = kept.get_update(self.doc.get_state())
        if diff == EMPTY_UPDATE:
            return
        self._apply_live(diff)
        crdt.apply(self.shadow, diff)
        self._feed_projection(diff)
        frame = create_update(diff)
        for conn in self.conns.values():
            if conn.live:
                conn.offer(frame)
        self.registry.resynced += 1

    def compaction_due(self) -> bool:
        """Fold the log when it is long and at least half the snapshot's size: each
        compaction costs about the document's size, so a growing document is
        compacted geometrically less often, and loading stays within ~1.5x the
        snapshot's work."""
        log_bytes = self.stored_bytes - self.snapshot_bytes
        return (
            self.log_rows >= self.limits.compact_after_updates
            and log_bytes * 2 >= self.snapshot_bytes
        )

    def _poisoned(self) -> None:
        self.registry.discard(self)
        for conn in list(self.conns.values()):
            conn.fail(DocumentUnavailable("document reloading: reconnect"))

    # -- awareness ----------------------------------------------------------------

    def awareness_update(
        self, conn: DocConnection, entries: tuple[AwarenessEntry, ...]
    ) -> None:
        """Take a connection's own awareness entry; others' entries are ignored.

        Stock clients re-send states they heard from others; a connection speaks only
        for one client id: the first one it sends that nobody else owns.

        Raises:
            MessageTooBig: a state over the size limit. RateLimited: too frequent.
        """
        if not conn.awareness_bucket.take(time.monotonic()):
            raise RateLimited("awareness updates too frequent")
        for entry in entries:
            if len(entry.state) > self.limits.max_awareness_bytes:
                raise MessageTooBig("awareness state too large")
            owner = self.awareness_owner.get(entry.client_id)
            if owner is None:
                if conn.client_id is not None and conn.client_id != entry.client_id:
                    continue  # one state per connection
                if entry.removed:
                    continue  # nothing of ours to remove
                conn.client_id = entry.client_id
                self.awareness_owner[entry.client_id] = conn.conn_id
            elif owner != conn.conn_id:
                continue  # another connection's cursor: not this one's to change
            current = self.awareness.get(entry.client_id)
            if current is not None and entry.clock < current.clock:
                continue  # stale
            if entry.removed:
                self.awareness.pop(entry.client_id, None)
                self.awareness_owner.pop(entry.client_id, None)
                conn.client_id = None
            else:
                self.awareness[entry.client_id] = entry
            self._queue_awareness(entry)

    def awareness_snapshot(self) -> bytes:
        return create_awareness(list(self.awareness.values()))

    def _queue_awareness(self, entry: AwarenessEntry) -> None:
        # Bursts are merged: within a flush interval only the latest state of each
        # client is sent, to everyone (the sender too: stock clients count any
        # message as a sign of life and reconnect after 30 s of silence).
        self._pending_awareness[entry.client_id] = entry
        if self._awareness_timer is None:
            self._awareness_timer = asyncio.get_running_loop().call_later(
                self.limits.awareness_flush_interval, self._flush_awareness
            )

    def _flush_awareness(self) -> None:
        self._awareness_timer = None
        if not self._pending_awareness:
            return
        frame = create_awareness(list(self._pending_awareness.values()))
        self._pending_awareness.clear()
        for conn in self.conns.values():
            conn.offer(frame)
        if self.registry.shared:
            self.registry._spawn(
                self.registry.broker.publish(
                    self.topic,
                    Envelope(data=frame, control="awareness", source=self.instance),
                )
            )

    # -- housekeeping -------------------------------------------------------------

    def take_edit_events(self, *, force: bool = False) -> list[EventRow]:
        now = time.monotonic()
        if not self._edits or (
            not force and now - self._edits_flushed < self.limits.edit_event_interval
        ):
            return []
        self._edits_flushed = now
        rows = [
            EventRow(
                "edit",
                self.room_id,
                user_id,
                {"document": self.name, "updates": counts[0], "bytes": counts[1]},
            )
            for user_id, counts in self._edits.items()
        ]
        self._edits.clear()
        return rows

    def projection_due(self, now: float) -> bool:
        return self._projection_due is not None and now >= self._projection_due

    def take_projection(self) -> list[bytes]:
        """The updates applied since the last projection, for the projector's copy
        (the live copy's roots are never typed by the server: a client's schema
        mistake must not touch it)."""
        self._projection_due = None
        feed, self._projection_feed = self._projection_feed or [], []
        return feed

    def project_soon(self) -> None:
        """Have the next housekeeping round project the activities (agreement only)."""
        if self.name == "agreement":
            self._projection_due = time.monotonic()

    def restart_projection(self) -> None:
        """The projector lost its copy: the next projection starts from the whole
        state (the updates queued meanwhile are in it)."""
        self._projection_feed = [self.doc.get_update()]
        self._projection_due = time.monotonic() + self.limits.projection_delay

    def _feed_projection(self, update: bytes) -> None:
        if self._projection_feed is not None:
            self._projection_feed.append(update)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._awareness_timer is not None:
            self._awareness_timer.cancel()
            self._awareness_timer = None


class DocumentRegistry:
    """The live documents of this process; loads on first use, unloads when idle."""

    def __init__(
        self,
        *,
        db: Database,
        broker: Broker,
        metrics: Metrics,
        record: Callable[[EventRow], None],
        limits: DocumentLimits,
    ) -> None:
        self.db = db
        self.sessions = db.sessions
        self.broker = broker
        self.metrics = metrics
        self.record = record
        self.limits = limits
        self._docs: dict[tuple[int, str], LiveDocument] = {}
        self._loading: dict[tuple[int, str], asyncio.Future[LiveDocument]] = {}
        self._room_subscriptions: dict[int, contextlib.AsyncExitStack] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._compactions: set[int] = set()
        self._user_conns: dict[int, int] = {}
        self._janitor: asyncio.Task[None] | None = None
        # pycrdt work that needs no live document runs in a child process, so its
        # GIL is not this process's (see rooms/worker.py).
        self.worker = DocumentWorker()
        self.projector = Projector(self.worker)
        self._projecting = asyncio.Lock()  # one projection at a time, written in order
        self.resynced = 0  # documents that caught up from storage after a resync
        # Other processes may hold the same documents: publish updates and awareness
        # (the in-process broker has no one else to tell).
        self.shared = not isinstance(broker, MemoryBroker)

    async def __aenter__(self) -> DocumentRegistry:
        self._janitor = asyncio.create_task(self._housekeeping())
        # Start the worker now (half a second or more: a new interpreter imports the
        # server's modules), not in the first projection or compaction.
        self._spawn(self._start_worker())
        return self

    async def _start_worker(self) -> None:
        with contextlib.suppress(WorkerFailed):
            await self.worker.call("pid")

    async def __aexit__(self, *exc: object) -> None:
        # Flush: stop every writer after it has stored what it queued, project
        # and record what is pending, then cancel the housekeeping loop.
        for doc in list(self._docs.values()):
            await self._unload(doc)
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for stack in self._room_subscriptions.values():
            await stack.aclose()
        self.projector.close()
        await self.worker.aclose()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("document task failed", exc_info=task.exception())
            self.metrics.internal_errors.inc()

    @contextlib.asynccontextmanager
    async def connect(
        self, room_id: int, name: str, conn: DocConnection
    ) -> AsyncIterator[tuple[LiveDocument, list[bytes]]]:
        """Attach a connection to the live document (loaded if needed) for the block;
        yields the document and the server's opening frames."""
        if (
            self._user_conns.get(conn.user_id, 0)
            >= self.limits.max_connections_per_user
        ):
            raise RateLimited("too many document connections for this user")
        self._user_conns[conn.user_id] = self._user_conns.get(conn.user_id, 0) + 1
        try:
            doc = await self._acquire(room_id, name)
            # No await between acquiring and attaching: an idle unload cannot slip in.
            frames = doc.attach(conn)
            try:
                yield doc, frames
            finally:
                doc.detach(conn)
        finally:
            left = self._user_conns[conn.user_id] - 1
            if left:
                self._user_conns[conn.user_id] = left
            else:
                del self._user_conns[conn.user_id]

    @contextlib.asynccontextmanager
    async def use(self, room_id: int, name: str) -> AsyncIterator[LiveDocument]:
        """Hold a live document for a short server-side operation (versions, restore)."""
        doc = await self._acquire(room_id, name)
        doc.idle_since = None
        try:
            yield doc
        finally:
            if not doc.conns:
                doc.idle_since = time.monotonic()

    async def _acquire(self, room_id: int, name: str) -> LiveDocument:
        key = (room_id, name)
        while True:
            doc = self._docs.get(key)
            if doc is not None and not doc.unloading:
                return doc
            if doc is not None:
                # Its writer is still storing: load the new copy only after that.
                await doc.closed.wait()
                continue
            pending = self._loading.get(key)
            if pending is not None:
                return await asyncio.shield(pending)
            future: asyncio.Future[LiveDocument] = (
                asyncio.get_running_loop().create_future()
            )
            self._loading[key] = future
            try:
                doc = await self._load(room_id, name)
            except BaseException as exc:
                future.set_exception(
                    exc if isinstance(exc, Exception) else DocumentUnavailable()
                )
                future.exception()  # mark retrieved; waiters re-raise it
                raise
            finally:
                self._loading.pop(key, None)
            future.set_result(doc)
            return doc

    async def _load(self, room_id: int, name: str) -> LiveDocument:
        # Subscribe first, then load: what is published meanwhile is applied after.
        feed = _Feed()
        subscription = contextlib.AsyncExitStack()
        await subscription.enter_async_context(
            self.broker.subscribe(
                doc_topic(room_id, name), feed.deliver, feed.on_resync
            )
        )
        try:
            doc = await self._load_stored(room_id, name)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await subscription.aclose()
            raise
        doc.subscription = subscription
        feed.attach(doc)
        return doc

    async def _load_stored(self, room_id: int, name: str) -> LiveDocument:
        try:
            doc_id = await store.document_id(
                self.sessions,
                room_id,
                name,
                max_per_room=self.limits.max_documents_per_room,
            )
            stored = await store.load_document(self.db, doc_id)
        except store.TooManyDocuments:
            raise Forbidden(
                f"this room has its {self.limits.max_documents_per_room} documents already"
            ) from None
        except Exception:
            log.exception("loading document %s/%s failed", room_id, name)
            raise DocumentUnavailable() from None
        doc = LiveDocument(self, room_id, name, doc_id, stored)
        await self._watch_room(room_id)
        self._docs[(room_id, name)] = doc
        self._spawn(doc.run())
        self.metrics.documents.inc()
        # Projected on load, but not before answering whoever is waiting for the
        # load: for a long list (20,000 activities) that took 400 ms.
        doc.project_soon()
        if doc.compaction_due():
            self.request_compaction(doc)
        return doc

    async def _watch_room(self, room_id: int) -> None:
        # Revocations are published on the room topic; a removed member's document
        # sockets end too.
        if room_id in self._room_subscriptions:
            return
        stack = contextlib.AsyncExitStack()
        self._room_subscriptions[room_id] = stack

        def deliver(envelope: Envelope) -> None:
            if envelope.control != "revoke":
                return
            for (rid, _), doc in list(self._docs.items()):
                if rid == room_id:
                    for conn in list(doc.conns.values()):
                        if conn.user_id == envelope.user_id:
                            conn.fail(Forbidden("membership revoked"))

        await stack.enter_async_context(
            self.broker.subscribe(room_topic(room_id), deliver)
        )

    def discard(self, doc: LiveDocument) -> None:
        """Drop a damaged live copy; the next connection loads it again from storage."""
        if self._docs.get((doc.room_id, doc.name)) is doc:
            del self._docs[(doc.room_id, doc.name)]
            self.metrics.documents.dec()
        doc.unloading = True
        doc.stop()
        doc.closed.set()
        if doc.subscription is not None:
            self._spawn(doc.subscription.aclose())
            doc.subscription = None
        if doc.name == "agreement":
            self._spawn(self.projector.drop(doc.instance))

    def request_compaction(self, doc: LiveDocument) -> None:
        if doc.document_id in self._compactions:
            return
        self._compactions.add(doc.document_id)
        self._spawn(self._compact(doc))

    async def _compact(self, doc: LiveDocument) -> None:
        done = False
        try:
            started_at = doc.stored_bytes
            compacted = await store.compact_document(
                self.db, doc.document_id, self._merge
            )
            if compacted is None:
                return  # nothing to fold, or another process folded it
            folded, snapshot_bytes = compacted
            doc.log_rows = max(0, doc.log_rows - folded)
            # The snapshot replaces the folded log; what arrived meanwhile stays counted.
            doc.stored_bytes = snapshot_bytes + (doc.stored_bytes - started_at)
            doc.snapshot_bytes = snapshot_bytes
            self.metrics.compactions.inc()
            done = True
        except Exception:
            log.exception("compacting document %s/%s failed", doc.room_id, doc.name)
        finally:
            self._compactions.discard(doc.document_id)
        # Batches stored meanwhile asked for a compaction and were turned away (one
        # at a time per document): if the log is long again, fold it now, not only
        # after the next batch (a failed one waits for the next batch).
        if done and not doc.unloading and doc.compaction_due():
            self.request_compaction(doc)

    async def _merge(self, parts: list[bytes]) -> bytes:
        """``crdt.merge`` in the document worker; in a thread of this process while
        the worker is restarting (or cannot run).

        Raises:
            crdt.UpdateRejected: pycrdt could not merge the parts.
            rooms.worker.WorkerFailed: the worker failed on these parts (nothing is written;
                the next compaction tries again).
        """
        if self.worker.usable():
            try:
                return await self.worker.call("merge", parts)
            except WorkerRefused as exc:
                raise crdt.UpdateRejected(exc.detail) from None
        return await anyio.to_thread.run_sync(crdt.merge, parts)

    async def _project(self, doc: LiveDocument) -> None:
        async with self._projecting:
            started = time.monotonic()
            updates = doc.take_projection()
            try:
                changes = await self.projector.changes(
                    doc.instance, doc.room_id, updates
                )
            except ProjectionFailed as exc:
                log.error(
                    "projecting activities of room %s failed: %s", doc.room_id, exc
                )
                if exc.copy_lost:
                    doc.restart_projection()
            else:
                try:
                    await store.write_activity_changes(self.db, doc.room_id, changes)
                except Exception:
                    log.exception("writing activities of room %s failed", doc.room_id)
                    await self.projector.forget_rows(doc.instance)  # all next time
            # Reading a long list costs time: keep projections under ~5% of the time.
            doc.projection_not_before = time.monotonic() + 20 * (
                time.monotonic() - started
            )

    async def _housekeeping(self) -> None:
        """Projections, edit events and idle unloads, a few times a second."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for doc in list(self._docs.values()):
                if doc.projection_due(now):
                    await self._project(doc)
                for row in doc.take_edit_events():
                    self.record(row)
                if (
                    doc.idle_since is not None
                    and now - doc.idle_since >= self.limits.idle_unload
                ):
                    await self._unload(doc)

    async def _unload(self, doc: LiveDocument) -> None:
        """Stop the writer after it stored its queue, then project, record, compact."""
        if doc.unloading:
            await doc.closed.wait()
            return
        doc.unloading = True  # from now on, new connections wait for a fresh load
        doc.stop()
        with anyio.CancelScope(shield=True):
            await doc.done.wait()
            try:
                if doc.name == "agreement" and doc._projection_due is not None:
                    await self._project(doc)
                for row in doc.take_edit_events(force=True):
                    self.record(row)
                if doc.log_rows:
                    await self._compact(doc)
            finally:
                if doc.name == "agreement":
                    await self.projector.drop(doc.instance)
                if self._docs.get((doc.room_id, doc.name)) is doc:
                    del self._docs[(doc.room_id, doc.name)]
                    self.metrics.documents.dec()
                doc.closed.set()
                if doc.subscription is not None:
                    subscription, doc.subscription = doc.subscription, None
                    await subscription.aclose()
        if not any(rid == doc.room_id for rid, _ in self._docs):
            stack = self._room_subscriptions.pop(doc.room_id, None)
            if stack is not None:
                await stack.aclose()

    def loaded(self) -> int:
        return len(self._docs)
