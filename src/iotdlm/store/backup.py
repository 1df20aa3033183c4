"""A consistent copy of the store's database while services may be writing to it (``iotdlm backup``).

SQLite: the online backup API (``sqlite3.Connection.backup``) copies the database page by page
as one consistent snapshot -- what a reader in one transaction would see, committed WAL content
included -- without stopping writers for long. PostgreSQL is backed up with its own tools
(``pg_dump`` / ``pg_restore``, or the operator's base backups): :func:`snapshot` refuses it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from iotdlm import errors

#: pages copied per step of the online backup (writers get the lock between steps)
_PAGES_PER_STEP = 1024


def sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite URL; None for any other database."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):
        raise errors.BadRequestError("the database URL in iotdlm.toml is not a database URL") from None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise errors.UnsupportedError(f"cannot back up the SQLite database {database!r}: name a file")
    return Path(database)


def snapshot(url: str, dest: Path) -> None:
    """Write a consistent copy of the database at ``url`` to the new file ``dest`` (mode 0600)."""
    path = sqlite_path(url)
    if path is None:
        raise errors.UnsupportedError(
            "the database is PostgreSQL: back it up with its own tools (pg_dump), beside this archive",
            field="database_url",
        )
    if not path.is_file():
        raise errors.NotFoundError(f"no database file at {path}")
    dest.touch(mode=0o600, exist_ok=False)
    try:
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        target = sqlite3.connect(dest)
        try:
            source.backup(target, pages=_PAGES_PER_STEP)
        finally:
            target.close()
            source.close()
    except sqlite3.Error as exc:
        dest.unlink(missing_ok=True)
        raise errors.UnavailableError(f"cannot copy the database at {path}: {exc}") from exc


def check_sqlite(path: Path) -> None:
    """Raise :class:`~iotdlm.errors.BadRequestError` unless ``path`` is a sound SQLite database
    (``PRAGMA integrity_check``) holding iotdlm's schema."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            (result,) = conn.execute("PRAGMA integrity_check").fetchone()
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise errors.BadRequestError(f"the database in the archive is not an SQLite database ({exc})") from None
    if result != "ok":
        raise errors.BadRequestError(f"the database in the archive is damaged: {result}")
    if "certificates" not in tables or "alembic_version" not in tables:
        raise errors.BadRequestError("the database in the archive is not an iotdlm store")
