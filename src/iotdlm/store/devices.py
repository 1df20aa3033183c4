"""The device repository: each device km knows, its dtype and status (``active``, ``retired``).

Devices are also created by the certificate and factory-registry writes, in their transactions;
decommissioning is in :mod:`~iotdlm.store.revocation`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Row, bindparam, select, update

from iotdlm import errors
from iotdlm.store import records as r
from iotdlm.store.engine import Database
from iotdlm.store.queries import check_page, equal_filters, quote
from iotdlm.store.records import DeviceRecord
from iotdlm.store.tables import devices

DEVICE_COLUMNS = (
    devices.c.device_id,
    devices.c.dtype,
    devices.c.status,
    devices.c.created_at,
    devices.c.updated_at,
)
#: built once (issue 15: building the statement per request cost more than running it)
GET_DEVICE = select(*DEVICE_COLUMNS).where(devices.c.device_id == bindparam("device_id"))


def device_record(row: Row[*tuple[Any, ...]] | tuple[Any, ...]) -> DeviceRecord:
    return DeviceRecord(device_id=row[0], dtype=row[1], status=row[2], created_at=row[3], updated_at=row[4])


def lock_device(conn: Connection, device_id: str) -> DeviceRecord:
    """The device, its row locked until commit on PostgreSQL (on SQLite the write lock is held),
    so bulk operations on one device run one after the other. NotFoundError if unknown."""
    row = None
    if r.findable_text(device_id, r.DEVICE_ID_LEN):
        stmt = select(*DEVICE_COLUMNS).where(devices.c.device_id == device_id).with_for_update()
        row = conn.execute(stmt).first()
    if row is None:
        raise errors.NotFoundError(f"no device {quote(device_id)}", device_id=device_id)
    return device_record(row)


class DeviceRepository(Database):
    """Devices."""

    def upsert_device(self, device_id: str, dtype: str, *, now: dt.datetime) -> DeviceRecord:
        """Create the device as ``active`` if it is unknown; return it as stored (an existing
        device is returned unchanged, whatever ``dtype`` says)."""
        r.check_text("device_id", device_id, r.DEVICE_ID_LEN)
        r.check_text("dtype", dtype, r.DTYPE_LEN)
        r.check_aware("now", now)
        ins = (
            self.insert()(devices)
            .values(device_id=device_id, dtype=dtype, status=r.DEVICE_ACTIVE, created_at=now, updated_at=now)
            .on_conflict_do_nothing(index_elements=[devices.c.device_id])
        )
        with self.transaction("creating a device", write=True) as conn:
            conn.execute(ins)
            row = conn.execute(select(*DEVICE_COLUMNS).where(devices.c.device_id == device_id)).one()
        return device_record(row)

    def get_devices(self, device_ids: Sequence[str]) -> dict[str, DeviceRecord]:
        """The known devices among ``device_ids`` (one read, however many), by id."""
        rows = self.rows_where_in(devices.c.device_id, device_ids, DEVICE_COLUMNS, "reading devices")
        return {rec.device_id: rec for rec in map(device_record, rows)}

    def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or None if unknown."""
        if not r.findable_text(device_id, r.DEVICE_ID_LEN):
            return None
        with self.driver_transaction("reading a device", write=False) as conn:
            row = conn.execute(GET_DEVICE, {"device_id": device_id}).first()
        return None if row is None else device_record(row)

    def set_device_status(self, device_id: str, status: str, *, now: dt.datetime) -> DeviceRecord:
        """Set a device's status (``active`` or ``retired``) and ``updated_at``; NotFoundError if unknown."""
        if status not in r.DEVICE_STATUSES:
            raise ValueError(f"device status must be one of {sorted(r.DEVICE_STATUSES)}, got {status!r}")
        r.check_aware("now", now)
        row = None
        if r.findable_text(device_id, r.DEVICE_ID_LEN):
            where = devices.c.device_id == device_id
            with self.transaction("updating a device status", write=True) as conn:
                changed = conn.execute(update(devices).where(where).values(status=status, updated_at=now)).rowcount
                row = conn.execute(select(*DEVICE_COLUMNS).where(where)).first() if changed else None
        if row is None:
            raise errors.NotFoundError(f"no device {quote(device_id)}", device_id=device_id)
        return device_record(row)

    def list_devices(
        self,
        *,
        dtype: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[DeviceRecord]:
        """Devices matching every given filter, ordered by ``device_id``."""
        check_page(limit, offset)
        where = equal_filters((devices.c.dtype, dtype, r.DTYPE_LEN), (devices.c.status, status, r.STATUS_LEN))
        if where is None:
            return []
        stmt = select(*DEVICE_COLUMNS).where(*where).order_by(devices.c.device_id).limit(limit).offset(offset)
        with self.transaction("listing devices", write=False) as conn:
            rows = conn.execute(stmt).all()
        return [device_record(row) for row in rows]
