"""Store methods of trust transfer (migration 0004), a mixin of :class:`~iotdlm.store.Store`.

- the **factory registry** of km (CA2's side of seed 003 VI-B / VII-C): CA certificates of another
  provider's permanent CA (``factory_cas``) and the external factory certificates registered from
  an x5bag (``factory_registry``), written with the devices they name and their audit records in
  ONE transaction;
- each provider's view of a transfer: one ``transfers`` row (its state as JSON) and one
  ``transfer_devices`` row per device (status + JSON detail), so a fleet of 10,000 devices is
  10,000 small rows, not one document rewritten per event;
- bulk revocation of one profile's certificates for many devices (SP1 after SP2's
  confirmation), 500 devices per transaction, one audit record per certificate.

Kept in its own module (the same conventions as the other repositories: SQLAlchemy Core, one
transaction per call, ``ValueError`` for records the schema cannot hold, UnavailableError for the
database failing) so the trust-transfer tables can evolve without touching the km store.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Connection, Row, bindparam, func, select, update

from iotdlm.store import records as r
from iotdlm.store.audit_log import append_entries, check_entries
from iotdlm.store.certificates import CERT_BY_FINGERPRINT, CERT_COLUMNS, cert_record
from iotdlm.store.devices import GET_DEVICE, device_record
from iotdlm.store.engine import Database
from iotdlm.store.queries import IN_CHUNK
from iotdlm.store.records import AuditEntry, CertRecord, DeviceRecord
from iotdlm.store.revocation import REVOCABLE, revocation_entry
from iotdlm.store.tables import certificates, devices, factory_cas, factory_registry, transfer_devices, transfers

FACTORY_REGISTERED: Final = "registered"
FACTORY_WITHDRAWN: Final = "withdrawn"
FACTORY_STATUSES: Final = frozenset({FACTORY_REGISTERED, FACTORY_WITHDRAWN})
ROLES: Final = frozenset({"sp1", "sp2"})
STATUS_LEN: Final = r.AUDIT_KIND_LEN


def _check_hex64(field: str, value: str) -> None:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= set("0123456789abcdef"):
        raise ValueError(f"{field} must be 64 lowercase hex characters")


@dataclass(frozen=True, slots=True)
class FactoryCaRecord:
    """A CA certificate of another provider's permanent CA, registered with this km."""

    fingerprint: str
    subject: str
    anchor: bool
    not_after: dt.datetime
    der: bytes
    registered_by: str
    registered_at: dt.datetime

    def __post_init__(self) -> None:
        _check_hex64("fingerprint", self.fingerprint)
        r.check_text("subject", self.subject, r.SUBJECT_LEN)
        r.check_aware("not_after", self.not_after)
        r.check_text("registered_by", self.registered_by, r.ACTOR_LEN)
        r.check_aware("registered_at", self.registered_at)
        if r.fingerprint_of(self.der) != self.fingerprint:
            raise ValueError("fingerprint is not the SHA-256 of der")


@dataclass(frozen=True, slots=True)
class FactoryRecord:
    """An external factory certificate registered with this km (from an x5bag)."""

    fingerprint: str
    device_id: str
    issuer_fingerprint: str
    serial_hex: str
    not_after: dt.datetime
    status: str
    batch: str
    der: bytes
    registered_by: str
    registered_at: dt.datetime
    enroll_not_before: dt.datetime | None = None
    enroll_not_after: dt.datetime | None = None

    def __post_init__(self) -> None:
        _check_hex64("fingerprint", self.fingerprint)
        _check_hex64("issuer_fingerprint", self.issuer_fingerprint)
        r.check_text("device_id", self.device_id, r.DEVICE_ID_LEN)
        r.check_text("serial_hex", self.serial_hex, r.SERIAL_HEX_LEN)
        r.check_aware("not_after", self.not_after)
        if self.status not in FACTORY_STATUSES:
            raise ValueError(f"factory registry status must be one of {sorted(FACTORY_STATUSES)}")
        r.check_text("batch", self.batch, r.FINGERPRINT_LEN)
        r.check_text("registered_by", self.registered_by, r.ACTOR_LEN)
        r.check_aware("registered_at", self.registered_at)
        for name in ("enroll_not_before", "enroll_not_after"):
            value = getattr(self, name)
            if value is not None:
                r.check_aware(name, value)
        if r.fingerprint_of(self.der) != self.fingerprint:
            raise ValueError("fingerprint is not the SHA-256 of der")


