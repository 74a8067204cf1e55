"""The call store contract over both implementations, and what only Redis does:
stale joins, expiry of a dead process's participants, participants Redis lost;
and the call service's sweep of records that a process killed mid-join left open.

Redis cases use the real Redis at 127.0.0.1:6379 (``COILROOM_TEST_REDIS``), each
with a key prefix of its own whose keys are deleted afterwards; call records use
SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from sqlalchemy import delete, select

from rooms.broker import MemoryBroker
from rooms.call_messages import MediaState, SignalRefused
from rooms.call_port import CallLimits
from rooms.hub import RoomHub
from rooms.metrics import Metrics
from rooms.presence import PresenceUser, RedisPresence
from signaling.calls import Participant
from signaling.ice import IceConfig
from signaling.service import CallService
from signaling.store import (
    CallStore,
    CallsUnavailable,
    MemoryCallStore,
    NotAlive,
    RedisCallStore,
    StaleCall,
)
from storage import Database, open_database
from storage.calls import record_join, record_leave
from storage.models import (
    CallParticipant,
    CallSession,
    Partnership,
    Room,
    User,
    UserRole,
)
from tests.unit.test_broker import Proxy
from tests.unit.test_presence_store import REDIS_URL, redis_client  # noqa: F401

pytestmark = pytest.mark.anyio

ANA = PresenceUser(1, "Ana\tMaría", "UNAM", "MX")  # a tab survives the record
LARS = PresenceUser(2, "Lars", None, "DK")
T0 = dt.datetime(2026, 11, 28, 21, 40, 2, 113456, tzinfo=dt.UTC)
ROOM = 7


def person(conn: str, user: PresenceUser, seconds: int = 0, **kw: bool) -> Participant:
    rollback = kw.pop("rollback", True)
    p = Participant(
        conn, user, MediaState(**kw), rollback, T0 + dt.timedelta(seconds=seconds)
    )
    p.record_id = abs(hash(conn)) % 10_000
    p.note_media()
    return p


@pytest.fixture
async def prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:  # noqa: F811
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis_client.delete(*keys)


@pytest.fixture
async def presence(prefix: str) -> AsyncIterator[RedisPresence]:
    async with RedisPresence(REDIS_URL, key_prefix=prefix + "presence:", expiry=3) as p:
        yield p


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, prefix: str, presence: RedisPresence
) -> AsyncIterator[CallStore]:
    if request.param == "memory":
        yield MemoryCallStore()
        return
    async with RedisCallStore(REDIS_URL, presence, key_prefix=prefix + "calls:") as s:
        yield s


async def test_join_leave_and_the_order_of_participants(store: CallStore) -> None:
    """Participants come back in join order with what they joined with; the call
    ends with its last one, and a user's time counts from their first tab."""
    assert await store.peek(ROOM, "a", 3) is None
    first = await store.join(
        ROOM, person("a", ANA, audio=True), call_id=17, started=True, max_participants=3
    )
    assert first.started
    assert first.call.call_id == 17
    for i, conn in enumerate(["b", "c"], start=1):
        assert await store.peek(ROOM, conn, 3) == 17
        user = LARS if conn == "b" else ANA
        await store.join(
            ROOM,
            person(conn, user, i, rollback=False),
            call_id=17,
            started=False,
            max_participants=3,
        )
    call = await store.call_of(ROOM)
    assert call is not None
    assert list(call.participants) == ["a", "b", "c"]
    a = call.participants["a"]
    assert (a.user, a.joined_at, a.media.audio, a.used) == (ANA, T0, True, {"audio"})
    assert call.participants["b"].rollback is False
    assert call.started_at == T0
    assert call.started_by == ANA.id
    left = await store.leave(ROOM, "a", T0 + dt.timedelta(seconds=10))
    assert left is not None
    assert (left.ended, left.user_seconds) == (False, None)  # Ana's other tab stays
    left = await store.leave(ROOM, "c", T0 + dt.timedelta(seconds=10))
    assert left is not None
    assert left.user_seconds == 10.0
    assert await store.leave(ROOM, "c", T0) is None
    left = await store.leave(ROOM, "b", T0 + dt.timedelta(seconds=10))
    assert left is not None
    assert left.ended
    assert left.call.call_id == 17
    assert left.call.started_at == T0
    assert await store.call_of(ROOM) is None
    assert store.local_counts() == (0, 0)


