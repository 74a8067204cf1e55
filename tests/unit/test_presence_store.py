"""The presence store contract over every implementation, and Redis expiry.

Redis cases use the real Redis at 127.0.0.1:6379 (``COILROOM_TEST_REDIS``); a missing
Redis fails them. Each test has its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from rooms.presence import (
    Change,
    MemoryPresence,
    PresenceStore,
    PresenceUser,
    RedisPresence,
    open_presence,
)
from tests.unit.test_broker import Proxy

pytestmark = pytest.mark.anyio

REDIS_URL = os.environ.get("COILROOM_TEST_REDIS", "redis://127.0.0.1:6379/0")
WAIT = 10.0  # bound on every wait; generous for a loaded 2-core machine

ANA = PresenceUser(1, "Ana", "UNAM", "MX")
LARS = PresenceUser(2, "lars", "AU", "DK")
BEA = PresenceUser(3, "Bea", None, None)


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()  # no skip: a missing Redis is a failure
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def key_prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:presence:"
    yield prefix
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis_client.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, key_prefix: str
) -> AsyncIterator[PresenceStore]:
    url = "memory://" if request.param == "memory" else REDIS_URL
    options = {} if request.param == "memory" else {"key_prefix": key_prefix}
    async with open_presence(url, **options) as s:
        yield s


class Expired:
    """An ``on_expired`` callback recording what it is told; awaitable."""

    def __init__(self) -> None:
        self.changes: list[tuple[int, Change]] = []
        self._event = asyncio.Event()

    async def __call__(self, room_id: int, change: Change) -> None:
        self.changes.append((room_id, change))
        self._event.set()

    async def wait(self) -> None:
        async with asyncio.timeout(WAIT):
            await self._event.wait()
        self._event.clear()


def names(snapshot: list) -> list[tuple[str, int]]:
    return [(p.user.name, p.connections) for p in snapshot]


# -- the contract: every store --------------------------------------------------


async def test_join_and_leave_of_one_connection(store: PresenceStore) -> None:
    """A user's first connection is a join, its last leaving is a leave."""
    joined = await store.add(10, "c1", ANA)
    assert joined.kind == "join"
    assert joined.after is not None
    assert joined.after.user == ANA
    assert (joined.after.status, joined.after.typing) == ("active", False)
    assert names(await store.snapshot(10)) == [("Ana", 1)]
    left = await store.remove(10, "c1")
    assert left.kind == "leave"
    assert left.before is not None
    assert left.before.user == ANA
    assert await store.snapshot(10) == []


async def test_connections_of_one_user_aggregate(store: PresenceStore) -> None:
    """Online while any tab is; active if any tab is; typing if any tab is."""
    assert (await store.add(10, "c1", ANA)).kind == "join"
    second = await store.add(10, "c2", ANA)
    assert second.kind == "none"  # a new tab is not news
    assert second.after is not None
    assert second.after.connections == 2
    assert (await store.update(10, "c1", status="away")).kind == "none"
    away = await store.update(10, "c2", status="away")
    assert away.kind == "update"
    assert away.after is not None
    assert away.after.status == "away"
    typing = await store.update(10, "c1", typing=True)
    assert typing.kind == "update"
    assert typing.after is not None
    assert (typing.after.status, typing.after.typing) == ("away", True)
    stopped = await store.remove(10, "c1")
    assert stopped.kind == "update"
    assert stopped.after is not None
    assert (stopped.after.typing, stopped.after.connections) == (False, 1)
    assert (await store.remove(10, "c2")).kind == "leave"


async def test_unknown_connections_change_nothing(store: PresenceStore) -> None:
    """Updating or removing a connection that is not there is no change."""
    assert await store.update(10, "nobody", typing=True) == Change(None, None)
    assert await store.remove(10, "nobody") == Change(None, None)
    await store.add(10, "c1", ANA)
    assert await store.remove(10, "c1") != Change(None, None)
    assert await store.remove(10, "c1") == Change(None, None)