@dataclass(frozen=True, slots=True)
class TransferRecord:
    role: str
    transfer_id: str
    state: str
    created_at: dt.datetime
    updated_at: dt.datetime

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}")
        r.check_text("transfer_id", self.transfer_id, r.FINGERPRINT_LEN)
        if not isinstance(self.state, str) or "\x00" in self.state:
            raise ValueError("state must be a str without NUL")
        r.check_aware("created_at", self.created_at)
        r.check_aware("updated_at", self.updated_at)


@dataclass(frozen=True, slots=True)
class TransferDeviceRecord:
    role: str
    transfer_id: str
    device_id: str
    status: str
    detail: str
    updated_at: dt.datetime

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}")
        r.check_text("transfer_id", self.transfer_id, r.FINGERPRINT_LEN)
        r.check_text("device_id", self.device_id, r.DEVICE_ID_LEN)
        r.check_text("status", self.status, STATUS_LEN)
        if not isinstance(self.detail, str) or "\x00" in self.detail:
            raise ValueError("detail must be a str without NUL")
        r.check_aware("updated_at", self.updated_at)


_CA_COLUMNS = (
    factory_cas.c.fingerprint,
    factory_cas.c.subject,
    factory_cas.c.anchor,
    factory_cas.c.not_after,
    factory_cas.c.der,
    factory_cas.c.registered_by,
    factory_cas.c.registered_at,
)
_FACTORY_COLUMNS = (
    factory_registry.c.fingerprint,
    factory_registry.c.device_id,
    factory_registry.c.issuer_fingerprint,
    factory_registry.c.serial_hex,
    factory_registry.c.not_after,
    factory_registry.c.status,
    factory_registry.c.batch,
    factory_registry.c.der,
    factory_registry.c.registered_by,
    factory_registry.c.registered_at,
    factory_registry.c.enroll_not_before,
    factory_registry.c.enroll_not_after,
)
_TRANSFER_COLUMNS = (
    transfers.c.role,
    transfers.c.transfer_id,
    transfers.c.state,
    transfers.c.created_at,
    transfers.c.updated_at,
)
_TD_COLUMNS = (
    transfer_devices.c.role,
    transfer_devices.c.transfer_id,
    transfer_devices.c.device_id,
    transfer_devices.c.status,
    transfer_devices.c.detail,
    transfer_devices.c.updated_at,
)


def _ca(row: Row[*tuple[Any, ...]]) -> FactoryCaRecord:
    return FactoryCaRecord(row[0], row[1], bool(row[2]), row[3], bytes(row[4]), row[5], row[6])


#: built once (issue 15): read for every certificate a device presents to km through cm
_FACTORY_BY_FINGERPRINT = select(*_FACTORY_COLUMNS).where(factory_registry.c.fingerprint == bindparam("fp"))


@dataclass(frozen=True, slots=True)
class PresentedRows:
    """What the store holds about a certificate a device presented, read in one transaction: its
    registration as an external factory certificate, its own record, and the device it names."""

    factory: FactoryRecord | None
    certificate: CertRecord | None
    device: DeviceRecord | None


def _factory(row: Row[*tuple[Any, ...]] | tuple[Any, ...]) -> FactoryRecord:
    return FactoryRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], bytes(row[7]), row[8], row[9], row[10], row[11]
    )


def _td(row: Row[*tuple[Any, ...]]) -> TransferDeviceRecord:
    return TransferDeviceRecord(row[0], row[1], row[2], row[3], row[4], row[5])


def _page(limit: int, offset: int) -> None:
    if not (1 <= limit <= 100_000) or offset < 0:
        raise ValueError("limit must be 1..100000 and offset >= 0")