async def test_refusals(store: CallStore) -> None:
    """In the call already, full, signals to oneself or to a stranger, media of a
    non-participant: the same refusals from both stores."""
    await store.join(
        ROOM, person("a", ANA), call_id=1, started=True, max_participants=2
    )
    with pytest.raises(SignalRefused) as refused:
        await store.peek(ROOM, "a", 2)
    assert refused.value.code == "already_in_call"
    await store.join(
        ROOM, person("b", LARS), call_id=1, started=False, max_participants=2
    )
    with pytest.raises(SignalRefused) as refused:
        await store.peek(ROOM, "c", 2)
    assert refused.value.code == "call_full"
    assert (await store.target(ROOM, "a", "b")).conn_id == "b"
    for sender, to, code in (
        ("a", "a", "unknown_peer"),
        ("a", "zz", "unknown_peer"),
        ("zz", "a", "not_in_call"),
    ):
        with pytest.raises(SignalRefused) as refused:
            await store.target(ROOM, sender, to)
        assert refused.value.code == code
    with pytest.raises(SignalRefused):
        await store.set_media(ROOM, "zz", {"audio": True})
    assert await store.participant(ROOM + 1, "a") is None


async def test_media_changes_keep_what_was_used(store: CallStore) -> None:
    """Fields left out keep their value; media used at any time stays used."""
    await store.join(
        ROOM, person("a", ANA, video=True), call_id=3, started=True, max_participants=3
    )
    call_id, p, before = await store.set_media(
        ROOM, "a", {"screen": True, "hand": True, "video": None}
    )
    assert call_id == 3
    assert before == {"video"}
    assert p.media == MediaState(video=True, screen=True, hand=True)
    _, p, before = await store.set_media(ROOM, "a", {"screen": False, "video": False})
    assert p.media == MediaState(hand=True)
    assert p.used == {"video", "screen"} == set(before)


async def test_a_join_for_a_call_that_changed_is_stale(
    prefix: str, presence: RedisPresence
) -> None:
    """Two processes start a call at once: the second is told to prepare again."""
    async with (
        RedisCallStore(REDIS_URL, presence, key_prefix=prefix + "calls:") as one,
        RedisCallStore(REDIS_URL, presence, key_prefix=prefix + "calls:") as two,
    ):
        await one.join(
            ROOM, person("a", ANA), call_id=5, started=True, max_participants=3
        )
        with pytest.raises(StaleCall):
            await two.join(
                ROOM, person("b", LARS), call_id=6, started=True, max_participants=3
            )
        with pytest.raises(StaleCall):
            await two.join(
                ROOM, person("b", LARS), call_id=4, started=False, max_participants=3
            )
        joined = await two.join(
            ROOM, person("b", LARS), call_id=5, started=False, max_participants=3
        )
        assert list(joined.call.participants) == ["a", "b"]
        await one.leave(ROOM, "a", T0)
        await two.leave(ROOM, "b", T0)
        with pytest.raises(StaleCall):  # the call ended meanwhile
            await two.join(
                ROOM, person("b", LARS), call_id=5, started=False, max_participants=3
            )


async def test_a_dead_process_participants_are_reaped_once(
    prefix: str, presence: RedisPresence
) -> None:
    """Participants of a process whose heartbeat is gone are returned by exactly
    one reap; a live process's participants stay."""
    async with (
        RedisPresence(REDIS_URL, key_prefix=prefix + "presence:", expiry=3) as doomed,
        RedisCallStore(REDIS_URL, presence, key_prefix=prefix + "calls:") as alive,
        RedisCallStore(REDIS_URL, doomed, key_prefix=prefix + "calls:") as dying,
    ):
        await alive.join(
            ROOM, person("a", ANA), call_id=9, started=True, max_participants=3
        )
        await dying.join(
            ROOM, person("b", LARS), call_id=9, started=False, max_participants=3
        )
        await dying.join(
            ROOM, person("c", ANA), call_id=9, started=False, max_participants=3
        )
        assert await alive.reap(T0) == []
        await doomed.aclose()  # no heartbeat any more (it holds no presence)
        reaped = await alive.reap(T0)
        assert sorted(left.participant.conn_id for _, left in reaped) == ["b", "c"]
        assert {room for room, _ in reaped} == {ROOM}
        assert not any(left.ended for _, left in reaped)
        assert await alive.reap(T0) == []
        assert await dying.reap(T0) == []
        call = await alive.call_of(ROOM)
        assert call is not None
        assert list(call.participants) == ["a"]


