"""The store's provisioning records (migration 0003) and settings written with their audit records,
on SQLite and (when it answers) PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa

from iotdlm.store import AuditEntry, ProvisioningRecord, Store
from iotdlm.store.records import PROVISIONING_COMPLETE, PROVISIONING_FAILED, PROVISIONING_IN_PROGRESS
from iotdlm.wire import audit as fmt
from tests.fixtures_store import T0

SHA = "ab" * 32


def record(device_id: str = "dev-1", **changes: Any) -> ProvisioningRecord:
    base = ProvisioningRecord(
        device_id=device_id,
        dtype="boardA",
        status=PROVISIONING_COMPLETE,
        operator="alice@line-7",
        started_at=T0,
        updated_at=T0 + dt.timedelta(seconds=3),
        ref="/bench/dev-1",
        steps_done=("software", "truststore", "config", "certificate:factory", "verify"),
        release_counter=7,
        image_sha256=SHA,
        certificates=(("factory", "1f2e"),),
        attempts=1,
        completed_at=T0 + dt.timedelta(seconds=3),
    )
    return dataclasses.replace(base, **changes)


def test_round_trip_keeps_every_field(store: Store) -> None:
    rec = record()
    store.save_provisioning([rec])
    assert store.get_provisioning("dev-1") == rec
    assert store.get_provisionings(["dev-1", "dev-2", "\x00bad"]) == {"dev-1": rec}


def test_save_replaces_and_is_one_transaction(store: Store) -> None:
    first = record(
        status=PROVISIONING_FAILED,
        steps_done=("software",),
        failed_step="certificate:factory",
        message="km refused: bad_signature",
        certificates=(),
        completed_at=None,
    )
    store.save_provisioning([first, record("dev-2")])
    assert store.get_provisioning("dev-1") == first
    again = record(attempts=2, operator="bob", certificates=(("factory", "a1"), ("operational", "b2")))
    store.save_provisioning([again])
    assert store.get_provisioning("dev-1") == again
    with pytest.raises(ValueError, match="twice"):
        store.save_provisioning([record("dev-3"), record("dev-3")])
    assert store.get_provisioning("dev-3") is None
    store.save_provisioning([])


def test_list_and_count_filter_by_dtype_and_status(store: Store) -> None:
    store.save_provisioning(
        [
            record("a-1"),
            record("a-2", status=PROVISIONING_IN_PROGRESS, completed_at=None, steps_done=("software",)),
            record("b-1", dtype="boardB"),
        ]
    )
    assert [r.device_id for r in store.list_provisioning()] == ["a-1", "a-2", "b-1"]
    assert [r.device_id for r in store.list_provisioning(dtype="boardA", status="complete")] == ["a-1"]
    assert [r.device_id for r in store.list_provisioning(limit=1, offset=1)] == ["a-2"]
    assert store.list_provisioning(dtype="x" * 1000) == []
    assert store.count_provisioning(dtype="boardA") == {"complete": 1, "in-progress": 1}
    assert store.count_provisioning() == {"complete": 2, "in-progress": 1}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"status": "done"}, "provisioning status"),
        ({"status": PROVISIONING_FAILED}, "failed_step"),
        ({"completed_at": None}, "completed_at"),
        ({"image_sha256": None}, "go together"),
        ({"image_sha256": "AB" * 32}, "lowercase hex"),
        ({"certificates": (("factory", "0x1"),)}, "hex"),
        ({"certificates": (("factory", "01"),)}, "canonical"),
        ({"certificates": (("factory", "1"), ("factory", "2"))}, "twice"),
        ({"steps_done": ("software", "software")}, "repeats"),
        ({"attempts": 0}, "attempts"),
        ({"operator": "a\x00b"}, "NUL"),
        ({"started_at": dt.datetime(2025, 1, 1)}, "timezone-aware"),  # naive: the point of the case
    ],
)
def test_bad_records_are_a_programming_error(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        record(**changes)


def test_meta_and_its_audit_records_commit_together(store: Store) -> None:
    entry = AuditEntry(at=T0, kind=fmt.ALARM, actor="pm[boardA]", subject="pm-boardA", data={"check": "sig_sm"})
    (stored,) = store.set_meta_with_audit("pm.alarm.boardA", '{"state":"raised"}', [entry])
    assert stored.kind == "alarm"
    assert store.get_meta("pm.alarm.boardA") == '{"state":"raised"}'
    bad = AuditEntry(at=T0, kind=fmt.ALARM, actor="x", subject=None, data={})
    object.__setattr__(bad, "data", {"not json": float("nan")})
    with pytest.raises(ValueError, match="JSON"):
        store.set_meta_with_audit("pm.alarm.boardA", '{"state":"cleared"}', [bad])
    assert store.get_meta("pm.alarm.boardA") == '{"state":"raised"}'
    assert store.count_audit() == 1


def test_provisioning_table_is_migrated(store: Store, store_url: str) -> None:
    from alembic.script import ScriptDirectory

    from iotdlm.store.engine import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config())
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            head = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
            # the database is at the newest migration, and 0003 (provisioning) is on the way to it
            assert head == scripts.get_current_head()
            assert "0003" in {rev.revision for rev in scripts.walk_revisions("base", head)}
            columns = {c["name"] for c in sa.inspect(conn).get_columns("provisioning")}
    finally:
        engine.dispose()
    assert {"device_id", "status", "steps_done", "certificates", "failed_step", "image_sha256"} <= columns
