"""Store behaviour, on SQLite and on PostgreSQL (``store`` fixture, skipped without PostgreSQL)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotdlm import errors
from iotdlm.store import CertRecord, SerialCollisionError, Store
from iotdlm.store.engine import alembic_config
from iotdlm.store.tables import metadata
from tests.fixtures_store import T0, make_cert

SERIAL_159 = (1 << 158) | 0x1234_5678_9ABC_DEF0_1122_3344_5566_7788_99AA
CET = dt.timezone(dt.timedelta(hours=1), "CET")


def _utc(value: dt.datetime | None) -> bool:
    return value is not None and value.utcoffset() == dt.timedelta(0)


# --- certificates: round trip --------------------------------------------------------------------


def test_certificate_round_trip_keeps_every_field(store: Store) -> None:
    assert SERIAL_159.bit_length() == 159
    created = dt.datetime(2025, 3, 1, 13, 30, 15, 123456, tzinfo=CET)
    rec = dataclasses.replace(
        make_cert(SERIAL_159, created_at=created, device_id="dev-ü-1"),
        revoked_at=created + dt.timedelta(days=1),
        revocation_reason="keyCompromise",
        superseded_by=2**160 - 1,
        status="revoked",
    )
    store.add_certificates([rec])

    got = store.get_certificate(rec.issuer, SERIAL_159)
    assert got == rec  # aware datetimes compare as instants
    assert got is not None
    for value in (got.created_at, got.not_before, got.not_after, got.revoked_at):
        assert _utc(value), value
    assert got.created_at.microsecond == 123456
    assert type(got.der) is bytes
    assert store.get_by_fingerprint(rec.fingerprint) == rec
    assert store.get_by_fingerprint(rec.fingerprint.upper()) == rec
    assert store.find_by_serial(SERIAL_159) == [rec]


def test_lookups_of_unknown_or_impossible_keys_find_nothing(store: Store) -> None:
    store.add_certificates([make_cert(7)])
    assert store.get_certificate("CN=Test Issuing CA", 8) is None
    assert store.get_certificate("CN=Other", 7) is None
    assert store.get_certificate("CN=Test Issuing CA", -7) is None
    assert store.get_certificate("CN=Test Issuing CA", 2**160) is None
    assert store.get_certificate("CN=\x00", 7) is None
    assert store.find_by_serial(2**161) == []
    assert store.get_by_fingerprint("0" * 64) is None
    assert store.get_by_fingerprint("x" * 65) is None
    assert store.list_certificates(device_id="d\x00") == []
    assert store.count_certificates(issuer="i" * 5000) == 0


def test_same_serial_under_two_issuers_is_fine_and_found_by_serial(store: Store) -> None:
    a = make_cert(42, issuer="CN=CA A", created_at=T0)
    b = make_cert(42, issuer="CN=CA B", created_at=T0 + dt.timedelta(seconds=1))
    store.add_certificates([a, b])
    assert store.find_by_serial(42) == [b, a]  # newest first
    assert store.get_certificate("CN=CA A", 42) == a
    assert store.get_certificate("CN=CA B", 42) == b


def test_empty_batch_is_a_no_op(store: Store) -> None:
    store.add_certificates([])
    assert store.count_certificates() == 0


def test_fingerprint_must_match_der(store: Store) -> None:
    rec = dataclasses.replace(make_cert(1), fingerprint="a" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        store.add_certificates([rec])
    assert store.count_certificates() == 0


# --- certificates: collisions --------------------------------------------------------------------


def test_serial_collision_stores_nothing_of_the_batch(store: Store) -> None:
    store.add_certificates([make_cert(s) for s in range(1, 6)])
    batch = [make_cert(s) for s in range(100, 110)] + [make_cert(3, device_id="dev-9")]
    with pytest.raises(SerialCollisionError) as info:
        store.add_certificates(batch)
    err = info.value
    assert isinstance(err, errors.ConflictError)
    assert err.code == "serial_collision"
    assert (err.issuer, err.serial, err.device_id) == ("CN=Test Issuing CA", 3, "dev-9")
    assert "nothing of the batch was stored" in err.message
    assert store.count_certificates() == 5
    assert all(store.get_certificate("CN=Test Issuing CA", s) is None for s in range(100, 110))


def test_serial_twice_in_one_batch_is_a_collision(store: Store) -> None:
    first = make_cert(9)
    twin = make_cert(9, der=b"other der")
    with pytest.raises(SerialCollisionError):
        store.add_certificates([make_cert(8), first, twin])
    assert store.count_certificates() == 0


def test_fingerprint_collision_is_a_conflict_not_a_serial_collision(store: Store) -> None:
    store.add_certificates([make_cert(1, der=b"same der")])
    with pytest.raises(errors.ConflictError) as info:
        store.add_certificates([make_cert(2), make_cert(3, der=b"same der")])
    assert type(info.value) is errors.ConflictError
    assert info.value.field == "fingerprint"
    assert store.count_certificates() == 1


def test_store_is_usable_after_a_collision(store: Store) -> None:
    store.add_certificates([make_cert(1)])
    with pytest.raises(SerialCollisionError):
        store.add_certificates([make_cert(1)])
    store.add_certificates([make_cert(2)])
    assert store.count_certificates() == 2


# --- certificates: listing, counting, status -----------------------------------------------------


@pytest.fixture
def populated(store: Store) -> list[CertRecord]:
    """20 certificates; created_at grows with the serial, so newest first = highest serial first."""
    combos = itertools.cycle(
        [
            ("dev-a", "operational", "valid", "CN=CA A"),
            ("dev-b", "operational", "revoked", "CN=CA A"),
            ("dev-a", "bootstrap", "superseded", "CN=CA B"),
            (None, "ca", "valid", "CN=CA B"),
        ]
    )
    recs = [
        make_cert(
            serial, device_id=dev, profile=prof, status=status, issuer=iss, created_at=T0 + dt.timedelta(minutes=serial)
        )
        for serial, (dev, prof, status, iss) in zip(range(1, 21), combos, strict=False)
    ]
    store.add_certificates(recs)
    return recs


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"device_id": "dev-a"},
        {"profile": "operational"},
        {"status": "valid"},
        {"issuer": "CN=CA B"},
        {"device_id": "dev-a", "status": "superseded"},
        {"device_id": "dev-a", "profile": "operational", "issuer": "CN=CA A"},
        {"device_id": "nobody"},
    ],
)
def test_list_and_count_apply_every_filter(store: Store, populated: list[CertRecord], filters: dict[str, str]) -> None:
    expected = sorted(
        (r for r in populated if all(getattr(r, k) == v for k, v in filters.items())),
        key=lambda r: r.created_at,
        reverse=True,
    )
    assert store.count_certificates(**filters) == len(expected)
    assert store.list_certificates(**filters) == expected  # type: ignore[arg-type]


def test_list_pages_newest_first(store: Store, populated: list[CertRecord]) -> None:
    pages = [store.list_certificates(limit=6, offset=o) for o in range(0, 24, 6)]
    assert [len(p) for p in pages] == [6, 6, 6, 2]
    serials = [r.serial for page in pages for r in page]
    assert serials == list(range(20, 0, -1))
    assert store.list_certificates(limit=0) == []
    with pytest.raises(ValueError, match="limit and offset"):
        store.list_certificates(limit=-1)


def test_update_status_revoke_then_supersede(store: Store) -> None:
    store.add_certificates([make_cert(10), make_cert(11)])
    at = dt.datetime(2025, 6, 1, 8, 0, tzinfo=CET)
    revoked = store.update_certificate_status("CN=Test Issuing CA", 10, status="revoked", at=at, reason="keyCompromise")
    assert (revoked.status, revoked.revoked_at, revoked.revocation_reason) == ("revoked", at, "keyCompromise")
    assert _utc(revoked.revoked_at)
    assert store.get_certificate("CN=Test Issuing CA", 10) == revoked

    sup = store.update_certificate_status("CN=Test Issuing CA", 11, status="superseded", at=at, superseded_by=12)
    assert (sup.status, sup.superseded_by, sup.revocation_reason) == ("superseded", 12, None)
    assert store.count_certificates(status="valid") == 0

    # generic: the call states the whole status; None clears
    back = store.update_certificate_status("CN=Test Issuing CA", 10, status="valid")
    assert (back.status, back.revoked_at, back.revocation_reason, back.superseded_by) == ("valid", None, None, None)


def test_update_status_of_a_missing_certificate_is_not_found(store: Store) -> None:
    store.add_certificates([make_cert(10)])
    with pytest.raises(errors.NotFoundError):
        store.update_certificate_status("CN=Test Issuing CA", 11, status="revoked")
    with pytest.raises(errors.NotFoundError):
        store.update_certificate_status("CN=Test Issuing CA", 2**170, status="revoked")
    with pytest.raises(ValueError, match="certificate status"):
        store.update_certificate_status("CN=Test Issuing CA", 10, status="on-hold")
    with pytest.raises(ValueError, match="timezone-aware"):
        store.update_certificate_status("CN=Test Issuing CA", 10, status="revoked", at=dt.datetime(2025, 1, 1))
    assert store.get_certificate("CN=Test Issuing CA", 10) == make_cert(10)


# --- nonces ----------------------------------------------------------------------------------------


def test_nonce_replay_is_refused(store: Store) -> None:
    exp = T0 + dt.timedelta(minutes=5)
    store.consume_nonce("fp-1", "n-1", expires_at=exp)
    with pytest.raises(errors.ReplayError, match="already used"):
        store.consume_nonce("fp-1", "n-1", expires_at=exp)
    store.consume_nonce("fp-2", "n-1", expires_at=exp)  # nonces are per sender
    store.consume_nonce("fp-1", "n-2", expires_at=exp)


def test_purge_forgets_only_expired_nonces(store: Store) -> None:
    for i in range(5):
        store.consume_nonce("s", f"n{i}", expires_at=T0 + dt.timedelta(minutes=i))
    assert store.purge_nonces(T0 + dt.timedelta(minutes=2)) == 3  # n0, n1, n2 (at or before now)
    assert store.purge_nonces(T0 + dt.timedelta(minutes=2)) == 0
    store.consume_nonce("s", "n0", expires_at=T0 + dt.timedelta(hours=1))  # forgotten: accepted again
    with pytest.raises(errors.ReplayError):
        store.consume_nonce("s", "n3", expires_at=T0 + dt.timedelta(hours=1))


def test_nonce_from_a_request_that_cannot_be_stored_is_bad_request(store: Store) -> None:
    with pytest.raises(errors.BadRequestError):
        store.consume_nonce("s", "n" * 256, expires_at=T0)
    with pytest.raises(errors.BadRequestError):
        store.consume_nonce("s", "a\x00b", expires_at=T0)


# --- devices ---------------------------------------------------------------------------------------


def test_device_upsert_is_idempotent_and_status_changes(store: Store) -> None:
    created = store.upsert_device("dev-1", "sensor", now=T0)
    assert (created.device_id, created.dtype, created.status) == ("dev-1", "sensor", "active")
    assert created.created_at == created.updated_at == T0
    assert _utc(created.created_at)

    again = store.upsert_device("dev-1", "gateway", now=T0 + dt.timedelta(hours=1))
    assert again == created
    assert store.get_device("dev-1") == created

    later = T0 + dt.timedelta(days=2)
    retired = store.set_device_status("dev-1", "retired", now=later)
    assert (retired.status, retired.created_at, retired.updated_at) == ("retired", T0, later)
    assert store.get_device("dev-1") == retired


def test_device_errors(store: Store) -> None:
    assert store.get_device("nope") is None
    assert store.get_device("a\x00") is None
    with pytest.raises(errors.NotFoundError) as info:
        store.set_device_status("nope", "retired", now=T0)
    assert info.value.device_id == "nope"
    store.upsert_device("d", "sensor", now=T0)
    with pytest.raises(ValueError, match="device status"):
        store.set_device_status("d", "lost", now=T0)
    with pytest.raises(ValueError, match="NUL"):
        store.upsert_device("a\x00", "sensor", now=T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.upsert_device("e", "sensor", now=dt.datetime(2025, 1, 1))


def test_list_devices_filters_and_pages(store: Store) -> None:
    for i in range(6):
        store.upsert_device(f"d{i}", "sensor" if i % 2 else "gateway", now=T0)
    store.set_device_status("d3", "retired", now=T0)
    assert [d.device_id for d in store.list_devices()] == [f"d{i}" for i in range(6)]
    assert [d.device_id for d in store.list_devices(dtype="sensor")] == ["d1", "d3", "d5"]
    assert [d.device_id for d in store.list_devices(dtype="sensor", status="active")] == ["d1", "d5"]
    assert [d.device_id for d in store.list_devices(status="retired")] == ["d3"]
    assert [d.device_id for d in store.list_devices(limit=2, offset=3)] == ["d3", "d4"]
    assert store.list_devices(dtype="x" * 100) == []


# --- meta ------------------------------------------------------------------------------------------


def test_meta_get_set_overwrite(store: Store) -> None:
    assert store.get_meta("ca.generation") is None
    store.set_meta("ca.generation", "1")
    store.set_meta("other", "")
    store.set_meta("ca.generation", "2")
    assert store.get_meta("ca.generation") == "2"
    assert store.get_meta("other") == ""


# --- schema ----------------------------------------------------------------------------------------


def _schema_diffs(url: str, target: sa.MetaData) -> list[object]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return list(compare_metadata(ctx, target))
    finally:
        engine.dispose()


def test_migrated_schema_matches_tables_py(store: Store, store_url: str) -> None:
    assert _schema_diffs(store_url, metadata) == []


def test_schema_comparison_would_see_a_difference(store: Store, store_url: str) -> None:
    """Guards the test above against passing vacuously (e.g. comparing against an empty schema)."""
    changed = sa.MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["devices"].append_column(sa.Column("extra", sa.String(10)))
    diffs = _schema_diffs(store_url, changed)
    assert len(diffs) == 1
    assert diffs[0][0] == "add_column"  # type: ignore[index]


def test_migrate_twice_is_a_no_op_and_records_head(store: Store, store_url: str) -> None:
    store.add_certificates([make_cert(1)])
    store.migrate()
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [_head()]
    finally:
        engine.dispose()
    assert store.count_certificates() == 1


def test_open_without_migrate_then_migrate(store_url: str) -> None:
    with Store.open(store_url, migrate=False) as fresh:
        with pytest.raises(errors.UnavailableError, match="failed while counting certificates"):
            fresh.count_certificates()
        fresh.migrate()
        assert fresh.count_certificates() == 0


def test_closed_store_refuses_work(store_url: str) -> None:
    s = Store.open(store_url)
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.count_certificates()
    s.close()  # idempotent


# --- properties --------------------------------------------------------------------------------------

_serial_counter = itertools.count(1)
_device_text = st.text(
    alphabet=st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1, max_size=255
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(serial=st.integers(min_value=0, max_value=2**160 - 1))
def test_any_serial_round_trips_through_the_store(store: Store, serial: int) -> None:
    issuer = f"CN=Hypothesis CA {next(_serial_counter)}"  # fresh issuer: examples never collide
    rec = make_cert(serial, issuer=issuer)
    store.add_certificates([rec])
    assert store.get_certificate(issuer, serial) == rec
    assert rec in store.find_by_serial(serial)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(device_id=_device_text)
def test_any_device_id_round_trips_through_the_store(store: Store, device_id: str) -> None:
    dev = store.upsert_device(device_id, "sensor", now=T0)
    assert dev.device_id == device_id
    assert store.get_device(device_id) == dev
    serial = next(_serial_counter)
    rec = make_cert(serial, device_id=device_id)
    store.add_certificates([rec])
    assert rec in store.list_certificates(device_id=device_id)


def test_downgrade_to_base_and_up_again_through_the_alembic_command_path(store: Store, store_url: str) -> None:
    """migrations/env.py without a handed-over connection (how developers run alembic)."""
    cfg = alembic_config()
    cfg.set_main_option("sqlalchemy.url", store_url.replace("%", "%%"))
    command.downgrade(cfg, "base")
    engine = sa.create_engine(store_url)
    try:
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    command.upgrade(cfg, "head")
    assert _schema_diffs(store_url, metadata) == []
    assert store.count_certificates() == 0


def test_a_database_from_a_newer_version_is_refused_clearly(store: Store, store_url: str) -> None:
    engine = sa.create_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    finally:
        engine.dispose()
    with pytest.raises(errors.UnavailableError, match="newer iotdlm") as info:
        Store.open(store_url)
    assert "9999_from_the_future" in info.value.message


def _head() -> str:
    """The newest migration, read from the migration scripts themselves."""
    from alembic.script import ScriptDirectory

    from iotdlm.store.engine import alembic_config

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def test_schema_head_read_from_file_names_is_alembics_head() -> None:
    """Store.migrate skips Alembic when the database is at schema_head(): it must be the head."""
    from iotdlm.store.engine import schema_head

    assert schema_head() == _head()


def test_opening_an_up_to_date_store_does_not_load_alembic(store: Store, store_url: str) -> None:
    """Every km worker, cm and CLI command opens the store: at the head, no Alembic (~0.2 s)."""
    code = (
        "import sys\n"
        "from iotdlm.store import Store\n"
        f"Store.open({store_url!r}).close()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_a_store_one_migration_behind_is_upgraded_on_open(store: Store, store_url: str) -> None:
    """The quick check sees an older revision and runs Alembic's upgrade as before."""
    from alembic.script import ScriptDirectory

    previous = ScriptDirectory.from_config(alembic_config()).get_revision(_head()).down_revision
    assert isinstance(previous, str)
    cfg = alembic_config()
    cfg.set_main_option("sqlalchemy.url", store_url.replace("%", "%%"))
    command.downgrade(cfg, previous)
    assert store.schema_revision() == previous
    with Store.open(store_url) as reopened:
        assert reopened.schema_revision() == _head()
    assert _schema_diffs(store_url, metadata) == []
