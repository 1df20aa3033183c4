"""Store support for the validation authority: revocation (with its audit records), CRL partitions,
revoked-certificate streaming, CRL numbers and stored CRLs. Both backends (``store`` fixture)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import multiprocessing
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Barrier
from typing import TypeVar

import pytest
import sqlalchemy as sa
from alembic import command

from iotdlm import errors
from iotdlm.store import AuditEntry, AuditRecord, CertRecord, CrlRecord, Store
from iotdlm.store.engine import alembic_config
from iotdlm.wire import audit as wire_audit
from tests.fixtures_store import T0, count_statements, make_cert

T = TypeVar("T")
CA = "CN=Test Issuing CA"
CET = dt.timezone(dt.timedelta(hours=1), "CET")
AT = dt.datetime(2025, 6, 1, 9, 30, 0, 250_000, tzinfo=CET)


def _run_together(n: int, work: Callable[[int], T]) -> list[T]:
    barrier = threading.Barrier(n)

    def start(i: int) -> T:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(start, range(n)))


def _audit(store: Store) -> list[AuditRecord]:
    return list(store.iter_audit())


def _revoked(serial: int, *, at: dt.datetime = AT, reason: str | None = "keyCompromise", **kw: object) -> CertRecord:
    return dataclasses.replace(
        make_cert(serial, **kw),  # type: ignore[arg-type]
        status="revoked",
        revoked_at=at,
        revocation_reason=reason,
    )


def _exec(url: str, *statements: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


# --- records ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 4096, True, 1.0])
def test_crl_partition_is_checked(bad: object) -> None:
    with pytest.raises(ValueError, match="crl_partition must be"):
        make_cert(1, crl_partition=bad)  # type: ignore[arg-type]
    assert make_cert(1, crl_partition=4095).crl_partition == 4095
    assert make_cert(1).crl_partition is None


def _crl(number: int = 1, *, kind: str = "full", partition: int = 0, issuer: str = CA, **kw: object) -> CrlRecord:
    fields: dict[str, object] = {
        "issuer": issuer,
        "partition": partition,
        "kind": kind,
        "number": number,
        "this_update": T0,
        "next_update": T0 + dt.timedelta(days=1),
        "base_number": None if kind == "full" else max(number - 1, 0),
        "der": b"\x30\x82crl|" + f"{issuer}|{partition}|{kind}|{number}".encode(),
    }
    fields.update(kw)
    return CrlRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "partial"}, "CRL kind"),
        ({"partition": 4096}, "partition must be in"),
        ({"partition": -1}, "partition must be in"),
        ({"number": -1}, "number must be in"),
        ({"number": 2**63}, "number must be in"),
        ({"this_update": dt.datetime(2025, 1, 1)}, "this_update must be timezone-aware"),
        ({"next_update": T0}, "next_update .* must be after this_update"),
        ({"base_number": 3}, "a full CRL has no base_number"),
        ({"der": b""}, "der must be non-empty bytes"),
        ({"issuer": "CN=\x00"}, "issuer must not contain NUL"),
    ],
)
def test_crl_record_validates(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(_crl(5), **change)  # type: ignore[arg-type]


def test_delta_crl_needs_a_base_not_after_itself() -> None:
    assert _crl(5, kind="delta", base_number=5).base_number == 5
    with pytest.raises(ValueError, match="needs base_number"):
        _crl(5, kind="delta", base_number=None)
    with pytest.raises(ValueError, match="base_number must be in"):
        _crl(5, kind="delta", base_number=6)


# --- crl_partition and the 0002 migration -----------------------------------------------------------


def test_crl_partition_round_trips(store: Store) -> None:
    recs = [make_cert(1, crl_partition=0), make_cert(2, crl_partition=4095), make_cert(3)]
    store.add_certificates(recs)
    assert [store.get_certificate(CA, s) for s in (1, 2, 3)] == recs
    assert store.get_certificate(CA, 3).crl_partition is None  # type: ignore[union-attr]


def test_migration_0002_keeps_existing_certificates_with_no_partition(store_url: str) -> None:
    cfg = alembic_config()
    cfg.set_main_option("sqlalchemy.url", store_url.replace("%", "%%"))
    command.upgrade(cfg, "0001")
    engine = sa.create_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO certificates (serial_hex, issuer, subject, device_id, profile, not_before, "
                    "not_after, status, der, fingerprint, requested_by, created_at) VALUES ('2a', 'CN=Old CA', "
                    "'CN=d', 'd', 'operational', '2024-01-01 00:00:00', '2025-01-01 00:00:00', 'revoked', :der, "
                    ":fp, 'pm', '2024-01-01 00:00:00')"
                ),
                {"der": b"\x30\x00", "fp": "ab" * 32},
            )
    finally:
        engine.dispose()
    with Store.open(store_url) as store:  # migrates 0001 -> head
        old = store.get_certificate("CN=Old CA", 0x2A)
        assert old is not None
        assert old.crl_partition is None
        assert old.status == "revoked"
        assert store.count_revoked("CN=Old CA", 0, not_after_from=T0 - dt.timedelta(days=3650)) == 0
        store.add_certificates([make_cert(1, crl_partition=7)])
        store.append_audit([])  # the new tables exist
        assert store.count_audit() == 0

    command.downgrade(cfg, "0001")
    engine = sa.create_engine(store_url)
    try:
        inspector = sa.inspect(engine)
        assert "crl_partition" not in {c["name"] for c in inspector.get_columns("certificates")}
        assert {"audit_log", "audit_checkpoints", "crls", "crl_numbers"}.isdisjoint(inspector.get_table_names())
        indexes = {ix["name"] for ix in inspector.get_indexes("certificates")}
        assert {name for name in indexes if name and name.startswith("ix_")} == {
            "ix_certificates_device_id",
            "ix_certificates_status",
            "ix_certificates_not_after",
            "ix_certificates_created_at",
        }
        assert {uq["name"] for uq in inspector.get_unique_constraints("certificates")} == {
            "uq_certificates_serial_hex_issuer",
            "uq_certificates_fingerprint",
        }
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM certificates")).scalar_one() == 2
    finally:
        engine.dispose()
    command.upgrade(cfg, "head")


# --- revoke_certificate ----------------------------------------------------------------------------


def test_revoke_sets_the_status_and_audits_in_the_same_transaction(store: Store) -> None:
    store.add_certificates([make_cert(10, crl_partition=3), make_cert(11)])
    got = store.revoke_certificate(CA, 10, reason="keyCompromise", at=AT, actor="op:alice")
    assert (got.status, got.revoked_at, got.revocation_reason) == ("revoked", AT, "keyCompromise")
    assert got.revoked_at is not None
    assert got.revoked_at.utcoffset() == dt.timedelta(0)
    assert got.crl_partition == 3
    assert store.get_certificate(CA, 10) == got
    assert store.get_certificate(CA, 11) == make_cert(11)

    [rec] = _audit(store)
    assert (rec.seq, rec.kind, rec.actor, rec.subject) == (1, wire_audit.REVOCATION, "op:alice", f"{CA}:a")
    assert rec.at == AT
    assert rec.data == {
        "issuer": CA,
        "serial": "a",
        "device_id": "dev-1",
        "reason": "keyCompromise",
        "revoked_at": "2025-06-01T08:30:00.250000+00:00",
    }
    assert rec.prev_hash == wire_audit.GENESIS_HASH
    assert rec.hash == wire_audit.record_hash(
        rec.prev_hash, rec.seq, rec.at, rec.kind, rec.actor, rec.subject, rec.data_json
    )


def test_revoking_a_superseded_certificate_keeps_superseded_by(store: Store) -> None:
    sup = dataclasses.replace(make_cert(20), status="superseded", superseded_by=21)
    store.add_certificates([sup, make_cert(21)])
    got = store.revoke_certificate(CA, 20, reason=None, at=AT, actor="km")
    assert (got.status, got.superseded_by, got.revocation_reason) == ("revoked", 21, None)
    assert _audit(store)[0].data["reason"] is None


def test_revoking_twice_is_a_conflict_that_says_when_and_why_and_changes_nothing(store: Store) -> None:
    store.add_certificates([make_cert(10)])
    first = store.revoke_certificate(CA, 10, reason="keyCompromise", at=AT, actor="a")
    with pytest.raises(errors.ConflictError) as info:
        store.revoke_certificate(CA, 10, reason="superseded", at=AT + dt.timedelta(days=1), actor="b")
    message = info.value.message
    assert "already revoked" in message
    assert "2025-06-01T08:30:00.250000+00:00" in message
    assert "keyCompromise" in message
    assert info.value.device_id == "dev-1"
    assert store.get_certificate(CA, 10) == first
    assert store.count_audit() == 1


def test_revoking_a_missing_certificate_is_not_found_and_audits_nothing(store: Store) -> None:
    store.add_certificates([make_cert(10)])
    for issuer, serial in ((CA, 11), ("CN=Other", 10), (CA, -1), (CA, 2**170), ("CN=\x00", 10)):
        with pytest.raises(errors.NotFoundError):
            store.revoke_certificate(issuer, serial, reason=None, at=AT, actor="a")
    assert store.count_audit() == 0
    assert store.get_certificate(CA, 10) == make_cert(10)


def test_revoke_refuses_bad_arguments(store: Store) -> None:
    store.add_certificates([make_cert(10)])
    with pytest.raises(ValueError, match="timezone-aware"):
        store.revoke_certificate(CA, 10, reason=None, at=dt.datetime(2025, 1, 1), actor="a")
    with pytest.raises(ValueError, match="reason is 65 characters"):
        store.revoke_certificate(CA, 10, reason="x" * 65, at=AT, actor="a")
    with pytest.raises(ValueError, match="actor must not contain NUL"):
        store.revoke_certificate(CA, 10, reason=None, at=AT, actor="a\x00")
    assert store.get_certificate(CA, 10) == make_cert(10)


def test_a_revocation_whose_audit_record_fails_is_rolled_back(store: Store, store_url: str) -> None:
    store.add_certificates([make_cert(10)])
    store.upsert_device("dev-1", "sensor", now=T0)
    _exec(store_url, "DROP TABLE audit_log")
    with pytest.raises(errors.UnavailableError, match="audit_log"):
        store.revoke_certificate(CA, 10, reason=None, at=AT, actor="a")
    with pytest.raises(errors.UnavailableError, match="audit_log"):
        store.revoke_device_certificates("dev-1", reason=None, at=AT, actor="a")
    with pytest.raises(errors.UnavailableError, match="audit_log"):
        store.decommission_device("dev-1", reason=None, at=AT, actor="a")
    assert store.get_certificate(CA, 10) == make_cert(10)
    device = store.get_device("dev-1")
    assert device is not None
    assert device.status == "active"


def test_concurrent_revocations_of_one_certificate_let_exactly_one_through(store: Store) -> None:
    store.add_certificates([make_cert(10)])

    def attempt(i: int) -> bool:
        try:
            store.revoke_certificate(CA, 10, reason=None, at=AT + dt.timedelta(seconds=i), actor=f"a{i}")
        except errors.ConflictError:
            return False
        return True

    assert _run_together(6, attempt).count(True) == 1
    assert store.count_audit() == 1


# --- device-wide revocation and decommissioning ------------------------------------------------------


@pytest.fixture
def device_certs(store: Store) -> list[CertRecord]:
    """dev-1: a valid, a superseded and an already revoked certificate; dev-2: one valid."""
    store.upsert_device("dev-1", "sensor", now=T0)
    store.upsert_device("dev-2", "sensor", now=T0)
    recs = [
        make_cert(1, created_at=T0),
        dataclasses.replace(make_cert(2, created_at=T0 + dt.timedelta(1)), status="superseded", superseded_by=3),
        _revoked(3, at=T0 + dt.timedelta(2), reason="affiliationChanged", created_at=T0 + dt.timedelta(2)),
        make_cert(4, device_id="dev-2"),
    ]
    store.add_certificates(recs)
    return recs


def test_revoke_device_certificates_revokes_the_rest_with_one_audit_record_each(
    store: Store, device_certs: list[CertRecord]
) -> None:
    out = store.revoke_device_certificates("dev-1", reason="keyCompromise", at=AT, actor="op")
    assert [r.serial for r in out] == [1, 2]
    assert all((r.status, r.revoked_at, r.revocation_reason) == ("revoked", AT, "keyCompromise") for r in out)
    assert out[1].superseded_by == 3
    assert out == [store.get_certificate(CA, 1), store.get_certificate(CA, 2)]
    assert store.get_certificate(CA, 3) == device_certs[2]  # already revoked: untouched
    assert store.get_certificate(CA, 4) == device_certs[3]  # another device
    audit = _audit(store)
    assert [(a.kind, a.subject, a.data["serial"]) for a in audit] == [
        ("revocation", f"{CA}:1", "1"),
        ("revocation", f"{CA}:2", "2"),
    ]
    # nothing left to revoke: an empty answer and no audit record
    assert store.revoke_device_certificates("dev-1", reason=None, at=AT, actor="op") == []
    assert store.count_audit() == 2


def test_revoke_device_certificates_of_an_unknown_device_is_not_found(store: Store) -> None:
    store.add_certificates([make_cert(1, device_id="ghost")])  # certificates alone do not make a device
    for device_id in ("ghost", "nobody", "a\x00", "d" * 300):
        with pytest.raises(errors.NotFoundError) as info:
            store.revoke_device_certificates(device_id, reason=None, at=AT, actor="op")
        assert info.value.device_id == device_id
    assert store.get_certificate(CA, 1) == make_cert(1, device_id="ghost")
    assert store.count_audit() == 0


def test_decommission_retires_revokes_and_audits(store: Store, device_certs: list[CertRecord]) -> None:
    out = store.decommission_device("dev-1", reason="cessationOfOperation", at=AT, actor="op:bob")
    assert [r.serial for r in out] == [1, 2]
    device = store.get_device("dev-1")
    assert device is not None
    assert (device.status, device.updated_at, device.created_at) == ("retired", AT, T0)
    other = store.get_device("dev-2")
    assert other is not None
    assert other.status == "active"
    assert store.count_certificates(device_id="dev-1", status="revoked") == 3
    assert store.get_certificate(CA, 4) == device_certs[3]

    audit = _audit(store)
    assert [a.kind for a in audit] == ["revocation", "revocation", "decommission"]
    assert all(a.actor == "op:bob" and a.at == AT for a in audit)
    last = audit[-1]
    assert last.subject == "dev-1"
    assert last.data == {"device_id": "dev-1", "revoked": ["1", "2"], "reason": "cessationOfOperation"}
    for before, rec in itertools.pairwise(audit):
        assert rec.prev_hash == before.hash


def test_decommission_refusals_change_nothing(store: Store, device_certs: list[CertRecord]) -> None:
    with pytest.raises(errors.NotFoundError):
        store.decommission_device("nobody", reason=None, at=AT, actor="op")
    store.decommission_device("dev-1", reason=None, at=AT, actor="op")
    snapshot = (store.list_certificates(), store.count_audit(), store.get_device("dev-1"))
    with pytest.raises(errors.ConflictError, match="already retired") as info:
        store.decommission_device("dev-1", reason="again", at=AT + dt.timedelta(days=1), actor="op")
    assert info.value.device_id == "dev-1"
    assert (store.list_certificates(), store.count_audit(), store.get_device("dev-1")) == snapshot


def test_decommission_of_a_device_without_certificates(store: Store) -> None:
    store.upsert_device("bare", "sensor", now=T0)
    assert store.decommission_device("bare", reason=None, at=AT, actor="op") == []
    [rec] = _audit(store)
    assert (rec.kind, rec.data) == ("decommission", {"device_id": "bare", "revoked": [], "reason": None})


# --- iter_revoked / count_revoked ------------------------------------------------------------------


def test_iter_revoked_filters_by_issuer_partition_expiry_and_revocation_time(store: Store) -> None:
    exp = T0 + dt.timedelta(days=100)  # not_after of most certificates below
    recs = [
        _revoked(1, crl_partition=5, not_after=exp, at=T0 + dt.timedelta(hours=1)),
        _revoked(2, crl_partition=5, not_after=exp, at=T0 + dt.timedelta(hours=3), reason=None),
        _revoked(3, crl_partition=6, not_after=exp),  # another partition
        _revoked(4, crl_partition=5, not_after=exp, issuer="CN=Other CA"),  # another issuer
        _revoked(5, crl_partition=5, not_after=T0 + dt.timedelta(days=10)),  # expires earlier
        _revoked(6),  # no partition
        make_cert(7, crl_partition=5, not_after=exp),  # valid
        dataclasses.replace(make_cert(8, crl_partition=5, not_after=exp), status="superseded", superseded_by=9),
        _revoked(9, crl_partition=5, not_after=exp, at=T0 + dt.timedelta(hours=2), reason="superseded"),
    ]
    store.add_certificates(recs)

    def run(not_after_from: dt.datetime, since: dt.datetime | None = None) -> list[tuple[int, dt.datetime, str | None]]:
        return list(store.iter_revoked(CA, 5, not_after_from=not_after_from, revoked_since=since, batch=2))

    h = dt.timedelta(hours=1)
    everything = [
        (1, T0 + h, "keyCompromise"),
        (2, T0 + 3 * h, None),
        (5, AT, "keyCompromise"),
        (9, T0 + 2 * h, "superseded"),
    ]
    assert run(T0) == everything
    assert store.count_revoked(CA, 5, not_after_from=T0) == 4
    # expiry: not_after >= not_after_from, so a certificate expiring exactly then is still listed
    assert [s for s, _, _ in run(exp)] == [1, 2, 9]
    assert run(exp + dt.timedelta(microseconds=1)) == []
    assert store.count_revoked(CA, 5, not_after_from=exp) == 3
    # delta: revoked strictly after revoked_since
    assert [s for s, _, _ in run(T0, T0 + h)] == [2, 5, 9]
    assert [s for s, _, _ in run(T0, T0 + 2 * h)] == [2, 5]
    assert [s for s, _, _ in run(exp, T0 + 3 * h)] == []
    # times come back in UTC
    assert all(at.utcoffset() == dt.timedelta(0) for _, at, _ in run(T0))
    assert [s for s, _, _ in store.iter_revoked("CN=Other CA", 5, not_after_from=T0)] == [4]
    assert [s for s, _, _ in store.iter_revoked(CA, 6, not_after_from=T0)] == [3]


def test_iter_revoked_lists_superseded_certificates_once_their_grace_has_passed(store: Store) -> None:
    """A superseded certificate (``revoked_at`` = when it was superseded) is on the CRLs from
    ``revoked_at + grace`` on, at that time and with reason superseded; deltas select it by that
    time too."""
    h = dt.timedelta(hours=1)
    exp = T0 + dt.timedelta(days=100)

    def superseded(serial: int, at: dt.datetime | None) -> CertRecord:
        return dataclasses.replace(
            make_cert(serial, crl_partition=5, not_after=exp), status="superseded", revoked_at=at, superseded_by=99
        )

    store.add_certificates(
        [
            _revoked(1, crl_partition=5, not_after=exp, at=T0 + h),
            superseded(8, T0 + h),
            superseded(10, T0 + 3 * h),
            superseded(11, None),  # superseded without a time: never listed
            dataclasses.replace(superseded(12, T0), crl_partition=6),  # another partition
        ]
    )

    def run(as_of: dt.datetime, since: dt.datetime | None = None) -> list[tuple[int, dt.datetime, str | None]]:
        return list(
            store.iter_revoked(CA, 5, not_after_from=T0, revoked_since=since, superseded_grace=h, as_of=as_of, batch=2)
        )

    assert run(T0 + 2.5 * h) == [(1, T0 + h, "keyCompromise"), (8, T0 + 2 * h, "superseded")]
    assert run(T0 + 2 * h) == [(1, T0 + h, "keyCompromise"), (8, T0 + 2 * h, "superseded")]  # grace just ended
    assert [s for s, _, _ in run(T0 + 2 * h - dt.timedelta(microseconds=1))] == [1]
    assert [s for s, _, _ in run(T0 + 5 * h)] == [1, 8, 10]
    assert [s for s, _, _ in run(T0 + 2.5 * h, T0 + 1.5 * h)] == [8]  # delta: by the time it took effect
    assert run(T0 + 2.5 * h, T0 + 2 * h) == []
    assert [s for s, _, _ in run(T0 + 5 * h, T0 + 2 * h)] == [10]
    # without a grace (the default), superseded certificates are not on CRLs
    assert [s for s, _, _ in store.iter_revoked(CA, 5, not_after_from=T0)] == [1]


def test_iter_revoked_of_impossible_keys_is_empty_and_bad_arguments_fail_at_once(store: Store) -> None:
    store.add_certificates([_revoked(1, crl_partition=0)])
    for issuer, partition in ((CA, -1), (CA, 4096), ("CN=\x00", 0), ("x" * 2000, 0)):
        assert list(store.iter_revoked(issuer, partition, not_after_from=T0)) == []
        assert store.count_revoked(issuer, partition, not_after_from=T0) == 0
    with pytest.raises(ValueError, match="timezone-aware"):
        store.iter_revoked(CA, 0, not_after_from=dt.datetime(2025, 1, 1))  # no next() needed
    with pytest.raises(ValueError, match="timezone-aware"):
        store.iter_revoked(CA, 0, not_after_from=T0, revoked_since=dt.datetime(2025, 1, 1))
    for bad in (0, -5, True):
        with pytest.raises(ValueError, match="batch must be"):
            store.iter_revoked(CA, 0, not_after_from=T0, batch=bad)


def test_a_revoked_certificate_without_revocation_time_stays_on_the_full_crl(store: Store) -> None:
    created = T0 + dt.timedelta(minutes=5)
    store.add_certificates([make_cert(1, crl_partition=0, created_at=created)])
    store.update_certificate_status(CA, 1, status="revoked")  # no at: revoked_at stays NULL
    assert list(store.iter_revoked(CA, 0, not_after_from=T0)) == [(1, created, None)]
    # deltas select on the indexed revoked_at: a revocation without a time is in full CRLs only
    assert list(store.iter_revoked(CA, 0, not_after_from=T0, revoked_since=T0)) == []


ROWS = 12_000


def test_iter_revoked_streams_in_batches(store: Store) -> None:
    recs = [
        _revoked(s, crl_partition=s % 2, at=T0 + dt.timedelta(seconds=s), reason=None if s % 3 else "keyCompromise")
        for s in range(1, 2 * ROWS + 1)
    ]
    for i in range(0, len(recs), 4000):
        store.add_certificates(recs[i : i + 4000])

    with count_statements(store, "SELECT") as selects:
        it = store.iter_revoked(CA, 0, not_after_from=T0, batch=1000)
        assert selects == []  # nothing read before the first next()
        first = next(it)
        assert len(selects) == 1  # one batch, not everything
        rest = list(it)
    got = [first, *rest]
    assert len(got) == ROWS
    assert [s for s, _, _ in got] == list(range(2, 2 * ROWS + 1, 2))  # all of partition 0, in order
    assert got[2] == (6, T0 + dt.timedelta(seconds=6), "keyCompromise")
    assert ROWS // 1000 <= len(selects) <= ROWS // 1000 + 1
    assert store.count_revoked(CA, 0, not_after_from=T0) == ROWS


def test_iter_revoked_pages_past_rows_changed_between_batches(store: Store) -> None:
    """Each batch is its own transaction: revocations during the iteration do not break it."""
    store.add_certificates([make_cert(s, crl_partition=0) for s in range(1, 11)])
    for s in range(1, 6):
        store.revoke_certificate(CA, s, reason=None, at=AT, actor="op")
    seen: list[int] = []
    for serial, _at, _reason in store.iter_revoked(CA, 0, not_after_from=T0, batch=2):
        seen.append(serial)
        if serial == 2:
            store.revoke_certificate(CA, 8, reason=None, at=AT, actor="op")  # ahead of the cursor: seen
            store.revoke_certificate(CA, 10, reason=None, at=AT, actor="op")
    assert seen == [1, 2, 3, 4, 5, 8, 10]


# --- CRL numbers -------------------------------------------------------------------------------------


def test_crl_numbers_count_up_per_issuer_and_partition(store: Store) -> None:
    assert [store.next_crl_number(CA, 0) for _ in range(3)] == [1, 2, 3]
    assert store.next_crl_number(CA, 1) == 1
    assert store.next_crl_number("CN=Other CA", 0) == 1
    assert store.next_crl_number(CA, 0) == 4
    with pytest.raises(ValueError, match="partition must be in"):
        store.next_crl_number(CA, 4096)
    with pytest.raises(ValueError, match="issuer must not contain NUL"):
        store.next_crl_number("CN=\x00", 0)


def test_threads_get_distinct_contiguous_crl_numbers(store: Store) -> None:
    got = _run_together(8, lambda _i: [store.next_crl_number(CA, 9) for _ in range(50)])
    numbers = [n for chunk in got for n in chunk]
    assert sorted(numbers) == list(range(1, 401))
    for chunk in got:
        assert chunk == sorted(chunk)  # increasing within each thread
    assert store.next_crl_number(CA, 9) == 401


PROCESSES = 3
PER_PROCESS = 40


def _number_worker(url: str, barrier: Barrier, results: multiprocessing.Queue[object]) -> None:
    """Draw CRL numbers and append audit records at the same moment as the other processes."""
    try:
        with Store.open(url) as store:
            barrier.wait(timeout=60)
            numbers = []
            for i in range(PER_PROCESS):
                numbers.append(store.next_crl_number(CA, 1))
                store.append_audit([AuditEntry(at=T0, kind="crl", actor=f"pid-{i}", subject=None, data={"i": i})])
        results.put(numbers)
    except BaseException as exc:  # report anything to the parent, which asserts
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_get_distinct_contiguous_crl_numbers_and_one_audit_chain(store: Store, store_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results: multiprocessing.Queue[object] = ctx.Queue()
    procs = [ctx.Process(target=_number_worker, args=(store_url, barrier, results)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [o for o in outcomes if isinstance(o, str)] == []
    numbers = [n for o in outcomes if isinstance(o, list) for n in o]
    assert sorted(numbers) == list(range(1, PROCESSES * PER_PROCESS + 1))
    audit = _audit(store)
    assert [a.seq for a in audit] == list(range(1, PROCESSES * PER_PROCESS + 1))
    prev = wire_audit.GENESIS_HASH
    for a in audit:
        assert a.prev_hash == prev
        assert a.computed_hash() == a.hash
        prev = a.hash


# --- stored CRLs -------------------------------------------------------------------------------------


def test_save_and_get_crl(store: Store) -> None:
    assert store.get_crl(CA, 0, "full") is None
    full = _crl(1, this_update=AT, next_update=AT + dt.timedelta(days=7))
    store.save_crl(full)
    got = store.get_crl(CA, 0, "full")
    assert got == full
    assert got is not None
    assert got.this_update.utcoffset() == dt.timedelta(0)
    assert type(got.der) is bytes
    assert store.get_crl(CA, 0, "delta") is None
    assert store.get_crl(CA, 1, "full") is None

    delta = _crl(2, kind="delta", base_number=1)
    store.save_crl(delta)
    newer = _crl(3, der=b"newer")
    store.save_crl(newer)
    assert store.get_crl(CA, 0, "full") == newer
    assert store.get_crl(CA, 0, "delta") == delta
    for issuer, partition, kind in ((CA, -1, "full"), ("CN=\x00", 0, "full"), (CA, 0, "x" * 100), (CA, 2**70, "full")):
        assert store.get_crl(issuer, partition, kind) is None


def test_save_crl_never_rolls_back(store: Store) -> None:
    current = _crl(5)
    store.save_crl(current)
    for number in (5, 4, 0):
        with pytest.raises(errors.ConflictError, match="not newer than the stored one, number 5") as info:
            store.save_crl(_crl(number, der=b"stale"))
        assert info.value.field == "number"
    assert store.get_crl(CA, 0, "full") == current
    store.save_crl(_crl(4, kind="delta", base_number=3))  # kinds are numbered independently here


def test_a_crl_and_its_audit_record_are_saved_together(store: Store) -> None:
    """save_crl appends the CRL's audit record in its own transaction: a refused (older) CRL
    audits nothing, and a CRL is never stored without its record."""
    head = store.audit_head()
    before = head.seq if head is not None else 0
    audit = [AuditEntry(at=T0, kind="crl", actor="km-va", subject=f"{CA}/0", data={"number": 5})]
    store.save_crl(_crl(5), audit)
    stored = store.audit_head()
    assert stored is not None
    assert stored.seq == before + 1
    assert stored.data == {"number": 5}
    with pytest.raises(errors.ConflictError):
        store.save_crl(_crl(4, der=b"stale"), [AuditEntry(at=T0, kind="crl", actor="km-va", subject=None, data={})])
    assert store.audit_head() == stored
    with pytest.raises(ValueError, match="AuditEntry"):
        store.save_crl(_crl(6), ["not an entry"])  # type: ignore[list-item]
    assert store.get_crl(CA, 0, "full") == _crl(5)


def test_concurrent_crl_generators_leave_the_newest(store: Store) -> None:
    numbers = list(range(1, 41))
    random.Random(7).shuffle(numbers)
    per_thread = [numbers[i::4] for i in range(4)]

    def save(i: int) -> int:
        refused = 0
        for n in per_thread[i]:
            try:
                store.save_crl(_crl(n))
            except errors.ConflictError:
                refused += 1
        return refused

    refused = _run_together(4, save)
    got = store.get_crl(CA, 0, "full")
    assert got == _crl(40)
    assert 0 < sum(refused) < 40


def test_list_crls_is_ordered_and_filters_by_issuer(store: Store) -> None:
    crls = [
        _crl(1, issuer="CN=B", partition=0),
        _crl(2, issuer="CN=A", partition=10, kind="delta", base_number=1),
        _crl(1, issuer="CN=A", partition=10),
        _crl(1, issuer="CN=A", partition=2),
    ]
    for c in crls:
        store.save_crl(c)
    assert [(c.issuer, c.partition, c.kind) for c in store.list_crls()] == [
        ("CN=A", 2, "full"),
        ("CN=A", 10, "delta"),
        ("CN=A", 10, "full"),
        ("CN=B", 0, "full"),
    ]
    assert store.list_crls("CN=B") == [crls[0]]
    assert store.list_crls("CN=C") == []
    assert store.list_crls("CN=\x00") == []
