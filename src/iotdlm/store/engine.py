"""The store's engine: one SQLAlchemy :class:`~sqlalchemy.engine.Engine`, its transactions, the
migrations hook and the guard that turns database failures into
:class:`~iotdlm.errors.UnavailableError`.

Synchronous SQLAlchemy Core; every call takes a connection from the engine's pool for one
transaction (:meth:`Database.transaction`), so a store may be shared by threads (async callers use
:func:`asyncio.to_thread`). On SQLite every write transaction is ``BEGIN IMMEDIATE`` in WAL mode
with a 10 s busy timeout, so several processes may write one file.

The repositories (one module per record kind: :mod:`~iotdlm.store.certificates`,
:mod:`~iotdlm.store.devices`, ...) are mixins of :class:`Database`; :class:`~iotdlm.store.Store`
combines them on one engine.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

from sqlalchemy import Connection, Engine, Row, create_engine, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from iotdlm import errors
from iotdlm.store import records as r
from iotdlm.store.driver import DriverConnection, StatementCache
from iotdlm.store.queries import IN_CHUNK, quote
from iotdlm.store.write_turn import WriteTurn

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
#: a migration script's file name: its revision id (four digits), then what it does
_MIGRATION_FILE: Final = re.compile(r"^([0-9]{4})_\w+\.py$")

_WRITE_OPTION: Final = "iotdlm_write"
# Any constant will do: it only has to be the same for every process migrating one database.
_MIGRATION_LOCK_KEY: Final = 0x10_7D_1A_0001
_DEFAULT_PG_CONNECT_TIMEOUT_S: Final = 10
#: a connection of either kind, for :meth:`Database._guarded`
_C = TypeVar("_C")
_T = TypeVar("_T")
_SQLITE_BUSY_TIMEOUT_MS: Final = 10_000


def _mask(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _reason(exc: BaseException) -> str:
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    text_ = " ".join(str(cause).split())
    return text_ or type(cause).__name__


def alembic_config() -> Config:
    """The Alembic configuration of the store's migrations (no database URL: see migrations/env.py)."""
    from alembic.config import Config  # only where the schema changes: Alembic costs ~0.2 s to import

    cfg = Config()
    # configparser interpolation: a literal % in the install path must be doubled.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return cfg


@functools.cache
def schema_head() -> str:
    """The newest migration's revision id, read from the scripts' file names (``0007_...py`` is
    revision ``0007``; a unit test holds this to Alembic's own reading of the scripts)."""
    found = [m.group(1) for p in (MIGRATIONS_DIR / "versions").iterdir() if (m := _MIGRATION_FILE.match(p.name))]
    if not found:
        raise RuntimeError(f"no migration scripts in {MIGRATIONS_DIR / 'versions'}: a broken install")
    return max(found)


