"""Persistence for km and pm: the only package that talks SQL (SQLAlchemy Core + Alembic).

Open with :meth:`Store.open`; the store is synchronous and thread-safe, so async code calls it
through :func:`asyncio.to_thread`. :class:`Store` is one repository per record kind on one
engine (see :mod:`iotdlm.store.store`); its users depend on Protocols of their own that name the
methods they call (``km/storage.py``, ``pm/storage.py``, ``transfer/storage.py``,
``supervisor/storage.py``).
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
