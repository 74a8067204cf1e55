"""Processes under test (the real server, the relay) and the server's accounts.

Everything listens on 127.0.0.1 only. Children get RLIMIT_NOFILE raised to the
hard limit before they exec, so thousands of sockets fit.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADMIN_EMAIL = "admin@bench.coilroom.test"
ADMIN_PASSWORD = "bench-admin-password"
USER_PASSWORD = "bench-user-password"


def raise_nofile() -> None:
    """Raise this process's open-file limit to the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited at start with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Relay:
    """``python -m bench.relay`` (or another module with ``--port``) on a free port."""

    def __init__(self, module: str = "bench.relay") -> None:
        self.module = module
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def __enter__(self) -> Relay:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            preexec_fn=raise_nofile,
        )
        wait_for_port(self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class Server:
    """``python server.py serve --no-demo`` with a fresh data dir (SQLite default).

    ``create_admin=False`` skips making the admin account: for a second process
    on a database (``database_url`` setting) another ``Server`` already set up."""

    def __init__(self, settings: dict[str, str], create_admin: bool = True) -> None:
        self.port = free_port()
        self.data_dir = Path(tempfile.mkdtemp(prefix="coilroom-bench-"))
        self.settings = settings
        self.create_admin = create_admin
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COILROOM_")}
        env["COILROOM_DATA_DIR"] = str(self.data_dir)
        env.update({f"COILROOM_{k.upper()}": v for k, v in self.settings.items()})
        return env

    def __enter__(self) -> Server:
        if self.create_admin:
            subprocess.run(
                [sys.executable, "server.py", "create-admin", "--email", ADMIN_EMAIL],
                cwd=ROOT,
                env=self.env() | {"COILROOM_ADMIN_PASSWORD": ADMIN_PASSWORD},
                check=True,
                capture_output=True,
                timeout=60,
            )
        with (self.data_dir / "server.log").open("ab") as log:
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
                preexec_fn=raise_nofile,
            )
        wait_for_port(self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        path = self.data_dir / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class Rooms:
    """Room ids and, per room, one token per user (tokens may open many sockets)."""

    room_ids: list[int]
    tokens: dict[int, list[str]]


async def create_rooms(server: Server, *, users: int, rooms: int) -> Rooms:
    """Admin creates ``users`` instructors and ``rooms`` partnerships with all of
    them as members; each user logs in (argon2, the slow part) and gets tokens."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as admin:
        r = await admin.post(
            "/api/session", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
        )
        r.raise_for_status()
        insts = []
        for name, country in (
            ("Bench University A", "MX"),
            ("Bench University B", "DK"),
        ):
            r = await admin.post(
                "/api/institutions", json={"name": name, "country": country}
            )
            r.raise_for_status()
            insts.append(int(r.json()["id"]))
        user_ids = []
        for i in range(users):
            r = await admin.post(
                "/api/users",
                json={
                    "email": f"user{i}@bench.coilroom.test",
                    "name": f"Bench User {i}",
                    "password": USER_PASSWORD,
                    "institution_id": insts[i % 2],
                    "role": "instructor",
                },
            )
            r.raise_for_status()
            user_ids.append(int(r.json()["id"]))
        partnerships, room_ids = [], []
        for k in range(rooms):
            r = await admin.post(
                "/api/partnerships",
                json={"title": f"Bench partnership {k}", "institution_ids": insts},
            )
            r.raise_for_status()
            partnerships.append(int(r.json()["id"]))
            room_ids.append(int(r.json()["room_id"]))
            for uid in user_ids:
                r = await admin.post(
                    f"/api/partnerships/{partnerships[-1]}/members",
                    json={"user_id": uid, "role": "instructor"},
                )
                r.raise_for_status()

    async def user_tokens(i: int) -> list[str]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            r = await client.post(
                "/api/session",
                json={
                    "email": f"user{i}@bench.coilroom.test",
                    "password": USER_PASSWORD,
                },
            )
            r.raise_for_status()
            tokens = []
            for room_id in room_ids:
                r = await client.post(f"/api/rooms/{room_id}/tokens")
                r.raise_for_status()
                tokens.append(str(r.json()["token"]))
            return tokens

    gate = asyncio.Semaphore(4)

    async def gated(i: int) -> list[str]:
        async with gate:
            return await user_tokens(i)

    per_user = await asyncio.gather(*(gated(i) for i in range(users)))
    return Rooms(
        room_ids, {room: [t[k] for t in per_user] for k, room in enumerate(room_ids)}
    )


def socket_urls(server: Server, rooms: Rooms, per_room: int) -> list[str]:
    """``per_room`` socket URLs in each room, cycling over the room's users."""
    base = f"ws://127.0.0.1:{server.port}/ws/rooms"
    return [
        f"{base}/{room}?token={rooms.tokens[room][i % len(rooms.tokens[room])]}"
        for room in rooms.room_ids
        for i in range(per_room)
    ]
