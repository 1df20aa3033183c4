"""What the store keeps, as plain frozen dataclasses (no SQLAlchemy here).

Records validate their own shape on construction (types the database cannot check the same
way on every backend: serial range, timezone-aware datetimes, known statuses, text without NUL
and within the column sizes). A bad record is a programming error and raises ``ValueError``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from iotdlm import errors
from iotdlm.wire import audit as wire_audit

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
CRL_KIND_LEN: Final = 16
AUDIT_KIND_LEN: Final = 32
ACTOR_LEN: Final = 255
AUDIT_SUBJECT_LEN: Final = 1024
HASH_LEN: Final = 64
SIGNER_LEN: Final = 255

MAX_CRL_PARTITION: Final = 4095
"""CRL partitions are numbered 0..4095 (a certificate's ``crl_partition``, a CRL's ``partition``)."""
MAX_CRL_NUMBER: Final = 2**63 - 1
"""Largest CRL number the store keeps (a signed 64-bit column on every backend)."""

PROVISIONING_COMPLETE: Final = "complete"
PROVISIONING_FAILED: Final = "failed"
PROVISIONING_IN_PROGRESS: Final = "in-progress"
PROVISIONING_STATUSES: Final = frozenset({PROVISIONING_COMPLETE, PROVISIONING_FAILED, PROVISIONING_IN_PROGRESS})
OPERATOR_LEN: Final = 255
REF_LEN: Final = 1024
STEP_LEN: Final = 64
MESSAGE_LEN: Final = 4096
SHA256_LEN: Final = 64
MAX_RELEASE_COUNTER: Final = 2**63 - 1
MAX_STEPS: Final = 64

CRL_FULL: Final = "full"
CRL_DELTA: Final = "delta"
CRL_KINDS: Final = frozenset({CRL_FULL, CRL_DELTA})


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


#: reasons no revocation may carry (RFC 5280 5.3.1: removeFromCRL belongs in delta CRLs only; this
#: CA cannot release a certificateHold); compared without case, ``_`` and spaces
NOT_REVOCATION_REASONS: Final = frozenset({"removefromcrl", "certificatehold"})


def check_revocation_reason(reason: str | None) -> None:
    """Refuse the reasons no revocation may be stored with (the VA refuses them first)."""
    if reason is not None and reason.replace("_", "").replace(" ", "").lower() in NOT_REVOCATION_REASONS:
        raise errors.BadRequestError(
            f"{reason} is not a revocation reason this CA records (RFC 5280 5.3.1)", field="reason"
        )


def check_aware(field: str, value: dt.datetime) -> None:
    if not isinstance(value, dt.datetime):
        raise ValueError(f"{field} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{field} must be timezone-aware, got naive {value.isoformat()}")


def check_int(field: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{field} must be in [{low}, {high}], got {value}")


def check_partition(field: str, value: int) -> None:
    check_int(field, value, 0, MAX_CRL_PARTITION)


def findable_partition(value: int) -> bool:
    """Whether a CRL partition could be stored at all (a lookup of any other finds nothing)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"partition must be an int, got {type(value).__name__}")
    return 0 <= value <= MAX_CRL_PARTITION


def _check_utf8(field: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} must be encodable as UTF-8 (no lone surrogates)") from None


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def audit_data_json(data: dict[str, Any]) -> str:
    """The canonical JSON (:func:`iotdlm.wire.audit.canonical_data`) of audit data, checked.

    Raises ``ValueError`` unless ``data`` is a dict that serialises to JSON any verifier can read
    back: no NaN or infinities, no lone surrogates, no objects JSON does not know.
    """
    if not isinstance(data, dict):
        raise ValueError(f"audit data must be a dict, got {type(data).__name__}")
    try:
        text_ = wire_audit.canonical_data(data)
        json.loads(text_, parse_constant=_refuse_constant)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"audit data must be JSON-serialisable: {exc}") from None
    _check_utf8("audit data", text_)
    return text_


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
    crl_partition: int | None = None
    """Which CRL partition (0..4095) lists this certificate once revoked; None: not assigned."""

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
        if self.crl_partition is not None:
            check_partition("crl_partition", self.crl_partition)


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


