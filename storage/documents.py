"""CRDT document storage: an append-only update log per document, a snapshot that
compaction folds the log into, named versions, and the activity projection.

Only this module knows the tables; callers pass and get bytes (Yjs updates).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.database import Database
from storage.models import (
    ActivityRow,
    Document,
    DocumentSnapshot,
    DocumentUpdate,
    DocumentVersion,
    User,
    utcnow,
)

Sessions = async_sessionmaker[AsyncSession]


@dataclass(frozen=True, slots=True)
class StoredDocument:
    """Everything needed to rebuild a document: snapshot first, then the updates."""

    document_id: int
    snapshot: bytes | None
    updates: list[bytes]
    last_update_id: int

    @property
    def stored_bytes(self) -> int:
        return len(self.snapshot or b"") + sum(len(u) for u in self.updates)


class TooManyDocuments(Exception):
    """The room already has as many documents as it may."""


async def document_id(
    sessions: Sessions, room_id: int, name: str, *, max_per_room: int | None = None
) -> int:
    """The id of a room's document, created on first use (up to ``max_per_room``).

    Raises:
        TooManyDocuments: creating it would pass ``max_per_room``.
    """
    async with sessions() as session:
        found = (
            await session.execute(
                select(Document.id).where(
                    Document.room_id == room_id, Document.name == name
                )
            )
        ).scalar_one_or_none()
        if found is not None:
            return int(found)
    try:
        async with sessions.begin() as session:
            if max_per_room is not None:
                count = (
                    await session.execute(
                        select(func.count()).where(Document.room_id == room_id)
                    )
                ).scalar_one()
                if count >= max_per_room:
                    raise TooManyDocuments
            doc = Document(room_id=room_id, name=name)
            session.add(doc)
            await session.flush()
            return doc.id
    except IntegrityError:  # created by another connection or process meanwhile
        async with sessions() as session:
            return int(
                (
                    await session.execute(
                        select(Document.id).where(
                            Document.room_id == room_id, Document.name == name
                        )
                    )
                ).scalar_one()
            )


async def _snapshot_and_log(
    session: AsyncSession, doc_id: int, *, for_update: bool = False
) -> tuple[DocumentSnapshot | None, list[Any]]:
    """The snapshot (if any) and the logged updates after it, in log order."""
    snap = await session.get(DocumentSnapshot, doc_id, with_for_update=for_update)
    upto = snap.upto_update_id if snap else 0
    rows = (
        await session.execute(
            select(DocumentUpdate.id, DocumentUpdate.data)
            .where(DocumentUpdate.document_id == doc_id, DocumentUpdate.id > upto)
            .order_by(DocumentUpdate.id)
        )
    ).all()
    return snap, list(rows)


async def load_document(sessions: Sessions, doc_id: int) -> StoredDocument:
    """Read the snapshot and every update after it, in log order."""
    async with sessions() as session:
        snap, rows = await _snapshot_and_log(session, doc_id)
    upto = snap.upto_update_id if snap else 0
    return StoredDocument(
        document_id=doc_id,
        snapshot=snap.state if snap else None,
        updates=[bytes(r.data) for r in rows],
        last_update_id=rows[-1].id if rows else upto,
    )


_INSERT_UPDATES = insert(DocumentUpdate)


async def append_updates(
    db: Database, doc_id: int, items: Sequence[tuple[bytes, int | None]]
) -> None:
    """Append ``(update, user_id)`` pairs in one transaction (group commit)."""
    now = utcnow()
    rows = [
        {"document_id": doc_id, "data": data, "user_id": user, "created_at": now}
        for data, user in items
    ]
    await db.transact(lambda conn: conn.execute(_INSERT_UPDATES, rows))


async def compact_document(
    sessions: Sessions, doc_id: int, merge: Callable[[Sequence[bytes]], bytes]
) -> tuple[int, int]:
    """Fold every logged update into the snapshot; returns the rows folded and the
    snapshot's size in bytes.

    ``merge`` combines updates into one (Yjs updates commute, so the order only
    matters for readability). Rows appended meanwhile stay in the log.
    """
    async with sessions.begin() as session:
        snap, rows = await _snapshot_and_log(session, doc_id, for_update=True)
        if not rows:
            return 0, len(snap.state) if snap else 0
        parts = ([snap.state] if snap else []) + [bytes(r.data) for r in rows]
        # Merging a long log is CPU work: off the event loop.
        state = await anyio.to_thread.run_sync(merge, parts)
        last = rows[-1].id
        if snap is None:
            session.add(
                DocumentSnapshot(document_id=doc_id, state=state, upto_update_id=last)
            )
        else:
            snap.state = state
            snap.upto_update_id = last
            snap.updated_at = utcnow()
        # The last folded row stays (loading skips it: it is not after the
        # snapshot). On SQLite a new row's id is the table's highest id + 1:
        # deleting the highest rows would hand their ids out again, to updates
        # that loading would then skip as folded. The next compaction deletes it.
        await session.execute(
            delete(DocumentUpdate).where(
                DocumentUpdate.document_id == doc_id, DocumentUpdate.id < last
            )
        )
        return len(rows), len(state)


# -- named versions ---------------------------------------------------------------


def _version_json(v: DocumentVersion, author: str | None) -> dict[str, Any]:
    return {
        "id": v.id,
        "name": v.name,
        "created_by": {"id": v.created_by, "name": author},
        "created_at": v.created_at.isoformat().replace("+00:00", "Z"),
        "bytes": len(v.state),
    }


async def create_version(
    sessions: Sessions, doc_id: int, name: str, state: bytes, user_id: int
) -> dict[str, Any]:
    async with sessions.begin() as session:
        version = DocumentVersion(
            document_id=doc_id, name=name, state=state, created_by=user_id
        )
        session.add(version)
        await session.flush()
        author = await session.get(User, user_id)
        return _version_json(version, author.name if author else None)


async def list_versions(sessions: Sessions, doc_id: int) -> list[dict[str, Any]]:
    async with sessions() as session:
        rows = await session.execute(
            select(DocumentVersion, User.name)
            .outerjoin(User, User.id == DocumentVersion.created_by)
            .where(DocumentVersion.document_id == doc_id)
            .order_by(DocumentVersion.id)
        )
        return [_version_json(v, name) for v, name in rows.tuples()]


async def version_state(
    sessions: Sessions, doc_id: int, version_id: int
) -> bytes | None:
    async with sessions() as session:
        v = await session.get(DocumentVersion, version_id)
        if v is None or v.document_id != doc_id:
            return None
        return bytes(v.state)


# -- activity projection ----------------------------------------------------------


def _id(value: Any) -> int | str | None:
    """A user or institution id as written by any client: JavaScript numbers arrive
    as floats through pycrdt (3.0), so whole numbers become ints again."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value:
        return value[:64]
    return None


