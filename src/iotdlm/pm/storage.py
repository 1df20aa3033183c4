"""What pm needs from the store (as step-ca's ``db.AuthDB``): its own provisioning records, the
alarm setting of its dtype with the alarm's audit record, and nothing of km's.
:class:`iotdlm.store.Store` implements it (mypy checks it below)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from iotdlm.store.records import AuditEntry, AuditRecord, ProvisioningRecord

if TYPE_CHECKING:
    from iotdlm.store import Store


class PmStore(Protocol):
    """pm's provisioning records and its alarm (a setting written with its audit record)."""

    def get_meta(self, key: str) -> str | None: ...

    def set_meta_with_audit(self, key: str, value: str, audit: Sequence[AuditEntry]) -> list[AuditRecord]: ...

    def save_provisioning(self, records: Sequence[ProvisioningRecord]) -> None: ...

    def get_provisionings(self, device_ids: Sequence[str]) -> dict[str, ProvisioningRecord]: ...

    def count_provisioning(self, *, dtype: str | None = ...) -> dict[str, int]: ...


if TYPE_CHECKING:

    def _store_serves_pm(store: Store) -> PmStore:
        return store