async def test_snapshot_is_per_room_and_sorted_by_name(store: PresenceStore) -> None:
    """A room's snapshot lists its users (case-insensitive name order) only."""
    await store.add(10, "c1", LARS)
    await store.add(10, "c2", ANA)
    await store.add(10, "c3", BEA)
    await store.add(10, "c4", ANA)
    await store.add(11, "c5", BEA)
    assert names(await store.snapshot(10)) == [("Ana", 2), ("Bea", 1), ("lars", 1)]
    assert names(await store.snapshot(11)) == [("Bea", 1)]
    assert await store.snapshot(12) == []


async def test_open_presence_chooses_by_url(key_prefix: str) -> None:
    """memory:// is in-process, redis:// shared; other schemes and bounds are refused."""
    async with open_presence("") as memory:
        assert isinstance(memory, MemoryPresence)
    async with open_presence(REDIS_URL, key_prefix=key_prefix) as shared:
        assert isinstance(shared, RedisPresence)
        assert shared.expiry == 15.0
    with pytest.raises(ValueError, match="unsupported"):
        async with open_presence("amqp://nowhere"):
            pass
    with pytest.raises(ValueError, match="expiry"):
        RedisPresence(REDIS_URL, expiry=30.0)


# -- Redis: several processes ----------------------------------------------------


async def test_two_processes_share_a_room(key_prefix: str) -> None:
    """A user's connections on two processes aggregate into one presence."""
    async with (
        RedisPresence(REDIS_URL, key_prefix=key_prefix) as a,
        RedisPresence(REDIS_URL, key_prefix=key_prefix) as b,
    ):
        assert (await a.add(10, "a1", ANA)).kind == "join"
        assert (await b.add(10, "b1", ANA)).kind == "none"
        assert (await b.add(10, "b2", LARS)).kind == "join"
        assert names(await a.snapshot(10)) == [("Ana", 2), ("lars", 1)]
        assert await a.snapshot(10) == await b.snapshot(10)
        assert (await a.update(10, "a1", typing=True)).kind == "update"
        left_a = await a.remove(10, "a1")
        assert left_a.kind == "update"  # no longer typing; still there through b1
        assert left_a.after is not None
        assert left_a.after.connections == 1
        assert (await b.remove(10, "b1")).kind == "leave"
        assert names(await a.snapshot(10)) == [("lars", 1)]
        await b.remove(10, "b2")


async def test_dead_process_expires_once_within_the_bound(
    key_prefix: str, redis_client: aioredis.Redis
) -> None:
    """A process that stops heartbeating without cleanup (kill -9) has its
    connections removed and announced exactly once, within ``expiry`` seconds."""
    expiry = 3.0
    seen = Expired()  # told by either survivor
    options = {"key_prefix": key_prefix, "expiry": expiry, "on_expired": seen}
    async with (
        RedisPresence(REDIS_URL, **options) as survivor_1,
        RedisPresence(REDIS_URL, **options) as survivor_2,
    ):
        dead = RedisPresence(REDIS_URL, key_prefix=key_prefix, expiry=expiry)
        await dead.__aenter__()
        await dead.add(10, "d1", ANA)  # Ana only on the dead process: leaves
        await dead.add(10, "d2", LARS)  # Lars also on a survivor: stays
        await dead.add(11, "d3", BEA)
        await survivor_1.add(10, "s1", LARS)
        # kill -9: the heartbeat stops and nothing is cleaned up.
        assert dead._task is not None
        dead._task.cancel()
        await asyncio.gather(dead._task, return_exceptions=True)
        await dead._client.aclose()
        died = time.monotonic()
        while len(seen.changes) < 2:
            await seen.wait()
        elapsed = time.monotonic() - died
        # The design bound is 5/6 of the expiry (2.5 s here); a loaded CI machine
        # gets a second of slack for its event loops.
        assert elapsed <= expiry + 1.0
        # Both survivors reap again: nothing is left to announce twice.
        assert await survivor_1.reap() == []
        assert await survivor_2.reap() == []
        announced = sorted(
            (room, change.kind, change.before.user.name)
            for room, change in seen.changes
            if change.before is not None
        )
        assert announced == [(10, "leave", "Ana"), (11, "leave", "Bea")]
        assert len(seen.changes) == 2
        assert names(await survivor_2.snapshot(10)) == [("lars", 1)]
        assert await survivor_2.snapshot(11) == []
        assert not await redis_client.exists(f"{key_prefix}owned:{dead.process_id}")
        assert not await redis_client.sismember(f"{key_prefix}procs", dead.process_id)
        await survivor_1.remove(10, "s1")


