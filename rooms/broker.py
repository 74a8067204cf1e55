"""Fan-out between the connections of a room, whichever process holds them.

Every frame meant for a room's members is published on the room's topic
(``room:{id}``); each process that has members there subscribes while it does and
hands each envelope to its local members. The in-process broker is the embedded
default; a Redis broker implements the same port for several processes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import msgspec

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
    """

    text: str = ""
    seq: int = 0
    control: str = ""
    user_id: int = 0
    to: str = ""


Deliver = Callable[[Envelope], None]


class Broker(Protocol):
    """Publish/subscribe by topic. ``deliver`` callbacks must not block."""

    def subscribe(
        self, topic: str, deliver: Deliver
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Receive the topic's envelopes for the duration of the block."""
        ...

    async def publish(self, topic: str, envelope: Envelope) -> None:
        """Send an envelope to every subscriber of the topic, in every process."""
        ...

    async def ping(self) -> None:
        """Raise if the broker cannot be reached (for ``/readyz``)."""
        ...


class MemoryBroker:
    """The in-process broker: delivery is a direct call, in publish order."""

    def __init__(self) -> None:
        self._topics: dict[str, list[Deliver]] = {}

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str, deliver: Deliver) -> AsyncIterator[None]:
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


@contextlib.asynccontextmanager
async def open_broker(url: str) -> AsyncIterator[Broker]:
    """Open the broker named by URL: empty or ``memory://`` for in-process."""
    if url in ("", "memory://"):
        yield MemoryBroker()
        return
    raise ValueError(
        f"unsupported broker URL scheme in {url.split('://')[0]!r}: "
        "only the in-process broker is available in this version"
    )
