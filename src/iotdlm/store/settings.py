"""The settings repository: small named values (``meta`` table) shared by every worker, e.g. km's
EST proof-nonce key and pm's alarm per dtype."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from iotdlm.store import records as r
from iotdlm.store.audit_log import append_entries, check_entries
from iotdlm.store.engine import Database
from iotdlm.store.records import AuditEntry, AuditRecord
from iotdlm.store.tables import meta


def _check_setting(key: str, value: str) -> None:
    r.check_text("key", key, r.META_KEY_LEN)
    if not isinstance(value, str) or "\x00" in value:
        raise ValueError("meta value must be a str without NUL characters")


class SettingsRepository(Database):
    """Named settings."""

    def _put_meta(self, key: str, value: str) -> Any:
        """INSERT ... ON CONFLICT DO UPDATE of one setting."""
        return (
            self.insert()(meta)
            .values(key=key, value=value)
            .on_conflict_do_update(index_elements=[meta.c.key], set_={"value": value})
        )

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        if not r.findable_text(key, r.META_KEY_LEN):
            return None
        with self.transaction("reading a setting", write=False) as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()
        return None if value is None else str(value)

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        _check_setting(key, value)
        with self.transaction("writing a setting", write=True) as conn:
            conn.execute(self._put_meta(key, value))

    def setdefault_meta(self, key: str, value: str) -> str:
        """The value under ``key``; if there is none, store ``value`` first. Race-free across
        workers: the first writer wins and every caller gets the winner's value."""
        _check_setting(key, value)
        stmt = self.insert()(meta).values(key=key, value=value).on_conflict_do_nothing(index_elements=[meta.c.key])
        with self.transaction("writing a setting", write=True) as conn:
            conn.execute(stmt)
            stored = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()
        return str(stored)

    def set_meta_with_audit(self, key: str, value: str, audit: Sequence[AuditEntry]) -> list[AuditRecord]:
        """Store ``value`` under ``key`` and append ``audit`` to the audit log in ONE transaction
        (pm's alarm: the halt and its audit record are written together or not at all)."""
        _check_setting(key, value)
        check_entries(audit)
        with self.transaction("writing a setting with its audit records", write=True) as conn:
            conn.execute(self._put_meta(key, value))
            return append_entries(conn, audit)
