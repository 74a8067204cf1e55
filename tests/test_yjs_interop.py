"""A real Node process running the stock npm Yjs client against the real server.

tests/interop/yjs_client.mjs connects one ``WebsocketProvider`` (yjs, y-websocket, ws at
the versions pinned in tests/interop/package.json; ``make test`` installs them) with
``disableBc: true``: one provider per Node process and no BroadcastChannel, so every byte
between the Node client and the Python client goes through the server. The test drives
it with JSON lines on stdin and reads its replies and events (provider status, sync,
close codes, auth messages, document and awareness changes) from stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pycrdt
import pytest

from tests.conftest import dedicated_server
from tests.support import ROOT, TIMEOUT, ServerProcess, World
from tests.yclient import add_activity, yclient

pytestmark = pytest.mark.anyio

INTEROP = ROOT / "tests" / "interop"
SCRIPT = INTEROP / "yjs_client.mjs"

Event = dict[str, Any]
State = dict[str, Any]


class NodeYjsClient:
    """The Node driver process: commands in, replies and events out."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[Event] = []
        self.stderr: list[str] = []
        self.client_id: int | None = None
        self._seq = 0
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._news = asyncio.Condition()
        self._tasks = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                self.stderr.append(f"(stdout, not JSON) {line}")
                continue
            if "reply" in msg:
                future = self._replies.pop(msg["reply"], None)
                if future is not None and not future.done():
                    if msg["ok"]:
                        future.set_result(msg["result"])
                    else:
                        future.set_exception(NodeCommandFailed(msg["error"]))
                continue
            if msg.get("event") == "ready":
                self.client_id = int(msg["clientID"])
            async with self._news:
                self.events.append(msg)
                self._news.notify_all()
        # The process closed its stdout: nobody will answer pending commands.
        for future in self._replies.values():
            if not future.done():
                future.set_exception(NodeCommandFailed("the Node client exited"))
        async with self._news:
            self.events.append({"event": "exit"})
            self._news.notify_all()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip())

    def diagnostics(self) -> str:
        events = "\n".join(json.dumps(e) for e in self.events[-40:])
        return f"Node events (last 40):\n{events}\nNode stderr:\n" + "\n".join(
            self.stderr[-40:]
        )

    async def cmd(self, name: str, timeout: float = TIMEOUT, **args: Any) -> Any:
        """Send one command and wait for its reply."""
        assert self.proc.stdin is not None
        self._seq += 1
        seq = self._seq
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[seq] = future
        self.proc.stdin.write(
            (json.dumps({"seq": seq, "cmd": name, **args}) + "\n").encode()
        )
        await self.proc.stdin.drain()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise AssertionError(
                f"no reply to {name} in {timeout}s\n{self.diagnostics()}"
            ) from None

    def mark(self) -> int:
        """A position in the event list: wait for events after it."""
        return len(self.events)

    async def wait_event(
        self,
        predicate: Callable[[Event], bool],
        *,
        since: int = 0,
        timeout: float = TIMEOUT,
    ) -> Event:
        """The first event at or after ``since`` that matches."""
        try:
            async with asyncio.timeout(timeout), self._news:
                index = since
                while True:
                    while index < len(self.events):
                        event = self.events[index]
                        index += 1
                        if predicate(event):
                            return event
                    await self._news.wait()
        except TimeoutError:
            raise AssertionError(
                f"no matching Node event in {timeout}s\n{self.diagnostics()}"
            ) from None

    async def state(self) -> State:
        return dict(await self.cmd("state"))

    async def wait_state(
        self, predicate: Callable[[State], bool], timeout: float = TIMEOUT
    ) -> State:
        """Read the document after each change until ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            since = self.mark()
            state = await self.state()
            if predicate(state):
                return state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"Node document never matched; last state:\n"
                    f"{json.dumps(state, indent=1)}\n{self.diagnostics()}"
                )
            with contextlib.suppress(AssertionError):
                await self.wait_event(
                    lambda e: e["event"] in ("update", "exit"),
                    since=since,
                    timeout=remaining,
                )

    async def peers(self) -> dict[int, Any]:
        return {int(k): v for k, v in (await self.cmd("peers")).items()}

    async def wait_peers(
        self, predicate: Callable[[dict[int, Any]], bool], timeout: float = TIMEOUT
    ) -> dict[int, Any]:
        """Read the others' awareness states after each change until ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            since = self.mark()
            peers = await self.peers()
            if predicate(peers):
                return peers
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"Node peers never matched: {peers}\n{self.diagnostics()}"
                )
            with contextlib.suppress(AssertionError):
                await self.wait_event(
                    lambda e: e["event"] in ("awareness", "exit"),
                    since=since,
                    timeout=remaining,
                )

    async def quit(self) -> None:
        """Leave as a closing app does: destroy the provider, exit."""
        await self.cmd("quit")
        async with asyncio.timeout(TIMEOUT):
            await self.proc.wait()

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class NodeCommandFailed(Exception):
    pass


