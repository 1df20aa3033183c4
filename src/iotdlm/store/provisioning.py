"""pm's provisioning records: one row per device pm provisioned or tried to, with the steps done,
the release flashed, the certificates issued and, on failure, the step that failed.

These are pm's, not km's: km never reads them. pm writes a whole batch of devices at once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Row, func, select

from iotdlm.store import records as r
from iotdlm.store.engine import Database
from iotdlm.store.queries import check_page, equal_filters, quote
from iotdlm.store.records import ProvisioningRecord
from iotdlm.store.tables import provisioning

_PROVISIONING_COLUMNS = (
    provisioning.c.device_id,
    provisioning.c.dtype,
    provisioning.c.status,
    provisioning.c.operator,
    provisioning.c.ref,
    provisioning.c.steps_done,
    provisioning.c.release_counter,
    provisioning.c.image_sha256,
    provisioning.c.certificates,
    provisioning.c.failed_step,
    provisioning.c.message,
    provisioning.c.attempts,
    provisioning.c.started_at,
    provisioning.c.updated_at,
    provisioning.c.completed_at,
)


def _provisioning_row(rec: ProvisioningRecord) -> dict[str, Any]:
    return {
        "device_id": rec.device_id,
        "dtype": rec.dtype,
        "status": rec.status,
        "operator": rec.operator,
        "ref": rec.ref,
        "steps_done": json.dumps(list(rec.steps_done), separators=(",", ":")),
        "release_counter": rec.release_counter,
        "image_sha256": rec.image_sha256,
        "certificates": json.dumps([list(pair) for pair in rec.certificates], separators=(",", ":")),
        "failed_step": rec.failed_step,
        "message": rec.message,
        "attempts": rec.attempts,
        "started_at": rec.started_at,
        "updated_at": rec.updated_at,
        "completed_at": rec.completed_at,
    }


def _provisioning_record(row: Row[*tuple[Any, ...]]) -> ProvisioningRecord:
    return ProvisioningRecord(
        device_id=row[0],
        dtype=row[1],
        status=row[2],
        operator=row[3],
        ref=row[4],
        steps_done=tuple(str(step) for step in json.loads(row[5])),
        release_counter=None if row[6] is None else int(row[6]),
        image_sha256=row[7],
        certificates=tuple((str(p), str(serial)) for p, serial in json.loads(row[8])),
        failed_step=row[9],
        message=row[10],
        attempts=int(row[11]),
        started_at=row[12],
        updated_at=row[13],
        completed_at=row[14],
    )


def _filters(dtype: str | None, status: str | None) -> list[ColumnElement[bool]] | None:
    return equal_filters((provisioning.c.dtype, dtype, r.DTYPE_LEN), (provisioning.c.status, status, r.STATUS_LEN))


class ProvisioningRepository(Database):
    """pm's provisioning records."""

    def save_provisioning(self, records: Sequence[ProvisioningRecord]) -> None:
        """Create or replace the provisioning record of each device in ``records``, all in one
        transaction (pm writes a whole batch of devices at once). A device twice in ``records`` is
        a ``ValueError``."""
        if not records:
            return
        seen: set[str] = set()
        for rec in records:
            if not isinstance(rec, ProvisioningRecord):
                raise ValueError(f"save_provisioning takes ProvisioningRecord, got {type(rec).__name__}")
            if rec.device_id in seen:
                raise ValueError(f"device {quote(rec.device_id)} appears twice in one save")
            seen.add(rec.device_id)
        rows = [_provisioning_row(rec) for rec in records]
        ins = self.insert()(provisioning)
        stmt = ins.on_conflict_do_update(
            index_elements=[provisioning.c.device_id],
            set_={c.name: ins.excluded[c.name] for c in provisioning.columns if c.name != "device_id"},
        )
        with self.transaction("saving provisioning records", write=True) as conn:
            conn.execute(stmt, rows)

    def get_provisioning(self, device_id: str) -> ProvisioningRecord | None:
        """The provisioning record of ``device_id``, or None."""
        if not r.findable_text(device_id, r.DEVICE_ID_LEN):
            return None
        stmt = select(*_PROVISIONING_COLUMNS).where(provisioning.c.device_id == device_id)
        with self.transaction("reading a provisioning record", write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _provisioning_record(row)

    def get_provisionings(self, device_ids: Sequence[str]) -> dict[str, ProvisioningRecord]:
        """The provisioning records among ``device_ids`` (one read per 500 ids), by device id."""
        rows = self.rows_where_in(
            provisioning.c.device_id, device_ids, _PROVISIONING_COLUMNS, "reading provisioning records"
        )
        return {rec.device_id: rec for rec in map(_provisioning_record, rows)}

    def list_provisioning(
        self, *, dtype: str | None = None, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[ProvisioningRecord]:
        """Provisioning records matching every given filter, ordered by device id."""
        check_page(limit, offset)
        where = _filters(dtype, status)
        if where is None:
            return []
        stmt = (
            select(*_PROVISIONING_COLUMNS).where(*where).order_by(provisioning.c.device_id).limit(limit).offset(offset)
        )
        with self.transaction("listing provisioning records", write=False) as conn:
            rows = conn.execute(stmt).all()
        return [_provisioning_record(row) for row in rows]

    def count_provisioning(self, *, dtype: str | None = None) -> dict[str, int]:
        """How many provisioning records (of ``dtype`` if given) have each status; statuses with
        none are absent."""
        where = _filters(dtype, None)
        if where is None:
            return {}
        stmt = (
            select(provisioning.c.status, func.count())
            .where(*where)
            .group_by(provisioning.c.status)
            .order_by(provisioning.c.status)
        )
        with self.transaction("counting provisioning records", write=False) as conn:
            return {str(status): int(n) for status, n in conn.execute(stmt)}
