"""Where a room's live call is kept: in this process, or in Redis for several processes.

``CallService`` (``signaling.service``) is the one writer of call state; it asks a
``CallStore`` for every membership change and check. ``MemoryCallStore`` keeps a
``CallBook`` (``signaling.calls``) in this process: the embedded single-process
default, serialised by the service's per-room lock. ``RedisCallStore`` keeps the
same state in Redis, so the members of one call can be connected to different
processes; each change is one Lua script, atomic across processes, so the cap and
"one live call per room" hold however joins interleave.

A join stores its database rows first (the call session, when it starts the call,
and the participant's row), then asks the store to add the participant to the call
it saw (``call_id``). When the room's call changed in between (another process
started one first, or it ended) the store answers ``StaleCall``; the service
deletes the rows it made and tries again. So each live call has exactly one
session row, and every participant in the store has its row.

Liveness is ``RedisPresence``'s: each participant is tagged with the id of the
process holding its connection, and a join is refused while that process's
presence heartbeat is not in Redis. After every presence reaper pass, each process
runs one atomic script that takes out the participants of processes whose
heartbeat expired: each of them is returned to exactly one process, which
announces the leave and closes the record.

What nothing announces is a join cut short by a kill -9 after its rows were
stored and before its script ran: no participant in Redis, so no reaper finds
it. The service's sweep closes such records once they are older than the
store's ``orphan_age`` (``CallService.close_orphans``), asking ``live_calls``
which records a live call still stands for.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from redis.exceptions import RedisError

from rooms.call_messages import MediaState, SignalRefused
from rooms.presence import PresenceStore, PresenceUser, RedisPresence
from rooms.redis_client import redis_client
from signaling.calls import Call, CallBook, Left, Participant

log = logging.getLogger(__name__)

Sweep = Callable[[], Awaitable[None]]
"""Run periodically (after each presence reaper pass) to expire and retry leaves."""


class CallsUnavailable(Exception):
    """The shared call state cannot be reached (Redis down or too slow)."""


class NotAlive(CallsUnavailable):
    """This process's heartbeat is not in Redis (it just came back, or this process
    stalled and was reaped): the join surely did not happen."""


class StaleCall(Exception):
    """The room's call is not the one the join was prepared for: prepare again."""


@dataclass(frozen=True, slots=True)
class Lost:
    """A participant of this process that the shared state lost track of."""

    room_id: int
    call_id: int
    participant: Participant
    reason: str  # for the record: "disconnected" or "interrupted"


@dataclass(frozen=True, slots=True)
class Joined:
    """A participant was added: ``call`` lists everyone in join order, it included."""

    call: Call
    participant: Participant
    started: bool


@dataclass(frozen=True, slots=True)
class LiveCalls:
    """What is live in some rooms: each one's call id, and the record ids of the
    participants in those calls."""

    calls: dict[int, int]  # room id -> call id (rooms without a call are left out)
    records: frozenset[int]


# Open call records older than this (seconds) may be orphans (see the module
# docstring), whatever the timeouts: a join runs its script right after
# storing its rows, so minutes leave room for a slow database, a skewed clock
# between machines and a process stalled for a while.
ORPHAN_MIN_AGE = 300.0


