"""The km store: certificates, devices, nonces, CRLs, the audit log and a few settings, in SQLite
or PostgreSQL.

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

Audit log: records are appended with sequence numbers ``head + 1, head + 2, ...`` and a hash chain
(:mod:`iotdlm.wire.audit`) inside the write transaction of whatever they record (issuance,
revocation), so a change and its audit records commit together or not at all. Appenders are
serialised: by an advisory transaction lock on PostgreSQL, by ``BEGIN IMMEDIATE`` on SQLite. The
audit lock is always the last lock a transaction takes, so it cannot take part in a deadlock.
"""

from __future__ import annotations

import datetime as dt
import json
import os
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
    Select,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from iotdlm import errors
from iotdlm.store import records as r
from iotdlm.store.records import (
    AuditCheckpoint,
    AuditEntry,
    AuditRecord,
    CertRecord,
    CrlRecord,
    DeviceRecord,
    NonceUse,
    ProvisioningRecord,
)
from iotdlm.store.tables import (
    UTCDateTime,
    audit_checkpoints,
    audit_log,
    certificates,
    crl_numbers,
    crls,
    devices,
    meta,
    nonces,
    provisioning,
)
from iotdlm.wire import audit as wire_audit

devices_table = devices  # ``devices`` is also a parameter name below

_STATUS_QUERY = select(certificates.c.status, certificates.c.revoked_at, certificates.c.revocation_reason).where(
    certificates.c.serial_hex == bindparam("serial_hex"), certificates.c.issuer == bindparam("issuer")
)

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

_WRITE_OPTION: Final = "iotdlm_write"
# Any constant will do: it only has to be the same for every process migrating one database.
_MIGRATION_LOCK_KEY: Final = 0x10_7D_1A_0001
# Serialises audit log appenders on PostgreSQL (pg_advisory_xact_lock), whatever else they write.
_AUDIT_LOCK_KEY: Final = 0x10_7D_1A_0002
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
    certificates.c.crl_partition,
)
_CRL_COLUMNS = (
    crls.c.issuer,
    crls.c.partition,
    crls.c.kind,
    crls.c.number,
    crls.c.this_update,
    crls.c.next_update,
    crls.c.base_number,
    crls.c.der,
)
_AUDIT_COLUMNS = (
    audit_log.c.seq,
    audit_log.c.at,
    audit_log.c.kind,
    audit_log.c.actor,
    audit_log.c.subject,
    audit_log.c.data,
    audit_log.c.prev_hash,
    audit_log.c.hash,
)
_CHECKPOINT_COLUMNS = (
    audit_checkpoints.c.seq,
    audit_checkpoints.c.hash,
    audit_checkpoints.c.at,
    audit_checkpoints.c.signer,
    audit_checkpoints.c.signature,
    audit_checkpoints.c.root,
)
# Certificates that revocation may still change; revoked ones are final.
_REVOCABLE: Final = (r.CERT_VALID, r.CERT_SUPERSEDED)
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
        "crl_partition": rec.crl_partition,
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
        crl_partition=row[15],
    )


def _crl_record(row: Row[*tuple[Any, ...]]) -> CrlRecord:
    return CrlRecord(
        issuer=row[0],
        partition=row[1],
        kind=row[2],
        number=int(row[3]),
        this_update=row[4],
        next_update=row[5],
        base_number=None if row[6] is None else int(row[6]),
        der=bytes(row[7]),
    )


def _audit_record(row: Row[*tuple[Any, ...]]) -> AuditRecord:
    return AuditRecord(
        seq=int(row[0]),
        at=row[1],
        kind=row[2],
        actor=row[3],
        subject=row[4],
        data_json=row[5],
        prev_hash=row[6],
        hash=row[7],
    )


def _checkpoint_record(row: Row[*tuple[Any, ...]]) -> AuditCheckpoint:
    return AuditCheckpoint(seq=int(row[0]), hash=row[1], at=row[2], signer=row[3], signature=bytes(row[4]), root=row[5])


