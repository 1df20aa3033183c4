"""The certificate repository: every certificate km issued (or recorded), keyed by
``(issuer, serial)`` and by fingerprint, with its status fields.

A batch of new certificates is stored with its audit records, the devices it names and the
request's replay nonce in one transaction (:meth:`CertificateRepository.add_certificates`).
Revoking is in :mod:`~iotdlm.store.revocation`.

Errors: a duplicate ``(issuer, serial)`` raises :class:`SerialCollisionError`, a duplicate
fingerprint :class:`~iotdlm.errors.ConflictError`, a missing row
:class:`~iotdlm.errors.NotFoundError`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Row, bindparam, func, select, update
from sqlalchemy import exc as sa_exc

from iotdlm import errors
from iotdlm.store import records as r
from iotdlm.store.audit_log import append_entries, check_entries
from iotdlm.store.engine import Database
from iotdlm.store.nonces import check_nonce, insert_nonces
from iotdlm.store.queries import IN_CHUNK, check_page, equal_filters, quote
from iotdlm.store.records import AuditEntry, CertRecord, CertWrite, NonceUse
from iotdlm.store.tables import certificates
from iotdlm.store.tables import devices as devices_table  # ``devices`` is also a parameter name below

_STATUS_QUERY = select(certificates.c.status, certificates.c.revoked_at, certificates.c.revocation_reason).where(
    certificates.c.serial_hex == bindparam("serial_hex"), certificates.c.issuer == bindparam("issuer")
)


def _new_devices(insert: Any) -> Any:
    """The insert of devices created by an issuance, known ones left as they are."""
    return insert(devices_table).on_conflict_do_nothing(index_elements=[devices_table.c.device_id])


CERT_COLUMNS = (
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

#: built once (issue 15): km reads the signer's or the presented certificate by fingerprint per request
CERT_BY_FINGERPRINT = select(*CERT_COLUMNS).where(certificates.c.fingerprint == bindparam("fp"))
_INSERT_CERTIFICATES = certificates.insert()


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


def cert_record(row: Row[*tuple[Any, ...]] | tuple[Any, ...]) -> CertRecord:
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


def _filters(
    device_id: str | None, profile: str | None, status: str | None, issuer: str | None
) -> list[ColumnElement[bool]] | None:
    """WHERE clauses for the filters given, or None if no stored row can match them."""
    return equal_filters(
        (certificates.c.device_id, device_id, r.DEVICE_ID_LEN),
        (certificates.c.profile, profile, r.PROFILE_LEN),
        (certificates.c.status, status, r.STATUS_LEN),
        (certificates.c.issuer, issuer, r.ISSUER_LEN),
    )


class CertificateRepository(Database):
    """Certificates."""

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
        self.add_certificate_writes(
            [CertWrite(tuple(records), audit=tuple(audit), devices=tuple(devices), nonce=nonce, now=now)]
        )

    def add_certificate_writes(self, writes: Sequence[CertWrite]) -> None:
        """What several requests record (see :meth:`add_certificates`), in ONE transaction: all
        of it or none (km's group commit, ADR 0021). A replayed nonce, a duplicate serial or
        fingerprint anywhere fails the whole transaction."""
        records = [rec for w in writes for rec in w.records]
        audit = [e for w in writes for e in w.audit]
        nonces = [w.nonce for w in writes if w.nonce is not None]
        extra = [n for w in writes for n in w.extra_nonces]
        if not records and not audit and not nonces and not extra and not any(w.devices for w in writes):
            return
        rows = [_cert_row(rec) for rec in records]
        self._check_batch(records)
        check_entries(audit)
        device_rows: dict[str, dict[str, Any]] = {}
        for w in writes:
            if not w.devices:
                continue
            if w.now is None:
                raise ValueError("add_certificates needs now= to create devices")
            r.check_aware("now", w.now)
            for device_id, dtype in w.devices:
                r.check_text("device_id", device_id, r.DEVICE_ID_LEN)
                r.check_text("dtype", dtype, r.DTYPE_LEN)
                device_rows[device_id] = {
                    "device_id": device_id,
                    "dtype": dtype,
                    "status": r.DEVICE_ACTIVE,
                    "created_at": w.now,
                    "updated_at": w.now,
                }
        for nonce in (*nonces, *extra):
            check_nonce(nonce.sender, nonce.nonce, nonce.expires_at)

        def explain(_exc: sa_exc.IntegrityError) -> errors.ConflictError:
            return self._explain_conflict(records)

        with self.driver_transaction("adding certificates", write=True, conflict=explain) as conn:
            insert_nonces(conn, [(n.sender, n.nonce, n.expires_at) for n in nonces])
            insert_nonces(conn, [(n.sender, n.nonce, n.expires_at) for n in extra])
            if device_rows:
                conn.execute(self.built(_new_devices), list(device_rows.values()))
            if rows:
                conn.execute(_INSERT_CERTIFICATES, rows)
            append_entries(conn, audit)

    @staticmethod
    def _check_batch(records: Sequence[CertRecord]) -> None:
        keys: set[tuple[str, int]] = set()
        fps: set[str] = set()
        for rec in records:
            key = (rec.issuer, rec.serial)
            if key in keys:
                raise SerialCollisionError(
                    f"certificate serial {rec.serial:x} of issuer {quote(rec.issuer)} appears twice in the batch",
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
        with self.connection(write=False) as conn:
            for i in range(0, len(serials), IN_CHUNK):
                stmt = select(certificates.c.serial_hex, certificates.c.issuer).where(
                    certificates.c.serial_hex.in_(serials[i : i + IN_CHUNK])
                )
                for serial_hex, issuer in conn.execute(stmt):
                    hit = wanted.get((serial_hex, issuer))
                    if hit is not None:
                        return SerialCollisionError(
                            f"certificate serial {serial_hex} of issuer {quote(issuer)} is already stored; "
                            "nothing of the batch was stored",
                            field="serial",
                            device_id=hit.device_id,
                            issuer=issuer,
                            serial=hit.serial,
                        )
            for i in range(0, len(fps), IN_CHUNK):
                stmt_fp = select(certificates.c.fingerprint).where(
                    certificates.c.fingerprint.in_(fps[i : i + IN_CHUNK])
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
        stmt = select(*CERT_COLUMNS).where(certificates.c.serial_hex == serial_hex, certificates.c.issuer == issuer)
        with self.transaction("reading a certificate", write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else cert_record(row)

    def certificate_status(self, issuer: str, serial: int) -> tuple[str, dt.datetime | None, str | None] | None:
        """(status, revoked_at, revocation reason) of one certificate, or None: the OCSP hot path,
        reading three columns instead of the whole record."""
        serial_hex = r.findable_serial(serial)
        if serial_hex is None or not r.findable_text(issuer, r.ISSUER_LEN):
            return None
        with self.transaction("reading a certificate status", write=False) as conn:
            row = conn.execute(_STATUS_QUERY, {"serial_hex": serial_hex, "issuer": issuer}).first()
        return None if row is None else (str(row[0]), row[1], row[2])

    def find_by_serial(self, serial: int) -> list[CertRecord]:
        """Every certificate with this serial, whatever its issuer, newest first."""
        serial_hex = r.findable_serial(serial)
        if serial_hex is None:
            return []
        stmt = (
            select(*CERT_COLUMNS)
            .where(certificates.c.serial_hex == serial_hex)
            .order_by(certificates.c.created_at.desc(), certificates.c.id.desc())
        )
        with self.transaction("finding certificates by serial", write=False) as conn:
            rows = conn.execute(stmt).all()
        return [cert_record(row) for row in rows]

    def get_by_fingerprint(self, fp: str) -> CertRecord | None:
        """The certificate whose SHA-256 DER fingerprint (hex, any case) is ``fp``, or None."""
        if not r.findable_text(fp, r.FINGERPRINT_LEN):
            return None
        with self.driver_transaction("reading a certificate by fingerprint", write=False) as conn:
            row = conn.execute(CERT_BY_FINGERPRINT, {"fp": fp.lower()}).first()
        return None if row is None else cert_record(row)

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
        check_page(limit, offset)
        where = _filters(device_id, profile, status, issuer)
        if where is None:
            return []
        stmt = (
            select(*CERT_COLUMNS)
            .where(*where)
            .order_by(certificates.c.created_at.desc(), certificates.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self.transaction("listing certificates", write=False) as conn:
            rows = conn.execute(stmt).all()
        return [cert_record(row) for row in rows]

    def count_certificates(
        self,
        *,
        device_id: str | None = None,
        profile: str | None = None,
        status: str | None = None,
        issuer: str | None = None,
    ) -> int:
        """How many certificates match every given filter."""
        where = _filters(device_id, profile, status, issuer)
        if where is None:
            return 0
        stmt = select(func.count()).select_from(certificates).where(*where)
        with self.transaction("counting certificates", write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

    def last_expiry(self, issuer: str, *, except_profile: str | None = None) -> dt.datetime | None:
        """The latest notAfter of the certificates ``issuer`` issued (None: none), leaving out
        ``except_profile`` (an OCSP responder's certificates, renewed as long as it answers)."""
        where = [certificates.c.issuer == issuer]
        if except_profile is not None:
            where.append(certificates.c.profile != except_profile)
        stmt = select(func.max(certificates.c.not_after)).where(*where)
        with self.transaction("reading when an issuer's last certificate expires", write=False) as conn:
            value = conn.execute(stmt).scalar_one()
        return value  # type: ignore[no-any-return]  # func.max keeps the column type (UTCDateTime)

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
            with self.transaction("updating a certificate status", write=True) as conn:
                changed = conn.execute(update(certificates).where(*where).values(values)).rowcount
                row = conn.execute(select(*CERT_COLUMNS).where(*where)).first() if changed else None
        if row is None:
            raise errors.NotFoundError(
                f"no certificate with serial {serial:x} from issuer {quote(issuer)}", field="serial"
            )
        return cert_record(row)
