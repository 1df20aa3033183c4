"""The audit log's record format and hash chain (pure).

Each record holds the hash of the one before it; the first holds :data:`GENESIS_HASH`. A record's
hash covers its sequence number, time, kind, actor, subject and data, and the previous hash, so
editing, deleting or reordering any record breaks the chain from that point on. km signs
checkpoints (sequence number + hash) so the head of the chain cannot be silently rewritten either.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import urllib.parse
from typing import Any

import msgspec

from iotdlm.errors import BadRequestError

GENESIS_HASH = "0" * 64

#: record kinds
ISSUANCE = "issuance"
REVOCATION = "revocation"
DECOMMISSION = "decommission"
CRL = "crl"
MODE_SWITCH = "mode_switch"
LOGIN = "login"
REFUSED = "refused"
CHECKPOINT = "checkpoint"
REGISTRATION = "registration"
#: pm halted (Algorithm 1 failed: sig_sm, the repository metadata or the image) or an operator cleared it
ALARM = "alarm"
#: a device refused a trust-transfer message and told its provider (cm's POST /transfer/refusal)
DEVICE_REFUSAL = "device_refusal"
#: an issuing CA rotated: a new generation issues, the old one is rotated out (ADR 0026)
CA_ROTATION = "ca_rotation"
KINDS = frozenset(
    {ISSUANCE, REVOCATION, DECOMMISSION, CRL, MODE_SWITCH, LOGIN, REFUSED, CHECKPOINT, ALARM, REGISTRATION,
     DEVICE_REFUSAL, CA_ROTATION}
)  # fmt: skip


def canonical_data(data: dict[str, Any]) -> str:
    """Canonical JSON of a record's data: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_time(at: dt.datetime) -> str:
    if at.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    return at.astimezone(dt.UTC).isoformat(timespec="microseconds")


def record_hash(
    prev_hash: str, seq: int, at: dt.datetime, kind: str, actor: str, subject: str | None, data_json: str
) -> str:
    head = json.dumps([seq, canonical_time(at), kind, actor, subject], separators=(",", ":"), ensure_ascii=False)
    h = hashlib.sha256()
    h.update(prev_hash.encode("ascii"))
    h.update(b"\n")
    h.update(head.encode("utf-8"))
    h.update(b"\n")
    h.update(data_json.encode("utf-8"))
    return h.hexdigest()


def checkpoint_message(seq: int, hash_: str) -> bytes:
    """The bytes km signs for a checkpoint."""
    return f"iotdlm-audit-checkpoint:{seq}:{hash_}".encode("ascii")


def tree_head_message(size: int, hash_: str, root: str, at: dt.datetime) -> bytes:
    """The bytes km signs for a signed tree head: the number of records, the chain hash of the
    last one, the RFC 9162 Merkle tree head of all of them (:mod:`iotdlm.wire.merkle`) and when."""
    return f"iotdlm-audit-tree-head:v1:{size}:{hash_}:{root}:{canonical_time(at)}".encode("ascii")