class CallStore(Protocol):
    """The live calls of rooms. Raises ``CallsUnavailable`` when it cannot answer."""

    async def call_of(self, room_id: int) -> Call | None: ...

    async def peek(
        self, room_id: int, conn_id: str, max_participants: int
    ) -> int | None:
        """The room's live call id (None: none), or refuse: in it already, or full."""
        ...

    async def join(
        self,
        room_id: int,
        participant: Participant,
        *,
        call_id: int,
        started: bool,
        max_participants: int,
    ) -> Joined:
        """Add ``participant`` to call ``call_id`` (``started``: it starts now).

        Raises:
            StaleCall: the room's call is another one now.
            SignalRefused: in the call already, or full.
        """
        ...

    async def leave(self, room_id: int, conn_id: str, now: dt.datetime) -> Left | None:
        """Take a connection out; None if it was not in the room's call."""
        ...

    async def participant(self, room_id: int, conn_id: str) -> Participant | None: ...

    async def target(self, room_id: int, sender: str, to: str) -> Participant:
        """The participant a signal from ``sender`` may go to, or ``SignalRefused``."""
        ...

    async def set_media(
        self, room_id: int, conn_id: str, changes: dict[str, bool | None]
    ) -> tuple[int, Participant, frozenset[str]]:
        """Change a participant's media: ``(call_id, participant, used before)``."""
        ...

    def local_counts(self) -> tuple[int, int]:
        """Calls with a participant on this process, and those participants."""
        ...

    def attach(self, sweep: Sweep) -> None:
        """Have ``sweep`` run periodically, when anything can expire."""
        ...

    def pending_leaves(self) -> list[tuple[str, int]]:
        """``(conn, room)`` of leaves (or joins) whose outcome the store could
        not learn: ``leave`` them again."""
        ...

    async def reap(self, now: dt.datetime) -> list[tuple[int, Left]]:
        """Participants of processes that died, taken out: ``(room, left)``."""
        ...

    async def lost(self) -> list[Lost]:
        """This process's participants that the store lost without a leave."""
        ...

    @property
    def orphan_age(self) -> float | None:
        """Seconds after which an open record that no live call stands for can
        only be an orphan; None: never checked (one process closes what it left
        open when it starts again)."""
        ...

    async def live_calls(self, room_ids: Iterable[int]) -> LiveCalls:
        """The live calls of these rooms and their participants' record ids."""
        ...


class MemoryCallStore:
    """One process holds every call (the embedded default): a ``CallBook``."""

    def __init__(self) -> None:
        self.book = CallBook()

    async def call_of(self, room_id: int) -> Call | None:
        return self.book.call_of(room_id)

    async def peek(
        self, room_id: int, conn_id: str, max_participants: int
    ) -> int | None:
        self.book.check_join(room_id, conn_id, max_participants)
        call = self.book.call_of(room_id)
        return None if call is None else call.call_id

    async def join(
        self,
        room_id: int,
        participant: Participant,
        *,
        call_id: int,
        started: bool,
        max_participants: int,
    ) -> Joined:
        # The service's room lock is held from peek to here: nothing changed.
        book = self.book
        call = book.call_of(room_id)
        if started:
            call = book.start(
                room_id, call_id, participant.user.id, participant.joined_at
            )
        assert call is not None
        assert call.call_id == call_id
        added = book.join(
            room_id,
            participant.conn_id,
            participant.user,
            media=participant.media,
            rollback=participant.rollback,
            now=participant.joined_at,
            max_participants=max_participants,
        )
        added.record_id = participant.record_id
        return Joined(call, added, started)

    async def leave(self, room_id: int, conn_id: str, now: dt.datetime) -> Left | None:
        return self.book.leave(room_id, conn_id, now)

    async def participant(self, room_id: int, conn_id: str) -> Participant | None:
        return self.book.participant(room_id, conn_id)

    async def target(self, room_id: int, sender: str, to: str) -> Participant:
        return self.book.target(room_id, sender, to)

    async def set_media(
        self, room_id: int, conn_id: str, changes: dict[str, bool | None]
    ) -> tuple[int, Participant, frozenset[str]]:
        before = frozenset(self.book.sender(room_id, conn_id).used)
        participant = self.book.set_media(room_id, conn_id, **changes)
        call = self.book.call_of(room_id)
        assert call is not None
        return call.call_id, participant, before

    def local_counts(self) -> tuple[int, int]:
        rooms = self.book.rooms()
        return len(rooms), sum(
            len(call.participants)
            for call in map(self.book.call_of, rooms)
            if call is not None
        )

    def attach(self, sweep: Sweep) -> None:
        return  # nothing expires in one process

    def pending_leaves(self) -> list[tuple[str, int]]:
        return []

    async def reap(self, now: dt.datetime) -> list[tuple[int, Left]]:
        return []

    async def lost(self) -> list[Lost]:
        return []

    @property
    def orphan_age(self) -> float | None:
        return None

    async def live_calls(self, room_ids: Iterable[int]) -> LiveCalls:
        calls = {
            room: call
            for room in room_ids
            if (call := self.book.call_of(room)) is not None
        }
        return LiveCalls(
            {room: call.call_id for room, call in calls.items()},
            frozenset(
                p.record_id
                for call in calls.values()
                for p in call.participants.values()
            ),
        )


