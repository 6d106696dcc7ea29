"""Persistence: SQLite by default, PostgreSQL for production (mautrix.util.async_db)."""

from relay.store.database import DatabaseUnusable, open_database
from relay.store.store import CommitResult, Store

__all__ = ["CommitResult", "DatabaseUnusable", "Store", "open_database"]