def _check_batch_size(batch: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")


def _check_entries(entries: Sequence[AuditEntry]) -> None:
    for entry in entries:
        if not isinstance(entry, AuditEntry):
            raise ValueError(f"audit entries must be AuditEntry, got {type(entry).__name__}")


def _revocation_entry(rec: CertRecord, *, actor: str) -> AuditEntry:
    assert rec.revoked_at is not None
    return AuditEntry(
        at=rec.revoked_at,
        kind=wire_audit.REVOCATION,
        actor=actor,
        subject=f"{rec.issuer}:{rec.serial:x}",
        data={
            "issuer": rec.issuer,
            "serial": r.serial_to_hex(rec.serial),
            "device_id": rec.device_id,
            "reason": rec.revocation_reason,
            "revoked_at": wire_audit.canonical_time(rec.revoked_at),
        },
    )


def _append_audit(conn: Connection, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
    """Append ``entries`` to the audit log inside the caller's write transaction.

    Takes the audit lock (PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` has already serialised every
    writer), reads the head, and chains the new records onto it. Call it last in a transaction:
    the lock is held until commit.
    """
    if not entries:
        return []
    _check_entries(entries)
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _AUDIT_LOCK_KEY})
    head = conn.execute(select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)).first()
    seq, prev_hash = (0, wire_audit.GENESIS_HASH) if head is None else (int(head[0]), str(head[1]))
    out: list[AuditRecord] = []
    for entry in entries:
        seq += 1
        at = entry.at.astimezone(dt.UTC)
        data_json = r.audit_data_json(entry.data)  # again: the dict may have changed since validation
        hash_ = wire_audit.record_hash(prev_hash, seq, at, entry.kind, entry.actor, entry.subject, data_json)
        out.append(
            AuditRecord(
                seq=seq,
                at=at,
                kind=entry.kind,
                actor=entry.actor,
                subject=entry.subject,
                data_json=data_json,
                prev_hash=prev_hash,
                hash=hash_,
            )
        )
        prev_hash = hash_
    conn.execute(
        audit_log.insert(),
        [
            {
                "seq": rec.seq,
                "at": rec.at,
                "kind": rec.kind,
                "actor": rec.actor,
                "subject": rec.subject,
                "data": rec.data_json,
                "prev_hash": rec.prev_hash,
                "hash": rec.hash,
            }
            for rec in out
        ],
    )
    return out


def _device_record(row: Row[*tuple[Any, ...]]) -> DeviceRecord:
    return DeviceRecord(device_id=row[0], dtype=row[1], status=row[2], created_at=row[3], updated_at=row[4])


_PROVISIONING_COLUMNS = (
    provisioning.c.device_id,
    provisioning.c.dtype,
    provisioning.c.status,
    provisioning.c.operator,
    provisioning.c.ref,
    provisioning.c.steps_done,
    provisioning.c.release_counter,
    provisioning.c.image_sha256,
    provisioning.c.certificates,
    provisioning.c.failed_step,
    provisioning.c.message,
    provisioning.c.attempts,
    provisioning.c.started_at,
    provisioning.c.updated_at,
    provisioning.c.completed_at,
)


def _provisioning_row(rec: ProvisioningRecord) -> dict[str, Any]:
    return {
        "device_id": rec.device_id,
        "dtype": rec.dtype,
        "status": rec.status,
        "operator": rec.operator,
        "ref": rec.ref,
        "steps_done": json.dumps(list(rec.steps_done), separators=(",", ":")),
        "release_counter": rec.release_counter,
        "image_sha256": rec.image_sha256,
        "certificates": json.dumps([list(pair) for pair in rec.certificates], separators=(",", ":")),
        "failed_step": rec.failed_step,
        "message": rec.message,
        "attempts": rec.attempts,
        "started_at": rec.started_at,
        "updated_at": rec.updated_at,
        "completed_at": rec.completed_at,
    }


