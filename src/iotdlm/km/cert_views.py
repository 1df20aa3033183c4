"""How km turns certificates into store records and wire answers."""

from __future__ import annotations

import datetime as dt
import hashlib

from cryptography import x509

from iotdlm.pki.chain import der
from iotdlm.store import CertRecord
from iotdlm.wire import km as msg


def record_for(
    cert: x509.Certificate,
    issuer: str,
    profile: str,
    device_id: str | None,
    requested_by: str,
    now: dt.datetime,
    *,
    crl_partition: int | None = None,
) -> CertRecord:
    raw = der(cert)
    return CertRecord(
        serial=cert.serial_number,
        issuer=issuer,
        subject=cert.subject.rfc4514_string(),
        device_id=device_id,
        profile=profile,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        status="valid",
        der=raw,
        fingerprint=hashlib.sha256(raw).hexdigest(),
        requested_by=requested_by,
        created_at=now,
        crl_partition=crl_partition,
    )


def issued(rec: CertRecord) -> msg.IssuedCertificate:
    return msg.IssuedCertificate(
        serial=format(rec.serial, "x"),
        issuer=rec.issuer,
        profile=rec.profile,
        device_id=rec.device_id,
        not_after=rec.not_after.isoformat(),
        certificate=rec.der,
    )


def info(rec: CertRecord) -> msg.CertificateInfo:
    return msg.CertificateInfo(
        serial=format(rec.serial, "x"),
        issuer=rec.issuer,
        subject=rec.subject,
        device_id=rec.device_id,
        profile=rec.profile,
        status=rec.status,
        not_before=rec.not_before.isoformat(),
        not_after=rec.not_after.isoformat(),
        certificate=rec.der,
        revoked_at=rec.revoked_at.isoformat() if rec.revoked_at else None,
        revocation_reason=rec.revocation_reason,
    )
