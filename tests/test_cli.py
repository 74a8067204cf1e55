"""The command line: serve on the embedded defaults with demo data, migrate, create-admin."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, free_port


def clean_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COILROOM_")}
    return env | {"COILROOM_DATA_DIR": str(data_dir)}


def test_serve_on_embedded_defaults_prints_address_and_demo_logins(
    tmp_path: Path,
) -> None:
    """First run: SQLite file in the data folder, demo data, the URL and logins printed;
    a demo instructor can log in and sees the partnership room."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "server.py", "serve", "--port", str(port)],
        cwd=ROOT,
        env=clean_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Uvicorn running" in line or proc.poll() is not None:
                break
        out = "".join(lines)
        assert f"http://localhost:{port}/" in out
        assert "ana@demo.coilroom.test" in out
        assert "coilroom-demo" in out
        assert (tmp_path / "coilroom.db").exists()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            r = client.post(
                "/api/session",
                json={"email": "ana@demo.coilroom.test", "password": "coilroom-demo"},
            )
            assert r.status_code == 200
            rooms = client.get("/api/rooms").json()["rooms"]
            assert len(rooms) == 1
            assert rooms[0]["partnership"]["title"].startswith("Climate Futures")
            page = client.get("/")
            assert page.status_code == 200
            assert "script-src 'self'" in page.headers["content-security-policy"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # A second start keeps the data and does not create the demo again.
    second = subprocess.run(
        [sys.executable, "server.py", "migrate"],
        cwd=ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "up to date" in second.stdout


def test_create_admin_refuses_short_passwords_and_duplicates(tmp_path: Path) -> None:
    """create-admin needs a 10+ character password and a new e-mail."""
    env = clean_env(tmp_path)
    cmd = [sys.executable, "server.py", "create-admin", "--email", "root@x.test"]
    short = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env | {"COILROOM_ADMIN_PASSWORD": "short"},
        capture_output=True,
        text=True,
    )
    assert short.returncode == 2
    assert "10 characters" in short.stderr
    ok = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env | {"COILROOM_ADMIN_PASSWORD": "long-enough-pw"},
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    again = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env | {"COILROOM_ADMIN_PASSWORD": "long-enough-pw"},
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1
    assert "exists" in again.stderr


@pytest.mark.parametrize(
    "bad", [{"COILROOM_PROT": "1"}, {"COILROOM_SECRET_KEY": "short"}]
)
def test_bad_settings_stop_the_start(tmp_path: Path, bad: dict[str, str]) -> None:
    """A misspelt setting or a weak secret key stops the server with a clear message."""
    result = subprocess.run(
        [sys.executable, "server.py", "migrate"],
        cwd=ROOT,
        env=clean_env(tmp_path) | bad,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "COILROOM_" in result.stderr