def require_node() -> str:
    """The node binary; the interop tests fail (never skip) without it or its packages."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the Yjs interop tests need Node.js and npm")
    if not (INTEROP / "node_modules" / "y-websocket" / "package.json").exists():
        pytest.fail(
            "the npm Yjs client is not installed: run `make test` or "
            "`npm ci --prefix tests/interop --no-audit --no-fund`"
        )
    return node


@contextlib.asynccontextmanager
async def node_client(
    server: ServerProcess, room_id: int, name: str, token: str, *, sync: bool = True
) -> AsyncIterator[NodeYjsClient]:
    """A Node process with one stock provider on ``/ws/docs/{room_id}/{name}``."""
    node = require_node()
    env = os.environ | {
        "YJS_SERVER_URL": f"{server.ws_url}/ws/docs",
        "YJS_ROOM": f"{room_id}/{name}",
        "YJS_TOKEN": token,
    }
    proc = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        cwd=INTEROP,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    client = NodeYjsClient(proc)
    try:
        await client.wait_event(lambda e: e["event"] in ("ready", "exit"))
        assert client.client_id is not None, client.diagnostics()
        if sync:
            await client.cmd("synced")
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def own_server(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServerProcess]:
    """conftest's ``dedicated_server``, entered and left in a thread: it blocks, and on
    PostgreSQL it runs an event loop of its own to create and drop the database."""
    stack = contextlib.ExitStack()
    proc = await anyio.to_thread.run_sync(
        stack.enter_context, dedicated_server(backend, tmp_path_factory, {})
    )
    try:
        yield proc
    finally:
        await anyio.to_thread.run_sync(stack.close)


def set_field(activity_id: str, key: str, value: Any) -> Callable[[pycrdt.Doc], None]:
    def change(doc: pycrdt.Doc) -> None:
        for entry in doc.get("activities", type=pycrdt.Array):
            if isinstance(entry, pycrdt.Map) and entry.get("id") == activity_id:
                entry[key] = value
                return
        raise AssertionError(f"no activity {activity_id}")

    return change


def by_id(activities: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {a["id"]: a for a in activities}


def ids(activities: list[dict[str, Any]]) -> list[str]:
    return [a["id"] for a in activities]


async def fresh_view(
    server: ServerProcess, room_id: int, token: str
) -> list[dict[str, Any]]:
    """What the server has stored: the activities a newly joining client receives."""
    async with yclient(server, room_id, "agreement", token) as late:
        return late.activities()


async def test_a_stock_client_is_synced_with_the_document_as_it_is(
    server: ServerProcess, world: World
) -> None:
    """The server keeps what it sends a fresh client and sends the edits made since
    as an update before the kept step 2. A stock provider (pending structs, then the
    step 2) must hold every activity, edits and a removal included, at its sync."""
    ana, lars, maria = world.members
    async with yclient(
        server, world.room_id, "kept", await ana.token(world.room_id)
    ) as py:
        await py.edit(add_activity("a1", title="First"))
        await py.edit(add_activity("a2", title="Second"))
        async with yclient(
            server, world.room_id, "kept", await maria.token(world.room_id)
        ):
            pass  # a fresh client: the server now keeps this step 2
        await py.edit(add_activity("a3", title="Third"))
        await py.edit(set_field("a1", "title", "First (changed)"))
        await py.edit(lambda d: d.get("activities", type=pycrdt.Array).pop(1))
        expected = py.activities()
        assert ids(expected) == ["a1", "a3"]
        async with yclient(
            server, world.room_id, "kept", await maria.token(world.room_id)
        ) as watcher:
            await watcher.wait_for(lambda: watcher.activities() == expected)
        async with node_client(
            server, world.room_id, "kept", await lars.token(world.room_id)
        ) as js:
            synced = [e for e in js.events if e["event"] == "sync" and e["synced"]]
            assert synced, js.diagnostics()
            assert synced[0]["activities"] == expected


async def test_node_and_python_clients_converge(
    server: ServerProcess, world: World
) -> None:
    """Concurrent edits from the npm Yjs client and the Python client, on the same activity too, converge everywhere."""
    ana, lars, maria = world.members
    async with (
        yclient(
            server, world.room_id, "agreement", await ana.token(world.room_id)
        ) as py,
        node_client(
            server, world.room_id, "agreement", await lars.token(world.room_id)
        ) as js,
    ):
        await py.edit(add_activity("shared", title="Joint lecture", owner=str(ana.id)))
        await js.wait_state(lambda s: ids(s["activities"]) == ["shared"])

        # Neither side waits for the other: each edits what it has not yet seen.
        await asyncio.gather(
            js.cmd(
                "add",
                activity={
                    "id": "js-1",
                    "title": "Virtual exchange",
                    "description": "Six weeks, two classes",
                    "owner": lars.id,
                    "people": [lars.id, ana.id],
                    "institutions": world.institutions,
                    "starts_on": "2025-03-01",
                    "ends_on": "2025-04-15",
                    "status": "planned",
                    "outcomes": "",
                },
            ),
            js.cmd("set", id="shared", key="title", value="Joint lecture (Node)"),
            js.cmd("set", id="shared", key="outcomes", value="Recorded talk"),
            py.edit(
                add_activity("py-1", title="Student survey", starts_on="2025-05-01")
            ),
            py.edit(set_field("shared", "title", "Joint lecture (Python)")),
            py.edit(set_field("shared", "status", "in_progress")),
        )

        def node_edits_seen(acts: list[dict[str, Any]]) -> bool:
            got = by_id(acts)
            return (
                "js-1" in got
                and got.get("shared", {}).get("outcomes") == "Recorded talk"
            )

        def python_edits_seen(acts: list[dict[str, Any]]) -> bool:
            got = by_id(acts)
            return (
                "py-1" in got and got.get("shared", {}).get("status") == "in_progress"
            )

        await py.wait_for(lambda: node_edits_seen(py.activities()))
        final = await js.wait_state(lambda s: python_edits_seen(s["activities"]))

        assert final["activities"] == py.activities()
        assert sorted(ids(final["activities"])) == ["js-1", "py-1", "shared"]
        shared = by_id(final["activities"])["shared"]
        # The concurrent title edits resolve to one of the two, the same on both sides.
        assert shared["title"] in ("Joint lecture (Node)", "Joint lecture (Python)")
        js1 = by_id(final["activities"])["js-1"]
        assert js1["people"] == [lars.id, ana.id] and js1["owner"] == lars.id
        # And the server stored exactly that.
        assert (
            await fresh_view(server, world.room_id, await maria.token(world.room_id))
            == (final["activities"])
        )


async def test_node_client_reconnects_after_restart_and_merges_offline_edits(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """After a server restart the npm provider reconnects by itself and the edits it made while the server was down reach everyone."""
    async with (
        own_server(backend, tmp_path_factory) as proc,
        World.create(proc) as world,
    ):
        ana, lars, maria = world.members
        async with node_client(
            proc, world.room_id, "agreement", await lars.token(world.room_id)
        ) as js:
            async with yclient(
                proc, world.room_id, "agreement", await ana.token(world.room_id)
            ) as py:
                await py.edit(add_activity("before", title="Kick-off"))
                await js.cmd("add", activity={"id": "js-before", "title": "Syllabus"})
                await js.wait_state(
                    lambda s: sorted(ids(s["activities"])) == ["before", "js-before"]
                )
                await py.wait_for(lambda: len(py.activities()) == 2)

                mark = js.mark()
                await anyio.to_thread.run_sync(proc.stop)
                closed = await js.wait_event(
                    lambda e: e["event"] == "connection-close", since=mark
                )
                # 1012 (restarting): the stock provider gives up on 4400-4499 only.
                assert closed["code"] == 1012, closed
                await js.wait_event(
                    lambda e: e == {"event": "status", "status": "disconnected"},
                    since=mark,
                )

            # The server is down: the Node client edits its local copy.
            await js.cmd(
                "add",
                activity={
                    "id": "js-offline",
                    "title": "Written offline",
                    "status": "planned",
                },
            )
            await js.cmd("set", id="before", key="status", value="done")
            await js.cmd("set", id="js-before", key="title", value="Syllabus v2")
            info = await js.cmd("info")
            assert info["synced"] is False and info["status"] != "connected"

            mark = js.mark()
            await anyio.to_thread.run_sync(proc.start)
            await js.wait_event(
                lambda e: e["event"] == "sync" and e["synced"], since=mark
            )
            assert {"event": "status", "status": "connected"} in js.events[mark:]

            async with yclient(
                proc, world.room_id, "agreement", await maria.token(world.room_id)
            ) as py2:

                def offline_edits_seen() -> bool:
                    got = by_id(py2.activities())
                    return (
                        "js-offline" in got
                        and got["before"].get("status") == "done"
                        and got["js-before"].get("title") == "Syllabus v2"
                    )

                await py2.wait_for(offline_edits_seen)
                await py2.edit(add_activity("after", title="Wrap-up"))
                final = await js.wait_state(lambda s: "after" in ids(s["activities"]))
                assert final["activities"] == py2.activities()
                assert sorted(ids(final["activities"])) == [
                    "after",
                    "before",
                    "js-before",
                    "js-offline",
                ]


async def test_awareness_between_node_and_python(
    server: ServerProcess, world: World
) -> None:
    """Awareness states cross both ways, and the Node client's state is removed promptly when it quits."""
    ana, lars, _ = world.members
    async with (
        yclient(
            server, world.room_id, "agreement", await ana.token(world.room_id)
        ) as py,
        node_client(
            server, world.room_id, "agreement", await lars.token(world.room_id)
        ) as js,
    ):
        node_id = js.client_id
        assert node_id is not None
        lars_state = {
            "user": {"name": lars.name, "color": "#30bced"},
            "cursor": {"activity": "a1", "field": "title", "anchor": 3, "head": 7},
        }
        await js.cmd("awareness", state=lars_state)
        await py.wait_for(
            lambda: (
                node_id in py.awareness
                and json.loads(py.awareness[node_id].state) == lars_state
            )
        )

        ana_state = {"user": {"name": ana.name, "color": "#ee6352"}, "cursor": None}
        await py.set_awareness(1, json.dumps(ana_state))
        peers = await js.wait_peers(lambda p: p.get(py.doc.client_id) == ana_state)
        assert node_id not in peers

        started = time.monotonic()
        await js.quit()
        await py.wait_for(lambda: py.awareness[node_id].removed, timeout=2)
        assert time.monotonic() - started < 2


