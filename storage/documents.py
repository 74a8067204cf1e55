"""CRDT document storage: an append-only update log per document, a snapshot that
compaction folds the log into, named versions, and the activity projection.

Only this module knows the tables; callers pass and get bytes (Yjs updates).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.activity_rows import ActivityChanges
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


def _read_stored(conn: Connection, doc_id: int) -> tuple[StoredDocument, int]:
    """The snapshot and the logged updates after it, in log order; and the update
    id the snapshot goes up to (0: no snapshot)."""
    snap = conn.execute(
        select(DocumentSnapshot.state, DocumentSnapshot.upto_update_id).where(
            DocumentSnapshot.document_id == doc_id
        )
    ).first()
    upto = snap.upto_update_id if snap else 0
    rows = conn.execute(
        select(DocumentUpdate.id, DocumentUpdate.data)
        .where(DocumentUpdate.document_id == doc_id, DocumentUpdate.id > upto)
        .order_by(DocumentUpdate.id)
    ).all()
    stored = StoredDocument(
        document_id=doc_id,
        snapshot=bytes(snap.state) if snap else None,
        updates=[bytes(r.data) for r in rows],
        last_update_id=rows[-1].id if rows else upto,
    )
    return stored, upto


async def load_document(db: Database, doc_id: int) -> StoredDocument:
    """Read the snapshot and every update after it, in log order (off the loop)."""
    stored, _ = await db.read(lambda conn: _read_stored(conn, doc_id))
    return stored


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
    db: Database, doc_id: int, merge: Callable[[list[bytes]], Awaitable[bytes]]
) -> tuple[int, int] | None:
    """Fold every logged update into the snapshot; returns the rows folded and the
    snapshot's size in bytes, or None if nothing was folded.

    ``merge`` combines updates into one (Yjs updates commute, so the order only
    matters for readability), off the event loop: it is CPU work (the caller runs
    it in a thread or another process); if it raises, nothing is written. Rows appended meanwhile stay in the log. Reading and
    merging happen outside any write transaction (off the event loop); the write
    is short: the snapshot replaces the one that was read, only if it is still
    the one in place (else another compaction won, and nothing is written), and
    the folded rows are deleted.
    """

    stored, upto = await db.read(lambda conn: _read_stored(conn, doc_id))
    if not stored.updates:
        return None
    parts = ([stored.snapshot] if stored.snapshot is not None else []) + stored.updates
    had_snapshot, last = stored.snapshot is not None, stored.last_update_id
    state = await merge(parts)

    def write(conn: Connection) -> bool:
        if had_snapshot:
            replaced = conn.execute(
                update(DocumentSnapshot)
                .where(
                    DocumentSnapshot.document_id == doc_id,
                    DocumentSnapshot.upto_update_id == upto,
                )
                .values(state=state, upto_update_id=last, updated_at=utcnow())
            )
            if replaced.rowcount != 1:
                return False
        else:
            conn.execute(
                insert(DocumentSnapshot).values(
                    document_id=doc_id,
                    state=state,
                    upto_update_id=last,
                    updated_at=utcnow(),
                )
            )
        # The last folded row stays (loading skips it: it is not after the
        # snapshot). On SQLite a new row's id is the table's highest id + 1:
        # deleting the highest rows would hand their ids out again, to updates
        # that loading would then skip as folded. The next compaction deletes it.
        conn.execute(
            delete(DocumentUpdate).where(
                DocumentUpdate.document_id == doc_id, DocumentUpdate.id < last
            )
        )
        return True

    try:
        if not await db.transact(write):
            return None
    except IntegrityError:  # another process made the first snapshot meanwhile
        return None
    return len(stored.updates), len(state)


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


# Rows written per transaction when a projection changes many: on SQLite every
# transaction holds the one write lock, and document updates wait behind it.
WRITE_CHUNK_ROWS = 200
_MOVE_ROW = (
    update(ActivityRow)
    .where(
        ActivityRow.room_id == bindparam("r"),
        ActivityRow.activity_id == bindparam("a"),
    )
    .values(position=bindparam("p"))
)


# Every column of a row but ``updated_at``: what ``activity_row`` makes.
_ROW_NAMES = tuple(
    c.name for c in ActivityRow.__table__.columns if c.name != "updated_at"
)
_ID_AT = _ROW_NAMES.index("activity_id")
_STORED_ROWS = select(*(ActivityRow.__table__.c[name] for name in _ROW_NAMES)).where(
    ActivityRow.room_id == bindparam("r")
)
_DELETE_ROWS = delete(ActivityRow).where(
    ActivityRow.room_id == bindparam("r"),
    ActivityRow.activity_id.in_(bindparam("ids", expanding=True)),
)
DELETE_CHUNK_IDS = 500  # ids per DELETE (SQLite limits the parameters of a statement)


async def write_activity_changes(
    db: Database, room_id: int, changes: ActivityChanges
) -> None:
    """Apply ``changes`` to the room's activity rows: a full replacement in one
    transaction, changes in transactions of ``WRITE_CHUNK_ROWS`` rows (each row is
    replaced within one; readers may see some of the changes before the others)."""
    if not changes:
        return
    now = utcnow()
    if changes.replace:

        def replace(conn: Connection) -> None:
            # The rows as stored are read and only the differences written: a
            # replacement comes at every load of the document, when the rows are
            # usually right already, and rewriting 20,000 of them held the
            # storage thread (and the GIL) for half a second.
            stored = {
                row[_ID_AT]: tuple(row)
                for row in conn.execute(_STORED_ROWS, {"r": room_id})
            }
            wanted = {
                r["activity_id"]: tuple(r[name] for name in _ROW_NAMES)
                for r in changes.changed
            }
            stale = [key for key, row in stored.items() if wanted.get(key) != row]
            fresh = [
                r
                for r in changes.changed
                if stored.get(r["activity_id"]) != wanted[r["activity_id"]]
            ]
            for start in range(0, len(stale), DELETE_CHUNK_IDS):
                conn.execute(
                    _DELETE_ROWS,
                    {"r": room_id, "ids": stale[start : start + DELETE_CHUNK_IDS]},
                )
            if fresh:
                conn.execute(
                    insert(ActivityRow), [{**r, "updated_at": now} for r in fresh]
                )

        await db.transact(replace)
        return

    def write(
        gone: list[str], changed: list[dict[str, Any]]
    ) -> Callable[[Connection], None]:
        def work(conn: Connection) -> None:
            dropped = gone + [r["activity_id"] for r in changed]
            conn.execute(
                delete(ActivityRow).where(
                    ActivityRow.room_id == room_id,
                    ActivityRow.activity_id.in_(dropped),
                )
            )
            if changed:
                conn.execute(
                    insert(ActivityRow), [{**r, "updated_at": now} for r in changed]
                )

        return work

    def move(moved: list[tuple[str, int]]) -> Callable[[Connection], None]:
        def work(conn: Connection) -> None:
            conn.execute(
                _MOVE_ROW,
                [{"r": room_id, "a": key, "p": position} for key, position in moved],
            )

        return work

    step = WRITE_CHUNK_ROWS
    for start in range(0, len(changes.moved), step):
        await db.transact(move(changes.moved[start : start + step]))
    for start in range(0, len(changes.gone), step):
        await db.transact(write(changes.gone[start : start + step], []))
    for start in range(0, len(changes.changed), step):
        await db.transact(write([], changes.changed[start : start + step]))


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