# -- Redis ---------------------------------------------------------------------
#
# Keys (prefix P, e.g. "coilroom:calls:"):
#   P"room:{room}"        hash: call_id, started_at (µs since the epoch), started_by,
#                         n (join counter: participants are listed in join order)
#   P"room:{room}:parts"  hash: conn id -> participant record (below)
#   P"room:{room}:since"  hash: user id -> µs when their first connection joined
#                         (a person in the call from two tabs counts once)
#   P"owned:{proc}"       set of "room\tconn": the participants a process holds
#   P"procs"              set of process ids that ever held one (the reaper's list)
# A participant record is one line of tab-separated fields that Lua can split:
#   n, user id, process id, record id, rollback (0/1), media (4 x 0/1: audio,
#   video, screen, hand), used (3 x 0/1: audio, video, screen), joined (µs),
#   user JSON [id, name, institution, country] (JSON escapes tabs).
# Like the presence reaper, scripts build keys from the prefix: fine for one
# Redis server, not for Redis Cluster.

_FIELDS = r"""
local function fields(rec)
  return string.match(rec,
    '^(%d+)\t(%d+)\t([^\t]*)\t(%d+)\t([01])\t([01][01][01][01])\t([01][01][01])\t(%d+)\t(.*)$')
end
"""

# Takes one connection out of its room's call; the call ends with its last one.
# Returns {room, conn, record, call_id, started_at, ended (0/1), user since (''
# while another connection of the same user stays)} or false.
_LEAVE_FN = (
    _FIELDS
    + r"""
local function leave(P, room, conn)
  local base = P .. 'room:' .. room
  local parts = base .. ':parts'
  local rec = redis.call('HGET', parts, conn)
  if not rec then return false end
  local _, uid, proc = fields(rec)
  redis.call('HDEL', parts, conn)
  redis.call('SREM', P .. 'owned:' .. proc, room .. '\t' .. conn)
  local same = false
  for _, other in ipairs(redis.call('HVALS', parts)) do
    local _, other_uid = fields(other)
    if other_uid == uid then same = true; break end
  end
  local since = ''
  if not same then
    since = redis.call('HGET', base .. ':since', uid) or ''
    redis.call('HDEL', base .. ':since', uid)
  end
  local call = redis.call('HMGET', base, 'call_id', 'started_at')
  local ended = 0
  if redis.call('HLEN', parts) == 0 then
    ended = 1
    redis.call('DEL', base, base .. ':since')
  end
  return {room, conn, rec, call[1] or '0', call[2] or '0', ended, since}
end
"""
)

_LEAVE = _LEAVE_FN + "return leave(ARGV[1], ARGV[2], ARGV[3])"

_PEEK = r"""
local base = ARGV[1] .. 'room:' .. ARGV[2]
local cid = redis.call('HGET', base, 'call_id')
if not cid then return {''} end
if redis.call('HEXISTS', base .. ':parts', ARGV[3]) == 1 then
  return {cid, 'already_in_call'}
end
if redis.call('HLEN', base .. ':parts') >= tonumber(ARGV[4]) then
  return {cid, 'call_full'}
end
return {cid}
"""

# ARGV: prefix, room, conn, call id, starts (1/0), record without n, cap, user id,
# joined µs, process id, started by; KEYS[1]: the process's presence heartbeat.
_JOIN = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'dead'} end
local P, room, conn = ARGV[1], ARGV[2], ARGV[3]
local base = P .. 'room:' .. room
local parts = base .. ':parts'
local cid = redis.call('HGET', base, 'call_id')
if cid then
  if cid ~= ARGV[4] then return {'stale'} end
  if redis.call('HEXISTS', parts, conn) == 1 then return {'already_in_call'} end
  if redis.call('HLEN', parts) >= tonumber(ARGV[7]) then return {'call_full'} end
