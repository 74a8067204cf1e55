"""Fan-out between the connections of a room, whichever process holds them.

Every frame meant for a room's members is published on the room's topic
(``room:{id}``); each process that has members there subscribes while it does and
hands each envelope to its local members. The in-process broker is the embedded
default; the Redis broker implements the same port for several processes.

Redis pub/sub is at-most-once: a message published while a process is cut off from
Redis never reaches it. The Redis broker does not hide that; it makes every loss
visible as a *resync*: a subscription's ``on_resync`` hook is called after its
process reconnects, and on every other process after a process that dropped
remote copies of the topic's envelopes is back. The owner then catches up from
the source of truth (chat from the database sequence, documents by state vector).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from redis.exceptions import RedisError

from rooms.redis_client import redis_client

log = logging.getLogger(__name__)


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    """One published item.

    ``text`` is the frame exactly as members receive it (encoded once, sent to all).
    ``seq`` is the chat sequence it carries, 0 for anything else: a resuming
    connection drops live messages it already replayed from the database.
    ``control`` is for the servers, not the clients (``"revoke"``: end the
    connections of ``user_id``).
    ``to`` names one connection when the frame is for it alone (call signals);
    empty means every member of the room.
    ``edit`` is the chat edit sequence a ``chat.edited``/``chat.deleted`` frame
    carries (0 otherwise), so a resync knows which changes a room already saw.
    ``data`` is a binary payload (a stored Yjs update, an awareness frame) and
    ``source`` names the live copy that published it, so that copy skips it.
    """

    text: str = ""
    seq: int = 0
    control: str = ""
    user_id: int = 0
    to: str = ""
    data: bytes = b""
    source: str = ""
    edit: int = 0


Deliver = Callable[[Envelope], None]
Resync = Callable[[], None]


class Broker(Protocol):
    """Publish/subscribe by topic. ``deliver`` and ``on_resync`` must not block."""

    def subscribe(
        self, topic: str, deliver: Deliver, on_resync: Resync | None = None
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Receive the topic's envelopes for the duration of the block.

        ``on_resync`` is called when envelopes of the topic may have been lost
        (the broker lost its connection, or another process dropped copies it
        published): the owner catches up from the source of truth.
        """
        ...

    async def publish(self, topic: str, envelope: Envelope) -> None:
        """Send an envelope to every subscriber of the topic, in every process."""
        ...

    async def ping(self) -> None:
        """Raise if the broker cannot be reached (for ``/readyz``)."""
        ...