@dataclass(frozen=True, slots=True)
class CrlRecord:
    """The newest CRL of one kind (``"full"`` or ``"delta"``) for one partition of one issuer.

    ``der`` is the signed CRL. ``base_number`` is the CRL number of the full CRL a delta CRL is
    relative to (RFC 5280 BaseCRLNumber), required for a delta and absent from a full CRL.
    """

    issuer: str
    partition: int
    kind: str
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    base_number: int | None
    der: bytes

    def __post_init__(self) -> None:
        check_text("issuer", self.issuer, ISSUER_LEN)
        check_partition("partition", self.partition)
        if self.kind not in CRL_KINDS:
            raise ValueError(f"CRL kind must be one of {sorted(CRL_KINDS)}, got {self.kind!r}")
        check_int("number", self.number, 0, MAX_CRL_NUMBER)
        check_aware("this_update", self.this_update)
        check_aware("next_update", self.next_update)
        if self.next_update <= self.this_update:
            raise ValueError(
                f"next_update {self.next_update.isoformat()} must be after this_update {self.this_update.isoformat()}"
            )
        if self.kind == CRL_DELTA:
            if self.base_number is None:
                raise ValueError("a delta CRL needs base_number (the number of the full CRL it builds on)")
            check_int("base_number", self.base_number, 0, self.number)
        elif self.base_number is not None:
            raise ValueError("a full CRL has no base_number")
        if not isinstance(self.der, bytes) or not self.der:
            raise ValueError("der must be non-empty bytes")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An event to append to the audit log; the store gives it a sequence number and its hashes.

    ``kind`` is one of :data:`iotdlm.wire.audit.KINDS`; ``data`` must serialise to JSON (see
    :func:`audit_data_json`). ``at`` is stored in UTC with microseconds, as the hash covers it.
    """

    at: dt.datetime
    kind: str
    actor: str
    subject: str | None
    data: dict[str, Any]

    def __post_init__(self) -> None:
        check_aware("at", self.at)
        if self.kind not in wire_audit.KINDS:
            raise ValueError(f"audit kind must be one of {sorted(wire_audit.KINDS)}, got {self.kind!r}")
        check_text("actor", self.actor, ACTOR_LEN)
        _check_utf8("actor", self.actor)
        if self.subject is not None:
            check_text("subject", self.subject, AUDIT_SUBJECT_LEN)
            _check_utf8("subject", self.subject)
        audit_data_json(self.data)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored audit log record.

    ``hash`` is :func:`iotdlm.wire.audit.record_hash` of ``prev_hash`` and the other fields, where
    ``prev_hash`` is the ``hash`` of record ``seq - 1`` (:data:`~iotdlm.wire.audit.GENESIS_HASH`
    for record 1). ``data_json`` is the canonical JSON exactly as hashed; :attr:`data` parses it.
    """

    seq: int
    at: dt.datetime
    kind: str
    actor: str
    subject: str | None
    data_json: str
    prev_hash: str
    hash: str

    @property
    def data(self) -> dict[str, Any]:
        """``data_json`` parsed (a fresh dict on every call)."""
        value = json.loads(self.data_json)
        if not isinstance(value, dict):
            raise ValueError(f"audit record {self.seq} holds {type(value).__name__} data, not an object")
        return value

    def computed_hash(self) -> str:
        """The hash this record should have, recomputed from its fields (compare with :attr:`hash`)."""
        return wire_audit.record_hash(
            self.prev_hash, self.seq, self.at, self.kind, self.actor, self.subject, self.data_json
        )


_HEX_DIGITS: Final = frozenset("0123456789abcdef")


def check_hash(field: str, value: str) -> None:
    if not isinstance(value, str) or len(value) != HASH_LEN or not set(value) <= _HEX_DIGITS:
        raise ValueError(f"{field} must be {HASH_LEN} lowercase hex characters")


@dataclass(frozen=True, slots=True)
class AuditCheckpoint:
    """A signature by km over record ``seq`` of the audit log and its ``hash``. With ``root`` (the
    RFC 9162 Merkle tree head of records 1..seq) it is a signed tree head over (seq, hash, root, at)
    (:func:`iotdlm.wire.audit.tree_head_message`); without it, a checkpoint of an older version
    over (seq, hash) only (:func:`iotdlm.wire.audit.checkpoint_message`). ``signer`` is the signing
    certificate's fingerprint."""

    seq: int
    hash: str
    at: dt.datetime
    signer: str
    signature: bytes
    root: str | None = None

    def __post_init__(self) -> None:
        check_int("seq", self.seq, 1, 2**63 - 1)
        check_hash("hash", self.hash)
        if self.root is not None:
            check_hash("root", self.root)
        check_aware("at", self.at)
        check_text("signer", self.signer, SIGNER_LEN)
        if not isinstance(self.signature, bytes) or not self.signature:
            raise ValueError("signature must be non-empty bytes")