elseif ARGV[5] == '1' then
  redis.call('HSET', base, 'call_id', ARGV[4], 'started_at', ARGV[9],
             'started_by', ARGV[11], 'n', '0')
else
  return {'stale'}
end
local n = redis.call('HINCRBY', base, 'n', 1)
redis.call('HSET', parts, conn, n .. '\t' .. ARGV[6])
redis.call('HSETNX', base .. ':since', ARGV[8], ARGV[9])
redis.call('SADD', P .. 'owned:' .. ARGV[10], room .. '\t' .. conn)
redis.call('SADD', P .. 'procs', ARGV[10])
local call = redis.call('HMGET', base, 'call_id', 'started_at', 'started_by')
return {'ok', call[1], call[2], call[3], redis.call('HGETALL', parts)}
"""

_SNAPSHOT = r"""
local base = ARGV[1] .. 'room:' .. ARGV[2]
local call = redis.call('HMGET', base, 'call_id', 'started_at', 'started_by')
if not call[1] then return false end
return {call[1], call[2], call[3], redis.call('HGETALL', base .. ':parts')}
"""

# ARGV: prefix, room, conn, then audio, video, screen, hand as '1', '0' or '' (keep).
# Returns {call_id, record before, record after} or false.
_MEDIA = (
    _FIELDS
    + r"""
local base = ARGV[1] .. 'room:' .. ARGV[2]
local parts = base .. ':parts'
local rec = redis.call('HGET', parts, ARGV[3])
if not rec then return false end
local n, uid, proc, record, rollback, media, used, joined, user = fields(rec)
local m, u = {}, {}
for i = 1, 4 do
  local change = ARGV[3 + i]
  m[i] = change ~= '' and change or string.sub(media, i, i)
end
for i = 1, 3 do
  u[i] = (m[i] == '1' or string.sub(used, i, i) == '1') and '1' or '0'
end
local after = table.concat({n, uid, proc, record, rollback, table.concat(m),
                            table.concat(u), joined, user}, '\t')
redis.call('HSET', parts, ARGV[3], after)
return {redis.call('HGET', base, 'call_id'), rec, after}
"""
)

# One atomic pass over the processes whose presence heartbeat expired: their
# participants leave, each returned (as by _LEAVE) to exactly one reaper.
# ARGV: prefix, the presence heartbeat key without the process id.
_REAP = (
    _LEAVE_FN
    + r"""
local P = ARGV[1]
local out = {}
for _, proc in ipairs(redis.call('SMEMBERS', P .. 'procs')) do
  if redis.call('EXISTS', ARGV[2] .. proc) == 0 then
    for _, member in ipairs(redis.call('SMEMBERS', P .. 'owned:' .. proc)) do
      local room, conn = string.match(member, '^([^\t]*)\t(.*)$')
      local left = leave(P, room, conn)
      if left then table.insert(out, left) end
    end
    redis.call('DEL', P .. 'owned:' .. proc)
    redis.call('SREM', P .. 'procs', proc)
  end
end
return out
"""
)

# ARGV: prefix, then room ids. Returns, per room, {call id or '', its records}.
_LIVE = r"""
local out = {}
for i = 2, #ARGV do
  local base = ARGV[1] .. 'room:' .. ARGV[i]
  table.insert(out, {redis.call('HGET', base, 'call_id') or '',
                     redis.call('HVALS', base .. ':parts')})
end
return out
"""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_KINDS = ("audio", "video", "screen", "hand")
_UserFields = tuple[int, str, str | None, str | None]
_encode_user = msgspec.json.Encoder().encode
_decode_user = msgspec.json.Decoder(_UserFields).decode


def _micros(moment: dt.datetime) -> int:
    return (moment - _EPOCH) // dt.timedelta(microseconds=1)


def _moment(micros: bytes | str) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=int(micros))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record(p: Participant, process_id: str) -> str:
    """A participant's record, without the join counter that Lua puts in front."""
    u = p.user
    media = "".join("1" if getattr(p.media, k) else "0" for k in _KINDS)
    used = "".join("1" if k in p.used else "0" for k in _KINDS[:3])
    user = _encode_user((u.id, u.name, u.institution, u.country)).decode()
    return "\t".join(
        (
            str(u.id),
            process_id,
            str(p.record_id),
            "1" if p.rollback else "0",
            media,
            used,
            str(_micros(p.joined_at)),
            user,
        )
    )


