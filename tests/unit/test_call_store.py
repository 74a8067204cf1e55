"""The call store contract over both implementations, and what only Redis does:
stale joins, expiry of a dead process's participants, participants Redis lost.

Redis cases use the real Redis at 127.0.0.1:6379 (``COILROOM_TEST_REDIS``), each
with a key prefix of its own whose keys are deleted afterwards.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from rooms.call_messages import MediaState, SignalRefused
from rooms.presence import PresenceUser, RedisPresence
from signaling.calls import Participant
from signaling.store import (
    CallStore,
    CallsUnavailable,
    MemoryCallStore,
    NotAlive,
    RedisCallStore,
    StaleCall,
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
