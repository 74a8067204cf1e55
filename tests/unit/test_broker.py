"""The broker contract; every broker implementation must pass it.

The Redis cases run against the real Redis at 127.0.0.1:6379 (``COILROOM_TEST_REDIS``
to override); a missing Redis fails them. Each test uses its own channel prefix, so
parallel runs and other processes on the same Redis never see each other. Outages
are made with ``CLIENT KILL`` on one broker's own connections, or with a TCP proxy
that the test takes down and brings back: the shared Redis itself is never stopped.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from rooms.broker import (
    Broker,
    BrokerUnavailable,
    Envelope,
    LinkState,
    MemoryBroker,
    RedisBroker,
    open_broker,
)

pytestmark = pytest.mark.anyio

REDIS_URL = os.environ.get("COILROOM_TEST_REDIS", "redis://127.0.0.1:6379/0")
REDIS_HOST, REDIS_PORT = "127.0.0.1", int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
# Every wait in these tests is bounded by this; generous for a loaded 2-core box.
WAIT = 10.0
# Fast reconnects so outage tests take milliseconds, not seconds.
FAST = {"reconnect_min": 0.01, "reconnect_max": 0.1}


def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    url = "memory://" if request.param == "memory" else REDIS_URL
    options = {} if request.param == "memory" else {"channel_prefix": prefix()}
    async with open_broker(url, **options) as b:
        yield b


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()  # no skip: a missing Redis is a failure
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[RedisBroker, RedisBroker]]:
    """Two Redis brokers on one channel prefix: two processes in one test."""
    shared = prefix()
    async with (
        RedisBroker(REDIS_URL, channel_prefix=shared, **FAST) as a,
        RedisBroker(REDIS_URL, channel_prefix=shared, **FAST) as b,
    ):
        yield a, b


class Collector:
    """Collects envelopes and lets a test wait until some condition holds."""

    def __init__(self) -> None:
        self.got: list[Envelope] = []
        self._changed = asyncio.Event()

    def __call__(self, envelope: Envelope) -> None:
        self.got.append(envelope)
        self._changed.set()

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.got]

    async def until(self, done: Callable[[list[Envelope]], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not done(self.got):
                self._changed.clear()
                await self._changed.wait()

    async def until_text(self, text: str) -> None:
        await self.until(lambda got: any(e.text == text for e in got))


class Hook:
    """An ``on_resync`` hook that counts its calls and can be awaited."""

    def __init__(self) -> None:
        self.calls = 0
        self._called = asyncio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self._called.set()

    async def wait(self) -> None:
        async with asyncio.timeout(WAIT):
            await self._called.wait()
        self._called.clear()


class Proxy:
    """A TCP proxy to Redis that a test can take down (dropping every connection)
    and bring back on the same port: a Redis outage for one broker only."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(REDIS_HOST, REDIS_PORT)
            self._writers.add(up_writer)
            await asyncio.gather(
                self._pump(reader, up_writer), self._pump(up_reader, writer)
            )
        finally:
            writer.close()
            self._handlers.discard(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    p = Proxy()
    await p.up()
    try:
        yield p
    finally:
        await p.down()


async def kill_connections(client: aioredis.Redis, broker: RedisBroker) -> int:
    """``CLIENT KILL`` every connection of one broker (found by its client name)."""
    name = f"coilroom-broker-{broker.origin}"
    ids = [c["id"] for c in await client.client_list() if c.get("name") == name]
    for client_id in ids:
        await client.execute_command("CLIENT", "KILL", "ID", client_id)
    return len(ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the contract: every broker -------------------------------------------------


async def test_subscribers_get_envelopes_in_publish_order(broker: Broker) -> None:
    """Each subscriber of a topic receives every envelope, in order."""
    got_a: list[Envelope] = []
    got_b: list[Envelope] = []
    async with (
        broker.subscribe("room:1", got_a.append),
        broker.subscribe("room:1", got_b.append),
    ):
        for i in range(5):
            await broker.publish("room:1", Envelope(text=f"m{i}", seq=i))
    assert [e.text for e in got_a] == [f"m{i}" for i in range(5)]
    assert got_a == got_b


async def test_topics_are_separate_and_unsubscribe_stops_delivery(
    broker: Broker,
) -> None:
    """Nothing crosses topics; after the block ends nothing more arrives."""
    got: list[Envelope] = []
    async with broker.subscribe("room:1", got.append):
        await broker.publish("room:2", Envelope(text="elsewhere"))
        await broker.publish("room:1", Envelope(text="here"))
    await broker.publish("room:1", Envelope(text="after"))
    assert [e.text for e in got] == ["here"]


async def test_a_failing_subscriber_does_not_starve_others(broker: Broker) -> None:
    """One subscriber's exception does not stop delivery to the next."""
    got: list[Envelope] = []

    def broken(envelope: Envelope) -> None:
        raise RuntimeError("subscriber bug")

    async with broker.subscribe("t", broken), broker.subscribe("t", got.append):
        await broker.publish("t", Envelope(text="x", control="revoke", user_id=3))
    assert got == [Envelope(text="x", control="revoke", user_id=3)]


async def test_ping_and_unknown_scheme(broker: Broker) -> None:
    """A working broker answers ping; an unknown URL scheme is a clear error."""
    await broker.ping()
    with pytest.raises(ValueError, match="unsupported"):
        async with open_broker("amqp://nowhere"):
            pass


async def test_resync_hook_is_optional_and_not_called_without_loss(
    broker: Broker,
) -> None:
    """``on_resync`` is accepted by every broker and not called while nothing is lost."""
    hook = Hook()
    got = Collector()
    async with broker.subscribe("t", got, on_resync=hook):
        await broker.publish("t", Envelope(text="x", to="conn-1"))
    assert got.got == [Envelope(text="x", to="conn-1")]
    assert hook.calls == 0


async def test_open_broker_chooses_by_url() -> None:
    """Empty and memory:// give the in-process broker, redis:// the Redis one."""
    async with open_broker("") as memory:
        assert isinstance(memory, MemoryBroker)
    async with open_broker(REDIS_URL, channel_prefix=prefix()) as shared:
        assert isinstance(shared, RedisBroker)


# -- Redis: between processes ---------------------------------------------------


async def test_two_processes_see_each_other_in_publish_order(
    pair: tuple[RedisBroker, RedisBroker],
) -> None:
    """Envelopes published in one process reach the other's subscribers in order."""
    a, b = pair
    got_a, got_b = Collector(), Collector()
    async with a.subscribe("room:1", got_a), b.subscribe("room:1", got_b):
        for i in range(200):
            await b.publish("room:1", Envelope(text=f"b{i}", seq=i))
        for i in range(200):
            await a.publish("room:1", Envelope(text=f"a{i}", seq=i))
        await got_a.until(lambda got: len(got) >= 400)
        await got_b.until(lambda got: len(got) >= 400)
    assert [t for t in got_a.texts if t[0] == "b"] == [f"b{i}" for i in range(200)]
    assert [t for t in got_b.texts if t[0] == "a"] == [f"a{i}" for i in range(200)]
    # Each process's own envelopes arrived at once, before anything from Redis.
    assert got_a.texts[:200] == [f"a{i}" for i in range(200)]
    assert got_b.texts[:200] == [f"b{i}" for i in range(200)]


async def test_own_envelopes_are_not_delivered_twice(
    pair: tuple[RedisBroker, RedisBroker],
) -> None:
    """A process skips its own envelopes coming back from Redis."""
    a, b = pair
    got_a, got_b = Collector(), Collector()
    async with a.subscribe("room:1", got_a), b.subscribe("room:1", got_b):
        await a.publish("room:1", Envelope(text="from-a"))
        await got_b.until_text("from-a")
        await b.publish("room:1", Envelope(text="marker"))
        # Redis delivers to a in order: its own echo of "from-a" comes before the
        # marker, which b published only after receiving "from-a".
        await got_a.until_text("marker")
    assert got_a.texts == ["from-a", "marker"]
    assert a.stats.own_skipped == 1


async def test_unsubscribe_stops_delivery_and_leaves_the_channel(
    pair: tuple[RedisBroker, RedisBroker], redis_client: aioredis.Redis
) -> None:
    """The last local subscriber leaving unsubscribes the Redis channel."""
    a, b = pair
    pattern = f"{a.channel_prefix}*"
    got_1, got_2 = Collector(), Collector()
    async with a.subscribe("room:2", got_2):
        async with a.subscribe("room:1", got_1), a.subscribe("room:1", got_1):
            channels = await redis_client.pubsub_channels(pattern)
            assert sorted(channels) == [
                f"{a.channel_prefix}room:1".encode(),
                f"{a.channel_prefix}room:2".encode(),
            ]
        assert await redis_client.pubsub_channels(pattern) == [
            f"{a.channel_prefix}room:2".encode()
        ]
        await b.publish("room:1", Envelope(text="too late"))
        await b.publish("room:2", Envelope(text="marker"))
        await got_2.until_text("marker")
    assert got_1.got == []
    assert await redis_client.pubsub_channels(pattern) == []
    assert a.topics() == 0


async def test_every_envelope_field_crosses_processes(
    pair: tuple[RedisBroker, RedisBroker],
) -> None:
    """The whole envelope, ``to`` included, arrives unchanged in the other process."""
    a, b = pair
    envelope = Envelope(text='{"type":"x"}', seq=7, control="revoke", user_id=9, to="c")
    got = Collector()
    async with a.subscribe("room:1", got):
        await b.publish("room:1", envelope)
        await got.until(lambda got: bool(got))
    assert got.got == [envelope]


async def test_a_failing_subscriber_does_not_starve_others_remotely(
    pair: tuple[RedisBroker, RedisBroker],
) -> None:
    """A subscriber raising on a remote envelope is logged; the next still gets it."""
    a, b = pair
    got = Collector()

    def broken(envelope: Envelope) -> None:
        raise RuntimeError("subscriber bug")

    async with a.subscribe("t", broken), a.subscribe("t", got):
        await b.publish("t", Envelope(text="1"))
        await b.publish("t", Envelope(text="2"))
        await got.until(lambda got: len(got) == 2)
    assert got.texts == ["1", "2"]


async def test_undecodable_payloads_are_counted_and_skipped(
    pair: tuple[RedisBroker, RedisBroker], redis_client: aioredis.Redis
) -> None:
    """A foreign payload on a channel is skipped; later envelopes still arrive."""
    a, b = pair
    got = Collector()
    async with a.subscribe("t", got):
        await redis_client.publish(f"{a.channel_prefix}t", b"\xc1 not msgpack")
        await b.publish("t", Envelope(text="fine"))
        await got.until_text("fine")
    assert a.stats.undecodable == 1
    assert got.texts == ["fine"]


# -- Redis: outages -------------------------------------------------------------


async def test_killed_connections_reconnect_resubscribe_and_resync(
    pair: tuple[RedisBroker, RedisBroker], redis_client: aioredis.Redis
) -> None:
    """After CLIENT KILL the broker reconnects, re-subscribes and calls the hook."""
    a, b = pair
    hook, other = Hook(), Hook()
    got_a, got_b = Collector(), Collector()
    async with (
        a.subscribe("room:1", got_a, on_resync=hook),
        a.subscribe("room:2", got_a, on_resync=other),
        b.subscribe("room:1", got_b),
    ):
        assert await kill_connections(redis_client, a) >= 1
        await a.publish("room:1", Envelope(text="during"))  # local at once
        assert got_a.texts == ["during"]
        await hook.wait()
        await other.wait()
        assert a.state is LinkState.LIVE
        await a.ping()
        assert a.stats.reconnects == 1
        channels = await redis_client.pubsub_channels(f"{a.channel_prefix}*")
        assert len(channels) == 2
        await b.publish("room:1", Envelope(text="after"))
        await got_a.until_text("after")
        await a.publish("room:1", Envelope(text="from-a"))
        await got_b.until_text("from-a")
    assert got_a.texts == ["during", "after", "from-a"]


async def test_outage_serves_locally_fails_ping_and_resyncs_everyone(
    proxy: Proxy,
) -> None:
    """While Redis is unreachable: local delivery, ping fails, remote copies dropped;
    afterwards: re-subscribed, both processes' resync hooks called, traffic flows."""
    shared = prefix()
    hook_a, hook_b = Hook(), Hook()
    got_a, got_b = Collector(), Collector()
    async with (
        RedisBroker(proxy.url, channel_prefix=shared, **FAST) as a,
        RedisBroker(REDIS_URL, channel_prefix=shared, **FAST) as b,
        a.subscribe("room:1", got_a, on_resync=hook_a),
        b.subscribe("room:1", got_b, on_resync=hook_b),
    ):
        await a.ping()
        await proxy.down()
        with pytest.raises(BrokerUnavailable):
            await a.ping()
        await a.wait_state(LinkState.DOWN, LinkState.CONNECTING)
        await a.publish("room:1", Envelope(text="lost-remotely", seq=1))
        assert got_a.texts == ["lost-remotely"]
        assert a.stats.dropped == 1
        # A subscription made during the outage returns at once.
        async with a.subscribe("room:3", got_a, on_resync=hook_a):
            pass
        await proxy.up()
        await hook_a.wait()  # a reconnected and re-subscribed
        await hook_b.wait()  # b was told that a dropped copies on room:1
        await a.ping()
        await b.publish("room:1", Envelope(text="from-b"))
        await got_a.until_text("from-b")
        await a.publish("room:1", Envelope(text="from-a"))
        await got_b.until_text("from-a")
    assert "lost-remotely" not in got_b.texts
    assert hook_b.calls == 1


async def test_unreachable_redis_starts_fails_ping_and_serves_locally() -> None:
    """Opened with nothing listening: ping raises, publish delivers locally only."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    got = Collector()
    async with open_broker(url, channel_prefix=prefix(), **FAST) as broker:
        assert isinstance(broker, RedisBroker)
        with pytest.raises(BrokerUnavailable):
            await broker.ping()
        async with broker.subscribe("t", got):
            await broker.publish("t", Envelope(text="local"))
        assert got.texts == ["local"]
        assert broker.stats.dropped >= 1
        assert broker.state is not LinkState.LIVE


@pytest.mark.parametrize(
    "bound",
    [{"send_queue_limit": 2}, {"send_queue_bytes": 2500}],
    ids=["count", "bytes"],
)
async def test_full_send_queue_drops_counts_and_resyncs_others(
    bound: dict[str, int],
) -> None:
    """Past the send queue's bound (envelopes or bytes) remote copies are dropped,
    counted, and the other processes are told to resync the topic."""
    shared = prefix()
    hook = Hook()
    got_a, got_b = Collector(), Collector()
    async with (
        RedisBroker(REDIS_URL, channel_prefix=shared, **bound) as a,
        RedisBroker(REDIS_URL, channel_prefix=shared) as b,
        a.subscribe("t", got_a),
        b.subscribe("t", got_b, on_resync=hook),
    ):
        # publish() does not yield, so the sender cannot drain between these.
        for i in range(10):
            await a.publish("t", Envelope(text=f"m{i}" + "x" * 1000))
        assert a.stats.dropped == 8
        assert len(got_a.got) == 10  # local delivery is never dropped
        await hook.wait()
        assert [t[:2] for t in got_b.texts] == ["m0", "m1"]


async def test_close_is_idempotent_and_ends_every_task() -> None:
    """Closing twice (even at once) is fine; the broker's tasks are all finished."""
    broker = RedisBroker(REDIS_URL, channel_prefix=prefix())
    await broker.__aenter__()
    tasks = list(broker._tasks)
    await broker.publish("t", Envelope(text="flushed on close"))
    await asyncio.gather(broker.aclose(), broker.aclose())
    await broker.aclose()
    assert all(t.done() for t in tasks)
    assert broker.state is LinkState.CLOSED
    assert broker.stats.sent == 1
    with pytest.raises(RuntimeError, match="closed"):
        async with broker.subscribe("t", print):
            pass


async def test_subscription_churn_settles(
    pair: tuple[RedisBroker, RedisBroker], redis_client: aioredis.Redis
) -> None:
    """Many subscribers joining and leaving the same topics at once each see what is
    published after they joined, and Redis ends with no channel left."""
    a, b = pair

    async def member(i: int) -> None:
        got = Collector()
        async with a.subscribe(f"room:{i % 3}", got):
            await b.publish(f"room:{i % 3}", Envelope(text=f"hello-{i}"))
            await got.until_text(f"hello-{i}")

    async with asyncio.timeout(WAIT):
        for _ in range(3):
            await asyncio.gather(*(member(i) for i in range(30)))
    assert a.topics() == 0
    assert await redis_client.pubsub_channels(f"{a.channel_prefix}*") == []