def _participant(conn_id: str, record: bytes | str) -> tuple[int, Participant]:
    """``(join counter, participant)`` from a stored record."""
    n, _uid, _proc, record_id, rollback, media, used, joined, user = _text(
        record
    ).split("\t", 8)
    uid, name, institution, country = _decode_user(user)
    return int(n), Participant(
        conn_id,
        PresenceUser(uid, name, institution, country),
        MediaState(**{k: media[i] == "1" for i, k in enumerate(_KINDS)}),
        rollback == "1",
        _moment(joined),
        int(record_id),
        {k for i, k in enumerate(_KINDS[:3]) if used[i] == "1"},
    )


class RedisCallStore:
    """Calls shared by every process through Redis (see the module docstring).

    Use as an async context manager. No command is retried: a script re-run after
    a lost reply could, say, take a participant out twice. Every failure or
    timeout (``command_timeout``) is ``CallsUnavailable``; the service answers it
    with an ``unavailable`` error frame, except for a connection leaving, which
    is kept here and retried after each reaper pass until Redis takes it.
    """

    def __init__(
        self,
        url: str,
        presence: RedisPresence,
        *,
        key_prefix: str = "coilroom:calls:",
        connect_timeout: float = 2.0,
        command_timeout: float = 2.0,
    ) -> None:
        self.presence = presence
        self.process_id = presence.process_id
        self.key_prefix = key_prefix
        self._client = redis_client(
            url,
            name=f"coilroom-calls-{self.process_id}",
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
        )
        script = self._client.register_script
        self._leave, self._peek, self._join = (
            script(_LEAVE),
            script(_PEEK),
            script(_JOIN),
        )
        self._snapshot, self._media, self._reap, self._live = (
            script(_SNAPSHOT),
            script(_MEDIA),
            script(_REAP),
            script(_LIVE),
        )
        # A join runs its script within connect + command timeout of storing
        # its rows (or gives up), and presence takes a process stalled for its
        # expiry for dead: ten times their sum is far beyond any join still in
        # progress (300 s with the default settings).
        self.orphan_age = max(
            ORPHAN_MIN_AGE,
            10 * (connect_timeout + command_timeout + presence.expiry),
        )
        # This process's participants, for the gauges and to notice those Redis
        # lost (it restarted empty): conn -> (room, call id, participant).
        self._mine: dict[str, tuple[int, int, Participant]] = {}
        self._missing: set[str] = set()  # not in Redis at the last check
        self._lost: list[Lost] = []
        # Connections whose leave (or join) Redis may not have taken: it was
        # unreachable, or the reply was lost. Left again by the sweep.
        self._pending: dict[str, int] = {}
        self._closed = False

    async def __aenter__(self) -> RedisCallStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        await self._client.aclose()

    def attach(self, sweep: Sweep) -> None:
        async def hook() -> None:
            # The presence heartbeat outlives this store by a moment at shutdown
            # (it was opened first): a closed client must not reconnect.
            if not self._closed:
                await sweep()

        self.presence.add_reap_hook(hook)

    async def _run(
        self, script: Any, *args: object, keys: list[str] | None = None
    ) -> Any:
        try:
            return await script(keys=keys or [], args=[self.key_prefix, *args])
        except (RedisError, OSError) as exc:
            raise CallsUnavailable(str(exc)) from exc

    # -- reading -----------------------------------------------------------------

    async def call_of(self, room_id: int) -> Call | None:
        reply = await self._run(self._snapshot, room_id)
        if not reply:
            return None
        call_id, started_at, started_by, records = reply
        return self._call(room_id, call_id, started_at, started_by, records)

    def _call(
        self,
        room_id: int,
        call_id: bytes,
        started_at: bytes,
        started_by: bytes,
        records: list[bytes],
    ) -> Call:
        """A call from its hash fields and ``HGETALL`` of its participants."""
        call = Call(int(call_id), room_id, _moment(started_at), int(started_by))
        ordered = sorted(
            (_participant(_text(conn), record) for conn, record in _pairs(records)),
            key=lambda item: item[0],
        )
        for _n, p in ordered:
            call.participants[p.conn_id] = p
        return call

    async def participant(self, room_id: int, conn_id: str) -> Participant | None:
        try:
            record = await self._client.hget(self._parts(room_id), conn_id)
        except (RedisError, OSError) as exc:
            raise CallsUnavailable(str(exc)) from exc
        return None if record is None else _participant(conn_id, record)[1]

    async def target(self, room_id: int, sender: str, to: str) -> Participant:
        try:
            mine, theirs = await self._client.hmget(self._parts(room_id), [sender, to])
        except (RedisError, OSError) as exc:
            raise CallsUnavailable(str(exc)) from exc
        # The same refusals, in the same order, as CallBook.target.
        if mine is None:
            raise SignalRefused("not_in_call", "join the call first")
        if to == sender:
            raise SignalRefused("unknown_peer", "a signal cannot go to oneself")
        if theirs is None:
            raise SignalRefused("unknown_peer", "no such participant in this call")
        return _participant(to, theirs)[1]

    def _parts(self, room_id: int) -> str:
        return f"{self.key_prefix}room:{room_id}:parts"

    # -- changing ----------------------------------------------------------------

    async def peek(
        self, room_id: int, conn_id: str, max_participants: int
    ) -> int | None:
        reply = await self._run(self._peek, room_id, conn_id, max_participants)
        if len(reply) > 1:
            code = _text(reply[1])
            raise _refusal(code, max_participants)
        return int(reply[0]) if reply[0] else None

    async def join(
        self,
        room_id: int,
        participant: Participant,
        *,
        call_id: int,
        started: bool,
        max_participants: int,
    ) -> Joined:
        conn_id = participant.conn_id
        try:
            reply = await self._join_script(
                room_id, participant, call_id, started, max_participants
            )
        except BaseException:
            # Failed or cancelled: it may be in the call all the same. Until a
            # leave gets through, it counts as pending.
            self._pending[conn_id] = room_id
            raise
        status = _text(reply[0])
        if status == "stale":
            raise StaleCall()
        if status == "dead":
            # Our heartbeat is not in Redis (just reconnected, or we stalled and
            # were reaped): a participant now would be reaped at once.
            raise NotAlive("this process's heartbeat is not in Redis yet")
        if status != "ok":
            raise _refusal(status, max_participants)
        _, cid, started_at, started_by, records = reply
        call = self._call(room_id, cid, started_at, started_by, records)
        self._mine[conn_id] = (room_id, call.call_id, call.participants[conn_id])
        return Joined(call, call.participants[conn_id], started)

    async def _join_script(
        self,
        room_id: int,
        participant: Participant,
        call_id: int,
        started: bool,
        max_participants: int,
    ) -> Any:
        return await self._run(
            self._join,
            room_id,
            participant.conn_id,
            call_id,
            "1" if started else "0",
            _record(participant, self.process_id),
            max_participants,
            participant.user.id,
            _micros(participant.joined_at),
            self.process_id,
            participant.user.id,
            keys=[self.presence.alive_key()],
        )

    async def leave(self, room_id: int, conn_id: str, now: dt.datetime) -> Left | None:
        try:
            reply = await self._run(self._leave, room_id, conn_id)
        except BaseException:
            if conn_id in self._mine:
                # Left again by the sweep; the leave is announced then.
                self._pending[conn_id] = room_id
            raise
        mine = self._mine.pop(conn_id, None)
        self._pending.pop(conn_id, None)
        self._missing.discard(conn_id)
        if not reply:
            if mine is not None:
                # Ours, and Redis no longer has it: taken out by another process
                # (that one closed the record), or lost with Redis's data.
                self._lost.append(Lost(*mine, "disconnected"))
            return None
        return _left(reply, now)

    async def set_media(
        self, room_id: int, conn_id: str, changes: dict[str, bool | None]
    ) -> tuple[int, Participant, frozenset[str]]:
        args = [
            "" if changes.get(k) is None else ("1" if changes[k] else "0")
            for k in _KINDS
        ]
        reply = await self._run(self._media, room_id, conn_id, *args)
        if not reply:
            raise SignalRefused("not_in_call", "join the call first")
        call_id, before, after = reply
        return (
            int(call_id),
            _participant(conn_id, after)[1],
            frozenset(_participant(conn_id, before)[1].used),
        )

    def local_counts(self) -> tuple[int, int]:
        return len({room for room, _, _ in self._mine.values()}), len(self._mine)

    # -- expiry ------------------------------------------------------------------

    def pending_leaves(self) -> list[tuple[str, int]]:
        return list(self._pending.items())

    async def lost(self) -> list[Lost]:
        """This process's participants that Redis no longer holds although no
        leave of ours took them out: missing at two checks in a row (a leave by
        another process is in flight for a moment), or found missing by a leave.
        """
        try:
            owned = await self._client.smembers(
                f"{self.key_prefix}owned:{self.process_id}"
            )
        except (RedisError, OSError) as exc:
            raise CallsUnavailable(str(exc)) from exc
        lost, self._lost = self._lost, []
        missing = {
            conn
            for conn, (room, _, _) in self._mine.items()
            if f"{room}\t{conn}".encode() not in owned
        }
        for conn in missing & self._missing:
            if conn in self._mine:
                lost.append(Lost(*self._mine.pop(conn), "interrupted"))
        self._missing = missing - self._missing
        return lost

    async def reap(self, now: dt.datetime) -> list[tuple[int, Left]]:
        """Take out the participants of every process whose presence heartbeat
        expired; each is returned by exactly one process's call."""
        reaped = await self._run(self._reap, self.presence.alive_key(""))
        return [(int(reply[0]), _left(reply, now)) for reply in reaped]

    async def live_calls(self, room_ids: Iterable[int]) -> LiveCalls:
        rooms = list(room_ids)
        if not rooms:
            return LiveCalls({}, frozenset())
        replies = await self._run(self._live, *rooms)
        calls: dict[int, int] = {}
        records: set[int] = set()
        for room, (call_id, parts) in zip(rooms, replies, strict=True):
            if call_id:
                calls[room] = int(call_id)
            # The record id is the fourth field (see the key layout above).
            records.update(int(_text(rec).split("\t", 4)[3]) for rec in parts)
        return LiveCalls(calls, frozenset(records))


