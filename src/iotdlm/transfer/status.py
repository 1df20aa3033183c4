"""Per-device transfer status, as each provider tracks it (``iotdlm transfer status``), pure.

pending -> [fetched] -> reset -> [attested] -> [updated] -> enrolled -> revoked-at-CA1, or failed-fallback from
any step before enrolled. A provider does not see every step (SP1 does not see attestation, SP2
does not see the reset), so a status may skip ahead; it never moves back, except that a device
that fell back may be sent a new transfer message (failed-fallback -> pending / reset).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from iotdlm.errors import ConflictError

PENDING: Final = "pending"
#: the device fetched its transfer message from SP1's cm (GET /transfer/message)
FETCHED: Final = "fetched"
RESET: Final = "reset"
ATTESTED: Final = "attested"
UPDATED: Final = "updated"
ENROLLED: Final = "enrolled"
REVOKED_AT_CA1: Final = "revoked-at-CA1"
FAILED_FALLBACK: Final = "failed-fallback"
#: in the order a device goes through them
STATUSES: Final = (PENDING, FETCHED, RESET, ATTESTED, UPDATED, ENROLLED, REVOKED_AT_CA1, FAILED_FALLBACK)

_NEXT: Final[dict[str, frozenset[str]]] = {
    PENDING: frozenset({FETCHED, RESET, ATTESTED, UPDATED, ENROLLED, FAILED_FALLBACK}),
    FETCHED: frozenset({RESET, ATTESTED, UPDATED, ENROLLED, FAILED_FALLBACK}),
    RESET: frozenset({ATTESTED, UPDATED, ENROLLED, FAILED_FALLBACK}),
    ATTESTED: frozenset({UPDATED, ENROLLED, FAILED_FALLBACK}),
    UPDATED: frozenset({ENROLLED, FAILED_FALLBACK}),
    ENROLLED: frozenset({REVOKED_AT_CA1}),
    REVOKED_AT_CA1: frozenset(),
    FAILED_FALLBACK: frozenset({PENDING, FETCHED, RESET, ATTESTED, UPDATED, ENROLLED}),
}


def advance(current: str, new: str, *, device_id: str | None = None) -> str:
    """The status after ``new`` is reported for a device at ``current``; ConflictError if that
    would move it back (the report is stale or out of order)."""
    if new not in _NEXT:
        raise ValueError(f"unknown transfer status {new!r}")
    if current == new:
        return current
    if new in _NEXT.get(current, frozenset()):
        return new
    raise ConflictError(f"a device at {current} cannot go to {new}", device_id=device_id)


def can_advance(current: str, new: str) -> bool:
    return current == new or new in _NEXT.get(current, frozenset())


#: refusals a provider keeps in a device's row (the newest; every one is in the audit log)
KEEP_REFUSALS: Final = 5


def with_refusal(detail: Mapping[str, Any], *, reason: str, text: str, at: str, message: str) -> dict[str, Any]:
    """A device row's detail after the device reported refusing a transfer message: the newest
    :data:`KEEP_REFUSALS` under ``refusals``, and how many in all under ``refused``. The status
    does not change (the device stays where it was: a refused message moves nothing)."""
    out = dict(detail)
    kept = [r for r in out.get("refusals", []) if isinstance(r, dict)] if isinstance(out.get("refusals"), list) else []
    kept.append({"reason": reason, "detail": text, "at": at, "message": message})
    out["refusals"] = kept[-KEEP_REFUSALS:]
    count = out.get("refused")
    out["refused"] = (count if isinstance(count, int) and count >= 0 else 0) + 1
    return out


def last_refusal(detail_json: str) -> str:
    """``reason: detail`` of the newest refusal in a row's detail (JSON), or ``""``."""
    try:
        detail = json.loads(detail_json)
    except ValueError:
        return ""
    kept = detail.get("refusals") if isinstance(detail, dict) else None
    if not isinstance(kept, list) or not kept or not isinstance(kept[-1], dict):
        return ""
    last = kept[-1]
    return f"{last.get('reason', '?')}: {last.get('detail', '')}".rstrip(": ")
