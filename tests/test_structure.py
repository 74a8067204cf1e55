"""The shape of the code: dependency direction, public surfaces, schema vs models."""

from __future__ import annotations

import ast
import asyncio
import importlib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from storage import run_migrations
from storage.models import Base

ROOT = Path(__file__).resolve().parent.parent
# server -> signaling -> rooms -> storage; never the other way.
LAYERS = ["storage", "rooms", "signaling", "server"]


def imports_of(package: str) -> set[str]:
    found: set[str] = set()
    paths = (
        [ROOT / "server.py"] if package == "server" else (ROOT / package).rglob("*.py")
    )
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_dependencies_point_one_way(package: str) -> None:
    """A layer imports only the layers below it."""
    above = set(LAYERS[LAYERS.index(package) + 1 :])
    assert not (imports_of(package) & above)


@pytest.mark.parametrize("package", ["rooms", "storage"])
def test_public_surface_is_declared(package: str) -> None:
    """Every name in a package's __all__ exists."""
    module = importlib.import_module(package)
    assert module.__all__
    for name in module.__all__:
        assert hasattr(module, name), name


def test_migrations_match_models(database_url: str) -> None:
    """After the migrations run, the database schema equals the models (both backends)."""
    run_migrations(database_url)

    async def diff() -> list[object]:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: compare_metadata(
                        MigrationContext.configure(sync, opts={"compare_type": True}),
                        Base.metadata,
                    )
                )
        finally:
            await engine.dispose()

    assert asyncio.run(diff()) == []
