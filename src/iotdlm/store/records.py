"""What the store keeps, as plain frozen dataclasses (no SQLAlchemy here).

Records validate their own shape on construction (types the database cannot check the same
way on every backend: serial range, timezone-aware datetimes, known statuses, text without NUL
and within the column sizes). A bad record is a programming error and raises ``ValueError``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Final

CERT_VALID: Final = "valid"
CERT_REVOKED: Final = "revoked"
CERT_SUPERSEDED: Final = "superseded"
CERT_STATUSES: Final = frozenset({CERT_VALID, CERT_REVOKED, CERT_SUPERSEDED})

DEVICE_ACTIVE: Final = "active"
DEVICE_RETIRED: Final = "retired"
DEVICE_STATUSES: Final = frozenset({DEVICE_ACTIVE, DEVICE_RETIRED})

MAX_SERIAL: Final = 2**160 - 1
"""Largest serial the store accepts (RFC 5280 allows up to 20 octets)."""

# Column sizes, in characters. Kept here so validation and tables.py agree.
ISSUER_LEN: Final = 1024
SUBJECT_LEN: Final = 2048
DEVICE_ID_LEN: Final = 255
DTYPE_LEN: Final = 64
PROFILE_LEN: Final = 64
STATUS_LEN: Final = 16
REQUESTED_BY_LEN: Final = 255
REASON_LEN: Final = 64
SENDER_LEN: Final = 255
NONCE_LEN: Final = 255
META_KEY_LEN: Final = 255
SERIAL_HEX_LEN: Final = 42
FINGERPRINT_LEN: Final = 64


def serial_to_hex(serial: int) -> str:
    """Canonical text form of a serial: lowercase hex, no ``0x``, no leading zeros."""
    if isinstance(serial, bool) or not isinstance(serial, int):
        raise ValueError(f"serial must be an int, got {type(serial).__name__}")
    if not 0 <= serial <= MAX_SERIAL:
        raise ValueError(f"serial must be in [0, 2**160), got {serial}")
    return format(serial, "x")


def serial_from_hex(text: str) -> int:
    """Inverse of :func:`serial_to_hex`."""
    return int(text, 16)


def fingerprint_of(der: bytes) -> str:
    """SHA-256 of the DER encoding, lowercase hex: the certificate fingerprint the store keys on."""
    return hashlib.sha256(der).hexdigest()


def check_text(field: str, value: str, max_len: int) -> None:
    """Reject text that one backend would store and another refuse (NUL, too long)."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{field} must not contain NUL characters")
    if len(value) > max_len:
        raise ValueError(f"{field} is {len(value)} characters long, the limit is {max_len}")


def findable_text(value: str, max_len: int) -> bool:
    """Whether a lookup key could be stored at all (lookups of impossible keys find nothing)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a str, got {type(value).__name__}")
    return "\x00" not in value and len(value) <= max_len


def findable_serial(serial: int) -> str | None:
    """The stored form of ``serial``, or None if no stored serial can equal it."""
    if isinstance(serial, bool) or not isinstance(serial, int):
        raise ValueError(f"serial must be an int, got {type(serial).__name__}")
    return format(serial, "x") if 0 <= serial <= MAX_SERIAL else None


def check_aware(field: str, value: dt.datetime) -> None:
    if not isinstance(value, dt.datetime):
        raise ValueError(f"{field} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{field} must be timezone-aware, got naive {value.isoformat()}")


@dataclass(frozen=True, slots=True)
class CertRecord:
    """One issued certificate.

    ``serial`` is a Python int (up to 160 bits) and is unique per ``issuer``; ``fingerprint`` is
    :func:`fingerprint_of` ``der`` and unique overall. ``status`` is one of :data:`CERT_STATUSES`.
    Datetimes are timezone-aware; the store always returns them in UTC.
    """

    serial: int
    issuer: str
    subject: str
    device_id: str | None
    profile: str
    not_before: dt.datetime
    not_after: dt.datetime
    status: str
    der: bytes
    fingerprint: str
    requested_by: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None
    revocation_reason: str | None = None
    superseded_by: int | None = None

    def __post_init__(self) -> None:
        serial_to_hex(self.serial)
        check_text("issuer", self.issuer, ISSUER_LEN)
        check_text("subject", self.subject, SUBJECT_LEN)
        if self.device_id is not None:
            check_text("device_id", self.device_id, DEVICE_ID_LEN)
        check_text("profile", self.profile, PROFILE_LEN)
        check_text("requested_by", self.requested_by, REQUESTED_BY_LEN)
        check_aware("not_before", self.not_before)
        check_aware("not_after", self.not_after)
        check_aware("created_at", self.created_at)
        if self.status not in CERT_STATUSES:
            raise ValueError(f"certificate status must be one of {sorted(CERT_STATUSES)}, got {self.status!r}")
        if not isinstance(self.der, bytes):
            raise ValueError(f"der must be bytes, got {type(self.der).__name__}")
        if not isinstance(self.fingerprint, str) or len(self.fingerprint) != FINGERPRINT_LEN:
            raise ValueError("fingerprint must be 64 lowercase hex characters (SHA-256 of the DER)")
        if self.revoked_at is not None:
            check_aware("revoked_at", self.revoked_at)
        if self.revocation_reason is not None:
            check_text("revocation_reason", self.revocation_reason, REASON_LEN)
        if self.superseded_by is not None:
            serial_to_hex(self.superseded_by)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device known to km. ``status`` is one of :data:`DEVICE_STATUSES`."""

    device_id: str
    dtype: str
    status: str
    created_at: dt.datetime
    updated_at: dt.datetime

    def __post_init__(self) -> None:
        check_text("device_id", self.device_id, DEVICE_ID_LEN)
        check_text("dtype", self.dtype, DTYPE_LEN)
        if self.status not in DEVICE_STATUSES:
            raise ValueError(f"device status must be one of {sorted(DEVICE_STATUSES)}, got {self.status!r}")
        check_aware("created_at", self.created_at)
        check_aware("updated_at", self.updated_at)
