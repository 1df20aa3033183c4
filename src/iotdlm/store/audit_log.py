"""The audit log repository: appending hash-chained records, reading them back, and the signed
checkpoints of the log.

Records are appended with sequence numbers ``head + 1, head + 2, ...`` and a hash chain
(:mod:`iotdlm.wire.audit`) inside the write transaction of whatever they record (issuance,
revocation), so a change and its audit records commit together or not at all
(:func:`append_entries`, called by the other repositories). Appenders are serialised: by an
advisory transaction lock on PostgreSQL, by ``BEGIN IMMEDIATE`` on SQLite. The audit lock is
always the last lock a transaction takes, so it cannot take part in a deadlock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any, Final

from sqlalchemy import Connection, Row, func, select, text
from sqlalchemy import exc as sa_exc

from iotdlm import errors
from iotdlm.store import records as r
from iotdlm.store.driver import DriverConnection
from iotdlm.store.engine import Database
from iotdlm.store.queries import check_batch_size, check_page, equal_filters
from iotdlm.store.records import AuditCheckpoint, AuditEntry, AuditRecord
from iotdlm.store.tables import audit_checkpoints, audit_log
from iotdlm.wire import audit as wire_audit

# Serialises audit log appenders on PostgreSQL (pg_advisory_xact_lock), whatever else they write.
_AUDIT_LOCK_KEY: Final = 0x10_7D_1A_0002

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


def check_entries(entries: Sequence[AuditEntry]) -> None:
    """``ValueError`` unless every entry is an :class:`~iotdlm.store.records.AuditEntry`."""
    for entry in entries:
        if not isinstance(entry, AuditEntry):
            raise ValueError(f"audit entries must be AuditEntry, got {type(entry).__name__}")


#: the newest record's seq and hash; built once (issue 15: building it cost more than running it)
_HEAD = select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
_INSERT = audit_log.insert()
_LOCK = text("SELECT pg_advisory_xact_lock(:k)")


def append_entries(conn: Connection | DriverConnection, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
    """Append ``entries`` to the audit log inside the caller's write transaction.

    Takes the audit lock (PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` has already serialised every
    writer), reads the head, and chains the new records onto it. Call it last in a transaction:
    the lock is held until commit.
    """
    if not entries:
        return []
    check_entries(entries)
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK, {"k": _AUDIT_LOCK_KEY})
    head = conn.execute(_HEAD).first()
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
        _INSERT,
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


class AuditRepository(Database):
    """The audit log and its checkpoints."""

    def append_audit(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        """Append ``entries`` to the audit log in one transaction; return them as stored."""
        check_entries(entries)
        if not entries:
            return []
        with self.transaction("appending to the audit log", write=True) as conn:
            return append_entries(conn, entries)

    def audit_head(self) -> AuditRecord | None:
        """The newest audit record, or None if the log is empty."""
        stmt = select(*_AUDIT_COLUMNS).order_by(audit_log.c.seq.desc()).limit(1)
        with self.transaction("reading the audit head", write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _audit_record(row)

    def iter_audit(self, *, start_seq: int = 1, batch: int = 1000) -> Iterator[AuditRecord]:
        """Audit records from ``start_seq`` on, oldest first, ``batch`` per query (keyset
        pagination on ``seq``, one short read transaction per query: bounded memory). Records
        appended meanwhile are seen if the iteration has not passed their place yet."""
        r.check_int("start_seq", start_seq, -(2**63), 2**63 - 1)
        check_batch_size(batch)
        return self._iter_audit(start_seq, batch)

    def _iter_audit(self, start_seq: int, batch: int) -> Iterator[AuditRecord]:
        next_seq = start_seq
        while True:
            stmt = select(*_AUDIT_COLUMNS).where(audit_log.c.seq >= next_seq).order_by(audit_log.c.seq).limit(batch)
            with self.transaction("reading the audit log", write=False) as conn:
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
        check_page(limit, offset)
        where = equal_filters((audit_log.c.kind, kind, r.AUDIT_KIND_LEN), (audit_log.c.actor, actor, r.ACTOR_LEN))
        if where is None:
            return []
        stmt = select(*_AUDIT_COLUMNS).where(*where).order_by(audit_log.c.seq.desc()).limit(limit).offset(offset)
        with self.transaction("listing the audit log", write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_audit_record(row) for row in rows]

    def count_audit(self) -> int:
        """How many records the audit log holds."""
        with self.transaction("counting the audit log", write=False) as conn:
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

        def taken(_exc: sa_exc.IntegrityError) -> errors.ConflictError:
            return errors.ConflictError(f"audit record {cp.seq} already has a checkpoint", field="seq")

        with self.transaction("adding an audit checkpoint", write=True, conflict=taken) as conn:
            stored = conn.execute(select(audit_log.c.hash).where(audit_log.c.seq == cp.seq)).scalar()
            if stored is None:
                raise errors.NotFoundError(f"no audit record {cp.seq} to checkpoint", field="seq")
            if stored != cp.hash:
                raise errors.ConflictError(
                    f"checkpoint hash {cp.hash} is not the hash of audit record {cp.seq} ({stored})",
                    field="hash",
                )
            conn.execute(audit_checkpoints.insert().values(row))

    def latest_audit_checkpoint(self) -> AuditCheckpoint | None:
        """The checkpoint of the highest ``seq``, or None if there is none."""
        stmt = select(*_CHECKPOINT_COLUMNS).order_by(audit_checkpoints.c.seq.desc()).limit(1)
        with self.transaction("reading the newest audit checkpoint", write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _checkpoint_record(row)

    def list_audit_checkpoints(self) -> list[AuditCheckpoint]:
        """Every checkpoint, oldest (lowest ``seq``) first."""
        stmt = select(*_CHECKPOINT_COLUMNS).order_by(audit_checkpoints.c.seq)
        with self.transaction("listing audit checkpoints", write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_checkpoint_record(row) for row in rows]
