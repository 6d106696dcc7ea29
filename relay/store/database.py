"""Open the database named by the config URL and bring its schema up to date."""

from __future__ import annotations

import logging
import sqlite3

from mautrix.util.async_db import Database
from mautrix.util.logging import TraceLogger

from relay.store.migrations import upgrade_table


class DatabaseUnusable(Exception):
    """The database could not be opened or migrated; the message is for the operator."""


def _redact_url(url: str) -> str:
    # Never log a PostgreSQL password.
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def _check_sqlite_opens(path: str) -> None:
    # aiosqlite leaves its worker thread behind when the first connect fails, which
    # then crashes at interpreter exit; finding out here gives a clean one-line error.
    try:
        sqlite3.connect(path).close()
    except sqlite3.Error as e:
        raise DatabaseUnusable(f"database sqlite:{path}: {e}") from e


async def open_database(url: str) -> Database:
    """Connect and migrate; raise DatabaseUnusable with a one-line reason."""
    log = logging.getLogger("relay.db")
    if not isinstance(log, TraceLogger):
        log = TraceLogger("relay.db")
    if url.startswith("sqlite:"):
        _check_sqlite_opens(url[len("sqlite:") :])
    db_args = {"min_size": 1, "max_size": 10} if not url.startswith("sqlite:") else {}
    if url.startswith("postgresql://"):
        url = "postgres://" + url[len("postgresql://") :]
    try:
        db = Database.create(url, upgrade_table=upgrade_table, db_args=db_args, log=log)
        await db.start()
    except Exception as e:
        raise DatabaseUnusable(f"database {_redact_url(url)}: {type(e).__name__}: {e}") from e
    return db
