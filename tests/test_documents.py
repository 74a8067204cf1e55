"""Live documents over the y-websocket protocol: sync, persistence, access, bad input."""

from __future__ import annotations

import asyncio
import contextlib

import pycrdt
import pytest

from tests.support import ServerProcess, World
from tests.yclient import YClient, add_activity, yclient

pytestmark = pytest.mark.anyio


async def test_two_clients_converge(server: ServerProcess, world: World) -> None:
    """Edits from two clients reach each other and both documents end equal."""
    ana, lars = world.members[:2]
    async with (
        yclient(
            server, world.room_id, "agreement", await ana.token(world.room_id)
        ) as a,
        yclient(
            server, world.room_id, "agreement", await lars.token(world.room_id)
        ) as b,
    ):
        await a.edit(add_activity("a1", title="Joint lecture"))
        await b.edit(add_activity("b1", title="Student exchange"))
        await a.wait_for(lambda: len(a.activities()) == 2)
        await b.wait_for(lambda: len(b.activities()) == 2)
        assert a.activities() == b.activities()


async def test_late_joiner_gets_the_stored_state(
    server: ServerProcess, world: World
) -> None:
    """A client joining later receives everything in its sync step 2."""
    ana, lars = world.members[:2]
    async with yclient(
        server, world.room_id, "notes", await ana.token(world.room_id)
    ) as a:
        await a.edit(lambda d: d.get("text", type=pycrdt.Text).insert(0, "hello world"))
        await a.edit(lambda d: d.get("text", type=pycrdt.Text).insert(5, ","))
        async with yclient(
            server, world.room_id, "notes", await lars.token(world.room_id)
        ) as b:
            await b.wait_for(
                lambda: str(b.doc.get("text", type=pycrdt.Text)) == "hello, world"
            )


async def test_every_fresh_joiner_gets_the_document_as_it_is_now(
    server: ServerProcess, world: World
) -> None:
    """The server keeps what it sends a client with an empty document for the next
    one, and follows the document's changes (one update with what changed since,
    then the kept step 2). After an insert, and after a deletion (which leaves the
    state vector as it was), the next fresh client holds the document as it is
    once its step 2 has come."""
    ana, lars = world.members[:2]
    text = "hello world"

    def read(doc: pycrdt.Doc) -> str:
        return str(doc.get("text", type=pycrdt.Text))

    async def fresh_joiner_reads() -> str:
        async with yclient(
            server, world.room_id, "fresh", await lars.token(world.room_id)
        ) as b:
            return read(b.doc)  # as of its step 2

    async with (
        yclient(server, world.room_id, "fresh", await ana.token(world.room_id)) as a,
        yclient(server, world.room_id, "fresh", await ana.token(world.room_id)) as w,
    ):
        changes = [
            lambda d: d.get("text", type=pycrdt.Text).insert(0, text),
            lambda d: d.get("text", type=pycrdt.Text).insert(5, ","),
            lambda d: d.get("text", type=pycrdt.Text).__delitem__(slice(0, 7)),
        ]
        for change in changes:
            state_vector = a.doc.get_state()
            await a.edit(change)
            # The watcher has it live, so the server has applied it before the join.
            await w.wait_for(lambda: read(w.doc) == read(a.doc))
            assert await fresh_joiner_reads() == read(a.doc)
            assert await fresh_joiner_reads() == read(a.doc)
        assert read(a.doc) == "world"
        assert a.doc.get_state() == state_vector  # the deletion made no new items


async def test_handshake_race_edits_arrive_exactly_once(
    server: ServerProcess, world: World
) -> None:
    """Edits made while clients join reach each of them once: in its sync step 2 or
    live, never both and never neither."""
    ana, lars = world.members[:2]
    async with yclient(
        server, world.room_id, "race", await ana.token(world.room_id)
    ) as a:
        joined = asyncio.Event()

        async def keep_editing() -> int:
            # Edit until every joiner is in, then 50 more.
            n, extra = 0, 50
            while extra:
                await a.edit(lambda d, n=n: d.get("log", type=pycrdt.Array).append(n))
                n += 1
                if joined.is_set():
                    extra -= 1
                if n % 5 == 0:
                    await asyncio.sleep(0.001)
            return n

        writer = asyncio.create_task(keep_editing())
        async with contextlib.AsyncExitStack() as stack:
            joiners = []
            for _ in range(3):
                await asyncio.sleep(0.02)
                joiners.append(
                    await stack.enter_async_context(
                        yclient(
                            server,
                            world.room_id,
                            "race",
                            await lars.token(world.room_id),
                        )
                    )
                )
            assert not writer.done(), "the joins must happen during the edits"
            joined.set()
            total = await writer
            for b in joiners:
                await b.wait_for(
                    lambda b=b: len(b.doc.get("log", type=pycrdt.Array)) == total
                )
                assert b.duplicates == 0, f"{b.duplicates} updates arrived twice"
                assert sorted(b.doc.get("log", type=pycrdt.Array).to_py()) == list(
                    range(total)
                )


