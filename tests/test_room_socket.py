"""The room socket over real sockets: presence, chat, resume, access."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import ServerProcess, World, join

pytestmark = pytest.mark.anyio


async def test_presence_join_and_leave_are_seen_by_others(
    server: ServerProcess, world: World
) -> None:
    """A member sees another arrive (with institution and country) and leave."""
    ana, lars = world.members[:2]
    async with await join(server, ana, world.room_id) as a:
        assert [p["user"]["id"] for p in a.welcome["presence"]] == [ana.id]
        async with await join(server, lars, world.room_id) as b:
            names = {p["user"]["id"] for p in b.welcome["presence"]}
            assert names == {ana.id, lars.id}
            joined = await a.recv_until(
                "presence.join",
                user={
                    "id": lars.id,
                    "name": lars.name,
                    "institution": b.welcome["user"]["institution"]["name"],
                    "country": "DK",
                },
            )
            assert joined["status"] == "active"
        left = await a.recv_until("presence.leave")
        assert left["user_id"] == lars.id


async def test_presence_is_per_user_across_tabs(
    server: ServerProcess, world: World
) -> None:
    """Two tabs of one user are one presence: leaving one tab is not a leave."""
    ana, lars = world.members[:2]
    async with await join(server, ana, world.room_id) as a:
        async with await join(server, lars, world.room_id) as tab1:
            await a.recv_until("presence.join")
            async with await join(server, lars, world.room_id) as tab2:
                snap = {p["user"]["id"]: p for p in tab2.welcome["presence"]}
                assert snap[lars.id]["connections"] == 2
            # tab2 closed; lars is still here. Prove no leave arrived by sending a
            # marker message after the close and reading up to it.
            await tab1.send({"type": "chat.send", "id": "marker", "text": "still here"})
            seen = []
            async with asyncio.timeout(10):
                while True:
                    frame = await a.recv()
                    seen.append(frame["type"])
                    if frame["type"] == "chat.message":
                        break
            assert "presence.leave" not in seen
        assert (await a.recv_until("presence.leave"))["user_id"] == lars.id


async def test_typing_and_away_states_are_broadcast(
    server: ServerProcess, world: World
) -> None:
    """Typing and away reach the others as presence updates."""
    ana, lars = world.members[:2]
    async with (
        await join(server, ana, world.room_id) as a,
        await join(server, lars, world.room_id) as b,
    ):
        await b.send({"type": "typing", "typing": True})
        update = await a.recv_until("presence.update", user_id=lars.id)
        assert update["typing"] is True
        await b.send({"type": "status", "status": "away"})
        update = await a.recv_until("presence.update", user_id=lars.id, status="away")
        assert update["typing"] is True
        await b.send({"type": "typing", "typing": False})
        update = await a.recv_until("presence.update", user_id=lars.id, typing=False)
        assert update["status"] == "away"


async def test_chat_in_order_for_everyone(server: ServerProcess, world: World) -> None:
    """Messages from two senders reach both members, acknowledged, in one order."""
    ana, lars = world.members[:2]
    async with (
        await join(server, ana, world.room_id) as a,
        await join(server, lars, world.room_id) as b,
    ):
        for i in range(10):
            await a.send({"type": "chat.send", "id": f"a{i}", "text": f"from ana {i}"})
            await b.send({"type": "chat.send", "id": f"b{i}", "text": f"from lars {i}"})
        got_a = await a.collect("chat.message", 20)
        got_b = await b.collect("chat.message", 20)
        assert [m["seq"] for m in got_a] == list(range(1, 21))
        assert [(m["seq"], m["id"], m["text"]) for m in got_a] == [
            (m["seq"], m["id"], m["text"]) for m in got_b
        ]
        # Each sender's own messages keep their order.
        assert [m["id"] for m in got_a if m["author"]["id"] == ana.id] == [
            f"a{i}" for i in range(10)
        ]


async def test_chat_ack_carries_sequence_and_duplicates_store_once(
    server: ServerProcess, world: World
) -> None:
    """Resending a client id is acknowledged with the first sequence and stored once."""
    ana = world.members[0]
    async with await join(server, ana, world.room_id) as a:
        await a.send({"type": "chat.send", "id": "same", "text": "once"})
        first = await a.recv_until("chat.ack")
        await a.send({"type": "chat.send", "id": "same", "text": "once"})
        second = await a.recv_until("chat.ack")
        assert first["seq"] == second["seq"]
        assert (first["duplicate"], second["duplicate"]) == (False, True)
    r = await ana.http.get(f"/api/rooms/{world.room_id}/messages")
    assert [m["id"] for m in r.json()["messages"]] == ["same"]


async def test_resume_delivers_exactly_the_missed_messages(
    server: ServerProcess, world: World
) -> None:
    """Disconnect, 50 messages are sent, reconnect with the last seq: exactly those 50, in order."""
    ana, lars = world.members[:2]
    async with await join(server, ana, world.room_id) as a:
        await a.send({"type": "chat.send", "id": "before", "text": "seen"})
        last_seen = (await a.recv_until("chat.message"))["seq"]
    async with await join(server, lars, world.room_id) as b:
        for i in range(50):
            await b.send({"type": "chat.send", "id": f"m{i}", "text": f"missed {i}"})
        await b.collect("chat.ack", 50)
        async with await join(
            server, ana, world.room_id, params={"after": last_seen}
        ) as a:
            replay = []
            while True:
                frame = await a.recv()
                if frame["type"] == "chat.resumed":
                    break
                if frame["type"] == "chat.message":
                    replay.append(frame)
            assert [m["id"] for m in replay] == [f"m{i}" for i in range(50)]
            assert [m["seq"] for m in replay] == list(
                range(last_seen + 1, last_seen + 51)
            )
            # Live traffic continues after the replay with nothing repeated.
            await b.send({"type": "chat.send", "id": "live", "text": "after resume"})
            live = await a.recv_until("chat.message")
            assert (live["id"], live["seq"]) == ("live", last_seen + 51)


async def test_resume_during_live_traffic_has_no_gap_or_duplicate(
    server: ServerProcess, world: World
) -> None:
    """A client resuming while others keep sending sees every sequence exactly once."""
    ana, lars = world.members[:2]
    async with await join(server, lars, world.room_id) as b:

        async def keep_sending() -> None:
            for i in range(200):
                await b.send({"type": "chat.send", "id": f"s{i}", "text": f"busy {i}"})
                if i % 20 == 0:
                    await asyncio.sleep(0.005)

        sender = asyncio.create_task(keep_sending())
        await asyncio.sleep(0.02)
        async with await join(server, ana, world.room_id, params={"after": 0}) as a:
            seqs = []
            async with asyncio.timeout(20):
                while len(seqs) < 200:
                    frame = await a.recv()
                    if frame["type"] == "chat.message":
                        seqs.append(frame["seq"])
            await sender
            assert seqs == list(range(1, 201))


async def test_edit_and_delete_own_messages_only(
    server: ServerProcess, world: World
) -> None:
    """Authors edit and delete their messages; others are refused; resume replays the change."""
    ana, lars = world.members[:2]
    async with (
        await join(server, ana, world.room_id) as a,
        await join(server, lars, world.room_id) as b,
    ):
        await a.send({"type": "chat.send", "id": "e1", "text": "first draft"})
        seq = (await a.recv_until("chat.ack"))["seq"]
        await b.send({"type": "chat.edit", "id": "x1", "seq": seq, "text": "hijack"})
        refused = await b.recv_until("error", id="x1")
        assert refused["code"] == "forbidden"
        await a.send(
            {"type": "chat.edit", "id": "x2", "seq": seq, "text": "final text"}
        )
        edited = await b.recv_until("chat.edited", seq=seq)
        assert edited["text"] == "final text"
        edit_seq = edited["edit_seq"]
    async with await join(server, ana, world.room_id) as a:
        await a.send({"type": "chat.delete", "seq": seq})
        await a.recv_until("chat.deleted", seq=seq)
    # Lars reconnects having seen the message and the edit: the deletion is replayed.
    async with await join(
        server, lars, world.room_id, params={"after": seq, "edits_after": edit_seq}
    ) as b:
        deleted = await b.recv_until("chat.deleted", seq=seq)
        assert deleted["text"] == ""
        await b.recv_until("chat.resumed")
    r = await ana.http.get(f"/api/rooms/{world.room_id}/messages")
    assert r.json()["messages"][0]["deleted"] is True


async def test_history_pages_back(server: ServerProcess, world: World) -> None:
    """GET messages pages backwards with before= and ends with has_more false."""
    ana = world.members[0]
    async with await join(server, ana, world.room_id) as a:
        for i in range(25):
            await a.send({"type": "chat.send", "id": f"h{i}", "text": f"h {i}"})
        await a.collect("chat.ack", 25)
    page = (await ana.http.get(f"/api/rooms/{world.room_id}/messages?limit=10")).json()
    assert [m["seq"] for m in page["messages"]] == list(range(16, 26))
    assert page["has_more"] is True
    seqs = [m["seq"] for m in page["messages"]]
    while page["has_more"]:
        page = (
            await ana.http.get(
                f"/api/rooms/{world.room_id}/messages?limit=10&before={seqs[0]}"
            )
        ).json()
        seqs = [m["seq"] for m in page["messages"]] + seqs
    assert seqs == list(range(1, 26))
    bad = await ana.http.get(f"/api/rooms/{world.room_id}/messages?limit=1000")
    assert bad.status_code == 422
