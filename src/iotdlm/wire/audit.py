"""The audit log's record format and hash chain (pure).

Each record holds the hash of the one before it; the first holds :data:`GENESIS_HASH`. A record's
hash covers its sequence number, time, kind, actor, subject and data, and the previous hash, so
editing, deleting or reordering any record breaks the chain from that point on. km signs
checkpoints (sequence number + hash) so the head of the chain cannot be silently rewritten either.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
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
KINDS = frozenset(
    {ISSUANCE, REVOCATION, DECOMMISSION, CRL, MODE_SWITCH, LOGIN, REFUSED, CHECKPOINT, ALARM, REGISTRATION}
)


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


class TreeHead(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A signed tree head as kept outside the database (an anchor file, cm's /audit/checkpoint)."""

    size: int
    hash: str
    root: str
    at: dt.datetime
    signer: str
    #: the signature, hex
    signature: str


_HEX = frozenset("0123456789abcdef")
_tree_head_decoder = msgspec.json.Decoder(TreeHead)
_MAX_TREE_HEAD = 4096


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
    return th


def _words(exc: Exception) -> str:
    text = str(exc)
    return "not JSON" if isinstance(exc, msgspec.DecodeError) else text.replace("`", "")
