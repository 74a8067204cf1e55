"""An agreement's activities as SQL rows: the pure shaping of what a document's
``activities`` list holds into rows, and the difference from the rows last written.

No database here (nor SQLAlchemy): the document worker imports this and little else.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


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
    # (activity id, new position) of rows that only moved (an insert or a removal
    # before them): a cheap update of one column.
    moved: list[tuple[str, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.replace or bool(self.gone or self.changed or self.moved)


def row_change(
    row: dict[str, Any], old: dict[str, Any] | None
) -> Literal["same", "moved", "changed"]:
    """How a row differs from the row last written for its activity."""
    if old == row:
        return "same"
    if (
        old is not None
        and old["position"] != row["position"]
        and {**old, "position": row["position"]} == row
    ):
        return "moved"
    return "changed"


def activity_changes(
    rows: dict[str, dict[str, Any]], previous: dict[str, dict[str, Any]] | None
) -> ActivityChanges:
    """The difference between ``rows`` and the rows as last written (``None``:
    unknown, so everything is written)."""
    if previous is None:
        return ActivityChanges([], list(rows.values()), replace=True)
    changes = ActivityChanges([i for i in previous if i not in rows], [])
    for key, row in rows.items():
        how = row_change(row, previous.get(key))
        if how == "moved":
            changes.moved.append((key, row["position"]))
        elif how == "changed":
            changes.changed.append(row)
    return changes
