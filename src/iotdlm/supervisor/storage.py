"""What the supervisor needs from the store (as step-ca's ``db.AuthDB``): it audits mode switches
and alarms, and closes the store it opened. :class:`iotdlm.store.Store` implements it (mypy
checks it below)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from iotdlm.store.records import AuditEntry, AuditRecord

if TYPE_CHECKING:
    from iotdlm.store import Store


class ModesStore(Protocol):
    """The audit log, for mode switches and alarms."""

    def append_audit(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]: ...

    def close(self) -> None: ...


if TYPE_CHECKING:

    def _store_serves_modes(store: Store) -> ModesStore:
        return store