def _sqlite_wal(cursor: Any) -> None:
    """Put the database in WAL mode (persistent, so usually already done).

    Switching modes can fail with "database is locked" at once, without waiting for the busy
    timeout, when other processes open the same new file at the same moment: retry with backoff.
    """
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode")
            if str(cursor.fetchone()[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.fetchall()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _create_owner_only(path: Path) -> None:
    """Create a new SQLite database file owner-only (0600) before SQLite would (with the umask's
    mode, typically world-readable). SQLite gives its -wal and -shm files the database file's mode.
    An existing file keeps its mode; a missing folder is left to SQLite's own error."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    os.close(fd)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # SQLAlchemy, not the sqlite3 module, decides when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
            _sqlite_wal(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that reads and then writes
        # can fail at once with SQLITE_BUSY instead of waiting for the busy timeout.
        if conn.get_execution_options().get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def _dialect_insert(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql  # not imported for SQLite deployments

        return postgresql.insert
    return sqlite.insert


@functools.cache
def _built(dialect: str, build: Callable[[Any], _T]) -> _T:
    return build(_dialect_insert(dialect))


class Database:
    """One database and its engine. Create with :meth:`open` (as :class:`~iotdlm.store.Store`)."""

    def __init__(self, engine: Engine, *, hint: str) -> None:
        """Wrap an engine made by :meth:`open`; call :meth:`open` instead."""
        self._engine = engine
        self._url = _mask(engine.url)
        self._hint = hint
        self._closed = False
        self._statements = StatementCache(engine.dialect)
        self._turn: WriteTurn | None = None
        database = engine.url.database or ""
        if engine.dialect.name == "sqlite" and database and not database.startswith("file:"):
            self._turn = WriteTurn(Path(database), _SQLITE_BUSY_TIMEOUT_MS / 1000)

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, migrate: bool = True, echo: bool = False) -> Self:
        """Connect to ``url`` and (by default) bring the schema up to date.

        ``url`` is an SQLAlchemy URL: ``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or
        ``postgresql+psycopg://user:password@host:5432/dbname`` (plain ``postgresql://`` means
        psycopg 3). libpq options go in the query string, e.g. ``?connect_timeout=5`` or, to use a
        schema other than ``public``, ``?options=-csearch_path%3Dmyschema`` (the schema must exist).

        Raises ``ValueError`` for a URL that is malformed or names another database kind, and
        :class:`~iotdlm.errors.UnavailableError` if the database cannot be reached.
        """
        try:
            parsed = make_url(url)
        except (sa_exc.ArgumentError, ValueError) as exc:
            raise ValueError(f"not a database URL: {quote(url)} ({exc})") from None
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            engine, hint = cls._sqlite_engine(parsed, echo=echo)
        elif backend == "postgresql":
            engine, hint = cls._postgres_engine(parsed, echo=echo)
        else:
            raise ValueError(
                f"unsupported database {_mask(parsed)}: use sqlite:///path/to/file.db "
                "or postgresql+psycopg://user@host:port/dbname"
            )
        store = cls(engine, hint=hint)
        try:
            store._ping()
            if migrate:
                store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    @staticmethod
    def _sqlite_engine(parsed: URL, *, echo: bool) -> tuple[Engine, str]:
        if parsed.get_driver_name() != "pysqlite":
            raise ValueError(f"unsupported SQLite driver in {_mask(parsed)}: use sqlite:///path/to/file.db")
        database = parsed.database or ""
        if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
            raise ValueError(
                "an in-memory SQLite database cannot be shared between connections: "
                "use a file, e.g. sqlite:///" + "/tmp/iotdlm.db"  # noqa: S108 -- an example in a message
            )
        if not database.startswith("file:"):
            _create_owner_only(Path(database))
        engine = create_engine(parsed, echo=echo, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000})
        _install_sqlite_hooks(engine)
        where = Path(database).resolve().parent
        hint = f"Check that the directory {where} exists and is writable and that the file is an SQLite database"
        return engine, hint

    @staticmethod
    def _postgres_engine(parsed: URL, *, echo: bool) -> tuple[Engine, str]:
        if "+" not in parsed.drivername:  # plain postgresql:// -- the default driver varies by SQLAlchemy version
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif parsed.get_driver_name() != "psycopg":
            raise ValueError(f"unsupported PostgreSQL driver in {_mask(parsed)}: use postgresql+psycopg://")
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = _DEFAULT_PG_CONNECT_TIMEOUT_S
        engine = create_engine(parsed, echo=echo, pool_pre_ping=True, connect_args=connect_args)
        host = parsed.host or "the local socket"
        port = parsed.port or 5432
        hint = (
            f"Check that PostgreSQL is running and accepts connections on {host}:{port}, "
            f"that database {parsed.database!r} exists and that user {parsed.username!r} may log in"
        )
        return engine, hint

    def close(self) -> None:
        """Close every pooled connection. The store cannot be used afterwards. Idempotent."""
        self._closed = True
        self._engine.dispose()
        if self._turn is not None:
            self._turn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL with any password shown as ``***``."""
        return self._url

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (``alembic upgrade head``).

        Safe to run from several processes at once: migrations run under a database-wide lock
        (an advisory lock on PostgreSQL, the write lock on SQLite), one after the other.
        """
        if self.schema_revision() == schema_head():
            return  # up to date: the common case at every start, without loading Alembic
        from alembic import command
        from alembic.util import CommandError

        with self.guard("migrating the schema"):
            try:
                with self.migration_connection() as conn:
                    cfg = alembic_config()
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
            except CommandError as exc:
                raise errors.UnavailableError(
                    f"cannot migrate the database at {self._url}: {exc}. It may have been migrated by a "
                    "newer iotdlm; run that version, or restore a backup"
                ) from exc

    def schema_revision(self) -> str | None:
        """The schema's migration revision (Alembic's ``alembic_version``), None for a database
        that was never migrated or that holds more than one revision (branches: left to Alembic)."""
        try:
            with self.connection(write=False) as conn:
                rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        except sa_exc.DBAPIError:  # no such table yet (anything else: Alembic's run says what is wrong)
            return None
        return str(rows[0][0]) if len(rows) == 1 else None

    @contextmanager
    def migration_connection(self) -> Iterator[Connection]:
        """A write transaction holding the migration lock. Also used by migrations/env.py."""
        with self.connection(write=True) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            yield conn

    # -- plumbing --------------------------------------------------------------------------------

    def _ping(self) -> None:
        try:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except sa_exc.SQLAlchemyError as exc:
            raise errors.UnavailableError(
                f"cannot connect to the database at {self._url} ({_reason(exc)}). {self._hint}"
            ) from exc

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Raise :class:`~iotdlm.errors.UnavailableError` for any database failure inside, saying
        ``what`` the store was doing (``RuntimeError`` if the store is closed)."""
        if self._closed:
            raise RuntimeError(f"store {self._url} is closed")
        try:
            yield
        except sa_exc.SQLAlchemyError as exc:
            raise errors.UnavailableError(f"database at {self._url} failed while {what}: {_reason(exc)}") from exc

    @contextmanager
    def connection(self, *, write: bool) -> Iterator[Connection]:
        """One transaction on a pooled connection, unguarded (see :meth:`transaction`); a write
        transaction takes SQLite's write lock at once."""
        with self._engine.connect() as conn:
            if write:
                conn.execution_options(**{_WRITE_OPTION: True})
            with self._write_turn(write), conn.begin():
                yield conn

    @contextmanager
    def _write_turn(self, write: bool) -> Iterator[None]:
        """A write transaction inside waits for its turn (SQLite; :mod:`~iotdlm.store.write_turn`)."""
        turn = self._turn if write else None
        if turn is None or not turn.take():
            yield
            return
        try:
            yield
        finally:
            turn.give()

    @contextmanager
    def transaction(
        self,
        what: str,
        *,
        write: bool,
        conflict: Callable[[sa_exc.IntegrityError], errors.IotdlmError] | None = None,
    ) -> Iterator[Connection]:
        """One guarded transaction: committed if the block returns, rolled back if it raises.

        ``what`` says what the store was doing, for the :class:`~iotdlm.errors.UnavailableError`
        raised if the database fails. With ``conflict``, a unique-constraint violation is raised
        as ``conflict(exc)`` (the error that names the duplicate) instead.
        """
        with self._guarded(what, conflict, self.connection(write=write)) as conn:
            yield conn

    @contextmanager
    def driver_transaction(
        self,
        what: str,
        *,
        write: bool,
        conflict: Callable[[sa_exc.IntegrityError], errors.IotdlmError] | None = None,
    ) -> Iterator[DriverConnection]:
        """:meth:`transaction` on the driver's own connection (:mod:`~iotdlm.store.driver`): the
        same guard, conflict handling, write lock and commit-or-rollback, a fraction of the CPU.
        For km's hot path; only statements built once may run in it."""
        with self._guarded(what, conflict, self._driver_connection(write=write)) as conn:
            yield conn

    @contextmanager
    def _guarded(
        self,
        what: str,
        conflict: Callable[[sa_exc.IntegrityError], errors.IotdlmError] | None,
        opened: AbstractContextManager[_C],
    ) -> Iterator[_C]:
        """``opened`` (a transaction on some connection) under :meth:`guard`, a unique-constraint
        violation raised as ``conflict(exc)`` when given."""
        with self.guard(what):
            try:
                with opened as conn:
                    yield conn
            except sa_exc.IntegrityError as exc:
                if conflict is None:
                    raise
                raise conflict(exc) from exc

    @contextmanager
    def _driver_connection(self, *, write: bool) -> Iterator[DriverConnection]:
        dialect = self._engine.dialect
        dbapi_error: Any = dialect.loaded_dbapi.Error  # the driver's base exception class
        try:
            pooled = self._engine.raw_connection()  # the pool's checkout: pre-ping on PostgreSQL
        except dbapi_error as exc:
            raise sa_exc.DBAPIError.instance(None, None, exc, dbapi_error, dialect=dialect) from exc
        raw: Any = pooled.dbapi_connection
        sqlite_ = dialect.name == "sqlite"
        try:
            with self._write_turn(write):
                try:
                    if sqlite_:  # isolation_level None (see _install_sqlite_hooks): we say when it begins
                        raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    yield DriverConnection(raw, self._statements, dbapi_error)
                    raw.commit()
                except BaseException as exc:
                    cause: Any = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
                    if isinstance(cause, dbapi_error) and dialect.is_disconnect(cause, raw, None):
                        pooled.invalidate(cause)
                    else:
                        self._rollback(raw, sqlite_, dbapi_error)
                    if isinstance(exc, dbapi_error):
                        raise sa_exc.DBAPIError.instance(None, None, exc, dbapi_error, dialect=dialect) from exc
                    raise
        finally:
            pooled.close()

    @staticmethod
    def _rollback(raw: Any, sqlite_: bool, dbapi_error: type[Exception]) -> None:
        try:
            if sqlite_ and not raw.in_transaction:
                return
            raw.rollback()
        except dbapi_error:  # the connection is gone with its transaction; the pool's reset sees it
            return

    def insert(self) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT."""
        return _dialect_insert(self._engine.dialect.name)

    def built(self, build: Callable[[Any], _T]) -> _T:
        """``build(insert)`` with this dialect's INSERT, made once per dialect and kept: for the
        statements of a hot path, whose building cost more than their SQL (issue 15). ``build``
        is a module-level function; the statement takes its values as bound parameters."""
        statement: _T = _built(self._engine.dialect.name, build)  # functools.cache keeps no type
        return statement

    def rows_where_in(
        self, key: Any, values: Sequence[str], columns: Sequence[Any], what: str, *, max_len: int = r.DEVICE_ID_LEN
    ) -> list[Row[Any]]:
        """Rows whose ``key`` column is one of ``values`` (values no row can hold are skipped):
        one read transaction, one query per 500 values."""
        wanted = sorted({v for v in values if r.findable_text(v, max_len)})
        rows: list[Row[Any]] = []
        if not wanted:
            return rows
        with self.transaction(what, write=False) as conn:
            for i in range(0, len(wanted), IN_CHUNK):
                rows.extend(conn.execute(select(*columns).where(key.in_(wanted[i : i + IN_CHUNK]))))
        return rows
