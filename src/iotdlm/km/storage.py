"""What km needs from the store, one Protocol per user (as step-ca's ``db.AuthDB``): each names
exactly the methods that part of km calls, so a reader sees what km reads and writes, and a test
may hand in anything that has them. :class:`iotdlm.store.Store` implements all of them (mypy
checks it below).

- :class:`AuditLogStore`: :mod:`iotdlm.km.audit` (tree heads, checkpoints, verification);
- :class:`RegistryStore`: :mod:`iotdlm.km.registry` (the factory registry of trust transfer);
- :class:`VaStore`: :mod:`iotdlm.km.va` (revocation, CRLs, OCSP);
- :class:`KmStore`: :mod:`iotdlm.km.core` and :mod:`iotdlm.km.service` (issuance, nonces, the
  audit checkpoint job); it hands itself to the registry and to the audit functions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from iotdlm.store.records import (
    AuditCheckpoint,
    AuditEntry,
    AuditRecord,
    CertRecord,
    CertWrite,
    CrlRecord,
    DeviceRecord,
    NonceUse,
)
from iotdlm.store.transfer import FactoryCaRecord, FactoryRecord, PresentedRows

if TYPE_CHECKING:
    from iotdlm.store import Store


class AuditLogStore(Protocol):
    """The audit log as :mod:`iotdlm.km.audit` reads it and checkpoints it."""

    def audit_head(self) -> AuditRecord | None: ...

    def iter_audit(self, *, start_seq: int = ..., batch: int = ...) -> Iterator[AuditRecord]: ...

    def list_audit_checkpoints(self) -> list[AuditCheckpoint]: ...

    def add_audit_checkpoint(self, cp: AuditCheckpoint) -> None: ...

    def latest_audit_checkpoint(self) -> AuditCheckpoint | None: ...

    def get_by_fingerprint(self, fp: str) -> CertRecord | None: ...


class RegistryStore(Protocol):
    """The factory registry (CA certificates of other providers, registered factory certificates)."""

    def factory_cas(self) -> list[FactoryCaRecord]: ...

    def get_factory(self, fingerprint: str) -> FactoryRecord | None: ...

    def list_factory(
        self, *, batch: str | None = ..., device_id: str | None = ..., limit: int = ..., offset: int = ...
    ) -> list[FactoryRecord]: ...

    def set_factory_status(self, fingerprints: Sequence[str], status: str) -> int: ...

    def register_factory(
        self,
        cas: Sequence[FactoryCaRecord],
        records: Sequence[FactoryRecord],
        *,
        devices_to_add: Sequence[tuple[str, str]] = ...,
        audit: Sequence[AuditEntry] = ...,
        now: dt.datetime,
    ) -> None: ...


class _Certificates(Protocol):
    """Reading and recording certificates (shared by km's core and its VA)."""

    def add_certificates(
        self,
        records: Sequence[CertRecord],
        *,
        audit: Sequence[AuditEntry] = ...,
        devices: Sequence[tuple[str, str]] = ...,
        nonce: NonceUse | None = ...,
        now: dt.datetime | None = ...,
    ) -> None: ...

    def add_certificate_writes(self, writes: Sequence[CertWrite]) -> None: ...

    def get_certificate(self, issuer: str, serial: int) -> CertRecord | None: ...

    def find_by_serial(self, serial: int) -> list[CertRecord]: ...

    def append_audit(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]: ...


class VaStore(_Certificates, Protocol):
    """What the validation authority reads and writes: revocation, CRLs, certificate status."""

    def certificate_status(self, issuer: str, serial: int) -> tuple[str, dt.datetime | None, str | None] | None: ...

    def revoke_certificate(
        self, issuer: str, serial: int, *, reason: str | None, at: dt.datetime, actor: str
    ) -> CertRecord: ...

    def revoke_device_certificates(
        self, device_id: str, *, reason: str | None, at: dt.datetime, actor: str
    ) -> list[CertRecord]: ...

    def decommission_device(
        self, device_id: str, *, reason: str | None, at: dt.datetime, actor: str
    ) -> list[CertRecord]: ...

    def iter_revoked(
        self,
        issuer: str,
        partition: int,
        *,
        not_after_from: dt.datetime,
        revoked_since: dt.datetime | None = ...,
        superseded_grace: dt.timedelta | None = ...,
        as_of: dt.datetime | None = ...,
        batch: int = ...,
    ) -> Iterator[tuple[int, dt.datetime, str | None]]: ...

    def next_crl_number(self, issuer: str, partition: int) -> int: ...

    def save_crl(self, rec: CrlRecord, audit: Sequence[AuditEntry] = ()) -> None: ...

    def get_crl(self, issuer: str, partition: int, kind: str) -> CrlRecord | None: ...

    def list_crls(self, issuer: str | None = ...) -> list[CrlRecord]: ...

    def last_expiry(self, issuer: str, *, except_profile: str | None = ...) -> dt.datetime | None: ...


class KmStore(_Certificates, RegistryStore, AuditLogStore, Protocol):
    """What km's core and its NATS service use: issuance, devices, nonces, settings, checkpoints."""

    def get_by_fingerprint(self, fp: str) -> CertRecord | None: ...

    def update_certificate_status(
        self,
        issuer: str,
        serial: int,
        *,
        status: str,
        at: dt.datetime | None = ...,
        reason: str | None = ...,
        superseded_by: int | None = ...,
    ) -> CertRecord: ...

    def get_device(self, device_id: str) -> DeviceRecord | None: ...

    def get_devices(self, device_ids: Sequence[str]) -> dict[str, DeviceRecord]: ...

    def presented_rows(self, fingerprint: str, device_id: str | None) -> PresentedRows: ...

    def consume_nonce(self, sender: str, nonce: str, *, expires_at: dt.datetime) -> None: ...

    def purge_nonces(self, now: dt.datetime) -> int: ...

    def setdefault_meta(self, key: str, value: str) -> str: ...

    def latest_audit_checkpoint(self) -> AuditCheckpoint | None: ...


if TYPE_CHECKING:

    def _store_serves_km(store: Store) -> tuple[KmStore, VaStore, RegistryStore, AuditLogStore]:
        return store, store, store, store