def _call_each(topic: str, callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # one subscriber's bug must not starve the others
            log.exception("subscriber of %s failed", topic)


class MemoryBroker:
    """The in-process broker: delivery is a direct call, in publish order."""

    def __init__(self) -> None:
        self._topics: dict[str, list[Deliver]] = {}

    @contextlib.asynccontextmanager
    async def subscribe(
        self, topic: str, deliver: Deliver, on_resync: Resync | None = None
    ) -> AsyncIterator[None]:
        # Nothing is ever lost in one process, so ``on_resync`` is never called.
        self._topics.setdefault(topic, []).append(deliver)
        try:
            yield
        finally:
            subscribers = self._topics[topic]
            subscribers.remove(deliver)
            if not subscribers:
                del self._topics[topic]

    async def publish(self, topic: str, envelope: Envelope) -> None:
        for deliver in tuple(self._topics.get(topic, ())):
            try:
                deliver(envelope)
            except Exception:  # one subscriber's bug must not starve the others
                log.exception("subscriber of %s failed", topic)

    async def ping(self) -> None:
        return None

    def topics(self) -> int:
        return len(self._topics)


class _Wire(msgspec.Struct, frozen=True, array_like=True):
    """What crosses Redis: the publishing broker's id and the whole envelope.

    ``envelope`` is None for a resync notice: the origin dropped remote copies
    of this topic's envelopes, so every other process should catch up.
    Array-like msgspec structs ignore trailing fields they do not know and fill
    missing ones with defaults, so envelopes gaining fields cross mixed versions.
    """

    origin: str
    envelope: Envelope | None = None


class LinkState(enum.Enum):
    """The subscriber connection's life: CONNECTING → SYNCING → LIVE → DOWN → …"""

    CONNECTING = "connecting"  # first attempt, or a reconnect attempt
    SYNCING = "syncing"  # connected; re-subscribing the active topics
    LIVE = "live"  # every active topic subscribed
    DOWN = "down"  # the last attempt failed; waiting out the backoff
    CLOSED = "closed"


class BrokerUnavailable(ConnectionError):
    """The broker's Redis connection is down (``/readyz`` reports not ready)."""


@dataclass(slots=True)
class BrokerStats:
    """Counters of one Redis broker (monotonic, for ``/metrics``)."""

    published: int = 0  # publish() calls
    sent: int = 0  # envelopes written to Redis
    dropped: int = 0  # remote copies dropped (Redis down, send failed, queue full)
    received: int = 0  # envelopes from other processes handed to local subscribers
    own_skipped: int = 0  # our own envelopes coming back from Redis
    undecodable: int = 0  # payloads on our channels that were not ours to read
    reconnects: int = 0  # subscriber connections lost
    resyncs: int = 0  # on_resync calls


@dataclass(eq=False, slots=True)
class _Subscription:
    deliver: Deliver
    on_resync: Resync | None


@dataclass(slots=True)
class _Link:
    """Book-keeping for one subscriber connection (one per connection attempt)."""

    conn: Any  # redis.asyncio.Connection; untyped in redis-py
    sent: set[bytes] = field(default_factory=set)  # channels SUBSCRIBE was sent for
    confirmed: set[bytes] = field(default_factory=set)  # Redis said "subscribe"
    pending: dict[bytes, int] = field(default_factory=dict)  # replies still due


class RedisBroker:
    """Fan-out between processes through Redis pub/sub.

    One subscriber connection per broker, multiplexing every topic with local
    subscribers (``{channel_prefix}{topic}``); one sender task writing every
    publish, in call order, through pipelines on the shared client. Envelopes are
    delivered to local subscribers at the moment they are published, and those
    coming back from Redis with our own ``origin`` are skipped.

    Use as an async context manager (``open_broker`` does this).
    """

    def __init__(
        self,
        url: str,
        *,
        channel_prefix: str = "coilroom:",
        send_queue_limit: int = 10_000,
        send_queue_bytes: int = 64 << 20,
        send_batch: int = 512,
        send_batch_bytes: int = 1 << 20,
        connect_timeout: float = 2.0,
        command_timeout: float = 2.0,
        keepalive_interval: float = 5.0,
        reconnect_min: float = 0.05,
        reconnect_max: float = 5.0,
    ) -> None:
        self.origin = uuid.uuid4().hex
        self.channel_prefix = channel_prefix
        self.send_queue_limit = send_queue_limit
        self.send_queue_bytes = send_queue_bytes
        self.send_batch = send_batch
        self.send_batch_bytes = send_batch_bytes
        self.command_timeout = command_timeout
        self.keepalive_interval = keepalive_interval
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.stats = BrokerStats()
        # Reconnecting is this class's job (with backoff and a resync).
        self._client = redis_client(
            url,
            name=f"coilroom-broker-{self.origin}",
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
        )
        self._prefix = channel_prefix.encode()
        self._topics: dict[str, list[_Subscription]] = {}
        self._state = LinkState.CONNECTING
        self._link: _Link | None = None
        self._changed = asyncio.Event()  # replaced on every change (see _notify)
        self._reconcile = asyncio.Event()
        self._first_attempt = asyncio.Event()
        # Encoded envelopes waiting for the sender; bounded, drops are counted and
        # turn into resync notices (``_gaps``) once Redis takes writes again.
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._outbox_bytes = 0
        self._gaps: set[str] = set()
        self._send_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: asyncio.Future[None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> RedisBroker:
        self._tasks = [
            asyncio.create_task(self._run_link(), name="broker-link"),
            asyncio.create_task(self._run_sender(), name="broker-sender"),
        ]
        # Wait for the first attempt so the common start finds Redis up; if it
        # is down we still start, serve local members, and report not ready.
        try:
            await self._first_attempt.wait()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Flush what is queued (bounded by ``command_timeout``), stop every task.

        Idempotent: a second call waits for the first.
        """
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        try:
            self._stopping.set()
            self._send_wake.set()
            if self._tasks:
                # The sender ends once its queue is empty (or sending fails):
                # envelopes published just before shutdown (leaves) still go out.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.command_timeout):
                        await asyncio.shield(self._tasks[1])
            if self._outbox:
                log.warning("broker closing: %d envelopes not sent", len(self._outbox))
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._set_state(LinkState.CLOSED)
            await self._client.aclose()
        finally:
            self._closing.set_result(None)

    @property
    def state(self) -> LinkState:
        return self._state

    async def wait_state(self, *states: LinkState) -> None:
        """Until the subscriber connection is in one of ``states``."""
        while self._state not in states:
            await self._changed.wait()

    def topics(self) -> int:
        return len(self._topics)

    # -- the port ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(
        self, topic: str, deliver: Deliver, on_resync: Resync | None = None
    ) -> AsyncIterator[None]:
        """Receive the topic's envelopes for the duration of the block.

        Returns once Redis confirmed the channel, so nothing published after that
        is missed; while Redis is unreachable it returns at once (local delivery
        works) and ``on_resync`` is called after the reconnection.
        """
        if self._state is LinkState.CLOSED:
            raise RuntimeError("broker is closed")
        subscription = _Subscription(deliver, on_resync)
        self._topics.setdefault(topic, []).append(subscription)
        self._reconcile.set()
        try:
            await self._settled(topic)
            yield
        finally:
            subscribers = self._topics[topic]
            subscribers.remove(subscription)
            if not subscribers:
                del self._topics[topic]
                self._reconcile.set()
                # Wait for Redis to confirm the unsubscribe (bounded: a lost
                # connection settles every topic).
                await self._settled(topic)

    async def publish(self, topic: str, envelope: Envelope) -> None:
        """Deliver locally now; queue one copy for Redis (never raises for Redis).

        The remote copy is dropped and counted when Redis is down or the send
        queue is full; the topic's other processes are then told to resync.
        """
        self.stats.published += 1
        for subscription in tuple(self._topics.get(topic, ())):
            try:
                subscription.deliver(envelope)
            except Exception:  # one subscriber's bug must not starve the others
                log.exception("subscriber of %s failed", topic)
        if self._state in (LinkState.DOWN, LinkState.CLOSED):
            self._drop(topic)
            return
        payload = msgspec.msgpack.encode(_Wire(self.origin, envelope))
        if (
            len(self._outbox) >= self.send_queue_limit
            or self._outbox_bytes + len(payload) > self.send_queue_bytes
        ):
            self._drop(topic)
            return
        self._outbox.append((topic, payload))
        self._outbox_bytes += len(payload)
        self._send_wake.set()

    async def ping(self) -> None:
        """Raise ``BrokerUnavailable`` unless the subscriber connection is live and
        a PING is answered."""
        if self._state is not LinkState.LIVE:
            raise BrokerUnavailable(f"redis subscriber connection {self._state.value}")
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis: {exc}") from exc

    # -- subscriber connection ---------------------------------------------------

    def _channel(self, topic: str) -> bytes:
        return self._prefix + topic.encode()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_state(self, state: LinkState) -> None:
        self._state = state
        self._notify()

    def _is_settled(self, topic: str) -> bool:
        link = self._link
        if self._state is not LinkState.LIVE or link is None:
            # Not connected: nothing to wait for; a reconnection re-subscribes
            # every active topic and calls the resync hooks.
            return True
        channel = self._channel(topic)
        wanted = topic in self._topics
        return (
            not self._reconcile.is_set()
            and link.pending.get(channel, 0) == 0
            and (channel in link.confirmed) == wanted
            and (channel in link.sent) == wanted
        )

    async def _settled(self, topic: str) -> None:
        while not self._is_settled(topic):
            await self._changed.wait()

    def _backoff(self, attempt: int) -> float:
        """Capped exponential backoff with equal jitter (half fixed, half random)."""
        ceiling = min(self.reconnect_max, self.reconnect_min * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - not crypto

    async def _run_link(self) -> None:
        attempt = 0
        while True:
            self._set_state(LinkState.CONNECTING)
            conn = self._client.connection_pool.make_connection()
            live = False
            try:
                await conn.connect()
                self._link = _Link(conn)
                live = await self._serve(self._link)
            except (RedisError, OSError) as exc:
                if attempt == 0:
                    log.warning("redis broker cannot connect: %s", exc)
            except Exception:
                log.exception("redis broker: connecting failed")  # a bug: retry anyway
            finally:
                self._link = None
                self._first_attempt.set()
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            self.stats.reconnects += live
            self._set_state(LinkState.DOWN)
            self._drop_outbox()
            attempt = 0 if live else attempt + 1
            await asyncio.sleep(self._backoff(attempt))

    async def _serve(self, link: _Link) -> bool:
        """Run one connection until it fails. Returns whether it went live."""
        self._set_state(LinkState.SYNCING)
        self._reconcile.set()
        went_live = False

        def live() -> None:
            nonlocal went_live
            went_live = True
            self._set_state(LinkState.LIVE)
            self._first_attempt.set()
            self._send_wake.set()  # resync notices may be owed
            log.info("redis broker connected (%d topics)", len(self._topics))
            for topic, subscriptions in list(self._topics.items()):
                self._resync(topic, subscriptions)

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(link, live))
                group.create_task(self._command(link, live))
        except* (RedisError, OSError) as failure:
            log.warning("redis broker connection lost: %s", failure.exceptions[0])
        except* Exception:
            # A bug here must not end fan-out for good: log it and reconnect.
            log.exception("redis broker connection failed")
        return went_live

    async def _command(self, link: _Link, live: Callable[[], None]) -> None:
        """The only writer on the subscriber connection: (un)subscribe and PING."""
        conn = link.conn
        clock = asyncio.get_running_loop().time
        next_ping = clock() + self.keepalive_interval
        while True:
            self._reconcile.clear()
            wanted = {self._channel(t) for t in self._topics}
            add = sorted(wanted - link.sent)
            remove = sorted(link.sent - wanted)
            for command, channels in (("SUBSCRIBE", add), ("UNSUBSCRIBE", remove)):
                if not channels:
                    continue
                for channel in channels:
                    link.pending[channel] = link.pending.get(channel, 0) + 1
                if command == "SUBSCRIBE":
                    link.sent.update(channels)
                else:
                    link.sent.difference_update(channels)
                await conn.send_command(command, *channels, check_health=False)
            if (
                self._state is LinkState.SYNCING
                and not link.pending
                and not self._reconcile.is_set()
            ):
                live()
            self._notify()
            if clock() >= next_ping:
                # Keepalive: the reader expects some reply within two intervals,
                # so a silently dead connection is noticed.
                await conn.send_command("PING", check_health=False)
                next_ping = clock() + self.keepalive_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_ping - clock()):
                    await self._reconcile.wait()

    async def _read(self, link: _Link, live: Callable[[], None]) -> None:
        conn = link.conn
        while True:
            reply = await conn.read_response(timeout=2 * self.keepalive_interval)
            if reply is None:
                raise ConnectionError("no reply from redis within two keepalives")
            kind = reply[0]
            if kind == b"message":
                self._receive(reply[1], reply[2])
                continue
            if kind in (b"subscribe", b"unsubscribe"):
                channel = reply[1]
                due = link.pending.pop(channel, 0) - 1
                if due > 0:
                    link.pending[channel] = due
                if kind == b"subscribe":
                    link.confirmed.add(channel)
                else:
                    link.confirmed.discard(channel)
                if (
                    self._state is LinkState.SYNCING
                    and not link.pending
                    and not self._reconcile.is_set()
                ):
                    live()
                self._notify()

    def _receive(self, channel: bytes, data: bytes) -> None:
        topic = channel[len(self._prefix) :].decode()
        subscriptions = self._topics.get(topic)
        if not subscriptions:
            return  # a message in flight while we unsubscribed
        try:
            wire = msgspec.msgpack.decode(data, type=_Wire)
        except msgspec.DecodeError:
            self.stats.undecodable += 1
            log.warning("undecodable message on %s (%d bytes)", topic, len(data))
            return
        if wire.origin == self.origin:
            self.stats.own_skipped += 1
            return
        if wire.envelope is None:
            self._resync(topic, subscriptions)
            return
        self.stats.received += 1
        envelope = wire.envelope
        for subscription in tuple(subscriptions):
            try:
                subscription.deliver(envelope)
            except Exception:  # one subscriber's bug must not starve the others
                log.exception("subscriber of %s failed", topic)

    def _resync(self, topic: str, subscriptions: list[_Subscription]) -> None:
        hooks = [s.on_resync for s in subscriptions if s.on_resync is not None]
        self.stats.resyncs += len(hooks)
        _call_each(topic, hooks)

    # -- sender ------------------------------------------------------------------

    def _drop(self, topic: str) -> None:
        self.stats.dropped += 1
        self._gaps.add(topic)

    def _take(self) -> tuple[str, bytes]:
        item = self._outbox.popleft()
        self._outbox_bytes -= len(item[1])
        return item

    def _drop_outbox(self) -> None:
        while self._outbox:
            self._drop(self._take()[0])

    async def _run_sender(self) -> None:
        """Write queued envelopes in call order, a pipeline per batch."""
        failures = 0
        notice = msgspec.msgpack.encode(_Wire(self.origin))
        while True:
            if not self._outbox and not (self._gaps and self._state is LinkState.LIVE):
                if self._stopping.is_set():
                    return
                self._send_wake.clear()
                await self._send_wake.wait()
                continue
            # At least one envelope per batch, however big (the queue's byte
            # bound keeps that finite).
            batch: list[tuple[str, bytes]] = []
            size = 0
            while self._outbox and (
                not batch
                or (
                    len(batch) < self.send_batch
                    and size + len(self._outbox[0][1]) <= self.send_batch_bytes
                )
            ):
                batch.append(self._take())
                size += len(batch[-1][1])
            gaps: list[str] = []
            if self._state is LinkState.LIVE:
                gaps, self._gaps = list(self._gaps), set()
            pipe = self._client.pipeline(transaction=False)
            for topic, payload in batch:
                pipe.publish(self._channel(topic), payload)
            # After the envelopes: a process that resyncs on the notice already
            # has them, or finds them in the source of truth.
            for topic in gaps:
                pipe.publish(self._channel(topic), notice)
            try:
                await pipe.execute()
            except Exception as exc:  # a failed send must not end fan-out
                if not isinstance(exc, RedisError | OSError):
                    log.error("redis broker: publishing failed", exc_info=exc)
                for topic, _ in batch:
                    self._drop(topic)
                self._gaps.update(gaps)
                if not failures:
                    log.warning("redis broker: publishing failed: %s", exc)
                failures += 1
                if self._stopping.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._backoff(failures)):
                        await self._stopping.wait()
                continue
            failures = 0
            self.stats.sent += len(batch)


@contextlib.asynccontextmanager
async def open_broker(url: str, **options: Any) -> AsyncIterator[Broker]:
    """Open the broker named by URL.

    Empty or ``memory://``: in-process. ``redis://`` / ``rediss://`` /
    ``unix://``: ``RedisBroker`` (``options`` are its keyword arguments, e.g.
    ``channel_prefix``). The Redis broker starts even when Redis is down: it
    serves local subscribers, ``ping`` raises, and it keeps reconnecting.
    """
    if url in ("", "memory://"):
        yield MemoryBroker()
        return
    scheme = url.split("://")[0]
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"unsupported broker URL scheme in {scheme!r}: "
            "use memory:// or redis://host:port/db"
        )
    async with RedisBroker(url, **options) as broker:
        yield broker