def _ids(values: Any) -> list[int | str]:
    if not isinstance(values, list):
        return []
    return [i for i in map(_id, values) if i is not None]


def _date(value: Any) -> dt.date | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def activity_id(activity: dict[str, Any]) -> str:
    """The id a row of this activity has ("" when it has none usable)."""
    return str(activity.get("id") or "")[:64]


def activity_row(room_id: int, position: int, a: dict[str, Any]) -> dict[str, Any]:
    """The row of one activity (with a usable id) at ``position`` in the list."""
    owner = _id(a.get("owner"))
    return {
        "room_id": room_id,
        "activity_id": activity_id(a),
        "position": position,
        "title": str(a.get("title") or ""),
        "description": str(a.get("description") or ""),
        "status": str(a.get("status") or "planned")[:16],
        "owner_id": owner if isinstance(owner, int) else None,
        "people": _ids(a.get("people")),
        "institutions": _ids(a.get("institutions")),
        "starts_on": _date(a.get("starts_on")),
        "ends_on": _date(a.get("ends_on")),
        "outcomes": str(a.get("outcomes") or ""),
    }


def activity_rows(
    room_id: int, activities: Sequence[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The rows for a document's activity list, by activity id, in list order."""
    rows: dict[str, dict[str, Any]] = {}
    for position, a in enumerate(activities):
        key = activity_id(a)
        if not key or key in rows:
            continue  # an entry without a usable id cannot be addressed; skip it
        rows[key] = activity_row(room_id, position, a)
    return rows


@dataclass(frozen=True, slots=True)
class ActivityChanges:
    """What to write so a room's activity rows equal a new projection."""

    gone: list[str]  # activity ids no longer in the list
    changed: list[dict[str, Any]]  # new or different rows
    replace: bool = False  # the rows as last written are unknown: rewrite them all

    def __bool__(self) -> bool:
        return self.replace or bool(self.gone or self.changed)


def activity_changes(
    rows: dict[str, dict[str, Any]], previous: dict[str, dict[str, Any]] | None
) -> ActivityChanges:
    """The difference between ``rows`` and the rows as last written (``None``:
    unknown, so everything is written)."""
    if previous is None:
        return ActivityChanges([], list(rows.values()), replace=True)
    return ActivityChanges(
        [i for i in previous if i not in rows],
        [r for i, r in rows.items() if previous.get(i) != r],
    )


async def write_activity_changes(
    db: Database, room_id: int, changes: ActivityChanges
) -> None:
    """Apply ``changes`` to the room's activity rows in one transaction."""
    if not changes:
        return
    now = utcnow()
    changed = changes.changed

    def write(conn: Connection) -> None:
        if changes.replace:
            conn.execute(delete(ActivityRow).where(ActivityRow.room_id == room_id))
        else:
            dropped = changes.gone + [r["activity_id"] for r in changed]
            for start in range(0, len(dropped), 500):
                conn.execute(
                    delete(ActivityRow).where(
                        ActivityRow.room_id == room_id,
                        ActivityRow.activity_id.in_(dropped[start : start + 500]),
                    )
                )
        if changed:
            conn.execute(
                insert(ActivityRow), [{**r, "updated_at": now} for r in changed]
            )

    await db.transact(write)


async def list_activities(sessions: Sessions, room_id: int) -> list[dict[str, Any]]:
    async with sessions() as session:
        rows = await session.execute(
            select(ActivityRow)
            .where(ActivityRow.room_id == room_id)
            .order_by(ActivityRow.position)
        )
        today = dt.date.today()
        return [
            {
                "id": r.activity_id,
                "position": r.position,
                "title": r.title,
                "description": r.description,
                "status": r.status,
                "owner": r.owner_id,
                "people": r.people,
                "institutions": r.institutions,
                "starts_on": r.starts_on.isoformat() if r.starts_on else None,
                "ends_on": r.ends_on.isoformat() if r.ends_on else None,
                "outcomes": r.outcomes,
                "overdue": bool(
                    r.ends_on
                    and r.ends_on < today
                    and r.status in ("planned", "in_progress")
                ),
                "updated_at": r.updated_at.isoformat().replace("+00:00", "Z"),
            }
            for r in rows.scalars()
        ]