async def test_a_process_without_a_heartbeat_cannot_join(prefix: str) -> None:
    """A join is refused while this process's heartbeat is not in Redis: its
    participant would be reaped at once."""
    async with RedisPresence(
        REDIS_URL, key_prefix=prefix + "presence:", expiry=3
    ) as presence:
        await presence.aclose()
        async with RedisCallStore(
            REDIS_URL, presence, key_prefix=prefix + "calls:"
        ) as store:
            with pytest.raises(NotAlive):
                await store.join(
                    ROOM, person("a", ANA), call_id=1, started=True, max_participants=3
                )
            assert await store.call_of(ROOM) is None
            assert store.pending_leaves() == []  # surely not in the call


async def test_participants_redis_lost_are_reported_once(
    prefix: str,
    presence: RedisPresence,
    redis_client: aioredis.Redis,  # noqa: F811
) -> None:
    """Our participants missing from Redis at two checks in a row are lost, and a
    leave that finds ours gone reports it at once."""
    async with RedisCallStore(
        REDIS_URL, presence, key_prefix=prefix + "calls:"
    ) as store:
        await store.join(
            ROOM, person("a", ANA), call_id=2, started=True, max_participants=3
        )
        await store.join(
            ROOM, person("b", LARS), call_id=2, started=False, max_participants=3
        )
        assert await store.lost() == []
        keys = [k async for k in redis_client.scan_iter(match=f"{prefix}calls:*")]
        await redis_client.delete(*keys)  # as a restart without persistence would
        assert await store.leave(ROOM, "b", T0) is None
        lost = await store.lost()
        assert [(x.participant.conn_id, x.reason) for x in lost] == [
            ("b", "disconnected")
        ]
        lost = await store.lost()
        assert [(x.participant.conn_id, x.reason, x.call_id) for x in lost] == [
            ("a", "interrupted", 2)
        ]
        assert await store.lost() == []
        assert store.local_counts() == (0, 0)


async def test_unreachable_redis_is_calls_unavailable(
    prefix: str, presence: RedisPresence
) -> None:
    """Every operation fails fast with ``CallsUnavailable``; a leave is kept."""
    proxy = Proxy()
    await proxy.up()
    try:
        async with RedisCallStore(
            proxy.url, presence, key_prefix=prefix + "calls:"
        ) as store:
            await store.join(
                ROOM, person("a", ANA), call_id=2, started=True, max_participants=3
            )
            await proxy.down()
            for call in (
                store.call_of(ROOM),
                store.peek(ROOM, "b", 3),
                store.participant(ROOM, "a"),
                store.target(ROOM, "a", "b"),
                store.set_media(ROOM, "a", {"audio": True}),
                store.reap(T0),
                store.lost(),
            ):
                with pytest.raises(CallsUnavailable):
                    await call
            with pytest.raises(CallsUnavailable):
                await store.leave(ROOM, "a", T0)
            assert store.pending_leaves() == [("a", ROOM)]
            await proxy.up()
            left = await store.leave(ROOM, "a", T0)
            assert left is not None
            assert left.ended
            assert store.pending_leaves() == []
    finally:
        await proxy.down()


# -- records nothing will close: a process killed in the middle of a join ------------
#
# A join stores its rows, then runs the join script; a kill -9 in between leaves
# rows with no participant in Redis. These tests make such rows with the storage
# functions alone, backdated past the store's ``orphan_age``, next to a live
# participant in a real call, on SQLite and PostgreSQL (a database of their own:
# the sweep looks at every open record).

OLD = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
LIMITS = CallLimits(
    max_participants=8,
    max_sdp_bytes=65536,
    signals_per_second=10,
    signal_burst=10,
    candidates_per_second=10,
    candidate_burst=10,
)


@pytest.fixture
async def db(migrated_url: str) -> AsyncIterator[Database]:
    async with open_database(migrated_url) as db:
        yield db
        async with db.sessions.begin() as session:
            await session.execute(delete(CallSession))  # stays go with them


