"""Calls in rooms: the one writer of call state, its records and relays.

The room socket hands every call frame to ``CallService``, which checks it against
the room's call in a ``CallStore`` (this process's ``CallBook``, or Redis when
several processes serve the rooms: ``signaling.store``), stores what must be kept
(call sessions and participants, in one short transaction per join or leave), and
publishes frames on the room's topic: room-wide ones (a participant joined, a call
ended) to every member, signals to the one connection named in them, which the
hub of whichever process holds it delivers. Membership changes are serialised per
room by a lock in this process and, across processes, by the store's atomic
scripts, so joins at once on any processes cannot start two calls or overfill one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio

from rooms.broker import Envelope
from rooms.call_messages import (
    CallJoin,
    CallMedia,
    CallModerate,
    CallSignal,
    EchoStart,
    SignalRefused,
    check_description,
    check_signal,
)
from rooms.call_port import CallLimits, LeaveReason
from rooms.hub import Member, RoomHub
from rooms.messages import create_error, encode
from signaling.calls import Left, Participant, newcomer_is_polite
from signaling.echo import EchoRefused
from signaling.ice import IceConfig
from signaling.store import (
    CallStore,
    CallsUnavailable,
    Joined,
    LiveCalls,
    Lost,
    MemoryCallStore,
    NotAlive,
    StaleCall,
)
from storage.calls import (
    OpenRecords,
    close_empty_call,
    close_interrupted_calls,
    close_lost_stay,
    close_uncertain_join,
    discard_join,
    open_records,
    record_join,
    record_leave,
    record_media,
)
from storage.events import EventRow
from storage.models import utcnow

log = logging.getLogger(__name__)

# A join retries when another process changed the room's call between its reading
# and its adding (a call started or ended there): rare, and each retry sees the
# newer call, so a few attempts are plenty.
JOIN_ATTEMPTS = 5

# Open call records that no live call stands for (a process killed between
# storing a join's rows and running its script) are looked for at most this
# often (seconds) by each process's sweep, and closed when two looks in a row
# find them so: whoever should close a record it holds (a process whose
# participants Redis lost) has done so well within a minute.
ORPHAN_CHECK_INTERVAL = 60.0
# Records checked per look, oldest first; more wait for the next one.
ORPHAN_BATCH = 500


class EchoPeer(Protocol):
    """The server's echo-test peer (``signaling.echo.EchoService``)."""

    async def start(
        self,
        user_id: int,
        offer: dict[str, str],
        on_end: Callable[[str], None] | None = None,
    ) -> dict[str, str]: ...

    async def stop(self, user_id: int) -> bool: ...

    def active(self) -> int: ...


