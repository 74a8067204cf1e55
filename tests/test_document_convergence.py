"""Property: any interleaving of random edits by several clients, with disconnects,
converges, and equals the state reloaded from storage after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pycrdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import dedicated_server
from tests.support import ServerProcess, World
from tests.yclient import YClient, yclient

CLIENTS = 3

op = st.one_of(
    st.tuples(
        st.just("text"),
        st.integers(0, CLIENTS - 1),
        st.integers(0, 50),
        st.text("abcxyz", min_size=1, max_size=4),
    ),
    st.tuples(
        st.just("delete"),
        st.integers(0, CLIENTS - 1),
        st.integers(0, 50),
        st.integers(1, 3),
    ),
    st.tuples(st.just("append"), st.integers(0, CLIENTS - 1), st.integers(0, 1000)),
    st.tuples(
        st.just("map"),
        st.integers(0, CLIENTS - 1),
        st.sampled_from("pqrs"),
        st.integers(0, 9),
    ),
    st.tuples(st.just("reconnect"), st.integers(0, CLIENTS - 1)),
)


@pytest.fixture(scope="module")
def conv_server(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with dedicated_server(
        backend,
        tmp_path_factory,
        {
            "DOC_UPDATES_PER_SECOND": "5000",
            "DOC_UPDATE_BURST": "5000",
            "DOC_COMPACT_AFTER_UPDATES": "20",
        },
    ) as proc:
        yield proc


def apply_op(doc: pycrdt.Doc, operation: tuple[Any, ...]) -> None:
    kind = operation[0]
    text = doc.get("text", type=pycrdt.Text)
    if kind == "text":
        text.insert(min(operation[2], len(text)), operation[3])
    elif kind == "delete" and len(text):
        start = min(operation[2], len(text) - 1)
        del text[start : min(len(text), start + operation[3])]
    elif kind == "append":
        doc.get("items", type=pycrdt.Array).append(operation[2])
    elif kind == "map":
        doc.get("fields", type=pycrdt.Map)[operation[2]] = operation[3]


def state(doc: pycrdt.Doc) -> tuple[str, list[Any], dict[str, Any]]:
    return (
        str(doc.get("text", type=pycrdt.Text)),
        doc.get("items", type=pycrdt.Array).to_py() or [],
        # Sorted: map key order differs between replicas and means nothing.
        dict(sorted((doc.get("fields", type=pycrdt.Map).to_py() or {}).items())),
    )


async def scenario(
    server: ServerProcess, world: World, name: str, ops: list[tuple[Any, ...]]
) -> tuple[Any, ...]:
    tokens = [await m.token(world.room_id) for m in world.members]
    async with contextlib.AsyncExitStack() as stack:
        clients: list[YClient] = [
            await stack.enter_async_context(
                yclient(server, world.room_id, name, tokens[i])
            )
            for i in range(CLIENTS)
        ]
        offline: dict[int, pycrdt.Doc] = {}
        for operation in ops:
            i = operation[1]
            if operation[0] == "reconnect":
                if i in offline:
                    # Back online: a fresh socket, the offline edits merge on sync.
                    doc = offline.pop(i)
                    client = await stack.enter_async_context(
                        yclient(server, world.room_id, name, tokens[i], sync=False)
                    )
                    client.doc = doc
                    # Our step 2 answers the server's step 1 with what it lacks.
                    await client.wait_for(lambda c=client: c.synced.is_set())
                    clients[i] = client
                else:
                    offline[i] = clients[i].doc
                    await clients[i].ws.close()
                continue
            if i in offline:
                apply_op(offline[i], operation)  # an edit made while offline
            else:
                await clients[i].edit(lambda d, o=operation: apply_op(d, o))
        for i, doc in list(offline.items()):
            client = await stack.enter_async_context(
                yclient(server, world.room_id, name, tokens[i], sync=False)
            )
            client.doc = doc
            await client.wait_for(lambda c=client: c.synced.is_set())
            clients[i] = client
        async with asyncio.timeout(10):
            while len({repr(state(c.doc)) for c in clients}) != 1:
                await asyncio.sleep(0.02)
        return state(clients[0].doc)


@pytest.mark.slow
def test_random_edits_converge_and_survive_restart(conv_server: ServerProcess) -> None:
    """Random edits by three clients with disconnects converge; storage equals them."""
    results: dict[str, tuple[Any, ...]] = {}

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops=st.lists(op, min_size=1, max_size=25))
    def run(ops: list[tuple[Any, ...]]) -> None:
        async def go() -> None:
            async with World.create(conv_server, members=CLIENTS) as world:
                name = f"prop-{uuid.uuid4().hex[:8]}"
                results[name] = (
                    world.room_id,
                    world.members[0].email,
                    await scenario(conv_server, world, name, ops),
                )

        asyncio.run(go())

    run()
    conv_server.stop()
    conv_server.start()

    async def reload() -> None:
        from tests.support import PASSWORD, login

        for name, (room_id, email, expected) in results.items():
            client = await login(conv_server, email, PASSWORD)
            try:
                token = (await client.post(f"/api/rooms/{room_id}/tokens")).json()[
                    "token"
                ]
            finally:
                await client.aclose()
            async with yclient(conv_server, room_id, name, token) as fresh:
                assert state(fresh.doc) == expected, name

    asyncio.run(reload())
    assert len(results) >= 5