class TransferRepository(Database):
    """Trust-transfer tables: the factory registry, transfers and their devices."""

    # -- factory registry (km) -------------------------------------------------------------------
    def register_factory(
        self,
        cas: Sequence[FactoryCaRecord],
        records: Sequence[FactoryRecord],
        *,
        devices_to_add: Sequence[tuple[str, str]] = (),
        audit: Sequence[AuditEntry] = (),
        now: dt.datetime,
    ) -> None:
        """In ONE transaction: the CA certificates (kept if already there), the factory
        certificates (a registered fingerprint is registered again: new batch, window, status),
        the devices they name (created ``active`` with their dtype when unknown) and ``audit``."""
        r.check_aware("now", now)
        check_entries(audit)
        with self.transaction("registering factory certificates", write=True) as conn:
            if cas:
                ins = self.insert()(factory_cas).on_conflict_do_nothing(index_elements=[factory_cas.c.fingerprint])
                conn.execute(
                    ins,
                    [
                        {
                            "fingerprint": c.fingerprint,
                            "subject": c.subject,
                            "anchor": c.anchor,
                            "not_after": c.not_after,
                            "der": c.der,
                            "registered_by": c.registered_by,
                            "registered_at": c.registered_at,
                        }
                        for c in cas
                    ],
                )
            rows = [
                {
                    "fingerprint": f.fingerprint,
                    "device_id": f.device_id,
                    "issuer_fingerprint": f.issuer_fingerprint,
                    "serial_hex": f.serial_hex,
                    "not_after": f.not_after,
                    "enroll_not_before": f.enroll_not_before,
                    "enroll_not_after": f.enroll_not_after,
                    "status": f.status,
                    "batch": f.batch,
                    "der": f.der,
                    "registered_by": f.registered_by,
                    "registered_at": f.registered_at,
                }
                for f in records
            ]
            for i in range(0, len(rows), IN_CHUNK):
                ins = self.insert()(factory_registry)
                stmt = ins.on_conflict_do_update(
                    index_elements=[factory_registry.c.fingerprint],
                    set_={
                        k: ins.excluded[k]
                        for k in (
                            "status",
                            "batch",
                            "enroll_not_before",
                            "enroll_not_after",
                            "registered_by",
                            "registered_at",
                        )
                    },
                )
                conn.execute(stmt, rows[i : i + IN_CHUNK])
            if devices_to_add:
                dev_rows = [
                    {"device_id": d, "dtype": t, "status": r.DEVICE_ACTIVE, "created_at": now, "updated_at": now}
                    for d, t in devices_to_add
                ]
                for i in range(0, len(dev_rows), IN_CHUNK):
                    ins = self.insert()(devices).on_conflict_do_nothing(index_elements=[devices.c.device_id])
                    conn.execute(ins, dev_rows[i : i + IN_CHUNK])
            append_entries(conn, audit)

    def factory_cas(self) -> list[FactoryCaRecord]:
        with self.transaction("reading factory CAs", write=False) as conn:
            return [_ca(row) for row in conn.execute(select(*_CA_COLUMNS).order_by(factory_cas.c.registered_at))]

    def get_factory(self, fingerprint: str) -> FactoryRecord | None:
        if not r.findable_text(fingerprint, r.FINGERPRINT_LEN):
            return None
        with self.transaction("reading a registered factory certificate", write=False) as conn:
            row = conn.execute(_FACTORY_BY_FINGERPRINT, {"fp": fingerprint}).first()
        return None if row is None else _factory(row)

    def presented_rows(self, fingerprint: str, device_id: str | None) -> PresentedRows:
        """The registration and the record of the certificate with SHA-256 ``fingerprint`` (hex),
        and the device ``device_id``, in ONE read transaction (km's EST path, issue 15: three
        reads per request were three transactions)."""
        fp = fingerprint.lower() if r.findable_text(fingerprint, r.FINGERPRINT_LEN) else None
        wanted = device_id if device_id is not None and r.findable_text(device_id, r.DEVICE_ID_LEN) else None
        if fp is None and wanted is None:
            return PresentedRows(None, None, None)
        with self.driver_transaction("reading a presented certificate", write=False) as conn:
            factory = conn.execute(_FACTORY_BY_FINGERPRINT, {"fp": fp}).first() if fp is not None else None
            cert = conn.execute(CERT_BY_FINGERPRINT, {"fp": fp}).first() if fp is not None else None
            device = conn.execute(GET_DEVICE, {"device_id": wanted}).first() if wanted is not None else None
        return PresentedRows(
            factory=None if factory is None else _factory(factory),
            certificate=None if cert is None else cert_record(cert),
            device=None if device is None else device_record(device),
        )

    def list_factory(
        self, *, batch: str | None = None, device_id: str | None = None, limit: int = 1000, offset: int = 0
    ) -> list[FactoryRecord]:
        _page(limit, offset)
        where = []
        if batch is not None:
            where.append(factory_registry.c.batch == batch)
        if device_id is not None:
            where.append(factory_registry.c.device_id == device_id)
        stmt = (
            select(*_FACTORY_COLUMNS)
            .where(*where)
            .order_by(factory_registry.c.device_id, factory_registry.c.fingerprint)
            .limit(limit)
            .offset(offset)
        )
        with self.transaction("listing registered factory certificates", write=False) as conn:
            return [_factory(row) for row in conn.execute(stmt)]

    def set_factory_status(self, fingerprints: Sequence[str], status: str) -> int:
        if status not in FACTORY_STATUSES:
            raise ValueError(f"factory registry status must be one of {sorted(FACTORY_STATUSES)}")
        n = 0
        with self.transaction("updating registered factory certificates", write=True) as conn:
            for i in range(0, len(fingerprints), IN_CHUNK):
                stmt = (
                    update(factory_registry)
                    .where(factory_registry.c.fingerprint.in_(list(fingerprints[i : i + IN_CHUNK])))
                    .values(status=status)
                )
                n += int(conn.execute(stmt).rowcount)
        return n

    # -- a provider's transfers ------------------------------------------------------------------
    def save_transfer(self, rec: TransferRecord) -> None:
        ins = self.insert()(transfers).values(
            role=rec.role,
            transfer_id=rec.transfer_id,
            state=rec.state,
            created_at=rec.created_at,
            updated_at=rec.updated_at,
        )
        stmt = ins.on_conflict_do_update(
            index_elements=[transfers.c.role, transfers.c.transfer_id],
            set_={"state": ins.excluded.state, "updated_at": ins.excluded.updated_at},
        )
        with self.transaction("saving a transfer", write=True) as conn:
            conn.execute(stmt)

    def get_transfer(self, role: str, transfer_id: str) -> TransferRecord | None:
        if not r.findable_text(transfer_id, r.FINGERPRINT_LEN):
            return None
        stmt = select(*_TRANSFER_COLUMNS).where(transfers.c.role == role, transfers.c.transfer_id == transfer_id)
        with self.transaction("reading a transfer", write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else TransferRecord(row[0], row[1], row[2], row[3], row[4])

    def list_transfers(self, role: str) -> list[TransferRecord]:
        stmt = select(*_TRANSFER_COLUMNS).where(transfers.c.role == role).order_by(transfers.c.created_at.desc())
        with self.transaction("listing transfers", write=False) as conn:
            return [TransferRecord(row[0], row[1], row[2], row[3], row[4]) for row in conn.execute(stmt)]

    def put_transfer_devices(self, recs: Sequence[TransferDeviceRecord]) -> None:
        """Create or replace device rows (status and detail), 500 per statement, one transaction."""
        if not recs:
            return
        with self.transaction("saving transfer devices", write=True) as conn:
            self._upsert_transfer_devices(conn, recs)

    def _upsert_transfer_devices(self, conn: Connection, recs: Sequence[TransferDeviceRecord]) -> None:
        """Create or replace the rows of ``recs`` (status, detail, updated_at), 500 per statement."""
        for i in range(0, len(recs), IN_CHUNK):
            ins = self.insert()(transfer_devices)
            stmt = ins.on_conflict_do_update(
                index_elements=[transfer_devices.c.role, transfer_devices.c.transfer_id, transfer_devices.c.device_id],
                set_={k: ins.excluded[k] for k in ("status", "detail", "updated_at")},
            )
            rows = [
                {
                    "role": x.role,
                    "transfer_id": x.transfer_id,
                    "device_id": x.device_id,
                    "status": x.status,
                    "detail": x.detail,
                    "updated_at": x.updated_at,
                }
                for x in recs[i : i + IN_CHUNK]
            ]
            conn.execute(stmt, rows)

    def update_transfer_devices(
        self,
        role: str,
        transfer_id: str,
        device_ids: Sequence[str],
        change: Callable[[TransferDeviceRecord], TransferDeviceRecord | None],
    ) -> list[TransferDeviceRecord]:
        """Read the rows of ``device_ids`` and write back what ``change`` returns for each (None:
        leave it), in ONE write transaction (no report is lost between the read and the write)."""
        wanted = sorted({d for d in device_ids if r.findable_text(d, r.DEVICE_ID_LEN)})
        out: list[TransferDeviceRecord] = []
        base = select(*_TD_COLUMNS).where(
            transfer_devices.c.role == role, transfer_devices.c.transfer_id == transfer_id
        )
        with self.transaction("updating transfer devices", write=True) as conn:
            for i in range(0, len(wanted), IN_CHUNK):
                for row in conn.execute(base.where(transfer_devices.c.device_id.in_(wanted[i : i + IN_CHUNK]))):
                    new = change(_td(row))
                    if new is not None:
                        out.append(new)
            self._upsert_transfer_devices(conn, out)
        return out

    def get_transfer_devices(
        self, role: str, transfer_id: str, device_ids: Sequence[str] | None = None
    ) -> dict[str, TransferDeviceRecord]:
        """The device rows of a transfer (all of them, or those among ``device_ids``)."""
        base = select(*_TD_COLUMNS).where(
            transfer_devices.c.role == role, transfer_devices.c.transfer_id == transfer_id
        )
        out: dict[str, TransferDeviceRecord] = {}
        with self.transaction("reading transfer devices", write=False) as conn:
            if device_ids is None:
                for row in conn.execute(base):
                    rec = _td(row)
                    out[rec.device_id] = rec
            else:
                wanted = sorted({d for d in device_ids if r.findable_text(d, r.DEVICE_ID_LEN)})
                for i in range(0, len(wanted), IN_CHUNK):
                    for row in conn.execute(base.where(transfer_devices.c.device_id.in_(wanted[i : i + IN_CHUNK]))):
                        rec = _td(row)
                        out[rec.device_id] = rec
        return out

    def count_transfer_devices(self, role: str, transfer_id: str) -> dict[str, int]:
        stmt = (
            select(transfer_devices.c.status, func.count())
            .where(transfer_devices.c.role == role, transfer_devices.c.transfer_id == transfer_id)
            .group_by(transfer_devices.c.status)
        )
        with self.transaction("counting transfer devices", write=False) as conn:
            return {str(row[0]): int(row[1]) for row in conn.execute(stmt)}

    # -- certificates -------------------------------------------------------------------------
    def certificates_of(
        self, device_ids: Sequence[str], *, profile: str, issuer: str, statuses: Sequence[str] = (r.CERT_VALID,)
    ) -> dict[str, list[CertRecord]]:
        """The certificates of one profile and issuer that each device holds (by device id)."""
        wanted = sorted({d for d in device_ids if r.findable_text(d, r.DEVICE_ID_LEN)})
        out: dict[str, list[CertRecord]] = {}
        with self.transaction("reading device certificates", write=False) as conn:
            for i in range(0, len(wanted), IN_CHUNK):
                stmt = select(*CERT_COLUMNS).where(
                    certificates.c.device_id.in_(wanted[i : i + IN_CHUNK]),
                    certificates.c.profile == profile,
                    certificates.c.issuer == issuer,
                    certificates.c.status.in_(list(statuses)),
                )
                for row in conn.execute(stmt):
                    rec = cert_record(row)
                    assert rec.device_id is not None
                    out.setdefault(rec.device_id, []).append(rec)
        return out

    def revoke_for_devices(
        self, device_ids: Sequence[str], *, profile: str, issuer: str, reason: str | None, at: dt.datetime, actor: str
    ) -> list[CertRecord]:
        """Revoke every valid (or superseded) ``profile`` certificate of ``issuer`` that the
        devices hold, with one ``revocation`` audit record each; 500 devices per transaction.
        Returns the certificates revoked now (already revoked ones are left as they are)."""
        if reason is not None:
            r.check_text("reason", reason, r.REASON_LEN)
        r.check_aware("at", at)
        r.check_text("actor", actor, r.ACTOR_LEN)
        wanted = sorted({d for d in device_ids if r.findable_text(d, r.DEVICE_ID_LEN)})
        out: list[CertRecord] = []
        for i in range(0, len(wanted), IN_CHUNK):
            stmt = (
                update(certificates)
                .where(
                    certificates.c.device_id.in_(wanted[i : i + IN_CHUNK]),
                    certificates.c.profile == profile,
                    certificates.c.issuer == issuer,
                    certificates.c.status.in_(REVOCABLE),
                )
                .values(status=r.CERT_REVOKED, revoked_at=at, revocation_reason=reason)
                .returning(*CERT_COLUMNS)
            )
            with self.transaction("revoking device certificates", write=True) as conn:
                revoked = [cert_record(row) for row in conn.execute(stmt)]
                append_entries(conn, [revocation_entry(rec, actor=actor) for rec in revoked])
            out.extend(revoked)
        return out
