"""km's hot path on the driver's connection (store/driver.py, issue 15): what it writes is
byte-for-byte what SQLAlchemy writes, what it reads is what SQLAlchemy reads, failures are the
store's errors, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import cast, select, text
from sqlalchemy.types import String

from iotdlm import errors
from iotdlm.store import Store
from iotdlm.store.certificates import _cert_row
from iotdlm.store.records import AuditEntry, NonceUse
from iotdlm.store.tables import certificates, devices
from tests.fixtures_store import PG_DATABASE, PG_HOST, PG_PORT, T0, make_cert

# not UTC on purpose: both paths must store UTC
PLUS2 = dt.timezone(dt.timedelta(hours=2))
T1 = dt.datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=PLUS2)


def _raw_rows(store: Store, serials: list[str]) -> list[tuple[object, ...]]:
    cols = [cast(c, String) for c in certificates.c if c.name not in ("id", "serial_hex", "der", "fingerprint")]
    stmt = select(*cols).where(certificates.c.serial_hex.in_(serials)).order_by(certificates.c.serial_hex)
    with store.transaction("reading raw rows", write=False) as conn:
        return [tuple(row) for row in conn.execute(stmt)]


def test_a_certificate_written_by_the_driver_is_stored_as_sqlalchemy_stores_it(store: Store) -> None:
    fast = make_cert(0x10, created_at=T1, not_after=T1 + dt.timedelta(days=3))
    slow = make_cert(0x20, created_at=T1, not_after=T1 + dt.timedelta(days=3))
    store.add_certificates([fast], devices=[("dev-1", "sensor")], now=T1)  # driver path
    with store.transaction("writing the reference row", write=True) as conn:  # SQLAlchemy path
        conn.execute(certificates.insert(), [_cert_row(slow)])
    raw_fast, raw_slow = _raw_rows(store, ["10", "20"])
    assert raw_fast == raw_slow
    assert store.get_certificate(fast.issuer, fast.serial) == fast  # SQLAlchemy reads the driver's row
    device = store.get_device("dev-1")  # the driver reads what it wrote...
    assert device is not None
    assert device.created_at == T1
    assert device.created_at.tzinfo == dt.UTC
    assert store.get_devices(["dev-1"])["dev-1"] == device  # ...as SQLAlchemy reads it


def test_the_driver_reads_what_sqlalchemy_wrote(store: Store) -> None:
    written = store.upsert_device("dev-9", "sensor", now=T1)
    assert store.get_device("dev-9") == written
    rec = make_cert(0x30, device_id="dev-9", created_at=T1)
    with store.transaction("writing the reference row", write=True) as conn:
        conn.execute(certificates.insert(), [_cert_row(rec)])
    rows = store.presented_rows(rec.fingerprint.upper(), "dev-9")
    assert rows.certificate == rec
    assert rows.device == written
    assert rows.factory is None
    assert store.get_device("nobody") is None


def test_the_driver_write_is_all_or_nothing_and_says_why(store: Store) -> None:
    nonce = NonceUse("pm", "n-1", T0 + dt.timedelta(days=1))
    entry = AuditEntry(at=T1, kind="issuance", actor="pm", subject="dev-1", data={"serial": "40"})
    store.add_certificates([make_cert(0x40)], audit=[entry], nonce=nonce)
    head = store.audit_head()
    assert head is not None
    assert head.seq == 1
    with pytest.raises(errors.ReplayError):
        store.add_certificates([make_cert(0x41)], audit=[entry], nonce=nonce)
    with pytest.raises(errors.ConflictError, match="already stored"):
        store.add_certificates([make_cert(0x40)], audit=[entry])
    assert store.count_certificates() == 1
    assert store.count_audit() == 1
    store.add_certificates([make_cert(0x42)], audit=[entry, entry])  # the chain goes on after the failures
    assert [a.seq for a in store.iter_audit()] == [1, 2, 3]


def test_a_database_failure_on_the_driver_is_unavailable(store: Store) -> None:
    with store.transaction("dropping a table", write=True) as conn:
        conn.execute(devices.delete())
        conn.execute(text("DROP TABLE devices"))
    with pytest.raises(errors.UnavailableError, match="failed while reading a device") as info:
        store.get_device("dev-1")
    assert type(info.value.__cause__).__module__.startswith("sqlalchemy")
    assert store.count_certificates() == 0  # the connection went back to the pool usable


@pytest.mark.postgres
def test_the_driver_survives_its_connections_being_killed(
    postgres_url: str, postgres_user: str, postgres_schema: str
) -> None:
    with Store.open(postgres_url) as store:
        store.upsert_device("dev-1", "sensor", now=T0)
        assert store.get_device("dev-1") is not None  # a pooled connection now exists
        with psycopg.connect(
            host=PG_HOST, port=PG_PORT, dbname=PG_DATABASE, user=postgres_user, autocommit=True
        ) as admin:
            admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                (postgres_schema,),
            )
        assert store.get_device("dev-1") is not None  # the pool's pre-ping replaced the dead connection
        store.add_certificates([make_cert(1)])
        assert store.count_certificates() == 1


_ids = iter(range(10**9))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    at=st.datetimes(
        min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(9998, 12, 30), timezones=st.timezones()
    ).filter(lambda d: d.utcoffset() is not None),
    dtype=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20),
)
def test_any_device_row_is_stored_alike_by_both_paths(store: Store, at: dt.datetime, dtype: str) -> None:
    n = next(_ids)
    fast, slow = f"fast-{n}", f"slow-{n}"
    store.add_certificates([], devices=[(fast, dtype)], now=at)  # driver path
    store.upsert_device(slow, dtype, now=at)  # SQLAlchemy path
    cols = [cast(c, String) for c in devices.c if c.name != "device_id"]
    with store.transaction("reading raw rows", write=False) as conn:
        raw = {
            row[0]: tuple(row[1:])
            for row in conn.execute(select(devices.c.device_id, *cols).where(devices.c.device_id.in_([fast, slow])))
        }
    assert raw[fast] == raw[slow]
    read = store.get_device(fast)
    assert read is not None
    assert read.created_at == at.astimezone(dt.UTC)  # (a time in a DST gap compares unequal across zones)
    assert read.dtype == dtype
