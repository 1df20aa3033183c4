"""The tamper-evident audit log: typed records in a hash chain, with signed tree heads by km.

Appending happens in the store (in the same transaction as what is audited); this module signs
checkpoints -- signed tree heads: the number of records, the last chain hash, the RFC 9162 Merkle
tree head of all records and the time -- and verifies the whole chain, naming the first record that
was edited, deleted or moved. Checkpoints are also kept where the database writer cannot rewrite
them (anchors: one file per checkpoint in an operator-chosen directory, read by ``audit verify``),
so deleting the newest records with their checkpoints, or rewriting the chain, is caught too
(docs/adr/0005-audit-anchors.md).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from iotdlm.bus import Bus, subjects
from iotdlm.errors import BadRequestError, BadSignatureError, ConflictError, IotdlmError
from iotdlm.km.storage import AuditLogStore
from iotdlm.pki.ca import fingerprint
from iotdlm.pki.keys import PrivateKey, check_public_key, sign_bytes, verify_bytes
from iotdlm.store import AuditCheckpoint, AuditEntry, AuditRecord
from iotdlm.wire import audit as fmt
from iotdlm.wire import merkle

#: where a checkpoint kept in the database comes from, in messages
DATABASE = "the database"


@dataclass
class AuditReport:
    records: int = 0
    checkpoints: int = 0
    head_seq: int = 0
    problems: list[str] = field(default_factory=list)
    first_bad_seq: int | None = None
    #: records after the last signed checkpoint (chained, but not yet covered by a signature)
    unsigned_tail: int = 0
    #: the newest checkpoint found anywhere: (size, time, where)
    newest: tuple[int, dt.datetime, str] | None = None
    #: what is not damage but needs a look (an old checkpoint, no anchor checked)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def _bad(self, seq: int, message: str) -> None:
        if self.first_bad_seq is None or seq < self.first_bad_seq:
            self.first_bad_seq = seq
        self.problems.append(message)


def entry(at: dt.datetime, kind: str, actor: str, subject: str | None, **data: object) -> AuditEntry:
    return AuditEntry(at=at, kind=kind, actor=actor, subject=subject, data=dict(data))


@dataclass(frozen=True)
class Anchored:
    """A signed tree head and where it was found (:data:`DATABASE`, an anchor file, ...)."""

    head: fmt.TreeHead
    source: str


def tree_head(store: AuditLogStore, size: int, *, cache: merkle.CompactRange | None = None) -> str:
    """The RFC 9162 Merkle tree head (hex) of audit records 1..``size`` as the store has them.

    With ``cache`` (the tree of the records read last time, which this updates) only the records
    after it are read: km keeps one, so a checkpoint costs the new records, not the whole log."""
    cr = cache.copy() if cache is not None and cache.size <= size else merkle.CompactRange()
    for rec in store.iter_audit(start_seq=cr.size + 1):
        if rec.seq > size:
            break
        if rec.seq != cr.size + 1:  # a gap: read the log as it is, from the start
            return tree_head(store, size)
        cr.append(merkle.leaf_hash(bytes.fromhex(rec.hash)))
    if cache is not None and cr.size == size:
        cache.size, cache._stack = cr.size, cr._stack
    return cr.root().hex()


def checkpoint(
    store: AuditLogStore,
    key: PrivateKey,
    cert: x509.Certificate,
    now: dt.datetime,
    *,
    anchor_dir: Path | None = None,
    cache: merkle.CompactRange | None = None,
) -> AuditCheckpoint | None:
    """Sign a tree head of the whole log, store it and (with ``anchor_dir``) write it there too.
    None if the log is empty or its head is signed already."""
    head = store.audit_head()
    if head is None:
        return None
    existing = store.list_audit_checkpoints()
    if existing and existing[-1].seq >= head.seq:
        return None
    root = tree_head(store, head.seq, cache=cache)
    cp = AuditCheckpoint(
        seq=head.seq,
        hash=head.hash,
        at=now,
        signer=fingerprint(cert),
        signature=sign_bytes(key, fmt.tree_head_message(head.seq, head.hash, root, now)),
        root=root,
    )
    store.add_audit_checkpoint(cp)
    if anchor_dir is not None:
        write_anchor(anchor_dir, to_tree_head(cp))
    return cp


def to_tree_head(cp: AuditCheckpoint, *, certificate: bytes | None = None) -> fmt.TreeHead:
    """``cp`` as a signed tree head; with ``certificate`` (the signer's, DER) carried along for
    a party that holds only the service CA (cm's /audit/checkpoint)."""
    if cp.root is None:
        raise ValueError(f"checkpoint {cp.seq} predates tree heads")
    return fmt.TreeHead(
        size=cp.seq,
        hash=cp.hash,
        root=cp.root,
        at=cp.at,
        signer=cp.signer,
        signature=cp.signature.hex(),
        certificate=base64.b64encode(certificate).decode("ascii") if certificate is not None else None,
    )


def signer_certificate(store: AuditLogStore, cp: AuditCheckpoint, own: x509.Certificate | None = None) -> bytes | None:
    """The DER certificate whose key signed ``cp``: ``own`` (km's) when it is that one, else the
    service certificate the store recorded under that fingerprint, else None."""
    if own is not None and fingerprint(own) == cp.signer:
        return own.public_bytes(serialization.Encoding.DER)
    rec = store.get_by_fingerprint(cp.signer)
    return rec.der if rec is not None and rec.issuer == "service" else None


def write_anchor(anchor_dir: Path, th: fmt.TreeHead) -> Path:
    """Keep ``th`` as a new file in ``anchor_dir``; files there are never rewritten."""
    anchor_dir.mkdir(parents=True, exist_ok=True)
    path = anchor_dir / f"tree-head-{th.size:012d}.json"
    try:
        with path.open("xb") as f:
            f.write(fmt.encode_tree_head(th))
            f.flush()
            os.fsync(f.fileno())
    except FileExistsError:
        pass  # the same size signed again (another km worker): the first one stays
    return path


def read_anchor_dir(anchor_dir: Path) -> tuple[list[Anchored], list[str]]:
    """Every tree head in ``anchor_dir``, and what could not be read there (in words)."""
    if not anchor_dir.is_dir():
        return [], [f"anchor folder {anchor_dir} does not exist"]
    out: list[Anchored] = []
    bad: list[str] = []
    for path in sorted(anchor_dir.glob("tree-head-*.json")):
        try:
            out.append(Anchored(fmt.decode_tree_head(path.read_bytes(), where=str(path)), f"anchor {path}"))
        except BadRequestError as exc:
            bad.append(f"anchor file {exc.message}")
        except OSError as exc:
            bad.append(f"anchor file {path} cannot be read: {exc.strerror}")
    return out, bad


def consistency(store: AuditLogStore, first: int, second: int) -> fmt.ConsistencyProof:
    """The RFC 9162 2.1.4.1 proof that the log's first ``first`` records are a prefix of its first
    ``second``, from the records as the store has them (``0 < first <= second <=`` the size of the
    newest signed tree head). A store that lost or rewrote records gives a proof that fails
    against the tree heads a witness kept: that is the point."""
    fmt.check_sizes(first, second)
    cp = store.latest_audit_checkpoint()
    size = cp.seq if cp is not None else 0
    if second > size:
        raise BadRequestError(
            f"second={second} is beyond the newest signed tree head ({size} records)"
            if size
            else "the audit log has no signed tree head yet",
            field="second",
        )
    leaves: list[bytes] = []
    for rec in store.iter_audit():
        if rec.seq > second:
            break
        leaves.append(bytes.fromhex(rec.hash))
    if len(leaves) != second:
        raise ConflictError(f"the store holds {len(leaves)} of the first {second} audit records: records were deleted")
    proof = merkle.consistency_proof(first, leaves)
    return fmt.ConsistencyProof(first=first, second=second, proof=[h.hex() for h in proof])


async def read_stream_heads(bus: Bus) -> tuple[list[Anchored], list[str]]:
    """Every tree head in the append-only stream (the third anchor), and what could not be read
    there (in words). ``bus`` must be allowed to read the stream (admin's is)."""
    stream = await bus.append_only_stream(subjects.AUDIT_HEADS_STREAM, subjects.AUDIT_TREE_HEAD)
    out: list[Anchored] = []
    bad: list[str] = []
    for e in await stream.read():
        where = f"stream {stream.name} message #{e.seq}"
        try:
            out.append(Anchored(fmt.decode_tree_head(e.data, where=where), where))
        except BadRequestError as exc:
            bad.append(exc.message)
    return out, bad


def verify(
    store: AuditLogStore,
    signer_key: Callable[[str], CertificateIssuerPublicKeyTypes | None],
    *,
    anchors: Sequence[Anchored] = (),
    now: dt.datetime | None = None,
    checkpoint_every: dt.timedelta | None = None,
    progress: Callable[[int], None] = lambda _n: None,
) -> AuditReport:
    """Walk the whole chain and check every checkpoint: those in the database and ``anchors``
    (tree heads kept outside it). ``signer_key(fingerprint)`` gives the trusted public key of a
    checkpoint signer, or None if that signer is not trusted. With ``now`` and
    ``checkpoint_every``, a newest checkpoint older than twice km's schedule is reported."""
    report = AuditReport()
    heads = [Anchored(_db_head(cp), DATABASE) for cp in store.list_audit_checkpoints()]
    heads += anchors
    sizes = {a.head.size for a in heads}
    prev_hash = fmt.GENESIS_HASH
    expected_seq = 1
    at_size: dict[int, tuple[str, str]] = {}  # size -> (chain hash of record #size, tree head of 1..size)
    cr = merkle.CompactRange()
    newest_at: dt.datetime | None = None
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
        cr.append(merkle.leaf_hash(bytes.fromhex(rec.hash)))
        if rec.seq in sizes:
            at_size[rec.seq] = (rec.hash, cr.root().hex() if cr.size == rec.seq else "")
        prev_hash = rec.hash
        expected_seq = rec.seq + 1
        report.head_seq = rec.seq
        newest_at = rec.at
        if report.records % 10_000 == 0:
            progress(report.records)
    progress(report.records)
    last_cp = 0
    for a in heads:
        _check_head(report, a, signer_key, at_size)
        if a.source == DATABASE:
            report.checkpoints += 1
        last_cp = max(last_cp, a.head.size)
        if report.newest is None or (a.head.size, a.head.at) > report.newest[:2]:
            report.newest = (a.head.size, a.head.at, a.source)
    report.unsigned_tail = max(0, report.head_seq - last_cp)
    if not anchors:
        report.warnings.append(
            "no checkpoint kept outside the database was checked: deleting the newest records with "
            "their checkpoints cannot be seen (give the anchor folder)"
        )
    if now is not None and checkpoint_every is not None:
        _check_age(report, now, checkpoint_every, newest_at)
    return report


def _db_head(cp: AuditCheckpoint) -> fmt.TreeHead:
    # a checkpoint from before tree heads has no root: "" marks it (signed over seq and hash only)
    return fmt.TreeHead(
        size=cp.seq, hash=cp.hash, root=cp.root or "", at=cp.at, signer=cp.signer, signature=cp.signature.hex()
    )


def _check_head(
    report: AuditReport,
    a: Anchored,
    signer_key: Callable[[str], CertificateIssuerPublicKeyTypes | None],
    at_size: dict[int, tuple[str, str]],
) -> None:
    th = a.head
    what = f"the checkpoint of {th.at.isoformat(timespec='seconds')} from {a.source}"
    message = (
        fmt.tree_head_message(th.size, th.hash, th.root, th.at) if th.root else fmt.checkpoint_message(th.size, th.hash)
    )
    key = signer_key(th.signer)
    if key is None:
        report._bad(th.size, f"{what} (record {th.size}) is signed by an unknown signer {th.signer[:16]}")
        return
    try:
        verify_bytes(check_public_key(key), bytes.fromhex(th.signature), message)
    except (BadSignatureError, IotdlmError, ValueError):
        report._bad(th.size, f"{what} (record {th.size}) has a bad signature")
        return
    stored = at_size.get(th.size)
    if stored is None:
        if th.size > report.head_seq:
            n = th.size - report.head_seq
            report._bad(
                report.head_seq + 1,
                f"the store has {report.records} records; {what} commits to {th.size}: "
                f"{n} record{'s' if n > 1 else ''} after #{report.head_seq} {'were' if n > 1 else 'was'} deleted "
                f"(record {th.size} no longer exists)",
            )
        else:
            report._bad(th.size, f"{what} names record {th.size}, which no longer exists (deleted)")
        return
    chain_hash, root = stored
    if chain_hash != th.hash:
        report._bad(th.size, f"record {th.size} differs from what {what} signed (rewritten chain)")
    elif th.root and root != th.root:
        report._bad(
            th.size,
            f"records 1..{th.size} do not reproduce the tree head of {what}: a record up to #{th.size} "
            "was rewritten, deleted or inserted and the chain recomputed",
        )


def _check_age(report: AuditReport, now: dt.datetime, every: dt.timedelta, newest_record: dt.datetime | None) -> None:
    if report.newest is None:
        if report.records:
            report.warnings.append(f"the log has {report.records} records and no checkpoint at all")
        return
    size, at, source = report.newest
    age = now - at
    if age <= 2 * every:
        return
    late = (
        f"the newest checkpoint (record {size}, from {source}) is {_span(age)} old; "
        f"km takes one every {_span(every)} when there is something new"
    )
    if newest_record is not None and report.head_seq > size and newest_record - at > 2 * every:
        late += f": records {size + 1}..{report.head_seq} are not covered (is km's schedule running?)"
    else:
        late += (
            ": either nothing was logged since, or the newest records were deleted with their "
            "checkpoints (compare with an anchor kept outside the database)"
        )
    report.warnings.append(late)


def _span(d: dt.timedelta) -> str:
    s = int(d.total_seconds())
    if s >= 2 * 86400:
        return f"{s // 86400} days"
    if s >= 2 * 3600:
        return f"{s // 3600} h"
    if s >= 120:
        return f"{s // 60} min"
    return f"{s} s"


def _recompute(rec: AuditRecord) -> str:
    return fmt.record_hash(rec.prev_hash, rec.seq, rec.at, rec.kind, rec.actor, rec.subject, rec.data_json)
