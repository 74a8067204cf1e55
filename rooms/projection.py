"""The activity overview: agreement documents' activities read into SQL rows, off the
event loop, from copies kept up to date with the new updates only.

Reading a whole list is work proportional to the document (20,000 activities: 25 ms
to read it in one pycrdt call, which holds the GIL, and 100 ms of Python to turn it
into rows and compare them with the last ones). So each projected document has a
copy, owned by one dedicated thread with the rows as last written, that takes only
the updates applied since the previous projection (bytes the live document already
has) and follows what they do to the list (``observe_deep``): entries inserted and
removed anywhere, activities edited. A projection then reads only the activities
inserted or edited; the others keep their rows, with a new position when entries
before them came or went (written as a one-column update). The list is read whole
only the first time, and when more than ``MAX_EDITED_READS`` activities changed
below their top level (those are found by index, each a walk from the start).

The copies are the server's own: reading types their roots, which must never happen
to a live document (a client's schema mistake must not touch it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import pycrdt

from rooms import crdt
from rooms.worker import WorkerFailed, WorkerRefused
from storage.activity_rows import (
    ActivityChanges,
    activity_changes,
    activity_id,
    activity_row,
    row_change,
)

if TYPE_CHECKING:
    from rooms.worker import DocumentWorker

log = logging.getLogger(__name__)

Rows = dict[str, dict[str, Any]]
_json = msgspec.json.Decoder()
# Past this many edited activities, one read of the whole list is cheaper than
# reading each (every read by index walks the list from its start).
MAX_EDITED_READS = 200
YIELD_EVERY = 32  # activities read between two releases of the GIL


class ProjectionFailed(Exception):
    """The activities could not be read; ``copy_lost``: the copy could not take an
    update and was dropped, so the next projection must start from the whole state."""

    def __init__(self, reason: str, *, copy_lost: bool) -> None:
        super().__init__(reason)
        self.copy_lost = copy_lost


class _Entry:
    """One entry of the list: the id of its row ("" a map without a usable id,
    None not an activity), or, when ``stale``, the value to read again (None: a
    change deep inside, read the activity by its index)."""

    __slots__ = ("key", "ref", "stale")

    def __init__(self, key: str | None, ref: Any = None, *, stale: bool) -> None:
        self.key = key
        self.ref = ref
        self.stale = stale


@dataclass(slots=True)
class _Copy:
    doc: pycrdt.Doc
    rows: Rows | None = None  # as last written; None: unknown, write them all
    # Known after a whole read: the list, its entries as the updates since left
    # them, and which entry each row was read from.
    array: pycrdt.Array[Any] | None = None
    entries: list[_Entry] = field(default_factory=list)
    sources: dict[str, _Entry] = field(default_factory=dict)
    reread: bool = True  # something happened that only a whole read handles
    deep_edits: int = 0  # stale entries to find by index

    def watch(self, events: list[Any]) -> None:
        """observe_deep callback (inside the transaction: only note what changed;
        the values noted are read after it, as they are then)."""
        if self.reread:
            return
        entries = self.entries
        # The list's own change first: its delta counts from the state before the
        # transaction, the paths of changes inside activities from the state after.
        for event in sorted(events, key=lambda e: len(e.path)):
            path = event.path
            if not path:
                index = 0
                for op in event.delta:
                    if "retain" in op:
                        index += op["retain"]
                    elif "insert" in op:
                        values = op["insert"]
                        entries[index:index] = [
                            _Entry(None, value, stale=True) for value in values
                        ]
                        index += len(values)
                    elif "delete" in op:
                        del entries[index : index + op["delete"]]
                continue
            entry = entries[path[0]]
            if len(path) == 1:
                entry.ref = event.target  # the activity's map itself
            elif not entry.stale or entry.ref is not None:
                entry.ref = None
                self.deep_edits += 1
            entry.stale = True


def _plain(value: Any) -> Any:
    if isinstance(value, (pycrdt.Map, pycrdt.Array)):
        return _json.decode(str(value))
    return value


class Projections:
    """The copies of the projected documents, by key (synchronous: one thread, or
    the document worker's process, owns an instance)."""

    def __init__(self) -> None:
        self._copies: dict[Hashable, _Copy] = {}

    def changes(
        self, key: Hashable, room_id: int, updates: list[bytes]
    ) -> ActivityChanges:
        """See ``Projector.changes``."""
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = _Copy(pycrdt.Doc())
        # One transaction for them all: each one's events cost a walk of the list
        # in pycrdt (where an insert is), holding the GIL.
        merged = crdt.merge_updates(updates) if len(updates) > 1 else None
        try:
            for update in updates if merged is None else [merged]:
                crdt.apply(copy.doc, update)
        except crdt.UpdateRejected as exc:
            del self._copies[key]
            raise ProjectionFailed(str(exc), copy_lost=True) from None
        try:
            changes = None if copy.reread else _read_changes(copy, room_id)
            if changes is None:
                changes = _read_all(copy, room_id)
        except BaseException as exc:
            if not crdt._is_crdt_failure(exc):
                raise
            copy.reread = True
            raise ProjectionFailed(
                f"activities unreadable: {type(exc).__name__}", copy_lost=False
            ) from None
        return changes

    def forget_rows(self, key: Hashable) -> None:
        copy = self._copies.get(key)
        if copy is not None:
            copy.rows = None
            copy.reread = True

    def drop(self, key: Hashable) -> None:
        self._copies.pop(key, None)

    def clear(self) -> None:
        self._copies.clear()


_LOCAL = -1  # a copy kept in this process (the worker's copies: its epoch)


class Projector:
    """Where the copies live: in the document worker's process when there is one
    (its pycrdt calls then never hold this process's GIL), else in one thread of
    this process (no worker, or the worker is restarting after a failure).

    A copy is lost when its worker failed (or the projections moved between the
    worker and the thread meanwhile): ``changes`` then raises ``ProjectionFailed``
    with ``copy_lost``, and the caller starts again from the whole state.
    """

    def __init__(self, worker: DocumentWorker | None = None) -> None:
        self._worker = worker
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="projection"
        )
        self._local = Projections()  # only used in the thread
        self._homes: dict[Hashable, int] = {}  # where each copy is

    def _here(self) -> int:
        worker = self._worker
        return worker.epoch if worker is not None and worker.usable() else _LOCAL

    async def changes(
        self, key: Hashable, room_id: int, updates: Sequence[bytes]
    ) -> ActivityChanges:
        """Apply ``updates`` to the document's copy (made from them if there is none)
        and return how its rows differ from the rows of the last projection.

        The copy takes the new rows as written: call ``forget_rows`` if writing
        the changes fails.

        Raises:
            ProjectionFailed: the copy could not take an update (it is dropped), or
                its list could not be read, or it was lost with its worker.
        """
        here, home = self._here(), self._homes.get(key)
        if home is not None and home != here:
            await self.drop(key)
            raise ProjectionFailed("copy lost with the document worker", copy_lost=True)
        self._homes[key] = here
        try:
            if here == _LOCAL:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    self._thread, self._local.changes, key, room_id, list(updates)
                )
            assert self._worker is not None
            try:
                return await self._worker.call("project", key, room_id, list(updates))
            except WorkerFailed as exc:
                raise ProjectionFailed(str(exc), copy_lost=True) from None
            except WorkerRefused as exc:
                copy_lost = exc.kind != "projection_kept"
                raise ProjectionFailed(exc.detail, copy_lost=copy_lost) from None
        except ProjectionFailed as exc:
            if exc.copy_lost:
                self._homes.pop(key, None)
            raise

    async def forget_rows(self, key: Hashable) -> None:
        """The last changes were not written: write every row next time."""
        home = self._homes.get(key)
        if home == _LOCAL:
            await asyncio.get_running_loop().run_in_executor(
                self._thread, self._local.forget_rows, key
            )
        elif home is not None and self._worker is not None:
            try:
                await self._worker.call("forget_rows", key, start=False)
            except (WorkerFailed, WorkerRefused):
                self._homes.pop(key, None)  # gone with the worker: all rows anyway

    async def drop(self, key: Hashable) -> None:
        """Forget a document's copy (unloaded: the next load feeds the whole state)."""
        home = self._homes.pop(key, None)
        if home == _LOCAL:
            await asyncio.get_running_loop().run_in_executor(
                self._thread, self._local.drop, key
            )
        elif home is not None and self._worker is not None:
            with contextlib.suppress(WorkerFailed, WorkerRefused):
                await self._worker.call("drop", key, start=False)

    def close(self) -> None:
        """Drop every copy and end the thread (after what it is doing); the
        worker's copies end with the worker (its owner stops it)."""
        self._homes.clear()
        self._thread.submit(self._local.clear)
        self._thread.shutdown(wait=False)


