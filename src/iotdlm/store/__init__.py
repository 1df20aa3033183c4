"""Persistence for km and pm: the only package that talks SQL (SQLAlchemy Core + Alembic).

Open with :meth:`Store.open`; the store is synchronous and thread-safe, so async code calls it
through :func:`asyncio.to_thread`.
"""

from iotdlm.store.records import (
    AuditCheckpoint,
    AuditEntry,
    AuditRecord,
    CertRecord,
    CrlRecord,
    DeviceRecord,
    NonceUse,
    ProvisioningRecord,
    fingerprint_of,
)
from iotdlm.store.store import SerialCollisionError, Store

__all__ = [
    "AuditCheckpoint",
    "AuditEntry",
    "AuditRecord",
    "CertRecord",
    "CrlRecord",
    "DeviceRecord",
    "NonceUse",
    "ProvisioningRecord",
    "SerialCollisionError",
    "Store",
    "fingerprint_of",
]
