"""The activity overview: agreement documents' activities read into SQL rows, off the
event loop, from copies kept up to date with the new updates only.

Reading a whole list is work proportional to the document (20,000 activities: 25 ms
to read it in one pycrdt call, which holds the GIL, and 100 ms of Python to turn it
into rows and compare them with the last ones). So each projected document has a
copy, owned by one dedicated thread with the rows as last written, that takes only
the updates applied since the previous projection (bytes the live document already
has) and watches what they change: activities appended at the end and activities
edited in place are read one by one, and only their rows are written. Anything else
(an activity inserted or removed in the middle shifts every position after it, an
id changed, an entry that is not a map) reads the whole list again.

The copies are the server's own: reading types their roots, which must never happen
to a live document (a client's schema mistake must not touch it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pycrdt

from rooms import crdt
from storage import documents as store

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


@dataclass(slots=True)
class _Copy:
    doc: pycrdt.Doc
    rows: Rows | None = None  # as last written; None: unknown, write them all
    # Known after a whole read: the list, the row id at each index ("" for none),
    # and what the updates since did to it.
    array: pycrdt.Array[Any] | None = None
    ids: list[str] = field(default_factory=list)
    length: int = 0  # of the list as the events so far left it
    reread: bool = True  # something happened that only a whole read handles
    appended: list[Any] = field(default_factory=list)  # values added at the end
    # Activities edited in place, by index: the activity's map when the event
    # says it, else None (a change deeper inside: read it by index).
    edited: dict[int, pycrdt.Map[Any] | None] = field(default_factory=dict)

    def watch(self, events: list[Any]) -> None:
        """observe_deep callback (inside the transaction: only note what changed;
        the values noted are read after it, as they are then)."""
        if self.reread:
            return
        for event in events:
            path = event.path
            if path:
                index = path[0]  # inside activity path[0] (after the change)
                if len(path) == 1:
                    self.edited[index] = event.target
                else:
                    self.edited.setdefault(index, None)
                continue
            delta = event.delta
            if len(delta) == 1 and "insert" in delta[0] and self.length == 0:
                inserted = delta[0]["insert"]
            elif (
                len(delta) == 2
                and delta[0].get("retain") == self.length
                and "insert" in delta[1]
            ):
                inserted = delta[1]["insert"]  # appended at the end
            else:
                self.reread = True
                return
            self.length += len(inserted)
            self.appended.extend(inserted)

    def reset(self) -> None:
        self.appended = []
        self.edited = {}


def _plain(value: Any) -> Any:
    if isinstance(value, (pycrdt.Map, pycrdt.Array)):
        return _json.decode(str(value))
    return value


class Projector:
    """Copies of the projected documents, each touched only by the one thread."""

    def __init__(self) -> None:
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="projection"
        )
        self._copies: dict[Hashable, _Copy] = {}  # only used in the thread

    async def changes(
        self, key: Hashable, room_id: int, updates: Sequence[bytes]
    ) -> store.ActivityChanges:
        """Apply ``updates`` to the document's copy (made from them if there is none)
        and return how its rows differ from the rows of the last projection.

        The copy takes the new rows as written: call ``forget_rows`` if writing
        the changes fails.

        Raises:
            ProjectionFailed: the copy could not take an update (it is dropped), or
                its list could not be read.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, self._changes, key, room_id, list(updates)
        )

    def _changes(
        self, key: Hashable, room_id: int, updates: list[bytes]
    ) -> store.ActivityChanges:
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = _Copy(pycrdt.Doc())
        try:
            for update in updates:
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
        copy.reset()
        return changes

    async def forget_rows(self, key: Hashable) -> None:
        """The last changes were not written: write every row next time."""

        def forget() -> None:
            copy = self._copies.get(key)
            if copy is not None:
                copy.rows = None
                copy.reread = True
                copy.reset()

        await asyncio.get_running_loop().run_in_executor(self._thread, forget)

    async def drop(self, key: Hashable) -> None:
        """Forget a document's copy (unloaded: the next load feeds the whole state)."""
        await asyncio.get_running_loop().run_in_executor(
            self._thread, self._copies.pop, key, None
        )

    def close(self) -> None:
        """Drop every copy and end the thread (after what it is doing)."""
        self._thread.submit(self._copies.clear)
        self._thread.shutdown(wait=False)