def _pause(count: int) -> None:
    # Let the event loop and the storing thread have the GIL now and then: a
    # thread that wants it otherwise waits up to the 5 ms switch interval each
    # time, and the store thread wants it at every SQLite call.
    if count % YIELD_EVERY == 0:
        time.sleep(0)


def _diff(rows: Rows, previous: Rows | None) -> ActivityChanges:
    """``activity_changes``, pausing now and then (a long list)."""
    if previous is None:
        return activity_changes(rows, None)
    changes = ActivityChanges([], [])
    for count, key in enumerate(previous):
        _pause(count)
        if key not in rows:
            changes.gone.append(key)
    for count, (key, row) in enumerate(rows.items()):
        _pause(count)
        old = previous.get(key)
        if row is old:
            continue
        how = row_change(row, old)
        if how == "moved":
            changes.moved.append((key, row["position"]))
        elif how == "changed":
            changes.changed.append(row)
    return changes


def _read_all(copy: _Copy, room_id: int) -> ActivityChanges:
    """Read the whole list (and from now on, follow it)."""
    if copy.array is None:
        copy.array = copy.doc.get("activities", type=pycrdt.Array)
        copy.array.observe_deep(copy.watch)
    items = crdt.plain(copy.array) or []
    entries = []
    for count, item in enumerate(items):
        _pause(count)
        key = activity_id(item) if isinstance(item, dict) else None
        entries.append(_Entry(key, stale=False))
    copy.entries = entries
    copy.reread = False
    copy.deep_edits = 0
    # Every entry is known now: the same pass as for changes reads none of them.
    return _changes_of(copy, room_id, items)