async def test_awareness_removed_when_node_process_dies(
    server: ServerProcess, world: World
) -> None:
    """When the Node process is killed without a goodbye, the server removes its awareness state at once."""
    ana, lars, _ = world.members
    async with (
        yclient(
            server, world.room_id, "agreement", await ana.token(world.room_id)
        ) as py,
        node_client(
            server, world.room_id, "agreement", await lars.token(world.room_id)
        ) as js,
    ):
        node_id = js.client_id
        assert node_id is not None
        await js.cmd("awareness", state={"user": {"name": lars.name}})
        await py.wait_for(
            lambda: node_id in py.awareness and not py.awareness[node_id].removed
        )
        started = time.monotonic()
        js.proc.send_signal(signal.SIGKILL)
        await py.wait_for(lambda: py.awareness[node_id].removed, timeout=2)
        assert time.monotonic() - started < 2


async def test_observer_with_node_client_reads_but_cannot_edit(
    server: ServerProcess, world: World
) -> None:
    """An observer's npm client receives the document, but its edits are refused with [2, 0, reason] and reach nobody."""
    ana, lars, _ = world.members
    observer = await world.add_member(
        "Olga Observer", world.institutions[0], role="observer"
    )
    async with yclient(
        server, world.room_id, "agreement", await ana.token(world.room_id)
    ) as py:
        await py.edit(add_activity("seed", title="Joint lecture"))
        async with node_client(
            server, world.room_id, "agreement", await observer.token(world.room_id)
        ) as js:
            await js.wait_state(lambda s: ids(s["activities"]) == ["seed"])

            mark = js.mark()
            await js.cmd("add", activity={"id": "observer-1", "title": "Not allowed"})
            await js.cmd("set", id="seed", key="title", value="Hijacked")
            # One refusal per update: the server has handled both.
            await js.wait_event(
                lambda e: sum(x["event"] == "denied" for x in js.events[mark:]) >= 2,
                since=mark,
            )
            denied = [e for e in js.events[mark:] if e["event"] == "denied"]
            assert all(e["kind"] == 0 and e["reason"] for e in denied), denied

            # A later edit from a member reaches the observer: the server has handled the
            # observer's updates by then, and they reached nobody.
            await py.edit(add_activity("after", title="Wrap-up"))
            await js.wait_state(lambda s: "after" in ids(s["activities"]))
            assert ids(py.activities()) == ["seed", "after"]
            assert by_id(py.activities())["seed"]["title"] == "Joint lecture"
            stored = await fresh_view(
                server, world.room_id, await lars.token(world.room_id)
            )
            assert stored == py.activities()
            # The observer stays connected (it still reads).
            assert (await js.cmd("info"))["status"] == "connected"
            assert not any(e["event"] == "connection-close" for e in js.events[mark:])
