"""Who is in each room: per connection, aggregated per user across tabs and devices.

``PresenceBook`` is the pure state. ``PresenceStore`` is the port the room socket uses;
``MemoryPresence`` keeps the book in this process (the embedded default);
``RedisPresence`` shares it between processes, with expiry for processes that die.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import msgspec
from redis.exceptions import RedisError

from rooms.redis_client import redis_client

log = logging.getLogger(__name__)

Status = Literal["active", "away"]


@dataclass(frozen=True, slots=True)
class PresenceUser:
    """What others see of a member: shown in the snapshot and in join events."""

    id: int
    name: str
    institution: str | None
    country: str | None


@dataclass(frozen=True, slots=True)
class ConnectionPresence:
    user: PresenceUser
    status: Status = "active"
    typing: bool = False


@dataclass(frozen=True, slots=True)
class UserPresence:
    """One user's presence in one room, over all of their connections."""

    user: PresenceUser
    status: Status
    typing: bool
    connections: int

    def as_json(self) -> dict[str, object]:
        return {
            "user": {
                "id": self.user.id,
                "name": self.user.name,
                "institution": self.user.institution,
                "country": self.user.country,
            },
            "status": self.status,
            "typing": self.typing,
            "connections": self.connections,
        }


@dataclass(frozen=True, slots=True)
class Change:
    """A user's presence before and after one connection changed."""

    before: UserPresence | None
    after: UserPresence | None

    @property
    def kind(self) -> Literal["join", "leave", "update", "none"]:
        if self.before is None and self.after is not None:
            return "join"
        if self.before is not None and self.after is None:
            return "leave"
        if self.before != self.after:
            # A new tab alone (connection count) is not news for the room.
            if (
                self.before is not None
                and self.after is not None
                and (self.before.status, self.before.typing)
                == (self.after.status, self.after.typing)
            ):
                return "none"
            return "update"
        return "none"


def aggregate(connections: list[ConnectionPresence]) -> UserPresence | None:
    """Online while any connection lives; active if any tab is; typing if any tab is."""
    if not connections:
        return None
    return UserPresence(
        user=connections[-1].user,
        status="active" if any(c.status == "active" for c in connections) else "away",
        typing=any(c.typing for c in connections),
        connections=len(connections),
    )


class PresenceBook:
    """Pure presence state for many rooms: ``room -> connection -> presence``."""

    def __init__(self) -> None:
        self._rooms: dict[int, dict[str, ConnectionPresence]] = {}

    def _user(self, room_id: int, user_id: int) -> UserPresence | None:
        conns = self._rooms.get(room_id, {})
        return aggregate([c for c in conns.values() if c.user.id == user_id])

    def add(self, room_id: int, conn_id: str, user: PresenceUser) -> Change:
        before = self._user(room_id, user.id)
        self._rooms.setdefault(room_id, {})[conn_id] = ConnectionPresence(user)
        return Change(before, self._user(room_id, user.id))

    def update(
        self,
        room_id: int,
        conn_id: str,
        *,
        status: Status | None = None,
        typing: bool | None = None,
    ) -> Change:
        conns = self._rooms.get(room_id, {})
        current = conns.get(conn_id)
        if current is None:
            return Change(None, None)
        before = self._user(room_id, current.user.id)
        conns[conn_id] = replace(
            current,
            status=current.status if status is None else status,
            typing=current.typing if typing is None else typing,
        )
        return Change(before, self._user(room_id, current.user.id))

    def remove(self, room_id: int, conn_id: str) -> Change:
        conns = self._rooms.get(room_id, {})
        current = conns.pop(conn_id, None)
        if current is None:
            return Change(None, None)
        if not conns:
            del self._rooms[room_id]
        return Change(
            aggregate(
                [*(c for c in conns.values() if c.user.id == current.user.id), current]
            ),
            self._user(room_id, current.user.id),
        )

    def snapshot(self, room_id: int) -> list[UserPresence]:
        by_user: dict[int, list[ConnectionPresence]] = {}
        for conn in self._rooms.get(room_id, {}).values():
            by_user.setdefault(conn.user.id, []).append(conn)
        return sorted(
            (p for p in map(aggregate, by_user.values()) if p is not None),
            key=lambda p: p.user.name.lower(),
        )

    def get(self, room_id: int, conn_id: str) -> ConnectionPresence | None:
        return self._rooms.get(room_id, {}).get(conn_id)

    def connections(self) -> Iterator[tuple[int, str, ConnectionPresence]]:
        """Every connection: ``(room_id, conn_id, presence)``."""
        for room_id, conns in self._rooms.items():
            for conn_id, presence in conns.items():
                yield room_id, conn_id, presence

    def connections_of(self, user_id: int) -> int:
        return sum(
            1
            for conns in self._rooms.values()
            for c in conns.values()
            if c.user.id == user_id
        )


