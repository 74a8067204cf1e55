"""The sync step 2 for a client that has nothing yet, kept between joins.

Every fresh client (an empty document: state vector ``[0]``) needs the whole
document. Encoding it costs milliseconds for a long one (11-13 ms for 20,000
activities on a live copy), and a class joining at once would pay it per student.
So the encoded step 2 is kept, and the updates applied after it are kept beside it,
in order. A fresh client gets those updates merged into one update frame first,
then the kept step 2: together they are the document as it is now.

The order matters. A client counts itself synced when its step 2 arrives, and
apps read the document then (a stock pattern: "if it is empty, fill in a
template"), so everything must be in by the step 2. An update that arrives first
and builds on what the client does not have yet waits inside the client (Yjs and
Yrs keep such "pending" structs and deletions) and is integrated as the step 2
brings what it builds on; the reference y-websocket server sends live updates
before the step 2 in just this way. Merging the two instead costs as much as
encoding afresh (30 ms for a 2.4 MB document).

When the updates grow past a share of the kept state (or in number), they are
dropped with it and the next join encodes afresh.

The owner (a ``LiveDocument``) calls ``applied`` for every update it applies to its
live copy, and ``frames`` and ``applied`` never straddle an ``await``: what a
joiner gets here plus what is broadcast after it goes live is every update once.
"""

from __future__ import annotations

from collections.abc import Callable

from rooms import crdt
from rooms.ysync import create_sync_step2, create_update

MAX_UPDATES = 256
MAX_SHARE = 0.25  # of the kept state's size, in bytes of updates after it
MIN_BYTES = 64 * 1024  # small documents may keep this much after them anyway


class Step2Cache:
    __slots__ = ("_after", "_after_bytes", "_step2", "_tail")

    def __init__(self) -> None:
        self._step2: bytes | None = None
        self._after: list[bytes] = []  # updates applied since, in order
        self._after_bytes = 0
        self._tail: list[bytes] | None = None  # their frames, made on demand

    @property
    def kept_bytes(self) -> int:
        return len(self._step2 or b"") + self._after_bytes

    def frames(self, encode: Callable[[], bytes]) -> list[bytes]:
        """What to send a fresh client, in order: an update frame if the document
        changed since the kept state, then the step 2 (``encode`` gives the whole
        document's update when nothing is kept)."""
        if self._step2 is None:
            self._step2 = create_sync_step2(encode())
            self._after, self._after_bytes, self._tail = [], 0, None
        if not self._after:
            return [self._step2]
        if self._tail is None:
            merged = crdt.merge_updates(self._after)
            self._tail = (
                [create_update(merged)]
                if merged is not None
                else [create_update(u) for u in self._after]
            )
        return [*self._tail, self._step2]

    def seed(self, state: bytes, after: list[bytes]) -> None:
        """Start from a stored snapshot (a whole document's update) and the updates
        stored after it: the document as just loaded, with nothing to encode."""
        self._step2, self._after, self._after_bytes, self._tail = (
            create_sync_step2(state),
            [],
            0,
            None,
        )
        for update in after:
            self.applied(update)

    def applied(self, update: bytes) -> None:
        """An update was applied to the document (after the kept state)."""
        if self._step2 is None:
            return
        self._after.append(update)
        self._after_bytes += len(update)
        self._tail = None
        if len(self._after) > MAX_UPDATES or self._after_bytes > max(
            MIN_BYTES, MAX_SHARE * len(self._step2)
        ):
            self.drop()

    def drop(self) -> None:
        """Forget everything (the next fresh client gets a new encoding)."""
        self._step2, self._after, self._after_bytes, self._tail = None, [], 0, None
