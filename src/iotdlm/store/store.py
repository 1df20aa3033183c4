"""The km store: certificates, devices, nonces, CRLs, the audit log and a few settings -- and
pm's provisioning records and the trust-transfer tables -- in SQLite or PostgreSQL.

:class:`Store` is one object on one database engine (:mod:`~iotdlm.store.engine`) made of one
repository per record kind, each in its own module:

==========================================  =====================================================
:mod:`~iotdlm.store.certificates`           certificates, by (issuer, serial) and fingerprint
:mod:`~iotdlm.store.devices`                devices and their status
:mod:`~iotdlm.store.revocation`             revoking certificates; CRL numbers and CRLs
:mod:`~iotdlm.store.nonces`                 replay nonces of signed requests
:mod:`~iotdlm.store.settings`               named settings
:mod:`~iotdlm.store.audit_log`              the hash-chained audit log and its checkpoints
:mod:`~iotdlm.store.provisioning`           pm's provisioning records
:mod:`~iotdlm.store.transfer`               trust transfer: factory registry, transfers
:mod:`~iotdlm.store.challenges`             trust transfer: SP2's attestation challenges
==========================================  =====================================================

Each user depends only on a Protocol naming the methods it calls (``km/storage.py``,
``pm/storage.py``, ``transfer/storage.py``, ``supervisor/storage.py``), as step-ca's ``db.AuthDB``.

Synchronous SQLAlchemy Core on one :class:`~sqlalchemy.engine.Engine`; every method takes a
connection from the engine's pool for one transaction, so a :class:`Store` may be shared by
threads (async callers use :func:`asyncio.to_thread`). On SQLite every write transaction is
``BEGIN IMMEDIATE`` in WAL mode with a 10 s busy timeout, so several processes may write one file.
km's per-request calls (``get_device``, ``get_by_fingerprint``, ``presented_rows``,
``add_certificate_writes``) run the same statements on the pool's driver connection instead
(:mod:`~iotdlm.store.driver`, ADR 0021): same transactions and errors, a fraction of the CPU.

Errors: a duplicate ``(issuer, serial)`` raises :class:`SerialCollisionError`, a duplicate
fingerprint :class:`~iotdlm.errors.ConflictError`, a reused nonce
:class:`~iotdlm.errors.ReplayError`, a missing row :class:`~iotdlm.errors.NotFoundError`. Any
other database failure raises :class:`~iotdlm.errors.UnavailableError` chained from the cause;
no SQLAlchemy exception type reaches callers.

Arguments: a lookup key that no stored row can have (a serial outside ``[0, 2**160)``, text with
NUL or longer than its column) simply finds nothing, so untrusted keys can be passed as they come.
A value to be *written* that the schema cannot hold (naive datetime, unknown status, NUL, too
long) is a programming error and raises ``ValueError``; nonces, which come straight from requests,
raise :class:`~iotdlm.errors.BadRequestError` instead.

Audit log: records are appended inside the write transaction of whatever they record (issuance,
revocation), so a change and its audit records commit together or not at all
(see :mod:`~iotdlm.store.audit_log`).
"""

from __future__ import annotations

from iotdlm.store.audit_log import AuditRepository
from iotdlm.store.certificates import CertificateRepository, SerialCollisionError
from iotdlm.store.challenges import ChallengeRepository
from iotdlm.store.devices import DeviceRepository
from iotdlm.store.nonces import NonceRepository
from iotdlm.store.provisioning import ProvisioningRepository
from iotdlm.store.revocation import RevocationRepository
from iotdlm.store.settings import SettingsRepository
from iotdlm.store.transfer import TransferRepository

__all__ = ["SerialCollisionError", "Store"]


class Store(
    CertificateRepository,
    DeviceRepository,
    RevocationRepository,
    NonceRepository,
    SettingsRepository,
    AuditRepository,
    ProvisioningRepository,
    TransferRepository,
    ChallengeRepository,
):
    """Persistent state of km (and pm's records, and trust transfer's). Create with :meth:`open`."""