class PresenceStore(Protocol):
    """Where presence lives; shared by all processes that serve the same rooms."""

    async def add(self, room_id: int, conn_id: str, user: PresenceUser) -> Change: ...

    async def update(
        self,
        room_id: int,
        conn_id: str,
        *,
        status: Status | None = None,
        typing: bool | None = None,
    ) -> Change: ...

    async def remove(self, room_id: int, conn_id: str) -> Change: ...

    async def snapshot(self, room_id: int) -> list[UserPresence]: ...


class MemoryPresence:
    """The in-process presence store (one process, no expiry needed)."""

    def __init__(self) -> None:
        self.book = PresenceBook()

    async def add(self, room_id: int, conn_id: str, user: PresenceUser) -> Change:
        return self.book.add(room_id, conn_id, user)

    async def update(
        self,
        room_id: int,
        conn_id: str,
        *,
        status: Status | None = None,
        typing: bool | None = None,
    ) -> Change:
        return self.book.update(room_id, conn_id, status=status, typing=typing)

    async def remove(self, room_id: int, conn_id: str) -> Change:
        return self.book.remove(room_id, conn_id)

    async def snapshot(self, room_id: int) -> list[UserPresence]:
        return self.book.snapshot(room_id)


OnExpired = Callable[[int, Change], Awaitable[None] | None]
"""Told of presence changes no local call caused: ``(room_id, change)``."""

ReapHook = Callable[[], Awaitable[None]]
"""Run after each reaper pass, e.g. to expire other state held per process."""

# Lua scripts: each change to a user's connections and the before/after it returns
# happen in one atomic step, so concurrent processes agree on join/leave/update.
# Keys (prefix P): P"procs" set of process ids; P"alive:{proc}" heartbeat with a TTL;
# P"owned:{proc}" set of "room\tuser\tconn"; P"reaped:{proc}" tombstone;
# P"room:{room}:users" set of user ids; P"room:{room}:user:{uid}" hash conn -> record.
# The reaper builds keys from the prefix inside Lua: fine for one Redis server,
# not for Redis Cluster (keys would have to be declared and share a slot).

_ADD = """
local before = redis.call('HVALS', KEYS[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return {before, redis.call('HVALS', KEYS[2])}
"""

_UPDATE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return false end
local before = redis.call('HVALS', KEYS[1])
local status = ARGV[2] ~= '' and ARGV[2] or string.sub(current, 1, 1)
local typing = ARGV[3] ~= '' and ARGV[3] or string.sub(current, 2, 2)
redis.call('HSET', KEYS[1], ARGV[1], status .. typing .. string.sub(current, 3))
return {before, redis.call('HVALS', KEYS[1])}
"""

_REMOVE = """
redis.call('SREM', KEYS[3], ARGV[3])
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return false end
local before = redis.call('HVALS', KEYS[2])
redis.call('HDEL', KEYS[2], ARGV[1])
local after = redis.call('HVALS', KEYS[2])
if #after == 0 then redis.call('SREM', KEYS[1], ARGV[2]) end
return {before, after}
"""

_SNAPSHOT = """
local out = {}
for _, uid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(out, redis.call('HVALS', ARGV[1] .. uid))
end
return out
"""

# Returns {was reaped (tombstone found), connections Redis holds for this process}.
_HEARTBEAT = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return {redis.call('DEL', KEYS[3]), redis.call('SCARD', KEYS[4])}
"""

