"""Durable state: SQLAlchemy models, migrations, and the queries the server runs."""

from storage.database import Database, open_database, run_migrations

__all__ = ["Database", "open_database", "run_migrations"]
