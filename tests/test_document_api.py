"""Named versions, restore, the edit history and the activity overview over HTTP."""

from __future__ import annotations

import asyncio

import pycrdt
import pytest

from tests.support import ServerProcess, World
from tests.yclient import add_activity, yclient

pytestmark = pytest.mark.anyio


async def test_versions_list_read_and_restore(
    server: ServerProcess, world: World
) -> None:
    """A named version can be listed and read; restoring it is a new edit live clients follow."""
    ana, lars = world.members[:2]
    base = f"/api/rooms/{world.room_id}/documents/agreement"
    async with yclient(
        server, world.room_id, "agreement", await ana.token(world.room_id)
    ) as a:
        await a.edit(add_activity("a1", title="Joint lecture"))
        await a.edit(
            lambda d: d.get("meta", type=pycrdt.Map).update({"signed_on": "2026-03-01"})
        )
        await asyncio.sleep(0.05)
        r = await ana.http.post(
            f"{base}/versions", json={"name": "as signed on 2026-03-01"}
        )
        assert r.status_code == 201, r.text
        version = r.json()
        assert version["created_by"]["id"] == ana.id
        await a.edit(add_activity("a2", title="Added later"))
        await a.edit(
            lambda d: d.get("activities", type=pycrdt.Array)[0].update(
                {"title": "Renamed"}
            )
        )
        listed = (await lars.http.get(f"{base}/versions")).json()["versions"]
        assert [v["name"] for v in listed] == ["as signed on 2026-03-01"]
        read = (await lars.http.get(f"{base}/versions/{version['id']}")).json()
        assert read["content"]["activities"] == [
            {"id": "a1", "status": "planned", "title": "Joint lecture"}
        ]
        assert read["content"]["meta"] == {"signed_on": "2026-03-01"}
        async with yclient(
            server, world.room_id, "agreement", await lars.token(world.room_id)
        ) as b:
            r = await lars.http.post(f"{base}/versions/{version['id']}/restore")
            assert r.status_code == 200, r.text
            for client in (a, b):
                await client.wait_for(
                    lambda c=client: (
                        [x.get("title") for x in c.activities()] == ["Joint lecture"]
                    )
                )
    edits = (await ana.http.get(f"{base}/edits")).json()["edits"]
    kinds = [e["kind"] for e in edits]
    assert "version_restored" in kinds and "version_created" in kinds


async def test_observer_cannot_create_or_restore_versions(
    server: ServerProcess, world: World
) -> None:
    """Observers read versions but cannot make or restore them."""
    observer = await world.add_member("Olga", world.institutions[0], role="observer")
    base = f"/api/rooms/{world.room_id}/documents/agreement"
    r = await observer.http.post(f"{base}/versions", json={"name": "mine"})
    assert r.status_code == 403
    assert (await observer.http.get(f"{base}/versions")).status_code == 200
    assert (await observer.http.post(f"{base}/versions/1/restore")).status_code == 403
    assert (
        await observer.http.get(
            f"/api/rooms/{world.room_id}/documents/Bad_Name/versions"
        )
    ).status_code == 404


async def test_activity_overview_matches_the_document(
    server: ServerProcess, world: World
) -> None:
    """After concurrent edits, GET activities lists what the document holds, in order."""
    ana, lars = world.members[:2]
    async with (
        yclient(
            server, world.room_id, "agreement", await ana.token(world.room_id)
        ) as a,
        yclient(
            server, world.room_id, "agreement", await lars.token(world.room_id)
        ) as b,
    ):
        await asyncio.gather(
            a.edit(
                add_activity(
                    "t1",
                    title="Kick-off",
                    owner=ana.id,
                    starts_on="2026-02-01",
                    ends_on="2026-02-02",
                    institutions=[world.institutions[0]],
                )
            ),
            b.edit(
                add_activity(
                    "t2",
                    title="Exchange",
                    owner=lars.id,
                    status="in_progress",
                    ends_on="2020-01-01",
                    people=[ana.id, lars.id],
                )
            ),
        )
        await a.wait_for(lambda: len(a.activities()) == 2)
        await b.wait_for(lambda: len(b.activities()) == 2)
        first = [x["id"] for x in a.activities()].index("t1")
        await a.edit(
            lambda d: d.get("activities", type=pycrdt.Array)[first].update(
                {"status": "done"}
            )
        )
        await b.wait_for(lambda: b.activities()[first].get("status") == "done")
        expected = b.activities()

    async def overview() -> list[dict]:  # type: ignore[type-arg]
        r = await ana.http.get(f"/api/rooms/{world.room_id}/activities")
        assert r.status_code == 200
        return r.json()["activities"]  # type: ignore[no-any-return]

    async with asyncio.timeout(10):
        while [x["id"] for x in await overview()] != [x["id"] for x in expected] or [
            x["status"] for x in await overview()
        ] != [x["status"] for x in expected]:
            await asyncio.sleep(0.05)
    rows = {x["id"]: x for x in await overview()}
    for activity in expected:
        row = rows[activity["id"]]
        assert row["title"] == activity["title"]
        assert row["status"] == activity["status"]
        assert row["owner"] == activity.get("owner")
    assert rows["t2"]["overdue"] is True  # ended in 2020 and not done
    # Ids stay integers, whatever number type the writing client used.
    assert rows["t2"]["people"] == [ana.id, lars.id]
    assert rows["t1"]["institutions"] == [world.institutions[0]]
    assert rows["t1"]["starts_on"] == "2026-02-01"
    # Removing an activity removes its row (the projection writes only changes).
    async with yclient(
        server, world.room_id, "agreement", await ana.token(world.room_id)
    ) as a:
        index = [x["id"] for x in a.activities()].index("t2")
        await a.edit(lambda d: d.get("activities", type=pycrdt.Array).pop(index))
    async with asyncio.timeout(10):
        while [x["id"] for x in await overview()] != ["t1"]:
            await asyncio.sleep(0.05)
    stranger = await world.add_user("Stranger", world.institutions[0])
    assert (
        await stranger.http.get(f"/api/rooms/{world.room_id}/activities")
    ).status_code == 403