_SHA256_DIGITS: Final = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class ProvisioningRecord:
    """What pm did to one device (one record per device; re-provisioning replaces it).

    ``status`` is one of :data:`PROVISIONING_STATUSES`: ``complete``; ``failed`` with the step that
    failed (``failed_step``) and why (``message``); ``in-progress`` while steps remain (a run
    stopped half way, or the operation mode allows only some steps). ``steps_done`` lists the steps
    finished, in order; a later run resumes from the first step not in it. ``certificates`` maps a
    profile (factory, operational) to the serial (lowercase hex) of the certificate flashed.
    ``release_counter`` and ``image_sha256`` name the software flashed (both or neither).
    """

    device_id: str
    dtype: str
    status: str
    operator: str
    started_at: dt.datetime
    updated_at: dt.datetime
    ref: str | None = None
    steps_done: tuple[str, ...] = ()
    release_counter: int | None = None
    image_sha256: str | None = None
    certificates: tuple[tuple[str, str], ...] = ()
    failed_step: str | None = None
    message: str | None = None
    attempts: int = 1
    completed_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        check_text("device_id", self.device_id, DEVICE_ID_LEN)
        check_text("dtype", self.dtype, DTYPE_LEN)
        if self.status not in PROVISIONING_STATUSES:
            raise ValueError(f"provisioning status must be one of {sorted(PROVISIONING_STATUSES)}, got {self.status!r}")
        check_text("operator", self.operator, OPERATOR_LEN)
        _check_utf8("operator", self.operator)
        check_aware("started_at", self.started_at)
        check_aware("updated_at", self.updated_at)
        if self.ref is not None:
            check_text("ref", self.ref, REF_LEN)
            _check_utf8("ref", self.ref)
        if not isinstance(self.steps_done, tuple) or len(self.steps_done) > MAX_STEPS:
            raise ValueError(f"steps_done must be a tuple of at most {MAX_STEPS} step names")
        for step in self.steps_done:
            check_text("step", step, STEP_LEN)
        if len(set(self.steps_done)) != len(self.steps_done):
            raise ValueError(f"steps_done repeats a step: {self.steps_done}")
        if (self.release_counter is None) != (self.image_sha256 is None):
            raise ValueError("release_counter and image_sha256 go together (both or neither)")
        if self.release_counter is not None:
            check_int("release_counter", self.release_counter, 0, MAX_RELEASE_COUNTER)
        if self.image_sha256 is not None and (
            not isinstance(self.image_sha256, str)
            or len(self.image_sha256) != SHA256_LEN
            or not set(self.image_sha256) <= _SHA256_DIGITS
        ):
            raise ValueError("image_sha256 must be 64 lowercase hex characters")
        if not isinstance(self.certificates, tuple):
            raise ValueError("certificates must be a tuple of (profile, serial hex) pairs")
        profiles = [p for p, _ in self.certificates]
        if len(set(profiles)) != len(profiles):
            raise ValueError(f"certificates name a profile twice: {profiles}")
        for profile, serial_hex in self.certificates:
            check_text("profile", profile, PROFILE_LEN)
            if not isinstance(serial_hex, str) or not serial_hex or len(serial_hex) > SERIAL_HEX_LEN:
                raise ValueError(f"serial of the {profile} certificate must be lowercase hex")
            if serial_to_hex(int(serial_hex, 16)) != serial_hex:
                raise ValueError(f"serial {serial_hex!r} of the {profile} certificate is not in canonical hex")
        if self.failed_step is not None:
            check_text("failed_step", self.failed_step, STEP_LEN)
        if self.message is not None:
            check_text("message", self.message, MESSAGE_LEN)
            _check_utf8("message", self.message)
        if (self.status == PROVISIONING_FAILED) != (self.failed_step is not None):
            raise ValueError("failed_step is set exactly when the status is failed")
        check_int("attempts", self.attempts, 1, 2**31 - 1)
        if self.completed_at is not None:
            check_aware("completed_at", self.completed_at)
        if (self.status == PROVISIONING_COMPLETE) != (self.completed_at is not None):
            raise ValueError("completed_at is set exactly when the status is complete")

    @property
    def certificate_serials(self) -> dict[str, str]:
        """``certificates`` as a dict: profile -> serial (hex)."""
        return dict(self.certificates)


@dataclass(frozen=True, slots=True)
class NonceUse:
    """A request's replay nonce, to be consumed in the transaction that acts on the request."""

    sender: str
    nonce: str
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class CertWrite:
    """What one km request records: its certificates, their audit entries, the devices they name
    (``(device_id, dtype)``, created as active at ``now`` if unknown) and its replay nonce. Several
    are written in one transaction (``CertificateRepository.add_certificate_writes``, km's group commit)."""

    records: tuple[CertRecord, ...]
    audit: tuple[AuditEntry, ...] = ()
    devices: tuple[tuple[str, str], ...] = ()
    nonce: NonceUse | None = None
    now: dt.datetime | None = None
    #: other single-use nonces the request spends with its records (an EST proof's, ADR 0008),
    #: inserted apart from the requests' own nonces so a replay names the nonce it reused
    extra_nonces: tuple[NonceUse, ...] = ()