class CallService:
    def __init__(
        self,
        *,
        hub: RoomHub,
        limits: CallLimits,
        ice: IceConfig,
        echo: EchoPeer | None = None,
        store: CallStore | None = None,
    ) -> None:
        self.hub = hub
        self.limits = limits
        self.ice = ice
        self.echo = echo
        self.store: CallStore = MemoryCallStore() if store is None else store
        self.store.attach(self.sweep)
        self._locks: dict[int, asyncio.Lock] = {}
        # Joins whose outcome was lost: conn -> (record id, call id it started).
        self._uncertain: dict[str, tuple[int, int | None]] = {}
        self._metrics = hub.metrics
        # Records found orphaned by the last look: ("stay" | "call", id).
        self._suspects: set[tuple[str, int]] = set()
        self._orphans_due = 0.0  # time.monotonic() of the next look

    async def close_interrupted(self) -> None:
        """At start-up of a single process: calls it had open when it stopped are over."""
        closed = await close_interrupted_calls(self.hub.sessions, utcnow())
        if closed:
            log.info("closed %d call records left open by a previous run", closed)

    async def snapshot(self, room_id: int) -> dict[str, object] | None:
        """The room's live call, for the welcome frame (None when there is none,
        or when the shared call state cannot be reached: see the README)."""
        try:
            call = await self.store.call_of(room_id)
        except CallsUnavailable as exc:
            log.warning("room %s: no call snapshot: %s", room_id, exc)
            return None
        return None if call is None else call.as_json()

    def _lock(self, room_id: int) -> asyncio.Lock:
        # One lock per room that ever had a call; rooms are few and long-lived.
        # With Redis it only spares this process's joins each other's retries.
        lock = self._locks.get(room_id)
        if lock is None:
            lock = self._locks[room_id] = asyncio.Lock()
        return lock

    async def _publish(self, room_id: int, frame: dict[str, Any], to: str = "") -> None:
        await self.hub.publish(room_id, Envelope(text=encode(frame), to=to))

    def _count(self) -> None:
        calls, participants = self.store.local_counts()
        self._metrics.calls.set(calls)
        self._metrics.call_participants.set(participants)

    def _unavailable(self, member: Member, message_id: str | None) -> None:
        member.offer(
            create_error(
                "unavailable",
                "calls are unavailable for a moment; try again",
                message_id,
            )
        )

    # -- joining and leaving ------------------------------------------------------

    async def join(self, room_id: int, member: Member, msg: CallJoin) -> None:
        async with self._lock(room_id):
            # Rows first, then the store adds the participant to the call the rows
            # name; a call that changed in between (another process) means again.
            for _attempt in range(JOIN_ATTEMPTS):
                try:
                    joined = await self._try_join(room_id, member, msg)
                except StaleCall:
                    continue
                except SignalRefused as refused:
                    member.offer(create_error(refused.code, refused.message, msg.id))
                    return
                except CallsUnavailable as exc:
                    log.warning("room %s: call join refused: %s", room_id, exc)
                    self._unavailable(member, msg.id)
                    return
                except Exception:
                    log.exception("room %s: storing a call join failed", room_id)
                    self._metrics.internal_errors.inc()
                    self._unavailable(member, msg.id)
                    return
                if joined is not None:
                    await self._announce_join(room_id, member, msg, joined)
                return
            log.warning("room %s: call join kept racing; refused", room_id)
            self._unavailable(member, msg.id)

    async def _try_join(
        self, room_id: int, member: Member, msg: CallJoin
    ) -> Joined | None:
        """One attempt; raises ``StaleCall`` to be tried again."""
        store, user = self.store, member.user
        call_id = await store.peek(
            room_id, member.conn_id, self.limits.max_participants
        )
        now = utcnow()
        used = {k for k, on in msg.media.as_json().items() if on and k != "hand"}
        new_call_id, record_id = await record_join(
            self.hub.sessions,
            room_id=room_id,
            call_id=call_id,
            user_id=user.id,
            conn_id=member.conn_id,
            at=now,
            used=used,
        )
        participant = Participant(
            member.conn_id, user, msg.media, msg.rollback, now, record_id
        )
        participant.note_media()
        started_call = new_call_id if call_id is None else None
        try:
            return await store.join(
                room_id,
                participant,
                call_id=new_call_id,
                started=call_id is None,
                max_participants=self.limits.max_participants,
            )
        except (StaleCall, SignalRefused, NotAlive):
            # Surely not in the call: its rows must not stay (nor a session it
            # would have started: a call has one session).
            with anyio.CancelScope(shield=True):
                try:
                    await discard_join(
                        self.hub.sessions, record_id=record_id, call_id=started_call
                    )
                except Exception:
                    log.exception("room %s: discarding a call join failed", room_id)
            raise
        except BaseException:
            # Maybe in the call (a lost reply): the store left it pending, and
            # the sweep either takes it out (a leave, announced) or finds it was
            # never in and closes these rows.
            self._uncertain[member.conn_id] = (record_id, started_call)
            raise

    async def _announce_join(
        self, room_id: int, member: Member, msg: CallJoin, joined: Joined
    ) -> None:
        user, call, participant = member.user, joined.call, joined.participant
        self._count()
        polite = {
            other.conn_id: newcomer_is_polite(participant.rollback, other.rollback)
            for other in call.participants.values()
            if other.conn_id != participant.conn_id
        }
        servers, expires = self.ice.servers_for(user.id, time.time())
        others = [p for p in call.participants.values() if p.conn_id in polite]
        joined_frame: dict[str, Any] = {
            "type": "call.joined",
            "call_id": call.call_id,
            "connection_id": member.conn_id,
            "started_at": call.as_json()["started_at"],
            "participants": [
                {**p.as_json(), "polite": polite[p.conn_id]} for p in others
            ],
            "ice_servers": servers,
            "ice_expires_at": expires,
            "max_participants": self.limits.max_participants,
        }
        if msg.id is not None:
            joined_frame["id"] = msg.id
        # The joiner learns who is there before anyone learns of the joiner, so
        # its offers (it makes them) never race an offer made to it.
        member.offer(encode(joined_frame))
        if joined.started:
            await self._publish(
                room_id,
                {
                    "type": "call.started",
                    "call_id": call.call_id,
                    "started_at": joined_frame["started_at"],
                    "by": {"id": user.id, "name": user.name},
                },
            )
            self.hub.record(
                EventRow(
                    "call",
                    room_id,
                    user.id,
                    {"action": "start", "call_id": call.call_id},
                    at=participant.joined_at,
                )
            )
        await self._publish(
            room_id,
            {
                "type": "call.participant_joined",
                "call_id": call.call_id,
                "participant": participant.as_json(),
                # Each earlier participant's side toward the newcomer.
                "roles": {
                    conn: "impolite" if newcomer_polite else "polite"
                    for conn, newcomer_polite in polite.items()
                },
            },
        )
        self.hub.record(
            EventRow(
                "call",
                room_id,
                user.id,
                {"action": "join", "call_id": call.call_id},
                at=participant.joined_at,
            )
        )

    async def leave(
        self,
        room_id: int,
        member: Member,
        reason: LeaveReason,
        message_id: str | None = None,
    ) -> bool:
        """Take a connection out of the room's call; False if it was not in one.

        While the shared call state is unreachable a ``left`` is refused with
        ``unavailable``; a disconnection is kept by the store and announced once
        Redis takes it.
        """
        try:
            if await self._take_out(room_id, member.conn_id, reason):
                return True
        except CallsUnavailable as exc:
            log.warning("room %s: call leave deferred: %s", room_id, exc)
            if reason == "left":
                self._unavailable(member, message_id)
            return False
        if reason == "left":
            member.offer(create_error("not_in_call", "not in the call", message_id))
        return False

    async def _take_out(self, room_id: int, conn_id: str, reason: LeaveReason) -> bool:
        async with self._lock(room_id):
            left = await self.store.leave(room_id, conn_id, utcnow())
            uncertain = self._uncertain.pop(conn_id, None)
            if left is None:
                if uncertain is not None:
                    await self._close_uncertain(room_id, uncertain)
                return False
            await self._after_leave(room_id, left, reason)
            return True

    async def sweep(self) -> None:
        """Expire what other processes or Redis left behind (run periodically by
        the store, on every process: after each presence reaper pass).

        First the leaves Redis has not taken (it was unreachable), then the
        participants of processes that died, each announced as ``disconnected``
        by exactly one process; then our participants Redis lost; at most once
        every ``ORPHAN_CHECK_INTERVAL``, records nothing will ever close
        (``close_orphans``). While Redis is out of reach the rest waits for the
        next pass.
        """
        try:
            await self._sweep()
        except CallsUnavailable as exc:
            log.info("call sweep postponed: %s", exc)
            return
        if self.store.orphan_age is None or time.monotonic() < self._orphans_due:
            return
        self._orphans_due = time.monotonic() + ORPHAN_CHECK_INTERVAL
        try:
            await self.close_orphans()
        except CallsUnavailable as exc:
            log.info("orphaned call records not looked for: %s", exc)
        except Exception:  # the database: the next look tries again
            log.exception("looking for orphaned call records failed")

    async def _sweep(self) -> None:
        for conn_id, room_id in self.store.pending_leaves():
            await self._take_out(room_id, conn_id, "disconnected")
        for room_id, left in await self.store.reap(utcnow()):
            try:
                async with self._lock(room_id):
                    await self._after_leave(room_id, left, "disconnected")
            except Exception:  # one room's failure must not lose the others
                log.exception("room %s: announcing an expired call leave", room_id)
        for lost in await self.store.lost():
            try:
                await self._close_lost(lost)
            except Exception:
                log.exception("room %s: closing a lost call stay", lost.room_id)

    async def close_orphans(self) -> tuple[int, int]:
        """Close the call records that nothing will ever close: open stays that
        joined over the store's ``orphan_age`` ago whose participant is in no
        live call, and open calls that old with no open stay that are not live.

        A process killed with -9 between storing a join's rows and running its
        script leaves them: nobody was told of that join, so nothing is
        announced. A record is closed (``interrupted``) only when this look and
        the one before (``sweep`` spaces them ``ORPHAN_CHECK_INTERVAL`` apart)
        both found it orphaned, so a process that still holds it (Redis lost
        its participant) closes and announces it first. Several processes may
        look at once: only records still open are closed, under the call's row
        lock, so each is closed once. Raises ``CallsUnavailable`` (nothing
        closed) while Redis cannot be asked.

        Returns how many stays and calls this look closed.
        """
        age = self.store.orphan_age
        if age is None:
            return 0, 0  # one process: closed at start-up (close_interrupted)
        now = utcnow()
        # The rows are read before Redis: a join whose rows are read has run
        # its script (or given up) long before, so Redis shows its outcome.
        records = await open_records(
            self.hub.sessions,
            before=now - dt.timedelta(seconds=age),
            limit=ORPHAN_BATCH,
        )
        live = await self.store.live_calls(
            {room for *_, room in records.stays} | {room for _, room in records.calls}
        )
        suspects = _orphans(records, live)
        confirmed = suspects & self._suspects
        self._suspects = suspects
        stays = calls = 0
        for record_id, call_id, room_id in records.stays:
            if ("stay", record_id) not in confirmed:
                continue
            closed, ended = await close_lost_stay(
                self.hub.sessions,
                record_id=record_id,
                call_id=call_id,
                at=now,
                reason="interrupted",
            )
            stays += closed
            calls += ended is not None
            if closed:
                log.info(
                    "room %s: closed call stay %s (call %s) that no live call holds",
                    room_id,
                    record_id,
                    call_id,
                )
        for call_id, room_id in records.calls:
            if ("call", call_id) in confirmed and await close_empty_call(
                self.hub.sessions, call_id=call_id, at=now
            ):
                calls += 1
                log.info("room %s: ended call %s that is not live", room_id, call_id)
        return stays, calls

    async def _close_lost(self, lost: Lost) -> None:
        """Redis lost one of our participants (it restarted empty) with no leave
        anyone announced: close its record, and tell the room, unless whoever
        took it out did already (the record says so)."""
        p, room_id = lost.participant, lost.room_id
        now = utcnow()
        closed, ended = await close_lost_stay(
            self.hub.sessions,
            record_id=p.record_id,
            call_id=lost.call_id,
            at=now,
            reason=lost.reason,
        )
        self._count()
        if not closed:
            return
        await self._finish_leave(room_id, p, lost.call_id, "disconnected", now, None)
        if ended is not None:
            await self._finish_call(room_id, lost.call_id, ended)

    async def _close_uncertain(
        self, room_id: int, uncertain: tuple[int, int | None]
    ) -> None:
        record_id, started_call = uncertain
        try:
            await close_uncertain_join(
                self.hub.sessions,
                record_id=record_id,
                call_id=started_call,
                at=utcnow(),
            )
        except Exception:
            log.exception("room %s: closing an unfinished call join failed", room_id)

    async def _after_leave(self, room_id: int, left: Left, reason: LeaveReason) -> None:
        call = left.call
        self._count()
        await self._finish_leave(
            room_id,
            left.participant,
            call.call_id,
            reason,
            utcnow(),
            left.user_seconds,
        )
        if left.ended:
            await self._finish_call(room_id, call.call_id, call.started_at)
        await self._store_leave(
            room_id, left.participant, reason, call.call_id if left.ended else None
        )

    async def _finish_leave(
        self,
        room_id: int,
        p: Participant,
        call_id: int,
        reason: LeaveReason,
        now: dt.datetime,
        user_seconds: float | None,
    ) -> None:
        await self._publish(
            room_id,
            {
                "type": "call.participant_left",
                "call_id": call_id,
                "connection_id": p.conn_id,
                "user_id": p.user.id,
                "reason": reason,
            },
        )
        self.hub.record(
            EventRow(
                "call",
                room_id,
                p.user.id,
                {
                    "action": "leave",
                    "call_id": call_id,
                    # The user's time in the call, counted once when their last
                    # connection leaves (0 while another tab of theirs stays).
                    "seconds": round(user_seconds or 0.0, 3),
                    "connection_seconds": round((now - p.joined_at).total_seconds(), 3),
                    "reason": reason,
                },
                at=now,
            )
        )

    async def _finish_call(
        self, room_id: int, call_id: int, started_at: dt.datetime
    ) -> None:
        now = utcnow()
        seconds = round((now - started_at).total_seconds(), 3)
        await self._publish(
            room_id,
            {
                "type": "call.ended",
                "call_id": call_id,
                "ended_at": now.isoformat().replace("+00:00", "Z"),
                "seconds": seconds,
            },
        )
        self.hub.record(
            EventRow(
                "call",
                room_id,
                None,
                {"action": "end", "call_id": call_id, "seconds": seconds},
                at=now,
            )
        )

    async def _store_leave(
        self, room_id: int, p: Participant, reason: str, end_call_id: int | None
    ) -> None:
        try:
            await record_leave(
                self.hub.sessions,
                record_id=p.record_id,
                at=utcnow(),
                used=p.used,
                reason=reason,
                end_call_id=end_call_id,
            )
        except Exception:
            # The call is over for everyone already; the record keeps the join
            # time and is closed at the next start of a single process, or by
            # close_orphans with Redis.
            log.exception("room %s: storing a call leave failed", room_id)
            self._metrics.internal_errors.inc()

    # -- in the call ----------------------------------------------------------------

    async def signal(self, room_id: int, member: Member, msg: CallSignal) -> None:
        """Relay an offer, answer or candidate to one participant of the same call.

        The target may be connected to another process: the envelope names its
        connection, and the hub of whichever process holds it delivers it.
        """
        try:
            check_signal(msg, max_sdp_bytes=self.limits.max_sdp_bytes)
            target = await self.store.target(room_id, member.conn_id, msg.to)
        except SignalRefused as refused:
            member.offer(create_error(refused.code, refused.message, msg.id))
            return
        except CallsUnavailable:
            self._unavailable(member, msg.id)
            return
        frame: dict[str, Any] = {
            "type": "call.signal",
            "from": member.conn_id,
            "user_id": member.user.id,
        }
        if msg.description is not None:
            frame["description"] = msg.description
            self._metrics.signals.labels(msg.description.type).inc()
        else:
            frame["candidate"] = msg.candidate
            self._metrics.signals.labels("candidate").inc()
        await self._publish(room_id, frame, to=target.conn_id)

    async def media(self, room_id: int, member: Member, msg: CallMedia) -> None:
        changes = {
            "audio": msg.audio,
            "video": msg.video,
            "screen": msg.screen,
            "hand": msg.hand,
        }
        try:
            call_id, participant, before = await self.store.set_media(
                room_id, member.conn_id, changes
            )
        except SignalRefused as refused:
            member.offer(create_error(refused.code, refused.message, msg.id))
            return
        except CallsUnavailable:
            self._unavailable(member, msg.id)
            return
        await self._announce_media(room_id, call_id, participant)
        if participant.used != before:
            try:
                await record_media(
                    self.hub.sessions,
                    record_id=participant.record_id,
                    used=participant.used,
                )
            except Exception:
                log.exception("room %s: storing call media use failed", room_id)

    async def _announce_media(self, room_id: int, call_id: int, p: Participant) -> None:
        await self._publish(
            room_id,
            {
                "type": "call.media",
                "call_id": call_id,
                "connection_id": p.conn_id,
                "user_id": p.user.id,
                "media": p.media.as_json(),
            },
        )

    async def moderate(
        self, room_id: int, member: Member, msg: CallModerate, *, allowed: bool
    ) -> None:
        """Mute or remove a participant (``allowed``: the sender coordinates the room)."""
        if not allowed:
            member.offer(
                create_error(
                    "forbidden", "only coordinators can moderate a call", msg.id
                )
            )
            return
        try:
            target = await self.store.participant(room_id, msg.target)
            if target is None:
                member.offer(
                    create_error(
                        "unknown_peer", "no such participant in this call", msg.id
                    )
                )
                return
            by = {"id": member.user.id, "name": member.user.name}
            await self._publish(
                room_id,
                {"type": "call.moderated", "action": msg.action, "by": by},
                to=target.conn_id,
            )
            if msg.action == "mute":
                if target.media.audio:
                    try:
                        call_id, target, _ = await self.store.set_media(
                            room_id, target.conn_id, {"audio": False}
                        )
                    except SignalRefused:
                        return  # it left meanwhile
                    await self._announce_media(room_id, call_id, target)
                return
            await self._take_out(room_id, target.conn_id, "removed")
        except CallsUnavailable:
            self._unavailable(member, msg.id)

    async def ice_servers(
        self, room_id: int, member: Member, message_id: str | None
    ) -> None:
        try:
            participant = await self.store.participant(room_id, member.conn_id)
        except CallsUnavailable:
            self._unavailable(member, message_id)
            return
        if participant is None:
            member.offer(create_error("not_in_call", "join the call first", message_id))
            return
        servers, expires = self.ice.servers_for(member.user.id, time.time())
        frame: dict[str, Any] = {
            "type": "call.ice_servers",
            "ice_servers": servers,
            "ice_expires_at": expires,
        }
        if message_id is not None:
            frame["id"] = message_id
        member.offer(encode(frame))

    # -- the echo test --------------------------------------------------------------

    async def echo_start(
        self, member: Member, msg: EchoStart, on_end: Callable[[str], None]
    ) -> bool:
        """Start an echo test for the member's user; True when it started."""
        if self.echo is None:
            member.offer(
                create_error(
                    "echo_unavailable", "the echo test is off on this server", msg.id
                )
            )
            return False
        description = msg.description
        try:
            if description.type != "offer":
                raise SignalRefused("invalid_message", "the echo test needs an offer")
            check_description(description, max_sdp_bytes=self.limits.max_sdp_bytes)
        except SignalRefused as refused:
            member.offer(create_error(refused.code, refused.message, msg.id))
            return False

        def ended(reason: str) -> None:
            self._metrics.echo_sessions.set(self.echo.active() if self.echo else 0)
            member.offer(encode({"type": "echo.ended", "reason": reason}))
            on_end(reason)

        try:
            answer = await self.echo.start(
                member.user.id,
                {"type": description.type, "sdp": description.sdp},
                on_end=ended,
            )
        except EchoRefused as refused:
            member.offer(create_error(refused.code, refused.message, msg.id))
            return False
        self._metrics.echo_sessions.set(self.echo.active())
        frame: dict[str, Any] = {"type": "echo.answer", "description": answer}
        if msg.id is not None:
            frame["id"] = msg.id
        member.offer(encode(frame))
        return True

    async def echo_stop(self, member: Member) -> bool:
        if self.echo is None:
            return False
        return await self.echo.stop(member.user.id)


def _orphans(records: OpenRecords, live: LiveCalls) -> set[tuple[str, int]]:
    """The open records among ``records`` that ``live`` does not stand for."""
    orphans = {
        ("stay", record_id)
        for record_id, _, _ in records.stays
        if record_id not in live.records
    }
    orphans.update(
        ("call", call_id)
        for call_id, room_id in records.calls
        if live.calls.get(room_id) != call_id
    )
    return orphans
