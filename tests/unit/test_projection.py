"""The activity projector: rows kept up to date from the new updates only."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pycrdt
import pytest

from rooms import crdt
from rooms.projection import MAX_EDITED_READS, ProjectionFailed, Projector
from storage.activity_rows import ActivityChanges, activity_rows

ROOM = 7


class Table:
    """The activity rows as ``write_activity_changes`` would leave them."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def write(self, changes: ActivityChanges) -> None:
        if changes.replace:
            self.rows = {}
        for key in changes.gone:
            self.rows.pop(key, None)
        for row in changes.changed:
            self.rows[row["activity_id"]] = row
        for key, position in changes.moved:
            self.rows[key] = {**self.rows[key], "position": position}


def expected(doc: pycrdt.Doc) -> dict[str, dict[str, Any]]:
    return activity_rows(ROOM, crdt.activities(crdt.copy(doc)))


def random_edit(
    rng: random.Random, activities: pycrdt.Array[Any], n: int, rare: float
) -> None:
    size = len(activities)
    kind = rng.choice(["append"] * 2 + ["edit"])
    if rng.random() < rare:  # what only a whole read handles, and odd entries
        kind = rng.choice(["insert", "delete", "rename", "plain", "dup"])
    if kind == "append" or size == 0:
        activities.append(pycrdt.Map({"id": f"a{n}", "title": f"t{n}"}))
    elif kind == "edit":
        activity = activities[rng.randrange(size)]
        if isinstance(activity, pycrdt.Map):
            field = rng.choice(["title", "status", "outcomes", "people"])
            if field != "people":
                activity[field] = f"v{n}"
            elif "people" in activity:
                activity["people"].append(n)  # a change deeper inside
            else:
                activity["people"] = pycrdt.Array([n])
    elif kind == "insert":
        activities.insert(rng.randrange(size), pycrdt.Map({"id": f"m{n}"}))
    elif kind == "delete":
        del activities[rng.randrange(size)]
    elif kind == "rename":
        activity = activities[rng.randrange(size)]
        if isinstance(activity, pycrdt.Map):
            activity["id"] = f"r{n}"
    elif kind == "plain":
        # A plain object is an activity too; a string (odd seeds) is not.
        activities.append(rng.choice(["not an activity", {"id": f"p{n}"}]))
    else:
        activities.append(pycrdt.Map({"id": "a0", "title": "a duplicate id"}))


@pytest.mark.parametrize("seed", range(12))
def test_incremental_rows_equal_a_whole_read(seed: int) -> None:
    """Whatever the edits (appends, edits in place, inserts and deletes in the middle,
    renamed ids, entries that are not maps, duplicate ids), the rows written from
    the updates alone equal the rows of a whole read."""
    rng = random.Random(seed)
    client = pycrdt.Doc()
    activities = client.get("activities", type=pycrdt.Array)
    projector = Projector()
    table = Table()

    async def run() -> None:
        n = 0
        for _ in range(60):
            updates = []
            for _ in range(rng.randrange(1, 6)):
                before = client.get_state()
                random_edit(rng, activities, n, rare=0.03 if seed % 2 else 0.1)
                n += 1
                updates.append(client.get_update(before))
            table.write(await projector.changes("doc", ROOM, updates))
            assert table.rows == expected(client)

    try:
        asyncio.run(run())
    finally:
        projector.close()


def test_appends_write_only_the_new_rows() -> None:
    """Activities appended at the end (and one edited in place) are the only rows
    written after the first projection."""
    client = pycrdt.Doc()
    activities = client.get("activities", type=pycrdt.Array)
    for n in range(50):
        activities.append(pycrdt.Map({"id": f"a{n}", "title": "x"}))
    projector = Projector()

    async def run() -> None:
        first = await projector.changes("doc", ROOM, [client.get_update()])
        assert first.replace and len(first.changed) == 50
        before = client.get_state()
        activities.append(pycrdt.Map({"id": "new", "title": "y"}))
        activities[3]["title"] = "edited"
        later = await projector.changes("doc", ROOM, [client.get_update(before)])
        assert not later.replace and not later.gone
        assert sorted(r["activity_id"] for r in later.changed) == ["a3", "new"]
        assert {r["activity_id"]: r["position"] for r in later.changed} == {
            "a3": 3,
            "new": 50,
        }

    try:
        asyncio.run(run())
    finally:
        projector.close()


def test_an_insert_in_the_middle_moves_the_rows_after_it() -> None:
    """An activity inserted before others is one new row; the rows after it only
    change position (written as moves, not as whole rows)."""
    client = pycrdt.Doc()
    activities = client.get("activities", type=pycrdt.Array)
    for n in range(5):
        activities.append(pycrdt.Map({"id": f"a{n}", "title": "x"}))
    projector = Projector()
    table = Table()

    async def run() -> None:
        table.write(await projector.changes("doc", ROOM, [client.get_update()]))
        before = client.get_state()
        activities.insert(2, pycrdt.Map({"id": "new"}))
        changes = await projector.changes("doc", ROOM, [client.get_update(before)])
        assert [r["activity_id"] for r in changes.changed] == ["new"]
        assert changes.moved == [("a2", 3), ("a3", 4), ("a4", 5)]
        table.write(changes)
        assert table.rows == expected(client)

    try:
        asyncio.run(run())
    finally:
        projector.close()


def test_many_deep_edits_read_the_whole_list_once() -> None:
    """More activities changed deep inside than MAX_EDITED_READS (each found by
    index otherwise) are read in one pass, with the same result."""
    client = pycrdt.Doc()
    activities = client.get("activities", type=pycrdt.Array)
    count = MAX_EDITED_READS + 10
    for n in range(count):
        activities.append(pycrdt.Map({"id": f"a{n}", "people": pycrdt.Array([])}))
    projector = Projector()
    table = Table()

    async def run() -> None:
        table.write(await projector.changes("doc", ROOM, [client.get_update()]))
        before = client.get_state()
        with client.transaction():
            for n in range(count):
                activities[n]["people"].append(n)
        table.write(await projector.changes("doc", ROOM, [client.get_update(before)]))
        assert table.rows == expected(client)
        assert table.rows["a7"]["people"] == [7]

    try:
        asyncio.run(run())
    finally:
        projector.close()


def test_a_bad_update_drops_the_copy() -> None:
    """An update the copy cannot take fails the projection and drops the copy; the
    next one starts again from the whole state."""
    client = pycrdt.Doc()
    client.get("activities", type=pycrdt.Array).append(pycrdt.Map({"id": "a"}))
    projector = Projector()

    async def run() -> None:
        await projector.changes("doc", ROOM, [client.get_update()])
        with pytest.raises(ProjectionFailed) as failed:
            await projector.changes("doc", ROOM, [b"\xff\xff\xff"])
        assert failed.value.copy_lost
        again = await projector.changes("doc", ROOM, [client.get_update()])
        assert again.replace and [r["activity_id"] for r in again.changed] == ["a"]

    try:
        asyncio.run(run())
    finally:
        projector.close()