def _read_changes(copy: _Copy, room_id: int) -> ActivityChanges | None:
    """The changes since the last read, reading only the activities inserted or
    edited; None when a whole read is cheaper."""
    if copy.deep_edits > MAX_EDITED_READS:
        return None
    return _changes_of(copy, room_id, None)


def _changes_of(copy: _Copy, room_id: int, items: list[Any] | None) -> ActivityChanges:
    """One pass over the entries: positions, rows (read again only where stale or
    where a row's entry changed), and their difference with the last rows.
    ``items``: the whole list just read (every entry's content at hand)."""
    array, previous = copy.array, copy.rows
    assert array is not None
    rows: Rows = {}
    sources: dict[str, _Entry] = {}
    position = 0
    for index, entry in enumerate(copy.entries):
        _pause(index)
        activity: Any = None
        if items is not None:
            activity = items[index]
        elif entry.stale:
            activity = _plain(array[index] if entry.ref is None else entry.ref)
            entry.key = activity_id(activity) if isinstance(activity, dict) else None
        entry.ref, entry.stale = None, False
        key = entry.key
        if key is None:
            continue  # not an activity: no position either
        at, position = position, position + 1
        if not key or key in rows:
            continue  # no usable id, or a later duplicate: the first one has the row
        old = previous.get(key) if previous is not None else None
        if activity is None and (old is None or copy.sources.get(key) is not entry):
            # Unchanged, but its row was another entry's (the first of a duplicate
            # id that is gone now): read it.
            activity = _plain(array[index])
        if activity is None:
            assert old is not None
            rows[key] = old if old["position"] == at else {**old, "position": at}
        else:
            rows[key] = activity_row(room_id, at, activity)
        sources[key] = entry
    copy.sources = sources
    copy.deep_edits = 0
    changes = _diff(rows, previous)
    copy.rows = rows
    return changes
