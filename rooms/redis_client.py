"""The one way Coilroom opens a Redis client (broker, presence, calls)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def redis_client(
    url: str, *, name: str, connect_timeout: float, command_timeout: float
) -> aioredis.Redis:
    """A client that never retries a command by itself.

    Every user of it runs commands that must not run twice (a script re-run after a
    lost reply, a pipeline published twice) and has its own way back after a failure
    (reconnect with backoff and resync, or an error to the client). RESP2: pub/sub
    replies are plain arrays the broker reads itself (RESP3 turns them into push
    frames that redis-py routes to a handler).
    """
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout,
        socket_timeout=command_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        client_name=name,
        protocol=2,
    )