def _provisioning_record(row: Row[*tuple[Any, ...]]) -> ProvisioningRecord:
    return ProvisioningRecord(
        device_id=row[0],
        dtype=row[1],
        status=row[2],
        operator=row[3],
        ref=row[4],
        steps_done=tuple(str(step) for step in json.loads(row[5])),
        release_counter=None if row[6] is None else int(row[6]),
        image_sha256=row[7],
        certificates=tuple((str(p), str(serial)) for p, serial in json.loads(row[8])),
        failed_step=row[9],
        message=row[10],
        attempts=int(row[11]),
        started_at=row[12],
        updated_at=row[13],
        completed_at=row[14],
    )


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

    def add_certificates(
        self,
        records: Sequence[CertRecord],
        *,
        audit: Sequence[AuditEntry] = (),
        devices: Sequence[tuple[str, str]] = (),
        nonce: NonceUse | None = None,
        now: dt.datetime | None = None,
    ) -> None:
        """Store a batch of new certificates, and append ``audit`` to the audit log, in one
        transaction: all of it, or none.

        In the same transaction (one write per request, which is what keeps a provisioning line
        fast on SQLite): ``devices`` -- ``(device_id, dtype)`` pairs created as active if unknown
        (known ones are left as they are; needs ``now``) -- and ``nonce``, the request's replay
        nonce, consumed here so a replayed request stores nothing (:class:`~iotdlm.errors.ReplayError`).

        Raises :class:`SerialCollisionError` if an ``(issuer, serial)`` is already stored or appears
        twice in the batch, and :class:`~iotdlm.errors.ConflictError` for a duplicate fingerprint;
        then neither the certificates nor the audit records are stored.
        """
        if not records and not audit and not devices and nonce is None:
            return
        rows = [_cert_row(rec) for rec in records]
        self._check_batch(records)
        _check_entries(audit)
        device_rows = []
        if devices:
            if now is None:
                raise ValueError("add_certificates needs now= to create devices")
            r.check_aware("now", now)
            for device_id, dtype in dict(devices).items():
                r.check_text("device_id", device_id, r.DEVICE_ID_LEN)
                r.check_text("dtype", dtype, r.DTYPE_LEN)
                device_rows.append(
                    {
                        "device_id": device_id,
                        "dtype": dtype,
                        "status": r.DEVICE_ACTIVE,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
        if nonce is not None:
            self._check_nonce(nonce.sender, nonce.nonce, nonce.expires_at)
        with self._guard("adding certificates"):
            try:
                with self._tx(write=True) as conn:
                    if nonce is not None:
                        self._insert_nonce(conn, nonce.sender, nonce.nonce, nonce.expires_at)
                    if device_rows:
                        ins = self._insert()(devices_table).on_conflict_do_nothing(
                            index_elements=[devices_table.c.device_id]
                        )
                        conn.execute(ins, device_rows)
                    if rows:
                        conn.execute(certificates.insert(), rows)
                    _append_audit(conn, audit)
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

    def certificate_status(self, issuer: str, serial: int) -> tuple[str, dt.datetime | None, str | None] | None:
        """(status, revoked_at, revocation reason) of one certificate, or None: the OCSP hot path,
        reading three columns instead of the whole record."""
        serial_hex = r.findable_serial(serial)
        if serial_hex is None or not r.findable_text(issuer, r.ISSUER_LEN):
            return None
        with self._guard("reading a certificate status"), self._tx(write=False) as conn:
            row = conn.execute(_STATUS_QUERY, {"serial_hex": serial_hex, "issuer": issuer}).first()
        return None if row is None else (str(row[0]), row[1], row[2])

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

    # -- revocation ------------------------------------------------------------------------------

    @staticmethod
    def _check_revocation(reason: str | None, at: dt.datetime, actor: str) -> None:
        if reason is not None:
            r.check_text("reason", reason, r.REASON_LEN)
            r.check_revocation_reason(reason)
        r.check_aware("at", at)
        r.check_text("actor", actor, r.ACTOR_LEN)

    def revoke_certificate(
        self, issuer: str, serial: int, *, reason: str | None, at: dt.datetime, actor: str
    ) -> CertRecord:
        """Revoke one valid or superseded certificate and audit it, in one transaction.

        Sets ``status`` to ``revoked``, ``revoked_at`` to ``at`` and ``revocation_reason`` to
        ``reason`` (``superseded_by`` is kept), appends one ``revocation`` audit record, and returns
        the certificate as now stored. Raises :class:`~iotdlm.errors.NotFoundError` if there is no
        such certificate and :class:`~iotdlm.errors.ConflictError` (saying when and why) if it is
        already revoked; then nothing changes.
        """
        self._check_revocation(reason, at, actor)
        serial_hex = r.findable_serial(serial)
        if serial_hex is None or not r.findable_text(issuer, r.ISSUER_LEN):
            raise self._no_certificate(issuer, serial)
        where = (certificates.c.serial_hex == serial_hex, certificates.c.issuer == issuer)
        stmt = (
            update(certificates)
            .where(*where, certificates.c.status.in_(_REVOCABLE))
            .values(status=r.CERT_REVOKED, revoked_at=at, revocation_reason=reason)
            .returning(*_CERT_COLUMNS)
        )
        with self._guard("revoking a certificate"), self._tx(write=True) as conn:
            row = conn.execute(stmt).first()
            if row is None:
                current = conn.execute(select(*_CERT_COLUMNS).where(*where)).first()
                if current is None:
                    raise self._no_certificate(issuer, serial)
                raise self._already_revoked(_cert_record(current))
            rec = _cert_record(row)
            _append_audit(conn, [_revocation_entry(rec, actor=actor)])
        return rec

    @staticmethod
    def _no_certificate(issuer: str, serial: int) -> errors.NotFoundError:
        return errors.NotFoundError(
            f"no certificate with serial {serial:x} from issuer {_short(issuer)}", field="serial"
        )

    @staticmethod
    def _already_revoked(rec: CertRecord) -> errors.ConflictError:
        when = "at an unknown time" if rec.revoked_at is None else f"at {rec.revoked_at.isoformat()}"
        why = "no reason given" if rec.revocation_reason is None else f"reason: {rec.revocation_reason}"
        return errors.ConflictError(
            f"certificate serial {rec.serial:x} of issuer {_short(rec.issuer)} was already revoked {when} ({why})",
            field="serial",
            device_id=rec.device_id,
        )

    @staticmethod
    def _lock_device(conn: Connection, device_id: str) -> DeviceRecord:
        """The device, its row locked until commit on PostgreSQL (on SQLite the write lock is held),
        so bulk operations on one device run one after the other. NotFoundError if unknown."""
        row = None
        if r.findable_text(device_id, r.DEVICE_ID_LEN):
            stmt = select(*_DEVICE_COLUMNS).where(devices.c.device_id == device_id).with_for_update()
            row = conn.execute(stmt).first()
        if row is None:
            raise errors.NotFoundError(f"no device {_short(device_id)}", device_id=device_id)
        return _device_record(row)

    @staticmethod
    def _revoke_device(conn: Connection, device_id: str, *, reason: str | None, at: dt.datetime) -> list[CertRecord]:
        """Revoke every valid or superseded certificate of the device; return them in issue order."""
        stmt = (
            update(certificates)
            .where(certificates.c.device_id == device_id, certificates.c.status.in_(_REVOCABLE))
            .values(status=r.CERT_REVOKED, revoked_at=at, revocation_reason=reason)
            .returning(*_CERT_COLUMNS, certificates.c.id)
        )
        id_at = len(_CERT_COLUMNS)
        rows = sorted(conn.execute(stmt).all(), key=lambda row: int(row[id_at]))
        return [_cert_record(row) for row in rows]

    def revoke_device_certificates(
        self, device_id: str, *, reason: str | None, at: dt.datetime, actor: str
    ) -> list[CertRecord]:
        """Revoke every valid or superseded certificate of a device, with one ``revocation`` audit
        record each, in one transaction, and return the newly revoked certificates in issue order
        (certificates already revoked are left as they are). Raises
        :class:`~iotdlm.errors.NotFoundError` if the device is unknown (see :meth:`upsert_device`).
        """
        self._check_revocation(reason, at, actor)
        with self._guard("revoking the certificates of a device"), self._tx(write=True) as conn:
            self._lock_device(conn, device_id)
            revoked = self._revoke_device(conn, device_id, reason=reason, at=at)
            _append_audit(conn, [_revocation_entry(rec, actor=actor) for rec in revoked])
        return revoked

    def decommission_device(
        self, device_id: str, *, reason: str | None, at: dt.datetime, actor: str
    ) -> list[CertRecord]:
        """Retire a device and revoke its certificates, in one transaction.

        The device becomes ``retired`` (``updated_at`` = ``at``); its certificates are revoked as
        by :meth:`revoke_device_certificates` (one ``revocation`` audit record each), then one
        ``decommission`` audit record lists the revoked serials. Returns the newly revoked
        certificates. Raises :class:`~iotdlm.errors.NotFoundError` for an unknown device and
        :class:`~iotdlm.errors.ConflictError` for one already retired; then nothing changes.
        """
        self._check_revocation(reason, at, actor)
        with self._guard("decommissioning a device"), self._tx(write=True) as conn:
            device = self._lock_device(conn, device_id)
            if device.status == r.DEVICE_RETIRED:
                raise errors.ConflictError(
                    f"device {_short(device_id)} was already retired (last change at {device.updated_at.isoformat()})",
                    device_id=device_id,
                )
            conn.execute(
                update(devices).where(devices.c.device_id == device_id).values(status=r.DEVICE_RETIRED, updated_at=at)
            )
            revoked = self._revoke_device(conn, device_id, reason=reason, at=at)
            entries = [_revocation_entry(rec, actor=actor) for rec in revoked]
            entries.append(
                AuditEntry(
                    at=at,
                    kind=wire_audit.DECOMMISSION,
                    actor=actor,
                    subject=device_id,
                    data={
                        "device_id": device_id,
                        "revoked": [r.serial_to_hex(rec.serial) for rec in revoked],
                        "reason": reason,
                    },
                )
            )
            _append_audit(conn, entries)
        return revoked

    @staticmethod
    def _revoked_filters(issuer: str, partition: int, not_after_from: dt.datetime) -> list[ColumnElement[bool]] | None:
        """WHERE clauses for the revoked certificates on a CRL, or None if no stored row can match."""
        r.check_aware("not_after_from", not_after_from)
        if not r.findable_partition(partition) or not r.findable_text(issuer, r.ISSUER_LEN):
            return None
        return [
            certificates.c.issuer == issuer,
            certificates.c.crl_partition == partition,
            certificates.c.not_after >= not_after_from,
        ]

    def iter_revoked(
        self,
        issuer: str,
        partition: int,
        *,
        not_after_from: dt.datetime,
        revoked_since: dt.datetime | None = None,
        superseded_grace: dt.timedelta | None = None,
        as_of: dt.datetime | None = None,
        batch: int = 5000,
    ) -> Iterator[tuple[int, dt.datetime, str | None]]:
        """``(serial, revoked_at, reason)`` of every revoked certificate of ``issuer`` in CRL
        partition ``partition`` whose ``not_after`` is at or after ``not_after_from`` (expired
        certificates drop off CRLs) and, if ``revoked_since`` is given, revoked after it (delta CRLs).

        With ``superseded_grace`` (and ``as_of``, the time the CRL is made), a superseded
        certificate counts as revoked once the grace after it was superseded (its ``revoked_at``)
        has passed by ``as_of``: it is reported revoked at ``revoked_at + superseded_grace`` with
        reason ``superseded``, and ``revoked_since`` applies to that time. Both selections use the
        index on (issuer, crl_partition, status, revoked_at) for deltas.

        Streams in issue order, ``batch`` rows per query, each query its own short read transaction
        (keyset pagination on the row id): memory stays bounded however many rows match, and no
        transaction stays open while the caller works. Certificates revoked while the iteration
        runs may or may not be seen. A revoked certificate without ``revoked_at`` (possible through
        :meth:`update_certificate_status`) is reported as revoked at its ``created_at`` rather than
        left off the CRL. Arguments are checked at once, not on the first ``next()``.
        """
        if revoked_since is not None:
            r.check_aware("revoked_since", revoked_since)
        if superseded_grace is not None:
            if as_of is None:
                raise ValueError("superseded_grace needs as_of, the time the CRL is made")
            r.check_aware("as_of", as_of)
            if superseded_grace < dt.timedelta(0):
                raise ValueError("superseded_grace must not be negative")
        _check_batch_size(batch)
        where = self._revoked_filters(issuer, partition, not_after_from)
        if where is None:
            return iter(())
        revoked_at = type_coerce(func.coalesce(certificates.c.revoked_at, certificates.c.created_at), UTCDateTime())
        revoked: list[ColumnElement[bool]] = [certificates.c.status == r.CERT_REVOKED]
        if revoked_since is not None:
            # on the indexed column (issuer, crl_partition, status, revoked_at): a delta is made after
            # every revocation. A row revoked without a time is in the full CRLs, not in deltas.
            revoked.append(certificates.c.revoked_at > revoked_since)
        status: ColumnElement[bool] = and_(*revoked)
        if superseded_grace is not None:
            assert as_of is not None
            superseded = [
                certificates.c.status == r.CERT_SUPERSEDED,
                certificates.c.revoked_at <= as_of - superseded_grace,
            ]
            if revoked_since is not None:
                superseded.append(certificates.c.revoked_at > revoked_since - superseded_grace)
            status = or_(status, and_(*superseded))
        where.append(status)
        base = select(
            certificates.c.id,
            certificates.c.serial_hex,
            revoked_at,
            certificates.c.revocation_reason,
            certificates.c.status,
        )
        return self._iter_revoked(base.where(*where), batch, superseded_grace or dt.timedelta(0))

    def _iter_revoked(
        self, base: Select[Any], batch: int, grace: dt.timedelta
    ) -> Iterator[tuple[int, dt.datetime, str | None]]:
        last_id: int | None = None
        while True:
            stmt = base if last_id is None else base.where(certificates.c.id > last_id)
            stmt = stmt.order_by(certificates.c.id).limit(batch)
            with self._guard("listing revoked certificates"), self._tx(write=False) as conn:
                rows = conn.execute(stmt).all()
            for row in rows:
                if row[4] == r.CERT_SUPERSEDED:
                    yield r.serial_from_hex(row[1]), row[2] + grace, row[3] or "superseded"
                else:
                    yield r.serial_from_hex(row[1]), row[2], row[3]
            if len(rows) < batch:
                return
            last_id = int(rows[-1][0])

    def count_revoked(self, issuer: str, partition: int, *, not_after_from: dt.datetime) -> int:
        """How many certificates :meth:`iter_revoked` yields (without ``revoked_since``)."""
        where = self._revoked_filters(issuer, partition, not_after_from)
        if where is None:
            return 0
        where.append(certificates.c.status == r.CERT_REVOKED)
        stmt = select(func.count()).select_from(certificates).where(*where)
        with self._guard("counting revoked certificates"), self._tx(write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

    # -- nonces ----------------------------------------------------------------------------------

    def consume_nonce(self, sender: str, nonce: str, *, expires_at: dt.datetime) -> None:
        """Record that ``sender`` used ``nonce``; raise :class:`~iotdlm.errors.ReplayError` if it had.

        Race-free across threads and processes: the primary key ``(sender, nonce)`` decides.
        The row is kept until :meth:`purge_nonces` runs after ``expires_at``.
        """
        self._check_nonce(sender, nonce, expires_at)
        with self._guard("recording a nonce"), self._tx(write=True) as conn:
            self._insert_nonce(conn, sender, nonce, expires_at)

    @staticmethod
    def _check_nonce(sender: str, nonce: str, expires_at: dt.datetime) -> None:
        for name, value, max_len in (("sender", sender, r.SENDER_LEN), ("nonce", nonce, r.NONCE_LEN)):
            if not r.findable_text(value, max_len):
                # Nonces come straight from requests: refuse them as bad input, not as a bug.
                raise errors.BadRequestError(f"{name} must be at most {max_len} characters without NUL", field=name)
        r.check_aware("expires_at", expires_at)

    @staticmethod
    def _insert_nonce(conn: Connection, sender: str, nonce: str, expires_at: dt.datetime) -> None:
        """Inside a write transaction; a reused nonce raises ReplayError (and the transaction rolls back)."""
        try:
            with conn.begin_nested():
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

    def get_devices(self, device_ids: Sequence[str]) -> dict[str, DeviceRecord]:
        """The known devices among ``device_ids`` (one read, however many), by id."""
        rows = self._rows_by_device_id(device_ids, _DEVICE_COLUMNS, devices_table.c.device_id, "reading devices")
        return {rec.device_id: rec for rec in map(_device_record, rows)}

    def _rows_by_device_id(
        self, device_ids: Sequence[str], columns: Sequence[Any], key: Any, what: str
    ) -> list[Row[Any]]:
        """Rows whose ``key`` column is one of ``device_ids``: one read, in chunks of ids."""
        wanted = sorted({d for d in device_ids if r.findable_text(d, r.DEVICE_ID_LEN)})
        rows: list[Row[Any]] = []
        if not wanted:
            return rows
        with self._guard(what), self._tx(write=False) as conn:
            for i in range(0, len(wanted), _IN_CHUNK):
                rows.extend(conn.execute(select(*columns).where(key.in_(wanted[i : i + _IN_CHUNK]))))
        return rows

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

    def setdefault_meta(self, key: str, value: str) -> str:
        """The value under ``key``; if there is none, store ``value`` first. Race-free across
        workers: the first writer wins and every caller gets the winner's value."""
        r.check_text("key", key, r.META_KEY_LEN)
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError("meta value must be a str without NUL characters")
        stmt = self._insert()(meta).values(key=key, value=value).on_conflict_do_nothing(index_elements=[meta.c.key])
        with self._guard("writing a setting"), self._tx(write=True) as conn:
            conn.execute(stmt)
            stored = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()
        return str(stored)

    def set_meta_with_audit(self, key: str, value: str, audit: Sequence[AuditEntry]) -> list[AuditRecord]:
        """Store ``value`` under ``key`` and append ``audit`` to the audit log in ONE transaction
        (pm's alarm: the halt and its audit record are written together or not at all)."""
        r.check_text("key", key, r.META_KEY_LEN)
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError("meta value must be a str without NUL characters")
        _check_entries(audit)
        stmt = (
            self._insert()(meta)
            .values(key=key, value=value)
            .on_conflict_do_update(index_elements=[meta.c.key], set_={"value": value})
        )
        with self._guard("writing a setting with its audit records"), self._tx(write=True) as conn:
            conn.execute(stmt)
            return _append_audit(conn, audit)

    # -- provisioning (pm) -----------------------------------------------------------------------

    def save_provisioning(self, records: Sequence[ProvisioningRecord]) -> None:
        """Create or replace the provisioning record of each device in ``records``, all in one
        transaction (pm writes a whole batch of devices at once). A device twice in ``records`` is
        a ``ValueError``."""
        if not records:
            return
        seen: set[str] = set()
        for rec in records:
            if not isinstance(rec, ProvisioningRecord):
                raise ValueError(f"save_provisioning takes ProvisioningRecord, got {type(rec).__name__}")
            if rec.device_id in seen:
                raise ValueError(f"device {_short(rec.device_id)} appears twice in one save")
            seen.add(rec.device_id)
        rows = [_provisioning_row(rec) for rec in records]
        ins = self._insert()(provisioning)
        stmt = ins.on_conflict_do_update(
            index_elements=[provisioning.c.device_id],
            set_={c.name: ins.excluded[c.name] for c in provisioning.columns if c.name != "device_id"},
        )
        with self._guard("saving provisioning records"), self._tx(write=True) as conn:
            conn.execute(stmt, rows)

    def get_provisioning(self, device_id: str) -> ProvisioningRecord | None:
        """The provisioning record of ``device_id``, or None."""
        if not r.findable_text(device_id, r.DEVICE_ID_LEN):
            return None
        stmt = select(*_PROVISIONING_COLUMNS).where(provisioning.c.device_id == device_id)
        with self._guard("reading a provisioning record"), self._tx(write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _provisioning_record(row)

    def get_provisionings(self, device_ids: Sequence[str]) -> dict[str, ProvisioningRecord]:
        """The provisioning records among ``device_ids`` (one read per 500 ids), by device id."""
        rows = self._rows_by_device_id(
            device_ids, _PROVISIONING_COLUMNS, provisioning.c.device_id, "reading provisioning records"
        )
        return {rec.device_id: rec for rec in map(_provisioning_record, rows)}

    @staticmethod
    def _provisioning_filters(dtype: str | None, status: str | None) -> list[ColumnElement[bool]] | None:
        where: list[ColumnElement[bool]] = []
        for column, value, max_len in (
            (provisioning.c.dtype, dtype, r.DTYPE_LEN),
            (provisioning.c.status, status, r.STATUS_LEN),
        ):
            if value is None:
                continue
            if not r.findable_text(value, max_len):
                return None
            where.append(column == value)
        return where

    def list_provisioning(
        self, *, dtype: str | None = None, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[ProvisioningRecord]:
        """Provisioning records matching every given filter, ordered by device id."""
        _check_page(limit, offset)
        where = self._provisioning_filters(dtype, status)
        if where is None:
            return []
        stmt = (
            select(*_PROVISIONING_COLUMNS).where(*where).order_by(provisioning.c.device_id).limit(limit).offset(offset)
        )
        with self._guard("listing provisioning records"), self._tx(write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_provisioning_record(row) for row in rows]

    def count_provisioning(self, *, dtype: str | None = None) -> dict[str, int]:
        """How many provisioning records (of ``dtype`` if given) have each status; statuses with
        none are absent."""
        where = self._provisioning_filters(dtype, None)
        if where is None:
            return {}
        stmt = (
            select(provisioning.c.status, func.count())
            .where(*where)
            .group_by(provisioning.c.status)
            .order_by(provisioning.c.status)
        )
        with self._guard("counting provisioning records"), self._tx(write=False) as conn:
            return {str(status): int(n) for status, n in conn.execute(stmt)}

    # -- CRLs ------------------------------------------------------------------------------------

    def next_crl_number(self, issuer: str, partition: int) -> int:
        """Allocate the next CRL number of ``(issuer, partition)``: 1, 2, 3, ...

        Atomic across threads and processes (one ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``
        in a write transaction): no two calls get the same number, and a call gets a number above
        every number handed out before it began. A number whose CRL is never saved is skipped.
        """
        r.check_text("issuer", issuer, r.ISSUER_LEN)
        r.check_partition("partition", partition)
        stmt = (
            self._insert()(crl_numbers)
            .values(issuer=issuer, partition=partition, last_number=1)
            .on_conflict_do_update(
                index_elements=[crl_numbers.c.issuer, crl_numbers.c.partition],
                set_={"last_number": crl_numbers.c.last_number + 1},
            )
            .returning(crl_numbers.c.last_number)
        )
        with self._guard("allocating a CRL number"), self._tx(write=True) as conn:
            return int(conn.execute(stmt).scalar_one())

    def save_crl(self, rec: CrlRecord) -> None:
        """Store ``rec`` as the current CRL of its ``(issuer, partition, kind)``.

        Never goes back: if the stored CRL of that key has a number at or above ``rec.number``
        (another generator got there first), raises :class:`~iotdlm.errors.ConflictError` and
        keeps the stored one. The comparison and the write are one statement.
        """
        if not isinstance(rec, CrlRecord):
            raise ValueError(f"save_crl takes a CrlRecord, got {type(rec).__name__}")
        values: dict[str, Any] = {
            "number": rec.number,
            "this_update": rec.this_update,
            "next_update": rec.next_update,
            "base_number": rec.base_number,
            "der": rec.der,
        }
        ins = self._insert()(crls).values(issuer=rec.issuer, partition=rec.partition, kind=rec.kind, **values)
        stmt = ins.on_conflict_do_update(
            index_elements=[crls.c.issuer, crls.c.partition, crls.c.kind],
            set_=values,
            where=crls.c.number < ins.excluded.number,
        ).returning(crls.c.number)
        key = (crls.c.issuer == rec.issuer, crls.c.partition == rec.partition, crls.c.kind == rec.kind)
        with self._guard("saving a CRL"), self._tx(write=True) as conn:
            if conn.execute(stmt).first() is None:
                stored = conn.execute(select(crls.c.number).where(*key)).scalar_one()
                raise errors.ConflictError(
                    f"{rec.kind} CRL number {rec.number} of issuer {_short(rec.issuer)} partition {rec.partition} "
                    f"is not newer than the stored one, number {stored}; the stored CRL was kept",
                    field="number",
                )

    def get_crl(self, issuer: str, partition: int, kind: str) -> CrlRecord | None:
        """The current CRL of that issuer, partition and kind (``"full"`` or ``"delta"``), or None."""
        if not (
            r.findable_partition(partition)
            and r.findable_text(issuer, r.ISSUER_LEN)
            and r.findable_text(kind, r.CRL_KIND_LEN)
        ):
            return None
        stmt = select(*_CRL_COLUMNS).where(crls.c.issuer == issuer, crls.c.partition == partition, crls.c.kind == kind)
        with self._guard("reading a CRL"), self._tx(write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _crl_record(row)

    def list_crls(self, issuer: str | None = None) -> list[CrlRecord]:
        """Every current CRL (of ``issuer`` if given), ordered by issuer, partition and kind."""
        stmt = select(*_CRL_COLUMNS).order_by(crls.c.issuer, crls.c.partition, crls.c.kind)
        if issuer is not None:
            if not r.findable_text(issuer, r.ISSUER_LEN):
                return []
            stmt = stmt.where(crls.c.issuer == issuer)
        with self._guard("listing CRLs"), self._tx(write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_crl_record(row) for row in rows]

    # -- audit log -------------------------------------------------------------------------------

    def append_audit(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        """Append ``entries`` to the audit log in one transaction; return them as stored."""
        _check_entries(entries)
        if not entries:
            return []
        with self._guard("appending to the audit log"), self._tx(write=True) as conn:
            return _append_audit(conn, entries)

    def audit_head(self) -> AuditRecord | None:
        """The newest audit record, or None if the log is empty."""
        stmt = select(*_AUDIT_COLUMNS).order_by(audit_log.c.seq.desc()).limit(1)
        with self._guard("reading the audit head"), self._tx(write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _audit_record(row)

    def iter_audit(self, *, start_seq: int = 1, batch: int = 1000) -> Iterator[AuditRecord]:
        """Audit records from ``start_seq`` on, oldest first, ``batch`` per query (keyset
        pagination on ``seq``, one short read transaction per query: bounded memory). Records
        appended meanwhile are seen if the iteration has not passed their place yet."""
        r.check_int("start_seq", start_seq, -(2**63), 2**63 - 1)
        _check_batch_size(batch)
        return self._iter_audit(start_seq, batch)

    def _iter_audit(self, start_seq: int, batch: int) -> Iterator[AuditRecord]:
        next_seq = start_seq
        while True:
            stmt = select(*_AUDIT_COLUMNS).where(audit_log.c.seq >= next_seq).order_by(audit_log.c.seq).limit(batch)
            with self._guard("reading the audit log"), self._tx(write=False) as conn:
                rows = conn.execute(stmt).all()
            for row in rows:
                yield _audit_record(row)
            if len(rows) < batch:
                return
            next_seq = int(rows[-1][0]) + 1

    def list_audit(
        self, *, kind: str | None = None, actor: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[AuditRecord]:
        """Audit records of that ``kind`` and ``actor`` (each if given), newest first."""
        _check_page(limit, offset)
        where: list[ColumnElement[bool]] = []
        for column, value, max_len in (
            (audit_log.c.kind, kind, r.AUDIT_KIND_LEN),
            (audit_log.c.actor, actor, r.ACTOR_LEN),
        ):
            if value is None:
                continue
            if not r.findable_text(value, max_len):
                return []
            where.append(column == value)
        stmt = select(*_AUDIT_COLUMNS).where(*where).order_by(audit_log.c.seq.desc()).limit(limit).offset(offset)
        with self._guard("listing the audit log"), self._tx(write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_audit_record(row) for row in rows]

    def count_audit(self) -> int:
        """How many records the audit log holds."""
        with self._guard("counting the audit log"), self._tx(write=False) as conn:
            return int(conn.execute(select(func.count()).select_from(audit_log)).scalar_one())

    def add_audit_checkpoint(self, cp: AuditCheckpoint) -> None:
        """Store a signed checkpoint of the audit log.

        It must match the log: :class:`~iotdlm.errors.NotFoundError` if there is no record
        ``cp.seq``, :class:`~iotdlm.errors.ConflictError` if that record's hash is not ``cp.hash``
        or record ``cp.seq`` already has a checkpoint. (The store holds no keys: the signature is
        the verifier's business.)
        """
        if not isinstance(cp, AuditCheckpoint):
            raise ValueError(f"add_audit_checkpoint takes an AuditCheckpoint, got {type(cp).__name__}")
        row = {
            "seq": cp.seq,
            "hash": cp.hash,
            "at": cp.at,
            "signer": cp.signer,
            "signature": cp.signature,
            "root": cp.root,
        }
        with self._guard("adding an audit checkpoint"):
            try:
                with self._tx(write=True) as conn:
                    stored = conn.execute(select(audit_log.c.hash).where(audit_log.c.seq == cp.seq)).scalar()
                    if stored is None:
                        raise errors.NotFoundError(f"no audit record {cp.seq} to checkpoint", field="seq")
                    if stored != cp.hash:
                        raise errors.ConflictError(
                            f"checkpoint hash {cp.hash} is not the hash of audit record {cp.seq} ({stored})",
                            field="hash",
                        )
                    conn.execute(audit_checkpoints.insert().values(row))
            except sa_exc.IntegrityError as exc:
                raise errors.ConflictError(f"audit record {cp.seq} already has a checkpoint", field="seq") from exc

    def latest_audit_checkpoint(self) -> AuditCheckpoint | None:
        """The checkpoint of the highest ``seq``, or None if there is none."""
        stmt = select(*_CHECKPOINT_COLUMNS).order_by(audit_checkpoints.c.seq.desc()).limit(1)
        with self._guard("reading the newest audit checkpoint"), self._tx(write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _checkpoint_record(row)

    def list_audit_checkpoints(self) -> list[AuditCheckpoint]:
        """Every checkpoint, oldest (lowest ``seq``) first."""
        stmt = select(*_CHECKPOINT_COLUMNS).order_by(audit_checkpoints.c.seq)
        with self._guard("listing audit checkpoints"), self._tx(write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_checkpoint_record(row) for row in rows]
