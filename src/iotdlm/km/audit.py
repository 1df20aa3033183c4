"""The tamper-evident audit log: typed records in a hash chain, with checkpoints signed by km.

Appending happens in the store (in the same transaction as what is audited); this module signs
checkpoints and verifies the whole chain, naming the first record that was edited, deleted or
moved.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from iotdlm.errors import BadSignatureError, IotdlmError
from iotdlm.pki.ca import fingerprint
from iotdlm.pki.keys import PrivateKey, check_public_key, sign_bytes, verify_bytes
from iotdlm.store import AuditCheckpoint, AuditEntry, AuditRecord, Store
from iotdlm.wire import audit as fmt


@dataclass
class AuditReport:
    records: int = 0
    checkpoints: int = 0
    head_seq: int = 0
    problems: list[str] = field(default_factory=list)
    first_bad_seq: int | None = None
    #: records after the last signed checkpoint (chained, but not yet covered by a signature)
    unsigned_tail: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def _bad(self, seq: int, message: str) -> None:
        if self.first_bad_seq is None or seq < self.first_bad_seq:
            self.first_bad_seq = seq
        self.problems.append(message)


def entry(at: dt.datetime, kind: str, actor: str, subject: str | None, **data: object) -> AuditEntry:
    return AuditEntry(at=at, kind=kind, actor=actor, subject=subject, data=dict(data))


def checkpoint(store: Store, key: PrivateKey, cert: x509.Certificate, now: dt.datetime) -> AuditCheckpoint | None:
    """Sign the current head of the chain (None if the log is empty or the head is signed already)."""
    head = store.audit_head()
    if head is None:
        return None
    existing = store.list_audit_checkpoints()
    if existing and existing[-1].seq >= head.seq:
        return None
    cp = AuditCheckpoint(
        seq=head.seq,
        hash=head.hash,
        at=now,
        signer=fingerprint(cert),
        signature=sign_bytes(key, fmt.checkpoint_message(head.seq, head.hash)),
    )
    store.add_audit_checkpoint(cp)
    return cp


def verify(
    store: Store,
    signer_key: Callable[[str], CertificateIssuerPublicKeyTypes | None],
    *,
    progress: Callable[[int], None] = lambda _n: None,
) -> AuditReport:
    """Walk the whole chain and every checkpoint. ``signer_key(fingerprint)`` gives the trusted
    public key of a checkpoint signer, or None if that signer is not trusted."""
    report = AuditReport()
    prev_hash = fmt.GENESIS_HASH
    expected_seq = 1
    hashes: dict[int, str] = {}
    for rec in store.iter_audit():
        report.records += 1
        if rec.seq != expected_seq:
            if rec.seq > expected_seq:
                missing = f"{expected_seq}" if rec.seq == expected_seq + 1 else f"{expected_seq}..{rec.seq - 1}"
                report._bad(expected_seq, f"record {missing} is missing (deleted?)")
            else:
                report._bad(rec.seq, f"record {rec.seq} appears out of order")
        if rec.prev_hash != prev_hash:
            report._bad(rec.seq, f"record {rec.seq} does not follow the record before it (moved or a record deleted)")
        if _recompute(rec) != rec.hash:
            report._bad(rec.seq, f"record {rec.seq} ({rec.kind} by {rec.actor}) was edited: its hash does not match")
        hashes[rec.seq] = rec.hash
        prev_hash = rec.hash
        expected_seq = rec.seq + 1
        report.head_seq = rec.seq
        if report.records % 10_000 == 0:
            progress(report.records)
    progress(report.records)
    last_cp = 0
    for cp in store.list_audit_checkpoints():
        report.checkpoints += 1
        key = signer_key(cp.signer)
        if key is None:
            report._bad(cp.seq, f"checkpoint at record {cp.seq} is signed by an unknown signer {cp.signer[:16]}")
        else:
            try:
                verify_bytes(check_public_key(key), cp.signature, fmt.checkpoint_message(cp.seq, cp.hash))
            except (BadSignatureError, IotdlmError):
                report._bad(cp.seq, f"checkpoint at record {cp.seq} has a bad signature")
        stored = hashes.get(cp.seq)
        if stored is None:
            report._bad(cp.seq, f"checkpoint at record {cp.seq} names a record that no longer exists (deleted)")
        elif stored != cp.hash:
            report._bad(cp.seq, f"record {cp.seq} differs from what checkpoint {cp.seq} signed (rewritten chain)")
        last_cp = max(last_cp, cp.seq)
    report.unsigned_tail = max(0, report.head_seq - last_cp)
    return report


def _recompute(rec: AuditRecord) -> str:
    return fmt.record_hash(rec.prev_hash, rec.seq, rec.at, rec.kind, rec.actor, rec.subject, rec.data_json)