async def test_a_process_reaped_while_alive_restores_its_connections(
    key_prefix: str, redis_client: aioredis.Redis
) -> None:
    """After a stall past the TTL (reaped, announced as a leave) the next heartbeat
    puts the process's connections back and reports them as joins."""
    stalled_seen, reaper_seen = Expired(), Expired()
    options = {"key_prefix": key_prefix, "expiry": 20.0}
    async with (
        RedisPresence(REDIS_URL, on_expired=stalled_seen, **options) as stalled,
        RedisPresence(REDIS_URL, on_expired=reaper_seen, **options) as reaper,
    ):
        await stalled.add(10, "c1", ANA)
        await redis_client.delete(f"{key_prefix}alive:{stalled.process_id}")
        assert [c.kind for _, c in await reaper.reap()] == ["leave"]
        assert await reaper.snapshot(10) == []
        await stalled._beat()
        assert [(r, c.kind) for r, c in stalled_seen.changes] == [(10, "join")]
        assert names(await reaper.snapshot(10)) == [("Ana", 1)]
        assert (await stalled.remove(10, "c1")).kind == "leave"


async def test_outage_answers_locally_then_redis_catches_up(key_prefix: str) -> None:
    """While Redis is unreachable the store answers for this process; afterwards the
    heartbeat brings Redis up to date and reports what that changed."""
    proxy = Proxy()
    await proxy.up()
    seen = Expired()
    try:
        async with (
            RedisPresence(
                proxy.url, key_prefix=key_prefix, expiry=6.0, on_expired=seen
            ) as cut_off,
            RedisPresence(REDIS_URL, key_prefix=key_prefix) as observer,
        ):
            assert (await cut_off.add(10, "a1", ANA)).kind == "join"
            await proxy.down()
            assert (await cut_off.add(10, "a2", LARS)).kind == "join"
            assert (await cut_off.remove(10, "a1")).kind == "leave"
            assert names(await cut_off.snapshot(10)) == [("lars", 1)]
            assert names(await observer.snapshot(10)) == [("Ana", 1)]  # stale
            await proxy.up()
            while len(seen.changes) < 2:
                await seen.wait()
            assert sorted((r, c.kind) for r, c in seen.changes) == [
                (10, "join"),
                (10, "leave"),
            ]
            assert names(await observer.snapshot(10)) == [("lars", 1)]
            assert (await cut_off.remove(10, "a2")).kind == "leave"
            assert await observer.snapshot(10) == []
    finally:
        await proxy.down()


async def test_unreachable_redis_answers_from_this_process(key_prefix: str) -> None:
    """With nothing listening, the store starts and answers for local connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with open_presence(
        f"redis://127.0.0.1:{port}/0", key_prefix=key_prefix
    ) as store:
        assert (await store.add(10, "c1", ANA)).kind == "join"
        assert names(await store.snapshot(10)) == [("Ana", 1)]
        assert (await store.update(10, "c1", status="away")).kind == "update"
        assert (await store.remove(10, "c1")).kind == "leave"


async def test_close_unregisters_a_process_without_connections(
    key_prefix: str, redis_client: aioredis.Redis
) -> None:
    """A clean close removes the heartbeat; closing twice is fine."""
    store = RedisPresence(REDIS_URL, key_prefix=key_prefix)
    await store.__aenter__()
    assert await redis_client.exists(f"{key_prefix}alive:{store.process_id}")
    await asyncio.gather(store.aclose(), store.aclose())
    await store.aclose()
    assert not await redis_client.exists(f"{key_prefix}alive:{store.process_id}")
    assert not await redis_client.sismember(f"{key_prefix}procs", store.process_id)
