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
