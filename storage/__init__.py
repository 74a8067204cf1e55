"""Durable state: SQLAlchemy models, migrations, and the queries the server runs.

``Database``, ``open_database`` and ``run_migrations`` load on first use (PEP 562),
so a module that needs no database (``storage.activity_rows``, in the document
worker) does not import SQLAlchemy with the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Database", "open_database", "run_migrations"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from storage import database

        value = getattr(database, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from storage.database import Database, open_database, run_migrations