class TreeHead(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A signed tree head as kept outside the database (an anchor file, the append-only stream,
    cm's /audit/checkpoint)."""

    size: int
    hash: str
    root: str
    at: dt.datetime
    signer: str
    #: the signature, hex
    signature: str
    #: the signer's certificate (DER, base64), for a party holding only the service CA (cm serves
    #: it); not covered by the signature: the signer fingerprint binds it
    certificate: str | None = None


_HEX = frozenset("0123456789abcdef")
_tree_head_decoder = msgspec.json.Decoder(TreeHead)
_MAX_TREE_HEAD = 8192
_MAX_CERTIFICATE_CHARS = 6000


def encode_tree_head(th: TreeHead) -> bytes:
    return msgspec.json.encode(th)


def decode_tree_head(data: bytes, *, where: str = "the tree head") -> TreeHead:
    """Parse a signed tree head; :class:`~iotdlm.errors.BadRequestError` naming ``where`` if it
    is not one. (The signature is the caller's business.)"""
    if len(data) > _MAX_TREE_HEAD:
        raise BadRequestError(f"{where} is not a signed tree head: {len(data)} bytes, at most {_MAX_TREE_HEAD}")
    try:
        th = _tree_head_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequestError(f"{where} is not a signed tree head ({_words(exc)})") from exc
    for name in ("hash", "root"):
        value = getattr(th, name)
        if len(value) != 64 or not set(value) <= _HEX:
            raise BadRequestError(f"{where}: {name} must be 64 lowercase hex characters")
    if not 0 < th.size < 2**63:
        raise BadRequestError(f"{where}: size must be a positive record count, not {th.size}")
    if th.at.tzinfo is None:
        raise BadRequestError(f"{where}: the time has no time zone")
    if not th.signature or len(th.signature) % 2 or not set(th.signature) <= _HEX or len(th.signer) > 128:
        raise BadRequestError(f"{where}: the signature or signer is malformed")
    if th.certificate is not None:
        try:
            if not th.certificate or len(th.certificate) > _MAX_CERTIFICATE_CHARS:
                raise ValueError
            base64.b64decode(th.certificate, validate=True)
        except (ValueError, binascii.Error):
            raise BadRequestError(f"{where}: the certificate is not base64 DER") from None
    return th


def certificate_der(th: TreeHead) -> bytes | None:
    """The signer certificate a tree head carries (DER), checked for form by :func:`decode_tree_head`."""
    return base64.b64decode(th.certificate) if th.certificate is not None else None


def _words(exc: Exception) -> str:
    text = str(exc)
    return "not JSON" if isinstance(exc, msgspec.DecodeError) else text.replace("`", "")


# --- consistency proofs (RFC 9162 2.1.4) between two sizes of the log -----------------------------

#: at most this many hashes in a proof: 2 per level of a tree of 2**63 leaves, with room to spare
MAX_PROOF_HASHES = 130
_MAX_SIZE = 2**63 - 1
_MAX_QUERY_DIGITS = 19


class ConsistencyRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Asks km for the proof that the log of ``first`` records is a prefix of the log of ``second``.
    ``nonce`` makes the request unique, so km's signed reply binds to it alone (ADR 0006)."""

    first: int
    second: int
    nonce: str = ""


class ConsistencyProof(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """PROOF(first, D[second]) (RFC 9162 2.1.4.1): node hashes, hex, in the RFC's order."""

    first: int
    second: int
    proof: list[str]


def check_sizes(first: int, second: int, *, where: str = "the request") -> None:
    """``0 < first <= second`` (the bound by the log's size is km's to check)."""
    if not 0 < first <= _MAX_SIZE:
        raise BadRequestError(f"{where}: first must be a record count from 1, not {first}", field="first")
    if not first <= second <= _MAX_SIZE:
        raise BadRequestError(f"{where}: second must be at least first ({first}), not {second}", field="second")


def parse_consistency_query(query: str) -> tuple[int, int]:
    """The sizes of ``GET /audit/consistency?first=M&second=N`` from the raw query string:
    exactly these two parameters, once each, decimal integers, ``0 < M <= N``;
    :class:`~iotdlm.errors.BadRequestError` naming the parameter otherwise (cm answers 400)."""
    if len(query) > 256:
        raise BadRequestError(f"the query is {len(query)} characters; first=M&second=N needs far fewer")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=2)
    except ValueError:
        raise BadRequestError("the query must be first=M&second=N (two record counts)") from None
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name not in ("first", "second"):
            raise BadRequestError(f"unknown query parameter {name[:40]!r}: only first and second", field=name[:40])
        if name in seen:
            raise BadRequestError(f"{name} is given twice", field=name)
        seen[name] = value
    values: list[int] = []
    for name in ("first", "second"):
        text = seen.get(name)
        if text is None or text == "":
            raise BadRequestError(f"the query needs {name}=<number of records>", field=name)
        if len(text) > _MAX_QUERY_DIGITS or not text.isascii() or not text.isdigit():
            raise BadRequestError(f"{name} must be a decimal number of records, not {text[:40]!r}", field=name)
        values.append(int(text))
    check_sizes(values[0], values[1], where="the query")
    return values[0], values[1]


_consistency_request = msgspec.json.Decoder(ConsistencyRequest)
_consistency_proof = msgspec.json.Decoder(ConsistencyProof)


def encode_consistency_request(req: ConsistencyRequest) -> bytes:
    return msgspec.json.encode(req)


def decode_consistency_request(data: bytes) -> ConsistencyRequest:
    if len(data) > 1024:
        raise BadRequestError(f"a consistency request is at most 1024 bytes, not {len(data)}")
    try:
        req = _consistency_request.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequestError(f"not a consistency request ({_words(exc)})") from exc
    check_sizes(req.first, req.second)
    return req


def encode_consistency_proof(p: ConsistencyProof) -> bytes:
    return msgspec.json.encode(p)


def decode_consistency_proof(data: bytes, *, where: str = "the consistency proof") -> ConsistencyProof:
    """Parse a consistency proof (its hashes are checked by :func:`iotdlm.wire.merkle.verify_consistency`)."""
    if len(data) > 64 * 1024:
        raise BadRequestError(f"{where} is {len(data)} bytes, at most {64 * 1024}")
    try:
        p = _consistency_proof.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequestError(f"{where} is not a consistency proof ({_words(exc)})") from exc
    check_sizes(p.first, p.second, where=where)
    if len(p.proof) > MAX_PROOF_HASHES or any(len(h) != 64 or not set(h) <= _HEX for h in p.proof):
        raise BadRequestError(f"{where}: the proof must be at most {MAX_PROOF_HASHES} hashes of 64 lowercase hex")
    return p