def _pause(count: int) -> None:
    # Let the event loop and the storing thread have the GIL now and then: a
    # thread that wants it otherwise waits up to the 5 ms switch interval each
    # time, and the store thread wants it at every SQLite call.
    if count % YIELD_EVERY == 0:
        time.sleep(0)


def _read_all(copy: _Copy, room_id: int) -> store.ActivityChanges:
    """Read the whole list (and from now on, watch it)."""
    if copy.array is None:
        copy.array = copy.doc.get("activities", type=pycrdt.Array)
        copy.array.observe_deep(copy.watch)
    items = crdt.plain(copy.array) or []
    activities = [a for a in items if isinstance(a, dict)]
    rows: Rows = {}
    for position, activity in enumerate(activities):
        _pause(position)
        key = store.activity_id(activity)
        if key and key not in rows:
            rows[key] = store.activity_row(room_id, position, activity)
    changes = _diff(rows, copy.rows)
    copy.rows = rows
    copy.length = len(items)
    # Incremental reads assume index == position: every entry is an activity map.
    copy.reread = len(activities) != len(items)
    copy.ids = [] if copy.reread else _ids(activities)
    return changes


def _ids(activities: list[dict[str, Any]]) -> list[str]:
    ids = []
    for count, activity in enumerate(activities):
        _pause(count)
        ids.append(store.activity_id(activity))
    return ids


def _diff(rows: Rows, previous: Rows | None) -> store.ActivityChanges:
    """``store.activity_changes``, pausing now and then (a long list)."""
    if previous is None:
        return store.activity_changes(rows, None)
    changes = store.ActivityChanges([], [])
    for count, key in enumerate(previous):
        _pause(count)
        if key not in rows:
            changes.gone.append(key)
    for count, (key, row) in enumerate(rows.items()):
        _pause(count)
        how = store.row_change(row, previous.get(key))
        if how == "moved":
            changes.moved.append((key, row["position"]))
        elif how == "changed":
            changes.changed.append(row)
    return changes


def _read_changes(copy: _Copy, room_id: int) -> store.ActivityChanges | None:
    """The changes of activities appended or edited in place since the last read,
    reading only those; None when a whole read is needed."""
    array, rows, ids = copy.array, copy.rows, copy.ids
    assert array is not None
    assert rows is not None
    known = len(ids)
    edited = sorted((i, m) for i, m in copy.edited.items() if i < known)
    if len(edited) > MAX_EDITED_READS:
        return None
    changed: dict[str, dict[str, Any]] = {}
    for count, (index, activity_map) in enumerate(edited):
        _pause(count)
        activity = _plain(array[index] if activity_map is None else activity_map)
        if not isinstance(activity, dict) or store.activity_id(activity) != ids[index]:
            return None  # a new id (or no longer a map): rows may move or merge
        key = ids[index]
        old = rows.get(key)
        if old is None or old["position"] != index:
            continue  # no id, or a later duplicate: its row is another entry's
        row = store.activity_row(room_id, index, activity)
        if row != old:
            changed[key] = row
    assert len(copy.appended) == copy.length - known
    appended = []
    for count, value in enumerate(copy.appended):
        _pause(count)
        appended.append(_plain(value))
    if not all(isinstance(a, dict) for a in appended):
        return None
    for index, activity in enumerate(appended, known):
        key = store.activity_id(activity)
        ids.append(key)
        if key and key not in rows and key not in changed:
            changed[key] = store.activity_row(room_id, index, activity)
    rows.update(changed)
    return store.ActivityChanges([], list(changed.values()))