@pytest.fixture
async def room(db: Database) -> tuple[int, PresenceUser, PresenceUser]:
    """A room and two users who may be in its call."""
    async with db.sessions.begin() as session:
        users = []
        for name in ("Ana", "Lars"):
            user = User(
                email=f"{uuid.uuid4().hex}@example.org",
                name=name,
                role=UserRole.INSTRUCTOR,
                password_hash="-",
            )
            session.add(user)
            users.append(user)
        partnership = Partnership(title="Orphans")
        session.add(partnership)
        await session.flush()
        room = Room(partnership_id=partnership.id, name="Orphans")
        session.add(room)
        await session.flush()
        ana, lars = (PresenceUser(u.id, u.name, None, None) for u in users)
        return room.id, ana, lars


@contextlib.asynccontextmanager
async def sweeper(
    url: str, prefix: str, redis_url: str = REDIS_URL
) -> AsyncIterator[CallService]:
    """A call service as another process would run it: its own engine, store and
    process id. Its presence does not heartbeat, so no sweep runs on its own:
    the tests make each look."""
    presence = RedisPresence(redis_url, key_prefix=prefix + "presence:", expiry=3)
    try:
        async with (
            open_database(url) as db,
            RedisCallStore(redis_url, presence, key_prefix=prefix + "calls:") as store,
            RoomHub(db=db, broker=MemoryBroker(), metrics=Metrics()) as hub,
        ):
            yield CallService(hub=hub, limits=LIMITS, ice=IceConfig(), store=store)
    finally:
        await presence.aclose()


async def live_join(
    db: Database,
    store: CallStore,
    room_id: int,
    user: PresenceUser,
    call_id: int | None,
    at: dt.datetime = OLD,
) -> tuple[int, int]:
    """Join the room's call for real (rows, then the join script): (call, record)."""
    call, record = await orphan_join(db, room_id, user, call_id, at)
    p = Participant(uuid.uuid4().hex, user, MediaState(), True, at, record)
    await store.join(
        room_id, p, call_id=call, started=call_id is None, max_participants=8
    )
    return call, record


async def orphan_join(
    db: Database,
    room_id: int,
    user: PresenceUser,
    call_id: int | None,
    at: dt.datetime = OLD,
) -> tuple[int, int]:
    """The rows of a join whose process was killed before its script: (call, record)."""
    return await record_join(
        db.sessions,
        room_id=room_id,
        call_id=call_id,
        user_id=user.id,
        conn_id=uuid.uuid4().hex,
        at=at,
        used=(),
    )


async def stays_of(db: Database) -> dict[int, tuple[str | None, bool]]:
    """Every stay: record id -> (left reason, closed)."""
    async with db.sessions.begin() as session:
        rows = await session.execute(
            select(
                CallParticipant.id,
                CallParticipant.left_reason,
                CallParticipant.left_at,
            )
        )
        return {r: (reason, left is not None) for r, reason, left in rows}


async def calls_of(db: Database) -> dict[int, bool]:
    """Every call: id -> ended."""
    async with db.sessions.begin() as session:
        rows = await session.execute(select(CallSession.id, CallSession.ended_at))
        return {c: ended is not None for c, ended in rows}


async def test_orphaned_records_are_closed_and_live_ones_kept(
    db: Database,
    migrated_url: str,
    room: tuple[int, PresenceUser, PresenceUser],
    prefix: str,
    presence: RedisPresence,
) -> None:
    """Open records older than ``orphan_age`` that no live call stands for are
    closed as interrupted at the second look that finds them (a call with them);
    a live participant's record, its call, and young records are kept."""
    room_id, ana, lars = room
    async with (
        RedisCallStore(REDIS_URL, presence, key_prefix=prefix + "calls:") as live,
        sweeper(migrated_url, prefix) as service,
    ):
        # A call started by a join that was killed, then a real call (the
        # orphan's call never reached Redis, so the room had none).
        orphan_call, orphan_starter = await orphan_join(db, room_id, ana, None)
        call, alive = await live_join(db, live, room_id, lars, None)
        _, orphan_joiner = await orphan_join(db, room_id, ana, call)  # killed too
        _, young = await orphan_join(db, room_id, ana, call, dt.datetime.now(dt.UTC))
        # A call whose stays closed while its own end was never stored.
        empty, stay = await orphan_join(db, room_id, ana, None)
        await record_leave(db.sessions, record_id=stay, at=OLD, used=(), reason="left")
        before = await stays_of(db), await calls_of(db)

        assert service.store.orphan_age == 300.0
        assert await service.close_orphans() == (0, 0)  # suspected, not closed
        assert (await stays_of(db), await calls_of(db)) == before
        assert await service.close_orphans() == (2, 2)

        stays = await stays_of(db)
        assert stays[orphan_starter] == stays[orphan_joiner] == ("interrupted", True)
        assert stays[alive] == stays[young] == (None, False)
        assert stays[stay] == ("left", True)
        assert await calls_of(db) == {orphan_call: True, call: False, empty: True}
        assert await service.close_orphans() == (0, 0)
        live_call = await live.call_of(room_id)
        assert live_call is not None
        assert [p.record_id for p in live_call.participants.values()] == [alive]


