"""Helpers for tests that drive real servers: processes, accounts, sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
ADMIN_EMAIL = "admin@tests.coilroom.test"
ADMIN_PASSWORD = "admin-password-for-tests"
PASSWORD = "member-password-1"
# Every wait in the tests is bounded by this (seconds); scale it on a slow machine.
TIMEOUT = float(os.environ.get("COILROOM_TEST_TIMEOUT", "10"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_postgres_database(admin_url: str, name: str) -> str:
    async def run() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(run())
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


def drop_postgres_database(admin_url: str, name: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(run())


class ServerProcess:
    """``python server.py serve`` in a child process, on a free port."""

    def __init__(
        self,
        *,
        database_url: str,
        data_dir: Path,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.database_url = database_url
        self.data_dir = Path(data_dir)
        self.settings = dict(settings or {})
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COILROOM_")}
        env.update(
            {
                "COILROOM_DATABASE_URL": self.database_url,
                "COILROOM_DATA_DIR": str(self.data_dir),
                "COILROOM_LOG_LEVEL": "info",
                "COILROOM_SQLITE_SYNCHRONOUS": "NORMAL",
                # Cheap hashes keep account set-up fast; production keeps the defaults.
                "COILROOM_PASSWORD_TIME_COST": "1",
                "COILROOM_PASSWORD_MEMORY_KIB": "8192",
            }
        )
        env.update({f"COILROOM_{k}": v for k, v in self.settings.items()})
        return env

    def create_admin(self, email: str, password: str) -> None:
        env = self.env() | {"COILROOM_ADMIN_PASSWORD": password}
        subprocess.run(
            [
                sys.executable,
                "server.py",
                "create-admin",
                "--email",
                email,
                "--name",
                "Test Admin",
            ],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "server.py",
                "serve",
                "--no-demo",
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited at start:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def stop(self) -> int | None:
        """Graceful stop (SIGTERM), as an operator would."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )


@dataclass
class Member:
    """A logged-in user of the test world."""

    id: int
    email: str
    name: str
    http: httpx.AsyncClient

    async def token(self, room_id: int) -> str:
        r = await self.http.post(f"/api/rooms/{room_id}/tokens")
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


@dataclass
class World:
    """A partnership of two institutions with a room, a coordinator and members."""

    server: ServerProcess
    admin: httpx.AsyncClient
    partnership_id: int
    room_id: int
    institutions: list[int]
    members: list[Member] = field(default_factory=list)
    _clients: list[httpx.AsyncClient] = field(default_factory=list)

    @classmethod
    @contextlib.asynccontextmanager
    async def create(
        cls, server: ServerProcess, members: int = 3
    ) -> AsyncIterator[World]:
        admin = await login(server, ADMIN_EMAIL, ADMIN_PASSWORD)
        tag = uuid.uuid4().hex[:8]
        insts = []
        for name, country in ((f"Univ A {tag}", "MX"), (f"Univ B {tag}", "DK")):
            r = await admin.post(
                "/api/institutions", json={"name": name, "country": country}
            )
            assert r.status_code == 201, r.text
            insts.append(r.json()["id"])
        r = await admin.post(
            "/api/partnerships",
            json={"title": f"Partnership {tag}", "institution_ids": insts},
        )
        assert r.status_code == 201, r.text
        world = cls(server, admin, r.json()["id"], r.json()["room_id"], insts)
        world._clients.append(admin)
        try:
            for i in range(members):
                await world.add_member(f"Member {i} {tag}", insts[i % 2])
            yield world
        finally:
            for client in world._clients:
                await client.aclose()

    async def add_user(
        self, name: str, institution_id: int | None, role: str = "instructor"
    ) -> Member:
        email = f"{uuid.uuid4().hex[:12]}@tests.coilroom.test"
        r = await self.admin.post(
            "/api/users",
            json={
                "email": email,
                "name": name,
                "password": PASSWORD,
                "institution_id": institution_id,
                "role": role,
            },
        )
        assert r.status_code == 201, r.text
        client = await login(self.server, email, PASSWORD)
        self._clients.append(client)
        return Member(r.json()["id"], email, name, client)

    async def add_member(
        self, name: str, institution_id: int, role: str = "instructor"
    ) -> Member:
        member = await self.add_user(name, institution_id)
        r = await self.admin.post(
            f"/api/partnerships/{self.partnership_id}/members",
            json={"user_id": member.id, "role": role},
        )
        assert r.status_code == 201, r.text
        self.members.append(member)
        return member


async def login(server: ServerProcess, email: str, password: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT)
    r = await client.post("/api/session", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    return client


class Socket:
    """A room socket client that reads JSON frames with a bounded wait."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self._pending: list[dict[str, Any]] = []
        self.batches = 0  # batch frames seen (several frames in one message)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame; the frames of a ``batch`` come out one by one."""
        if not self._pending:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
            if frame.get("type") == "batch":
                self.batches += 1
                self._pending.extend(frame["frames"])
            else:
                self._pending.append(frame)
        return dict(self._pending.pop(0))

    async def recv_until(
        self, type_: str, timeout: float = TIMEOUT, **match: Any
    ) -> dict[str, Any]:
        """Read frames until one of ``type_`` whose fields equal ``match``."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame["type"] == type_ and all(
                    frame.get(k) == v for k, v in match.items()
                ):
                    return frame

    async def collect(
        self, type_: str, count: int, timeout: float = TIMEOUT
    ) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while len(got) < count:
                frame = await self.recv(timeout)
                if frame["type"] == type_:
                    got.append(frame)
        return got

    async def close_code(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for the server to close; returns the close code it sent."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        await self.ws.wait_closed()
        return self.ws.close_code


@contextlib.asynccontextmanager
async def room_socket(
    server: ServerProcess,
    room_id: int,
    *,
    token: str | None = None,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    expect_welcome: bool = True,
    **kwargs: Any,
) -> AsyncIterator[Socket]:
    query = dict(params or {})
    if token is not None:
        query["token"] = token
    # Unbounded client queue: a test socket that does not read everything must
    # still see the server's close frame when it leaves.
    kwargs.setdefault("max_queue", None)
    url = f"{server.ws_url}/ws/rooms/{room_id}"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    async with connect(
        url, additional_headers=headers, open_timeout=TIMEOUT, **kwargs
    ) as ws:
        sock = Socket(ws)
        if expect_welcome:
            sock.welcome = await sock.recv()
            assert sock.welcome["type"] == "welcome", sock.welcome
        yield sock


async def join(
    server: ServerProcess, member: Member, room_id: int, **kw: Any
) -> contextlib.AbstractAsyncContextManager[Socket]:
    return room_socket(server, room_id, token=await member.token(room_id), **kw)


class TcpProxy:
    """A TCP proxy on a free port, in a thread of its own, that a test can cut
    (every open connection is reset and new ones are refused) and restore."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._up = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: Any = None
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        import threading

        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)

            async def serve() -> None:
                self._server = await asyncio.start_server(
                    self._handle, "127.0.0.1", self.port
                )
                ready.set()

            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(5)

    def stop(self) -> None:
        self.cut()

        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def cut(self) -> None:
        async def reset() -> None:
            self._up = False
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        asyncio.run_coroutine_threadsafe(reset(), self._loop).result(5)

    def restore(self) -> None:
        async def up() -> None:
            self._up = True

        asyncio.run_coroutine_threadsafe(up(), self._loop).result(5)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not self._up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)
