"""Shared fixtures: real server processes on real sockets, on SQLite and PostgreSQL.

A server process is started once per backend and shared by the tests that can share
it (each test makes its own partnership and room, so tests do not see each other's
traffic). Tests that restart or kill a server start their own.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.support import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    ServerProcess,
    World,
    create_postgres_database,
    drop_postgres_database,
)

POSTGRES_ADMIN_URL = os.environ.get(
    "COILROOM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def database_url(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh, empty database for this test session on the chosen backend."""
    if backend == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "coilroom.db"
        yield f"sqlite+aiosqlite:///{path}"
        return
    name = f"coilroom_test_{uuid.uuid4().hex[:10]}"
    # No skip: PostgreSQL is part of the machine; its absence fails the suite.
    url = create_postgres_database(POSTGRES_ADMIN_URL, name)
    yield url
    drop_postgres_database(POSTGRES_ADMIN_URL, name)


def fresh_database_url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    if backend == "sqlite":
        return (
            f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'coilroom.db'}"
        )
    name = f"coilroom_test_{uuid.uuid4().hex[:10]}"
    return create_postgres_database(POSTGRES_ADMIN_URL, name)


@pytest.fixture(scope="module")
def migrated_url(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh database with the whole schema, for one module's storage tests."""
    from storage import run_migrations

    url = fresh_database_url(backend, tmp_path_factory)
    run_migrations(url)
    yield url
    if backend == "postgres":
        drop_postgres_database(POSTGRES_ADMIN_URL, url.rsplit("/", 1)[1])


@pytest.fixture
async def db(migrated_url: str) -> AsyncIterator[Any]:
    """``storage.Database`` on ``migrated_url``, open for one test (a module may
    override it, to clean up after each test)."""
    from storage import open_database

    async with open_database(migrated_url) as db:
        yield db


@pytest.fixture(scope="session")
def server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One running server per backend, shared by the tests that do not stop it."""
    proc = ServerProcess(
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("data"),
        settings={
            # Generous limits: tests send bursts on purpose; the limit tests
            # start their own server with tight ones.
            "MESSAGES_PER_SECOND": "1000",
            "MESSAGE_BURST": "1000",
            "HEARTBEAT_INTERVAL": "1",
            "HEARTBEAT_TIMEOUT": "1",
            "TYPING_TIMEOUT": "1",
            "DOC_UPDATES_PER_SECOND": "5000",
            "DOC_UPDATE_BURST": "5000",
            "AWARENESS_PER_SECOND": "500",
            "DOC_IDLE_UNLOAD": "1",
            "PROJECTION_DELAY": "0.1",
        },
    )
    proc.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def world(server: ServerProcess) -> AsyncIterator[World]:
    """A fresh partnership with its room and members on the shared server."""
    async with World.create(server) as w:
        yield w


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        yield client


@contextlib.contextmanager
def dedicated_server(
    backend: str, tmp_path_factory: pytest.TempPathFactory, settings: dict[str, str]
) -> Iterator[ServerProcess]:
    """A server of one's own (fresh database), for tests that change limits or stop it."""
    url = fresh_database_url(backend, tmp_path_factory)
    proc = ServerProcess(
        database_url=url, data_dir=tmp_path_factory.mktemp("data"), settings=settings
    )
    proc.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        if backend == "postgres":
            drop_postgres_database(POSTGRES_ADMIN_URL, url.rsplit("/", 1)[1])