def _left(reply: list[Any], now: dt.datetime) -> Left:
    """A ``Left`` from a leave script's reply (``Left.call`` holds no participants)."""
    room, conn, record, call_id, started_at, ended, since = reply
    participant = _participant(_text(conn), record)[1]
    call = Call(int(call_id), int(room), _moment(started_at), 0)
    seconds = None
    if since:
        seconds = max(0.0, (now - _moment(since)).total_seconds())
    return Left(participant, call, ended == 1, seconds)


def _pairs(flat: list[bytes]) -> list[tuple[bytes, bytes]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


def _refusal(code: str, max_participants: int) -> SignalRefused:
    if code == "already_in_call":
        return SignalRefused("already_in_call", "this connection is in the call")
    return SignalRefused(
        "call_full", f"the call is full ({max_participants} participants at most)"
    )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@contextlib.asynccontextmanager
async def open_call_store(
    url: str, presence: PresenceStore, **options: Any
) -> AsyncIterator[CallStore]:
    """The call store that goes with a presence store.

    With ``RedisPresence`` (several processes): ``RedisCallStore`` on ``url``,
    using that presence's process id and heartbeat; ``options`` are its keyword
    arguments. Otherwise the in-process ``MemoryCallStore``.
    """
    if not isinstance(presence, RedisPresence):
        yield MemoryCallStore()
        return
    async with RedisCallStore(url, presence, **options) as store:
        yield store