# One atomic pass over every process whose heartbeat expired: its connections are
# removed and returned, so exactly one reaper announces each of them.
_REAP = """
local out = {}
local p = ARGV[1]
for _, proc in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', p .. 'alive:' .. proc) == 0 then
    local owned = p .. 'owned:' .. proc
    for _, member in ipairs(redis.call('SMEMBERS', owned)) do
      local room, uid, conn = string.match(member, '^([^\\t]*)\\t([^\\t]*)\\t(.*)$')
      local hash = p .. 'room:' .. room .. ':user:' .. uid
      if redis.call('HEXISTS', hash, conn) == 1 then
        local before = redis.call('HVALS', hash)
        redis.call('HDEL', hash, conn)
        local after = redis.call('HVALS', hash)
        if #after == 0 then
          redis.call('SREM', p .. 'room:' .. room .. ':users', uid)
        end
        table.insert(out, {room, before, after})
      end
    end
    redis.call('DEL', owned)
    redis.call('SREM', KEYS[1], proc)
    redis.call('SET', p .. 'reaped:' .. proc, '1', 'EX', ARGV[2])
  end
end
return out
"""

_TOMBSTONE_TTL = 86_400  # seconds a reaped process can still learn it was reaped
_USER = msgspec.json.Encoder()
_UserFields = tuple[int, str, str | None, str | None]
_decode_user = msgspec.json.Decoder(_UserFields).decode


def _encode_record(presence: ConnectionPresence) -> bytes:
    """``status char, typing char, user JSON``: Lua can change the first two alone."""
    u = presence.user
    head = (b"a" if presence.status == "active" else b"w") + (
        b"1" if presence.typing else b"0"
    )
    return head + _USER.encode((u.id, u.name, u.institution, u.country))


def _decode_record(record: bytes) -> ConnectionPresence:
    user_id, name, institution, country = _decode_user(record[2:])
    return ConnectionPresence(
        PresenceUser(user_id, name, institution, country),
        status="active" if record[:1] == b"a" else "away",
        typing=record[1:2] == b"1",
    )


def _change(reply: Any) -> Change:
    if reply is None:
        return Change(None, None)
    before, after = reply
    return Change(
        aggregate([_decode_record(r) for r in before]),
        aggregate([_decode_record(r) for r in after]),
    )