async def test_concurrent_edits_reach_the_others_but_not_their_sender(
    server: ServerProcess, world: World
) -> None:
    """Bursts from two writers (broadcast merged, a batch per frame) reach the other
    writer and a reader completely, and no writer hears its own edits back."""
    ana, lars = world.members[:2]
    token_a = await ana.token(world.room_id)
    token_b = await lars.token(world.room_id)
    async with (
        yclient(server, world.room_id, "burst", token_a) as a,
        yclient(server, world.room_id, "burst", token_b) as b,
        yclient(server, world.room_id, "burst", token_b) as reader,
    ):

        async def burst(client: YClient, tag: str) -> None:
            for n in range(100):
                await client.edit(
                    lambda d, n=n: d.get("log", type=pycrdt.Array).append(f"{tag}{n}")
                )

        await asyncio.gather(burst(a, "from-a-"), burst(b, "from-b-"))
        for client in (a, b, reader):
            await client.wait_for(
                lambda c=client: len(c.doc.get("log", type=pycrdt.Array)) == 200
            )
        # Yjs keeps strings as UTF-8 in updates: a writer's own tag never comes back.
        assert not any(b"from-a-" in u for u in a.updates_received)
        assert not any(b"from-b-" in u for u in b.updates_received)
        assert len(reader.updates_received) <= 200
        assert (
            a.doc.get("log", type=pycrdt.Array).to_py()
            == reader.doc.get("log", type=pycrdt.Array).to_py()
        )


async def test_awareness_is_relayed_echoed_and_removed_on_disconnect(
    server: ServerProcess, world: World
) -> None:
    """A cursor reaches the others and its sender; when the sender leaves it is removed."""
    ana, lars = world.members[:2]
    async with yclient(
        server, world.room_id, "agreement", await ana.token(world.room_id)
    ) as a:
        async with yclient(
            server, world.room_id, "agreement", await lars.token(world.room_id)
        ) as b:
            await b.set_awareness(1, '{"user":{"name":"Lars"},"cursor":3}')
            await a.wait_for(lambda: b.doc.client_id in a.awareness)
            assert (
                a.awareness[b.doc.client_id].state
                == '{"user":{"name":"Lars"},"cursor":3}'
            )
            # Echoed to the sender: stock clients need traffic to stay connected.
            await b.wait_for(lambda: b.doc.client_id in b.awareness)
            # Lars cannot change or remove Ana's cursor.
            await a.set_awareness(1, '{"user":{"name":"Ana"}}')
            await b.wait_for(lambda: a.doc.client_id in b.awareness)
            from rooms.ysync import AwarenessEntry, create_awareness

            await b.ws.send(
                create_awareness([AwarenessEntry(a.doc.client_id, 99, "null")])
            )
            await b.set_awareness(2, '{"user":{"name":"Lars"},"cursor":4}')
            await a.wait_for(lambda: '"cursor":4' in a.awareness[b.doc.client_id].state)
            assert a.awareness[a.doc.client_id].state == '{"user":{"name":"Ana"}}'
        await a.wait_for(lambda: a.awareness[b.doc.client_id].state == "null")
        assert a.awareness[b.doc.client_id].clock == 3


async def test_observer_reads_but_cannot_edit(
    server: ServerProcess, world: World
) -> None:
    """An observer receives the document; its updates are refused with [2,0,…] and not applied."""
    ana = world.members[0]
    observer = await world.add_member(
        "Olga Observer", world.institutions[0], role="observer"
    )
    async with yclient(
        server, world.room_id, "agreement", await ana.token(world.room_id)
    ) as a:
        await a.edit(add_activity("x1", title="Visible to all"))
        async with yclient(
            server, world.room_id, "agreement", await observer.token(world.room_id)
        ) as o:
            await o.wait_for(lambda: len(o.activities()) == 1)
            await o.edit(add_activity("o1", title="Not allowed"))
            await o.wait_for(lambda: bool(o.denied))
            assert "read-only" in o.denied[0]
            await a.edit(add_activity("x2", title="After"))
            await o.wait_for(lambda: len(o.activities()) == 3)  # its own local one + 2
            assert [x["id"] for x in a.activities()] == ["x1", "x2"]


async def test_non_member_and_bad_name_are_refused(
    server: ServerProcess, world: World
) -> None:
    """A non-member gets 4403; a document name outside [a-z0-9-]{1,64} gets 4404."""
    stranger = await world.add_user("Stranger", world.institutions[0])
    other = await world.admin.post(
        "/api/partnerships",
        json={"title": "Elsewhere", "institution_ids": world.institutions},
    )
    ana = world.members[0]
    async with yclient(
        server, world.room_id, "Bad_Name", await ana.token(world.room_id), sync=False
    ) as c:
        assert await c.close_code() == 4404
    # The stranger is not a member: no token can be had, and a member's token for
    # another room does not open this one.
    r = await stranger.http.post(f"/api/rooms/{world.room_id}/tokens")
    assert r.status_code == 403
    async with yclient(
        server,
        other.json()["room_id"],
        "agreement",
        await ana.token(world.room_id),
        sync=False,
    ) as c:
        assert await c.close_code() == 4403


async def test_revoked_member_is_disconnected(
    server: ServerProcess, world: World
) -> None:
    """Removing a member ends their open document socket with 4403."""
    leaving = await world.add_member("Leaving", world.institutions[1])
    async with yclient(
        server, world.room_id, "agreement", await leaving.token(world.room_id)
    ) as c:
        r = await world.admin.delete(
            f"/api/partnerships/{world.partnership_id}/members/{leaving.id}"
        )
        assert r.status_code == 200
        assert await c.close_code() == 4403
