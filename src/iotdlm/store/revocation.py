"""The revocation repository: revoking certificates (one, a device's, a decommissioned device's)
with their audit records, the revoked certificates a CRL lists, and the CRLs themselves (their
numbers and the current full and delta CRL of each issuer and partition).

Revocation never goes back: a revoked certificate is final; a CRL is only replaced by a newer one.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Select,
    and_,
    bindparam,
    func,
    or_,
    select,
    type_coerce,
    update,
)

from iotdlm import errors
from iotdlm.store import records as r
from iotdlm.store.audit_log import append_entries, check_entries
from iotdlm.store.certificates import CERT_COLUMNS, cert_record
from iotdlm.store.devices import lock_device
from iotdlm.store.engine import Database
from iotdlm.store.queries import check_batch_size, quote
from iotdlm.store.records import AuditEntry, CertRecord, CrlRecord
from iotdlm.store.tables import UTCDateTime, certificates, crl_numbers, crls, devices
from iotdlm.wire import audit as wire_audit

# Certificates that revocation may still change; revoked ones are final.
REVOCABLE: Final = (r.CERT_VALID, r.CERT_SUPERSEDED)
CRL_COLUMNS = (
    crls.c.issuer,
    crls.c.partition,
    crls.c.kind,
    crls.c.number,
    crls.c.this_update,
    crls.c.next_update,
    crls.c.base_number,
    crls.c.der,
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


@functools.cache
def _revoked_query(delta: bool, superseded: bool) -> Select[Any]:
    """The page query of :meth:`RevocationRepository.iter_revoked`, built once per shape (issue
    15: building the expression cost more than running it, for every CRL of every partition).
    Parameters: issuer, partition, not_after_from, after_id, batch; since (delta); superseded_by
    and, for a delta, superseded_since (superseded certificates)."""
    c = certificates.c
    revoked: list[ColumnElement[bool]] = [c.status == r.CERT_REVOKED]
    if delta:
        # on the indexed column (issuer, crl_partition, status, revoked_at): a delta is made after
        # every revocation. A row revoked without a time is in the full CRLs, not in deltas.
        revoked.append(c.revoked_at > bindparam("since"))
    status: ColumnElement[bool] = and_(*revoked)
    if superseded:
        grace = [c.status == r.CERT_SUPERSEDED, c.revoked_at <= bindparam("superseded_by")]
        if delta:
            grace.append(c.revoked_at > bindparam("superseded_since"))
        status = or_(status, and_(*grace))
    revoked_at = type_coerce(func.coalesce(c.revoked_at, c.created_at), UTCDateTime())
    return (
        select(c.id, c.serial_hex, revoked_at, c.revocation_reason, c.status)
        .where(
            c.issuer == bindparam("issuer"),
            c.crl_partition == bindparam("partition"),
            c.not_after >= bindparam("not_after_from"),
            status,
            c.id > bindparam("after_id"),
        )
        .order_by(c.id)
        .limit(bindparam("batch"))
    )


@dataclass(frozen=True)
class _CrlStatements:
    next_number: Any
    save: Any


def _crl_statements(insert: Any) -> _CrlStatements:
    """The CRL number allocation and the CRL upsert, built once per dialect by ``Database.built``
    (issue 15: a km worker's start makes a CRL per partition and CA, each building them anew cost
    more than the SQL). Parameters: issuer, partition; and kind, number, this_update, next_update,
    base_number, der for the upsert."""
    next_number = (
        insert(crl_numbers)
        .values(issuer=bindparam("issuer"), partition=bindparam("partition"), last_number=1)
        .on_conflict_do_update(
            index_elements=[crl_numbers.c.issuer, crl_numbers.c.partition],
            set_={"last_number": crl_numbers.c.last_number + 1},
        )
        .returning(crl_numbers.c.last_number)
    )
    columns = ("number", "this_update", "next_update", "base_number", "der")
    ins = insert(crls).values({name: bindparam(name) for name in ("issuer", "partition", "kind", *columns)})
    save = ins.on_conflict_do_update(
        index_elements=[crls.c.issuer, crls.c.partition, crls.c.kind],
        set_={name: getattr(ins.excluded, name) for name in columns},
        where=crls.c.number < ins.excluded.number,
    ).returning(crls.c.number)
    return _CrlStatements(next_number, save)


def revocation_entry(rec: CertRecord, *, actor: str) -> AuditEntry:
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


class RevocationRepository(Database):
    """Revocation, the revoked certificates of each CRL, and the CRLs."""

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
            .where(*where, certificates.c.status.in_(REVOCABLE))
            .values(status=r.CERT_REVOKED, revoked_at=at, revocation_reason=reason)
            .returning(*CERT_COLUMNS)
        )
        with self.transaction("revoking a certificate", write=True) as conn:
            row = conn.execute(stmt).first()
            if row is None:
                current = conn.execute(select(*CERT_COLUMNS).where(*where)).first()
                if current is None:
                    raise self._no_certificate(issuer, serial)
                raise self._already_revoked(cert_record(current))
            rec = cert_record(row)
            append_entries(conn, [revocation_entry(rec, actor=actor)])
        return rec

    @staticmethod
    def _no_certificate(issuer: str, serial: int) -> errors.NotFoundError:
        return errors.NotFoundError(
            f"no certificate with serial {serial:x} from issuer {quote(issuer)}", field="serial"
        )

    @staticmethod
    def _already_revoked(rec: CertRecord) -> errors.ConflictError:
        when = "at an unknown time" if rec.revoked_at is None else f"at {rec.revoked_at.isoformat()}"
        why = "no reason given" if rec.revocation_reason is None else f"reason: {rec.revocation_reason}"
        return errors.ConflictError(
            f"certificate serial {rec.serial:x} of issuer {quote(rec.issuer)} was already revoked {when} ({why})",
            field="serial",
            device_id=rec.device_id,
        )

    @staticmethod
    def _revoke_device(conn: Connection, device_id: str, *, reason: str | None, at: dt.datetime) -> list[CertRecord]:
        """Revoke every valid or superseded certificate of the device; return them in issue order."""
        stmt = (
            update(certificates)
            .where(certificates.c.device_id == device_id, certificates.c.status.in_(REVOCABLE))
            .values(status=r.CERT_REVOKED, revoked_at=at, revocation_reason=reason)
            .returning(*CERT_COLUMNS, certificates.c.id)
        )
        id_at = len(CERT_COLUMNS)
        rows = sorted(conn.execute(stmt).all(), key=lambda row: int(row[id_at]))
        return [cert_record(row) for row in rows]

    def revoke_device_certificates(
        self, device_id: str, *, reason: str | None, at: dt.datetime, actor: str
    ) -> list[CertRecord]:
        """Revoke every valid or superseded certificate of a device, with one ``revocation`` audit
        record each, in one transaction, and return the newly revoked certificates in issue order
        (certificates already revoked are left as they are). Raises
        :class:`~iotdlm.errors.NotFoundError` if the device is unknown (see :meth:`upsert_device`).
        """
        self._check_revocation(reason, at, actor)
        with self.transaction("revoking the certificates of a device", write=True) as conn:
            lock_device(conn, device_id)
            revoked = self._revoke_device(conn, device_id, reason=reason, at=at)
            append_entries(conn, [revocation_entry(rec, actor=actor) for rec in revoked])
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
        with self.transaction("decommissioning a device", write=True) as conn:
            device = lock_device(conn, device_id)
            if device.status == r.DEVICE_RETIRED:
                raise errors.ConflictError(
                    f"device {quote(device_id)} was already retired (last change at {device.updated_at.isoformat()})",
                    device_id=device_id,
                )
            conn.execute(
                update(devices).where(devices.c.device_id == device_id).values(status=r.DEVICE_RETIRED, updated_at=at)
            )
            revoked = self._revoke_device(conn, device_id, reason=reason, at=at)
            entries = [revocation_entry(rec, actor=actor) for rec in revoked]
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
            append_entries(conn, entries)
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
        check_batch_size(batch)
        r.check_aware("not_after_from", not_after_from)
        if not r.findable_partition(partition) or not r.findable_text(issuer, r.ISSUER_LEN):
            return iter(())
        params: dict[str, Any] = {"issuer": issuer, "partition": partition, "not_after_from": not_after_from}
        if revoked_since is not None:
            params["since"] = revoked_since
        if superseded_grace is not None:
            assert as_of is not None
            params["superseded_by"] = as_of - superseded_grace
            if revoked_since is not None:
                params["superseded_since"] = revoked_since - superseded_grace
        stmt = _revoked_query(revoked_since is not None, superseded_grace is not None)
        return self._iter_revoked(stmt, params, batch, superseded_grace or dt.timedelta(0))

    def _iter_revoked(
        self, stmt: Select[Any], params: dict[str, Any], batch: int, grace: dt.timedelta
    ) -> Iterator[tuple[int, dt.datetime, str | None]]:
        params = {**params, "after_id": 0, "batch": batch}  # ids start at 1
        while True:
            with self.transaction("listing revoked certificates", write=False) as conn:
                rows = conn.execute(stmt, params).all()
            for row in rows:
                if row[4] == r.CERT_SUPERSEDED:
                    yield r.serial_from_hex(row[1]), row[2] + grace, row[3] or "superseded"
                else:
                    yield r.serial_from_hex(row[1]), row[2], row[3]
            if len(rows) < batch:
                return
            params["after_id"] = int(rows[-1][0])

    def count_revoked(self, issuer: str, partition: int, *, not_after_from: dt.datetime) -> int:
        """How many certificates :meth:`iter_revoked` yields (without ``revoked_since``)."""
        where = self._revoked_filters(issuer, partition, not_after_from)
        if where is None:
            return 0
        where.append(certificates.c.status == r.CERT_REVOKED)
        stmt = select(func.count()).select_from(certificates).where(*where)
        with self.transaction("counting revoked certificates", write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

    # -- CRLs ------------------------------------------------------------------------------------

    def next_crl_number(self, issuer: str, partition: int) -> int:
        """Allocate the next CRL number of ``(issuer, partition)``: 1, 2, 3, ...

        Atomic across threads and processes (one ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``
        in a write transaction): no two calls get the same number, and a call gets a number above
        every number handed out before it began. A number whose CRL is never saved is skipped.
        """
        r.check_text("issuer", issuer, r.ISSUER_LEN)
        r.check_partition("partition", partition)
        with self.transaction("allocating a CRL number", write=True) as conn:
            stmt = self.built(_crl_statements).next_number
            return int(conn.execute(stmt, {"issuer": issuer, "partition": partition}).scalar_one())

    def save_crl(self, rec: CrlRecord, audit: Sequence[AuditEntry] = ()) -> None:
        """Store ``rec`` as the current CRL of its ``(issuer, partition, kind)``, and append
        ``audit`` to the audit log in the same transaction (a CRL is never published unaudited).

        Never goes back: if the stored CRL of that key has a number at or above ``rec.number``
        (another generator got there first), raises :class:`~iotdlm.errors.ConflictError` and
        keeps the stored one, auditing nothing. The comparison and the write are one statement.
        """
        if not isinstance(rec, CrlRecord):
            raise ValueError(f"save_crl takes a CrlRecord, got {type(rec).__name__}")
        check_entries(audit)
        params: dict[str, Any] = {
            "issuer": rec.issuer,
            "partition": rec.partition,
            "kind": rec.kind,
            "number": rec.number,
            "this_update": rec.this_update,
            "next_update": rec.next_update,
            "base_number": rec.base_number,
            "der": rec.der,
        }
        with self.transaction("saving a CRL", write=True) as conn:
            statements = self.built(_crl_statements)
            if conn.execute(statements.save, params).first() is None:
                key = (crls.c.issuer == rec.issuer, crls.c.partition == rec.partition, crls.c.kind == rec.kind)
                stored = conn.execute(select(crls.c.number).where(*key)).scalar_one()
                raise errors.ConflictError(
                    f"{rec.kind} CRL number {rec.number} of issuer {quote(rec.issuer)} partition {rec.partition} "
                    f"is not newer than the stored one, number {stored}; the stored CRL was kept",
                    field="number",
                )
            if audit:
                append_entries(conn, audit)

    def get_crl(self, issuer: str, partition: int, kind: str) -> CrlRecord | None:
        """The current CRL of that issuer, partition and kind (``"full"`` or ``"delta"``), or None."""
        if not (
            r.findable_partition(partition)
            and r.findable_text(issuer, r.ISSUER_LEN)
            and r.findable_text(kind, r.CRL_KIND_LEN)
        ):
            return None
        stmt = select(*CRL_COLUMNS).where(crls.c.issuer == issuer, crls.c.partition == partition, crls.c.kind == kind)
        with self.transaction("reading a CRL", write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _crl_record(row)

    def list_crls(self, issuer: str | None = None) -> list[CrlRecord]:
        """Every current CRL (of ``issuer`` if given), ordered by issuer, partition and kind."""
        stmt = select(*CRL_COLUMNS).order_by(crls.c.issuer, crls.c.partition, crls.c.kind)
        if issuer is not None:
            if not r.findable_text(issuer, r.ISSUER_LEN):
                return []
            stmt = stmt.where(crls.c.issuer == issuer)
        with self.transaction("listing CRLs", write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_crl_record(row) for row in rows]
