"""What the trust-transfer shell needs from the store (as step-ca's ``db.AuthDB``): each provider's
transfers and per-device rows, the certificates the devices hold, bulk revocation at CA1, the
outstanding attestation challenges, and the audit log. :class:`iotdlm.store.Store` implements
every Protocol here (mypy checks it below); the pure state machines (:mod:`~iotdlm.transfer.sp1`,
:mod:`~iotdlm.transfer.sp2`) need none of it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from iotdlm.store.challenges import ChallengeRecord
from iotdlm.store.records import AuditEntry, AuditRecord, CertRecord
from iotdlm.store.transfer import TransferDeviceRecord, TransferRecord

if TYPE_CHECKING:
    from iotdlm.store import Store


class HeldCertificatesStore(Protocol):
    """The certificates of one profile and issuer that devices hold."""

    def certificates_of(
        self, device_ids: Sequence[str], *, profile: str, issuer: str, statuses: Sequence[str] = ...
    ) -> dict[str, list[CertRecord]]: ...


class BulkRevocationStore(Protocol):
    """Revoking one profile's certificates of many devices (SP1 after SP2's confirmation)."""

    def revoke_for_devices(
        self, device_ids: Sequence[str], *, profile: str, issuer: str, reason: str | None, at: dt.datetime, actor: str
    ) -> list[CertRecord]: ...


class TransferDevicesStore(Protocol):
    """The per-device rows of one provider's transfers."""

    def put_transfer_devices(self, recs: Sequence[TransferDeviceRecord]) -> None: ...

    def get_transfer_devices(
        self, role: str, transfer_id: str, device_ids: Sequence[str] | None = ...
    ) -> dict[str, TransferDeviceRecord]: ...

    def update_transfer_devices(
        self,
        role: str,
        transfer_id: str,
        device_ids: Sequence[str],
        change: Callable[[TransferDeviceRecord], TransferDeviceRecord | None],
    ) -> list[TransferDeviceRecord]: ...


class TransferStore(TransferDevicesStore, HeldCertificatesStore, Protocol):
    """What SP1's and SP2's services use: their transfers, the devices' rows and certificates,
    and the audit log."""

    def get_transfer(self, role: str, transfer_id: str) -> TransferRecord | None: ...

    def save_transfer(self, rec: TransferRecord) -> None: ...

    def list_transfers(self, role: str) -> list[TransferRecord]: ...

    def append_audit(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]: ...


class ChallengeStore(Protocol):
    """SP2's outstanding attestation challenges (the raURI's verifier), shared by km's workers."""

    def put_challenge(self, rec: ChallengeRecord, *, keep: int) -> None: ...

    def take_challenge(self, device_id: str, nonce: bytes) -> ChallengeRecord | None: ...


if TYPE_CHECKING:

    def _store_serves_transfer(store: Store) -> tuple[TransferStore, BulkRevocationStore, ChallengeStore]:
        return store, store, store