async def test_two_processes_close_each_orphan_once(
    db: Database,
    migrated_url: str,
    room: tuple[int, PresenceUser, PresenceUser],
    prefix: str,
    presence: RedisPresence,
) -> None:
    """Two processes looking at the same time close every orphaned record exactly
    once between them, and leave the live call alone."""
    room_id, ana, lars = room
    async with (
        RedisCallStore(REDIS_URL, presence, key_prefix=prefix + "calls:") as live,
        sweeper(migrated_url, prefix) as one,
        sweeper(migrated_url, prefix) as two,
    ):
        orphans: set[int] = set()
        orphan_calls: set[int] = set()
        for _ in range(4):
            call, record = await orphan_join(db, room_id, ana, None)
            _, other = await orphan_join(db, room_id, lars, call)
            orphans |= {record, other}
            orphan_calls.add(call)
        call, alive = await live_join(db, live, room_id, lars, None)
        for _ in range(3):
            orphans.add((await orphan_join(db, room_id, ana, call))[1])

        await asyncio.gather(one.close_orphans(), two.close_orphans())
        closed = await asyncio.gather(one.close_orphans(), two.close_orphans())
        assert (sum(s for s, _ in closed), sum(c for _, c in closed)) == (11, 4)

        stays = await stays_of(db)
        assert {r for r, (_, done) in stays.items() if done} == orphans
        assert {reason for r, (reason, _) in stays.items() if r in orphans} == {
            "interrupted"
        }
        assert stays[alive] == (None, False)
        calls = await calls_of(db)
        assert {c for c, ended in calls.items() if ended} == orphan_calls
        assert calls[call] is False


async def test_orphans_are_kept_while_redis_is_unreachable(
    db: Database,
    migrated_url: str,
    room: tuple[int, PresenceUser, PresenceUser],
    prefix: str,
) -> None:
    """A look that cannot ask Redis closes nothing (the sweep logs it and goes on);
    the records are closed by the looks after Redis is back."""
    room_id, ana, _ = room
    proxy = Proxy()
    await proxy.up()
    try:
        async with sweeper(migrated_url, prefix, proxy.url) as service:
            call, record = await orphan_join(db, room_id, ana, None)
            assert await service.close_orphans() == (0, 0)
            await proxy.down()
            with pytest.raises(CallsUnavailable):
                await service.close_orphans()
            await service.sweep()
            assert (await stays_of(db))[record] == (None, False)
            await proxy.up()
            assert await service.close_orphans() == (1, 1)
            assert (await calls_of(db))[call] is True
    finally:
        await proxy.down()


async def test_the_sweep_looks_for_orphans_once_a_minute(
    db: Database,
    migrated_url: str,
    room: tuple[int, PresenceUser, PresenceUser],
    prefix: str,
) -> None:
    """The presence heartbeat's sweep makes one look per ``ORPHAN_CHECK_INTERVAL``
    (two sweeps in a row suspect an orphan without closing it); one process
    (no Redis) never looks: it closes what it left open when it starts."""
    room_id, ana, _ = room
    _, record = await orphan_join(db, room_id, ana, None)
    async with sweeper(migrated_url, prefix) as service:
        await service.sweep()
        await service.sweep()
        assert (await stays_of(db))[record] == (None, False)
        assert await service.close_orphans() == (1, 1)  # the sweep's look counts
    _, record = await orphan_join(db, room_id, ana, None)
    async with RoomHub(db=db, broker=MemoryBroker(), metrics=Metrics()) as hub:
        alone = CallService(hub=hub, limits=LIMITS, ice=IceConfig())
        assert alone.store.orphan_age is None
        await alone.sweep()
        assert await alone.close_orphans() == await alone.close_orphans() == (0, 0)
    assert (await stays_of(db))[record] == (None, False)