class RedisPresence:
    """Presence shared by every process through Redis, with expiry of dead processes.

    Each process heartbeats a key with a TTL and records the connections it owns.
    Every process also runs a reaper: one atomic Lua pass that removes the
    connections of processes whose heartbeat expired and reports each resulting
    change once, to ``on_expired``. A process that dies (kill -9) has its
    connections announced as leaves within ``expiry`` seconds of its death:
    heartbeat TTL ``2/3 expiry`` (renewed every ``expiry/6``, so three missed
    beats are tolerated) plus at most one reaper interval (``expiry/6``).

    The connections of this process are mirrored in a local ``PresenceBook``:
    while Redis is unreachable the store answers from it (this process's members
    only) and resynchronises Redis afterwards; the changes that brings are also
    reported to ``on_expired``. Use as an async context manager.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "coilroom:presence:",
        expiry: float = 15.0,
        on_expired: OnExpired | None = None,
        connect_timeout: float = 2.0,
        command_timeout: float = 2.0,
    ) -> None:
        if not 0 < expiry < 30:
            raise ValueError(
                f"presence expiry must be in (0, 30) seconds, not {expiry}"
            )
        self.process_id = uuid.uuid4().hex
        self.key_prefix = key_prefix
        self.expiry = expiry
        self.on_expired = on_expired
        self.interval = expiry / 6  # heartbeat and reaper period
        self.heartbeat_ttl = expiry * 2 / 3
        self.book = PresenceBook()  # this process's connections
        self._client = redis_client(
            url,
            name=f"coilroom-presence-{self.process_id}",
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
        )
        script = self._client.register_script
        self._add, self._update, self._remove = (
            script(_ADD),
            script(_UPDATE),
            script(_REMOVE),
        )
        self._snapshot, self._heartbeat, self._reap = (
            script(_SNAPSHOT),
            script(_HEARTBEAT),
            script(_REAP),
        )
        # One Redis change at a time from this process, so the mirror and Redis
        # agree whenever the heartbeat compares them.
        self._lock = asyncio.Lock()
        self._dirty = False  # a change reached the mirror but maybe not Redis
        self._orphans: dict[tuple[int, str], int] = {}  # removals Redis missed
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._reap_after = 0.0
        self._closed: asyncio.Future[None] | None = None
        self._reap_hooks: list[ReapHook] = []

    # -- keys --------------------------------------------------------------------

    def alive_key(self, process_id: str | None = None) -> str:
        """The heartbeat key of a process (this one by default): it exists while
        the process is alive. Other per-process state (calls) keys its liveness
        on it, so there is one liveness mechanism."""
        return self._key("alive", self.process_id if process_id is None else process_id)

    def add_reap_hook(self, hook: ReapHook) -> None:
        """Run ``hook`` after each reaper pass of this process (same period and
        back-off after an outage), to expire what dead processes held elsewhere."""
        self._reap_hooks.append(hook)

    def _key(self, *parts: object) -> str:
        return self.key_prefix + ":".join(map(str, parts))

    def _users(self, room_id: int) -> str:
        return self._key("room", room_id, "users")

    def _hash(self, room_id: int, user_id: int) -> str:
        return self._key("room", room_id, "user", user_id)

    def _owned_member(self, room_id: int, user_id: int, conn_id: str) -> str:
        return f"{room_id}\t{user_id}\t{conn_id}"

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> RedisPresence:
        try:
            await self._beat()
        except (RedisError, OSError) as exc:
            self._failed("first heartbeat", exc)
            self._reap_after = asyncio.get_running_loop().time() + self.heartbeat_ttl
        self._task = asyncio.create_task(self._run(), name="presence-heartbeat")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop heartbeating; unregister if no connection is left (idempotent).

        Connections still registered are left to expire: a surviving process
        announces them, as it would after a crash.
        """
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        try:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            left = sum(1 for _ in self.book.connections())
            if left:
                log.warning("redis presence closing with %d connections", left)
            else:
                with contextlib.suppress(RedisError, OSError):
                    await (
                        self._client.pipeline(transaction=True)
                        .delete(self._key("alive", self.process_id))
                        .delete(self._key("owned", self.process_id))
                        .srem(self._key("procs"), self.process_id)
                        .execute()
                    )
            await self._client.aclose()
        finally:
            self._closed.set_result(None)

    # -- the port ----------------------------------------------------------------

    async def add(self, room_id: int, conn_id: str, user: PresenceUser) -> Change:
        # The mirror changes under the lock too: the heartbeat compares it with Redis.
        async with self._lock:
            local = self.book.add(room_id, conn_id, user)
            presence = self.book.get(room_id, conn_id)
            assert presence is not None
            if self._failing:
                self._dirty = True
                return local  # this process's view until the heartbeat gets through
            try:
                return _change(await self._add_to_redis(room_id, conn_id, presence))
            except (RedisError, OSError) as exc:
                self._failed("add", exc)
                return local  # this process's view; Redis is restored later

    async def update(
        self,
        room_id: int,
        conn_id: str,
        *,
        status: Status | None = None,
        typing: bool | None = None,
    ) -> Change:
        args = [
            conn_id,
            "" if status is None else ("a" if status == "active" else "w"),
            "" if typing is None else ("1" if typing else "0"),
        ]
        async with self._lock:
            presence = self.book.get(room_id, conn_id)
            if presence is None:
                return Change(None, None)  # not a connection of this process
            local = self.book.update(room_id, conn_id, status=status, typing=typing)
            if self._failing:
                self._dirty = True
                return local
            try:
                reply = await self._update(
                    keys=[self._hash(room_id, presence.user.id)], args=args
                )
            except (RedisError, OSError) as exc:
                self._failed("update", exc)
                return local
            if reply is None:
                self._dirty = True  # reaped while alive (a stall): restored next beat
                return local
            return _change(reply)

    async def remove(self, room_id: int, conn_id: str) -> Change:
        async with self._lock:
            presence = self.book.get(room_id, conn_id)
            if presence is None:
                return Change(None, None)  # not a connection of this process
            local = self.book.remove(room_id, conn_id)
            user_id = presence.user.id
            if self._failing:
                self._orphans[room_id, conn_id] = user_id
                return local
            try:
                reply = await self._remove_from_redis(room_id, user_id, conn_id)
            except BaseException as exc:
                # Failed or cancelled: Redis may still hold it; retried next beat.
                self._orphans[room_id, conn_id] = user_id
                if isinstance(exc, RedisError | OSError):
                    self._failed("remove", exc)
                    return local
                raise
        # None: reaped already, and the reaper announced that leave.
        return _change(reply)

    async def snapshot(self, room_id: int) -> list[UserPresence]:
        if self._failing:
            return self.book.snapshot(room_id)  # this process's members only
        try:
            reply = await self._snapshot(
                keys=[self._users(room_id)],
                args=[self._key("room", room_id, "user", "")],
            )
        except (RedisError, OSError) as exc:
            self._failed("snapshot", exc)
            return self.book.snapshot(room_id)  # this process's members only
        return sorted(
            (
                p
                for p in (aggregate([_decode_record(r) for r in rs]) for rs in reply)
                if p is not None
            ),
            key=lambda p: p.user.name.lower(),
        )

    # -- expiry ------------------------------------------------------------------

    async def reap(self) -> list[tuple[int, Change]]:
        """Remove the connections of every process whose heartbeat expired.

        Atomic across processes: each expired connection is returned (and passed
        to ``on_expired``) by exactly one reaper.
        """
        reply = await self._reap(
            keys=[self._key("procs")], args=[self.key_prefix, _TOMBSTONE_TTL]
        )
        changes = [
            (int(room), _change([before, after])) for room, before, after in reply
        ]
        for room_id, change in changes:
            await self._report(room_id, change)
        return changes

    async def _run(self) -> None:
        clock = asyncio.get_running_loop().time
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._beat()
                # After our own outage, give the others a heartbeat's time to
                # renew theirs before declaring anyone dead.
                if clock() >= self._reap_after:
                    await self.reap()
                    await self._run_reap_hooks()
            except (RedisError, OSError) as exc:
                self._failed("heartbeat", exc)
                self._reap_after = clock() + self.heartbeat_ttl
            except Exception:
                # A bug must not stop the heartbeat: this process would be
                # reaped, its members announced as gone while still here.
                log.exception("redis presence: heartbeat failed")

    async def _run_reap_hooks(self) -> None:
        for hook in self._reap_hooks:
            try:
                await hook()
            except (RedisError, OSError) as exc:
                log.warning("redis presence: a reap hook failed: %s", exc)
            except Exception:  # another module's bug must not stop the heartbeat
                log.exception("redis presence: a reap hook failed")

    async def _beat(self) -> None:
        changes: list[tuple[int, Change]] = []
        try:
            async with self._lock:
                reaped, held = await self._heartbeat(
                    keys=[
                        self._key("alive", self.process_id),
                        self._key("procs"),
                        self._key("reaped", self.process_id),
                        self._key("owned", self.process_id),
                    ],
                    args=[self.process_id, int(self.heartbeat_ttl * 1000)],
                )
                mine = sum(1 for _ in self.book.connections())
                if reaped or held != mine or self._dirty or self._orphans:
                    if reaped:
                        log.warning("redis presence: this process was reaped")
                    await self._restore(changes)
                if self._failing:
                    log.info("redis presence: reachable again")
                    self._failing = False
        finally:
            # Reported outside the lock (the callback may use this store), with
            # whatever a restore got done before failing.
            for room_id, change in changes:
                await self._report(room_id, change)

    async def _restore(self, changes: list[tuple[int, Change]]) -> None:
        """Make Redis hold exactly this process's connections (under the lock)."""
        self._dirty = True  # until done: a failure part-way retries next beat
        for (room_id, conn_id), user_id in list(self._orphans.items()):
            reply = await self._remove_from_redis(room_id, user_id, conn_id)
            del self._orphans[room_id, conn_id]
            changes.append((room_id, _change(reply)))
        owned = await self._client.smembers(self._key("owned", self.process_id))
        wanted = {
            self._owned_member(room_id, p.user.id, conn_id).encode()
            for room_id, conn_id, p in self.book.connections()
        }
        for member in owned - wanted:
            room, user, conn = member.decode().split("\t", 2)
            reply = await self._remove_from_redis(int(room), int(user), conn)
            changes.append((int(room), _change(reply)))
        for room_id, conn_id, presence in list(self.book.connections()):
            reply = await self._add_to_redis(room_id, conn_id, presence)
            changes.append((room_id, _change(reply)))
        self._dirty = False

    async def _add_to_redis(
        self, room_id: int, conn_id: str, presence: ConnectionPresence
    ) -> Any:
        user_id = presence.user.id
        return await self._add(
            keys=[
                self._users(room_id),
                self._hash(room_id, user_id),
                self._key("owned", self.process_id),
            ],
            args=[
                conn_id,
                _encode_record(presence),
                user_id,
                self._owned_member(room_id, user_id, conn_id),
            ],
        )

    async def _remove_from_redis(self, room_id: int, user_id: int, conn_id: str) -> Any:
        return await self._remove(
            keys=[
                self._users(room_id),
                self._hash(room_id, user_id),
                self._key("owned", self.process_id),
            ],
            args=[conn_id, user_id, self._owned_member(room_id, user_id, conn_id)],
        )

    async def _report(self, room_id: int, change: Change) -> None:
        if change.kind == "none" or self.on_expired is None:
            return
        try:
            result = self.on_expired(room_id, change)
            if inspect.isawaitable(result):
                await result
        except Exception:  # the room code's bug must not stop the reaper
            log.exception("presence on_expired callback failed (room %s)", room_id)

    def _failed(self, what: str, exc: BaseException) -> None:
        self._dirty = True
        if not self._failing:
            log.warning("redis presence: %s failed: %s", what, exc)
            self._failing = True


@contextlib.asynccontextmanager
async def open_presence(
    url: str, *, on_expired: OnExpired | None = None, **options: Any
) -> AsyncIterator[PresenceStore]:
    """The presence store for a broker URL.

    Empty or ``memory://``: in-process (``on_expired`` is never called: nothing
    expires in one process). ``redis://``: ``RedisPresence``; ``on_expired(room_id,
    change)`` (plain or async, must not block for long) is told of changes no local
    call made: connections of dead processes reaped by this process (announce
    them as leaves/updates), and re-registration of this process's connections
    after Redis lost them. ``options`` are ``RedisPresence`` keyword arguments
    (``expiry``, ``key_prefix``).
    """
    if url in ("", "memory://"):
        yield MemoryPresence()
        return
    scheme = url.split("://")[0]
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"unsupported presence URL scheme in {scheme!r}: "
            "use memory:// or redis://host:port/db"
        )
    async with RedisPresence(url, on_expired=on_expired, **options) as presence:
        yield presence
