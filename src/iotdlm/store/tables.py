"""The schema, as SQLAlchemy Core metadata. Migrations in ``migrations/versions`` must match it
(a test runs Alembic's ``compare_metadata`` against a migrated database)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)

from iotdlm.store import records as r

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware datetimes in, timezone-aware UTC datetimes out, on every backend.

    PostgreSQL stores ``timestamptz``. SQLite has no time zones: values are converted to UTC and
    stored naive (so text ordering is time ordering), and marked UTC again when read back.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to the store; pass an aware one")
        utc = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return utc.replace(tzinfo=None)
        return utc

    def process_result_value(self, value: Any | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


# BIGINT on PostgreSQL; plain INTEGER on SQLite so the column is the rowid alias and autoincrements.
_ID = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(naming_convention=NAMING_CONVENTION)

certificates = Table(
    "certificates",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("serial_hex", String(r.SERIAL_HEX_LEN), nullable=False),
    Column("issuer", String(r.ISSUER_LEN), nullable=False),
    Column("subject", String(r.SUBJECT_LEN), nullable=False),
    Column("device_id", String(r.DEVICE_ID_LEN), nullable=True),
    Column("profile", String(r.PROFILE_LEN), nullable=False),
    Column("not_before", UTCDateTime(), nullable=False),
    Column("not_after", UTCDateTime(), nullable=False),
    Column("status", String(r.STATUS_LEN), nullable=False),
    Column("der", LargeBinary(), nullable=False),
    Column("fingerprint", String(r.FINGERPRINT_LEN), nullable=False),
    Column("requested_by", String(r.REQUESTED_BY_LEN), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("revocation_reason", String(r.REASON_LEN), nullable=True),
    Column("superseded_by_hex", String(r.SERIAL_HEX_LEN), nullable=True),
    Column("crl_partition", Integer(), nullable=True),
    # serial first: the same index serves get_certificate(issuer, serial) and find_by_serial(serial).
    UniqueConstraint("serial_hex", "issuer"),
    UniqueConstraint("fingerprint"),
    Index(None, "device_id"),
    Index(None, "status"),
    Index(None, "not_after"),
    Index(None, "created_at"),
    # CRL generation: the revoked certificates of one partition, in id order (keyset pagination).
    # id is spelled out for PostgreSQL; SQLite ends every index with the rowid (= id) anyway.
    Index(None, "issuer", "crl_partition", "status", "id"),
    # delta CRLs: what one partition revoked since its base (migration 0005)
    Index(None, "issuer", "crl_partition", "status", "revoked_at"),
)

devices = Table(
    "devices",
    metadata,
    Column("device_id", String(r.DEVICE_ID_LEN), primary_key=True),
    Column("dtype", String(r.DTYPE_LEN), nullable=False),
    Column("status", String(r.STATUS_LEN), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index(None, "dtype"),
    Index(None, "status"),
)

nonces = Table(
    "nonces",
    metadata,
    Column("sender", String(r.SENDER_LEN), primary_key=True),
    Column("nonce", String(r.NONCE_LEN), primary_key=True),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index(None, "expires_at"),
)

meta = Table(
    "meta",
    metadata,
    Column("key", String(r.META_KEY_LEN), primary_key=True),
    Column("value", Text(), nullable=False),
)

crl_numbers = Table(
    "crl_numbers",
    metadata,
    Column("issuer", String(r.ISSUER_LEN), primary_key=True),
    Column("partition", Integer(), primary_key=True),
    Column("last_number", BigInteger(), nullable=False),
)

crls = Table(
    "crls",
    metadata,
    Column("issuer", String(r.ISSUER_LEN), primary_key=True),
    Column("partition", Integer(), primary_key=True),
    Column("kind", String(r.CRL_KIND_LEN), primary_key=True),
    Column("number", BigInteger(), nullable=False),
    Column("this_update", UTCDateTime(), nullable=False),
    Column("next_update", UTCDateTime(), nullable=False),
    Column("base_number", BigInteger(), nullable=True),
    Column("der", LargeBinary(), nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    # assigned by the store as head + 1 under the audit lock, never by the database
    Column("seq", _ID, primary_key=True, autoincrement=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("kind", String(r.AUDIT_KIND_LEN), nullable=False),
    Column("actor", String(r.ACTOR_LEN), nullable=False),
    Column("subject", String(r.AUDIT_SUBJECT_LEN), nullable=True),
    Column("data", Text(), nullable=False),
    Column("prev_hash", String(r.HASH_LEN), nullable=False),
    Column("hash", String(r.HASH_LEN), nullable=False),
    Index(None, "kind"),
    Index(None, "at"),
)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", _ID, primary_key=True, autoincrement=False),
    Column("hash", String(r.HASH_LEN), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("signer", String(r.SIGNER_LEN), nullable=False),
    Column("signature", LargeBinary(), nullable=False),
    # RFC 9162 Merkle tree head of records 1..seq (hex); NULL for checkpoints made before 0006
    Column("root", String(r.HASH_LEN), nullable=True),
)

provisioning = Table(
    "provisioning",
    metadata,
    Column("device_id", String(r.DEVICE_ID_LEN), primary_key=True),
    Column("dtype", String(r.DTYPE_LEN), nullable=False),
    Column("status", String(r.STATUS_LEN), nullable=False),
    Column("operator", String(r.OPERATOR_LEN), nullable=False),
    Column("ref", String(r.REF_LEN), nullable=True),
    # JSON: the steps done, in order
    Column("steps_done", Text(), nullable=False),
    Column("release_counter", BigInteger(), nullable=True),
    Column("image_sha256", String(r.SHA256_LEN), nullable=True),
    # JSON: [[profile, serial hex], ...]
    Column("certificates", Text(), nullable=False),
    Column("failed_step", String(r.STEP_LEN), nullable=True),
    Column("message", Text(), nullable=True),
    Column("attempts", Integer(), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("completed_at", UTCDateTime(), nullable=True),
    # `iotdlm pm records --dtype D --status S` and pm's status counts
    Index(None, "dtype", "status"),
    Index(None, "updated_at"),
)

# --- trust transfer (migration 0004): km's registry of EXTERNAL factory certificates (shared by
# another provider as an x5bag, seed 003 VI-B / VII-C) and each provider's view of a transfer.
factory_cas = Table(
    "factory_cas",
    metadata,
    Column("fingerprint", String(r.FINGERPRINT_LEN), primary_key=True),
    Column("subject", String(r.SUBJECT_LEN), nullable=False),
    # an anchor is trusted as registered (the permanent CA's root); other CAs chain to an anchor
    Column("anchor", Boolean(), nullable=False),
    Column("not_after", UTCDateTime(), nullable=False),
    Column("der", LargeBinary(), nullable=False),
    Column("registered_by", String(r.ACTOR_LEN), nullable=False),
    Column("registered_at", UTCDateTime(), nullable=False),
)

factory_registry = Table(
    "factory_registry",
    metadata,
    Column("fingerprint", String(r.FINGERPRINT_LEN), primary_key=True),
    Column("device_id", String(r.DEVICE_ID_LEN), nullable=False),
    Column("issuer_fingerprint", String(r.FINGERPRINT_LEN), nullable=False),
    Column("serial_hex", String(r.SERIAL_HEX_LEN), nullable=False),
    Column("not_after", UTCDateTime(), nullable=False),
    # the agreed enrollment window (the DeviceUpdateInfo's updateTimeNotBefore/NotAfter), if any
    Column("enroll_not_before", UTCDateTime(), nullable=True),
    Column("enroll_not_after", UTCDateTime(), nullable=True),
    Column("status", String(r.STATUS_LEN), nullable=False),
    Column("batch", String(r.FINGERPRINT_LEN), nullable=False),
    Column("der", LargeBinary(), nullable=False),
    Column("registered_by", String(r.ACTOR_LEN), nullable=False),
    Column("registered_at", UTCDateTime(), nullable=False),
    Index(None, "device_id"),
    Index(None, "batch"),
)

transfers = Table(
    "transfers",
    metadata,
    Column("role", String(r.STATUS_LEN), primary_key=True),  # sp1 | sp2
    Column("transfer_id", String(r.FINGERPRINT_LEN), primary_key=True),
    # JSON: the transfer's state as iotdlm.transfer.sp1 / sp2 define it
    Column("state", Text(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

transfer_devices = Table(
    "transfer_devices",
    metadata,
    Column("role", String(r.STATUS_LEN), primary_key=True),
    Column("transfer_id", String(r.FINGERPRINT_LEN), primary_key=True),
    Column("device_id", String(r.DEVICE_ID_LEN), primary_key=True),
    Column("status", String(r.AUDIT_KIND_LEN), nullable=False),
    # JSON: what the provider keeps per device (window, references, last detail)
    Column("detail", Text(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index(None, "role", "transfer_id", "status"),
)

# --- trust transfer (migration 0007): SP2's outstanding attestation challenges (the raURI), so a
# challenge one km worker issued is answered at another, and survives a km restart.
attestation_challenges = Table(
    "attestation_challenges",
    metadata,
    Column("device_id", String(r.DEVICE_ID_LEN), primary_key=True),
    # hex of the 16..64 random bytes
    Column("nonce", String(128), primary_key=True),
    Column("issued_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index(None, "expires_at"),
)
