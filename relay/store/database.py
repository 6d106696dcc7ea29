"""Open the database named by the config URL and bring its schema up to date."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat

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


# SQLite gives its journal, WAL and shared-memory files the database file's mode.
_SQLITE_COMPANIONS = ("", "-journal", "-wal", "-shm")


def _private_sqlite_file(path: str) -> None:
    """Create the database file 0600, or take group/other access away from an existing one.

    It holds attachment keys (``encryption``: the key of every encrypted file seen), so
    it is as secret as the config. A special name (``:memory:``) is left alone.
    """
    if path in ("", ":memory:") or path.startswith("file:"):
        return
    log = logging.getLogger("relay.db")
    try:
        # O_EXCL: only a file created here gets the mode from the start (no window).
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        return  # _check_sqlite_opens reports the real problem in one line
    for suffix in _SQLITE_COMPANIONS:
        try:
            mode = stat.S_IMODE(os.stat(path + suffix).st_mode)
            if mode & 0o077:
                os.chmod(path + suffix, mode & 0o700)
                log.warning(
                    "database file %s was readable by others (mode %o); made it %o",
                    path + suffix,
                    mode,
                    mode & 0o700,
                )
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("could not restrict the mode of %s: %s", path + suffix, e)


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
        _private_sqlite_file(url[len("sqlite:") :])
        _check_sqlite_opens(url[len("sqlite:") :])
    # mautrix's PostgreSQL layer calls sys.exit(26) on an asyncpg internal client error
    # by default; the relay answers that query's caller with an error (a 503, a retry)
    # instead of stopping the whole process.
    db_args: dict[str, object] = (
        {"min_size": 1, "max_size": 10, "meow_exit_on_ice": False}
        if not url.startswith("sqlite:")
        else {}
    )
    if url.startswith("postgresql://"):
        url = "postgres://" + url[len("postgresql://") :]
    try:
        db = Database.create(url, upgrade_table=upgrade_table, db_args=db_args, log=log)
        await db.start()
    except Exception as e:
        raise DatabaseUnusable(f"database {_redact_url(url)}: {type(e).__name__}: {e}") from e
    return db
