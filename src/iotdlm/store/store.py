"""The km store: certificates, devices, nonces and a few settings, in SQLite or PostgreSQL.

Synchronous SQLAlchemy Core on one :class:`~sqlalchemy.engine.Engine`; every method takes a
connection from the engine's pool for one transaction, so a :class:`Store` may be shared by
threads (async callers use :func:`asyncio.to_thread`). On SQLite every write transaction is
``BEGIN IMMEDIATE`` in WAL mode with a 10 s busy timeout, so several processes may write one file.

Errors: a duplicate ``(issuer, serial)`` raises :class:`SerialCollisionError`, a duplicate
fingerprint :class:`~iotdlm.errors.ConflictError`, a reused nonce
:class:`~iotdlm.errors.ReplayError`, a missing row :class:`~iotdlm.errors.NotFoundError`. Any
other database failure raises :class:`~iotdlm.errors.UnavailableError` chained from the cause;
no SQLAlchemy exception type reaches callers.

Arguments: a lookup key that no stored row can have (a serial outside ``[0, 2**160)``, text with
NUL or longer than its column) simply finds nothing, so untrusted keys can be passed as they come.
A value to be *written* that the schema cannot hold (naive datetime, unknown status, NUL, too
long) is a programming error and raises ``ValueError``; nonces, which come straight from requests,
raise :class:`~iotdlm.errors.BadRequestError` instead.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from iotdlm import errors
from iotdlm.store import records as r
from iotdlm.store.records import CertRecord, DeviceRecord
from iotdlm.store.tables import certificates, devices, meta, nonces

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

_WRITE_OPTION: Final = "iotdlm_write"
# Any constant will do: it only has to be the same for every process migrating one database.
_MIGRATION_LOCK_KEY: Final = 0x10_7D_1A_0001
_DEFAULT_PG_CONNECT_TIMEOUT_S: Final = 10
_SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
_IN_CHUNK: Final = 500

_CERT_COLUMNS = (
    certificates.c.serial_hex,
    certificates.c.issuer,
    certificates.c.subject,
    certificates.c.device_id,
    certificates.c.profile,
    certificates.c.not_before,
    certificates.c.not_after,
    certificates.c.status,
    certificates.c.der,
    certificates.c.fingerprint,
    certificates.c.requested_by,
    certificates.c.created_at,
    certificates.c.revoked_at,
    certificates.c.revocation_reason,
    certificates.c.superseded_by_hex,
)
_DEVICE_COLUMNS = (
    devices.c.device_id,
    devices.c.dtype,
    devices.c.status,
    devices.c.created_at,
    devices.c.updated_at,
)


class SerialCollisionError(errors.ConflictError):
    """A certificate with this serial already exists for this issuer. Pick a new serial and retry."""

    code = "serial_collision"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        device_id: str | None = None,
        issuer: str | None = None,
        serial: int | None = None,
    ) -> None:
        super().__init__(message, field=field, device_id=device_id)
        self.issuer = issuer
        self.serial = serial


def _mask(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _reason(exc: BaseException) -> str:
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    text_ = " ".join(str(cause).split())
    return text_ or type(cause).__name__


def _short(value: str, limit: int = 64) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got limit={limit} offset={offset}")


def _cert_row(rec: CertRecord) -> dict[str, Any]:
    if r.fingerprint_of(rec.der) != rec.fingerprint:
        raise ValueError(
            f"fingerprint of certificate serial {rec.serial:x} is not the SHA-256 of its DER "
            "(use records.fingerprint_of)"
        )
    return {
        "serial_hex": r.serial_to_hex(rec.serial),
        "issuer": rec.issuer,
        "subject": rec.subject,
        "device_id": rec.device_id,
        "profile": rec.profile,
        "not_before": rec.not_before,
        "not_after": rec.not_after,
        "status": rec.status,
        "der": rec.der,
        "fingerprint": rec.fingerprint,
        "requested_by": rec.requested_by,
        "created_at": rec.created_at,
        "revoked_at": rec.revoked_at,
        "revocation_reason": rec.revocation_reason,
        "superseded_by_hex": None if rec.superseded_by is None else r.serial_to_hex(rec.superseded_by),
    }


def _cert_record(row: Row[*tuple[Any, ...]]) -> CertRecord:
    return CertRecord(
        serial=r.serial_from_hex(row[0]),
        issuer=row[1],
        subject=row[2],
        device_id=row[3],
        profile=row[4],
        not_before=row[5],
        not_after=row[6],
        status=row[7],
        der=bytes(row[8]),
        fingerprint=row[9],
        requested_by=row[10],
        created_at=row[11],
        revoked_at=row[12],
        revocation_reason=row[13],
        superseded_by=None if row[14] is None else r.serial_from_hex(row[14]),
    )


def _device_record(row: Row[*tuple[Any, ...]]) -> DeviceRecord:
    return DeviceRecord(device_id=row[0], dtype=row[1], status=row[2], created_at=row[3], updated_at=row[4])


def _alembic_config() -> Config:
    cfg = Config()
    # configparser interpolation: a literal % in the install path must be doubled.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return cfg


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


class Store:
    """Persistent state of the km service. Create with :meth:`open`."""

    def __init__(self, engine: Engine, *, hint: str) -> None:
        """Wrap an engine made by :meth:`open`; call :meth:`open` instead."""
        self._engine = engine
        self._url = _mask(engine.url)
        self._hint = hint
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, migrate: bool = True, echo: bool = False) -> Store:
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
            raise ValueError(f"not a database URL: {_short(url)} ({exc})") from None
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

    def __enter__(self) -> Store:
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
        with self._guard("migrating the schema"):
            try:
                with self._migration_connection() as conn:
                    cfg = _alembic_config()
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
            except CommandError as exc:
                raise errors.UnavailableError(
                    f"cannot migrate the database at {self._url}: {exc}. It may have been migrated by a "
                    "newer iotdlm; run that version, or restore a backup"
                ) from exc

    @contextmanager
    def _migration_connection(self) -> Iterator[Connection]:
        """A write transaction holding the migration lock. Also used by migrations/env.py."""
        with self._tx(write=True) as conn:
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
    def _guard(self, what: str) -> Iterator[None]:
        if self._closed:
            raise RuntimeError(f"store {self._url} is closed")
        try:
            yield
        except sa_exc.SQLAlchemyError as exc:
            raise errors.UnavailableError(f"database at {self._url} failed while {what}: {_reason(exc)}") from exc

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            if write:
                conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                yield conn

    def _insert(self) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT."""
        return postgresql.insert if self._engine.dialect.name == "postgresql" else sqlite.insert

    # -- certificates ----------------------------------------------------------------------------

    def add_certificates(self, records: Sequence[CertRecord]) -> None:
        """Store a batch of new certificates in one transaction: all of them, or none.

        Raises :class:`SerialCollisionError` if an ``(issuer, serial)`` is already stored or appears
        twice in the batch, and :class:`~iotdlm.errors.ConflictError` for a duplicate fingerprint.
        """
        if not records:
            return
        rows = [_cert_row(rec) for rec in records]
        self._check_batch(records)
        with self._guard("adding certificates"):
            try:
                with self._tx(write=True) as conn:
                    conn.execute(certificates.insert(), rows)
            except sa_exc.IntegrityError as exc:
                raise self._explain_conflict(records) from exc

    @staticmethod
    def _check_batch(records: Sequence[CertRecord]) -> None:
        keys: set[tuple[str, int]] = set()
        fps: set[str] = set()
        for rec in records:
            key = (rec.issuer, rec.serial)
            if key in keys:
                raise SerialCollisionError(
                    f"certificate serial {rec.serial:x} of issuer {_short(rec.issuer)} appears twice in the batch",
                    field="serial",
                    issuer=rec.issuer,
                    serial=rec.serial,
                )
            if rec.fingerprint in fps:
                raise errors.ConflictError(
                    f"certificate fingerprint {rec.fingerprint} appears twice in the batch", field="fingerprint"
                )
            keys.add(key)
            fps.add(rec.fingerprint)

    def _explain_conflict(self, records: Sequence[CertRecord]) -> errors.ConflictError:
        """After a unique violation: find which stored row the batch collided with."""
        wanted = {(r.serial_to_hex(rec.serial), rec.issuer): rec for rec in records}
        serials = sorted({hx for hx, _ in wanted})
        fps = sorted({rec.fingerprint for rec in records})
        with self._tx(write=False) as conn:
            for i in range(0, len(serials), _IN_CHUNK):
                stmt = select(certificates.c.serial_hex, certificates.c.issuer).where(
                    certificates.c.serial_hex.in_(serials[i : i + _IN_CHUNK])
                )
                for serial_hex, issuer in conn.execute(stmt):
                    hit = wanted.get((serial_hex, issuer))
                    if hit is not None:
                        return SerialCollisionError(
                            f"certificate serial {serial_hex} of issuer {_short(issuer)} is already stored; "
                            "nothing of the batch was stored",
                            field="serial",
                            device_id=hit.device_id,
                            issuer=issuer,
                            serial=hit.serial,
                        )
            for i in range(0, len(fps), _IN_CHUNK):
                stmt_fp = select(certificates.c.fingerprint).where(
                    certificates.c.fingerprint.in_(fps[i : i + _IN_CHUNK])
                )
                found = conn.execute(stmt_fp).scalar()
                if found is not None:
                    return errors.ConflictError(
                        f"a certificate with fingerprint {found} is already stored; nothing of the batch was stored",
                        field="fingerprint",
                    )
        return errors.ConflictError("the certificate batch conflicts with stored certificates; nothing was stored")

    def get_certificate(self, issuer: str, serial: int) -> CertRecord | None:
        """The certificate ``serial`` of ``issuer``, or None."""
        serial_hex = r.findable_serial(serial)
        if serial_hex is None or not r.findable_text(issuer, r.ISSUER_LEN):
            return None
        stmt = select(*_CERT_COLUMNS).where(certificates.c.serial_hex == serial_hex, certificates.c.issuer == issuer)
        with self._guard("reading a certificate"), self._tx(write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _cert_record(row)

    def find_by_serial(self, serial: int) -> list[CertRecord]:
        """Every certificate with this serial, whatever its issuer, newest first."""
        serial_hex = r.findable_serial(serial)
        if serial_hex is None:
            return []
        stmt = (
            select(*_CERT_COLUMNS)
            .where(certificates.c.serial_hex == serial_hex)
            .order_by(certificates.c.created_at.desc(), certificates.c.id.desc())
        )
        with self._guard("finding certificates by serial"), self._tx(write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_cert_record(row) for row in rows]

    def get_by_fingerprint(self, fp: str) -> CertRecord | None:
        """The certificate whose SHA-256 DER fingerprint (hex, any case) is ``fp``, or None."""
        if not r.findable_text(fp, r.FINGERPRINT_LEN):
            return None
        stmt = select(*_CERT_COLUMNS).where(certificates.c.fingerprint == fp.lower())
        with self._guard("reading a certificate by fingerprint"), self._tx(write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _cert_record(row)

    @staticmethod
    def _cert_filters(
        device_id: str | None, profile: str | None, status: str | None, issuer: str | None
    ) -> list[ColumnElement[bool]] | None:
        """WHERE clauses for the filters given, or None if no stored row can match them."""
        where: list[ColumnElement[bool]] = []
        for column, value, max_len in (
            (certificates.c.device_id, device_id, r.DEVICE_ID_LEN),
            (certificates.c.profile, profile, r.PROFILE_LEN),
            (certificates.c.status, status, r.STATUS_LEN),
            (certificates.c.issuer, issuer, r.ISSUER_LEN),
        ):
            if value is None:
                continue
            if not r.findable_text(value, max_len):
                return None
            where.append(column == value)
        return where

    def list_certificates(
        self,
        *,
        device_id: str | None = None,
        profile: str | None = None,
        status: str | None = None,
        issuer: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[CertRecord]:
        """Certificates matching every given filter, newest (``created_at``) first."""
        _check_page(limit, offset)
        where = self._cert_filters(device_id, profile, status, issuer)
        if where is None:
            return []
        stmt = (
            select(*_CERT_COLUMNS)
            .where(*where)
            .order_by(certificates.c.created_at.desc(), certificates.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self._guard("listing certificates"), self._tx(write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_cert_record(row) for row in rows]

    def count_certificates(
        self,
        *,
        device_id: str | None = None,
        profile: str | None = None,
        status: str | None = None,
        issuer: str | None = None,
    ) -> int:
        """How many certificates match every given filter."""
        where = self._cert_filters(device_id, profile, status, issuer)
        if where is None:
            return 0
        stmt = select(func.count()).select_from(certificates).where(*where)
        with self._guard("counting certificates"), self._tx(write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

    def update_certificate_status(
        self,
        issuer: str,
        serial: int,
        *,
        status: str,
        at: dt.datetime | None = None,
        reason: str | None = None,
        superseded_by: int | None = None,
    ) -> CertRecord:
        """Set the status fields of one certificate and return it as now stored.

        Every status field is written as given: ``status``, ``at`` (stored as ``revoked_at``,
        the moment the certificate stopped being valid), ``reason`` (``revocation_reason``) and
        ``superseded_by``; an argument left at None clears that field. No transition rules here.
        Raises :class:`~iotdlm.errors.NotFoundError` if there is no such certificate.
        """
        serial_hex = r.findable_serial(serial)
        if status not in r.CERT_STATUSES:
            raise ValueError(f"certificate status must be one of {sorted(r.CERT_STATUSES)}, got {status!r}")
        if at is not None:
            r.check_aware("at", at)
        if reason is not None:
            r.check_text("reason", reason, r.REASON_LEN)
        values = {
            "status": status,
            "revoked_at": at,
            "revocation_reason": reason,
            "superseded_by_hex": None if superseded_by is None else r.serial_to_hex(superseded_by),
        }
        row = None
        if serial_hex is not None and r.findable_text(issuer, r.ISSUER_LEN):
            where = (certificates.c.serial_hex == serial_hex, certificates.c.issuer == issuer)
            with self._guard("updating a certificate status"), self._tx(write=True) as conn:
                changed = conn.execute(update(certificates).where(*where).values(values)).rowcount
                row = conn.execute(select(*_CERT_COLUMNS).where(*where)).first() if changed else None
        if row is None:
            raise errors.NotFoundError(
                f"no certificate with serial {serial:x} from issuer {_short(issuer)}", field="serial"
            )
        return _cert_record(row)

    # -- nonces ----------------------------------------------------------------------------------

    def consume_nonce(self, sender: str, nonce: str, *, expires_at: dt.datetime) -> None:
        """Record that ``sender`` used ``nonce``; raise :class:`~iotdlm.errors.ReplayError` if it had.

        Race-free across threads and processes: the primary key ``(sender, nonce)`` decides.
        The row is kept until :meth:`purge_nonces` runs after ``expires_at``.
        """
        for name, value, max_len in (("sender", sender, r.SENDER_LEN), ("nonce", nonce, r.NONCE_LEN)):
            if not r.findable_text(value, max_len):
                # Nonces come straight from requests: refuse them as bad input, not as a bug.
                raise errors.BadRequestError(f"{name} must be at most {max_len} characters without NUL", field=name)
        r.check_aware("expires_at", expires_at)
        with self._guard("recording a nonce"):
            try:
                with self._tx(write=True) as conn:
                    conn.execute(nonces.insert().values(sender=sender, nonce=nonce, expires_at=expires_at))
            except sa_exc.IntegrityError as exc:
                raise errors.ReplayError(
                    f"nonce {_short(nonce)} from {_short(sender)} was already used", field="nonce"
                ) from exc

    def purge_nonces(self, now: dt.datetime) -> int:
        """Forget nonces whose ``expires_at`` is at or before ``now``; return how many."""
        r.check_aware("now", now)
        with self._guard("purging nonces"), self._tx(write=True) as conn:
            return int(conn.execute(delete(nonces).where(nonces.c.expires_at <= now)).rowcount)

    # -- devices ---------------------------------------------------------------------------------

    def upsert_device(self, device_id: str, dtype: str, *, now: dt.datetime) -> DeviceRecord:
        """Create the device as ``active`` if it is unknown; return it as stored (an existing
        device is returned unchanged, whatever ``dtype`` says)."""
        r.check_text("device_id", device_id, r.DEVICE_ID_LEN)
        r.check_text("dtype", dtype, r.DTYPE_LEN)
        r.check_aware("now", now)
        ins = (
            self._insert()(devices)
            .values(device_id=device_id, dtype=dtype, status=r.DEVICE_ACTIVE, created_at=now, updated_at=now)
            .on_conflict_do_nothing(index_elements=[devices.c.device_id])
        )
        with self._guard("creating a device"), self._tx(write=True) as conn:
            conn.execute(ins)
            row = conn.execute(select(*_DEVICE_COLUMNS).where(devices.c.device_id == device_id)).one()
        return _device_record(row)

    def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or None if unknown."""
        if not r.findable_text(device_id, r.DEVICE_ID_LEN):
            return None
        stmt = select(*_DEVICE_COLUMNS).where(devices.c.device_id == device_id)
        with self._guard("reading a device"), self._tx(write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _device_record(row)

    def set_device_status(self, device_id: str, status: str, *, now: dt.datetime) -> DeviceRecord:
        """Set a device's status (``active`` or ``retired``) and ``updated_at``; NotFoundError if unknown."""
        if status not in r.DEVICE_STATUSES:
            raise ValueError(f"device status must be one of {sorted(r.DEVICE_STATUSES)}, got {status!r}")
        r.check_aware("now", now)
        row = None
        if r.findable_text(device_id, r.DEVICE_ID_LEN):
            where = devices.c.device_id == device_id
            with self._guard("updating a device status"), self._tx(write=True) as conn:
                changed = conn.execute(update(devices).where(where).values(status=status, updated_at=now)).rowcount
                row = conn.execute(select(*_DEVICE_COLUMNS).where(where)).first() if changed else None
        if row is None:
            raise errors.NotFoundError(f"no device {_short(device_id)}", device_id=device_id)
        return _device_record(row)

    def list_devices(
        self,
        *,
        dtype: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[DeviceRecord]:
        """Devices matching every given filter, ordered by ``device_id``."""
        _check_page(limit, offset)
        where: list[ColumnElement[bool]] = []
        for column, value, max_len in ((devices.c.dtype, dtype, r.DTYPE_LEN), (devices.c.status, status, r.STATUS_LEN)):
            if value is None:
                continue
            if not r.findable_text(value, max_len):
                return []
            where.append(column == value)
        stmt = select(*_DEVICE_COLUMNS).where(*where).order_by(devices.c.device_id).limit(limit).offset(offset)
        with self._guard("listing devices"), self._tx(write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_device_record(row) for row in rows]

    # -- settings --------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        if not r.findable_text(key, r.META_KEY_LEN):
            return None
        with self._guard("reading a setting"), self._tx(write=False) as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()
        return None if value is None else str(value)

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        r.check_text("key", key, r.META_KEY_LEN)
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError("meta value must be a str without NUL characters")
        stmt = (
            self._insert()(meta)
            .values(key=key, value=value)
            .on_conflict_do_update(index_elements=[meta.c.key], set_={"value": value})
        )
        with self._guard("writing a setting"), self._tx(write=True) as conn:
            conn.execute(stmt)
