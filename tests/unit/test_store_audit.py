"""The audit log in the store: appending with a hash chain, reading, checkpoints, and atomicity with
what is audited. Both backends (``store`` fixture)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotdlm import errors
from iotdlm.store import AuditCheckpoint, AuditEntry, AuditRecord, SerialCollisionError, Store
from iotdlm.wire import audit as wire_audit
from tests.fixtures_store import T0, count_statements, make_cert

T = TypeVar("T")
CA = "CN=Test Issuing CA"
CET = dt.timezone(dt.timedelta(hours=1), "CET")


def _entry(
    i: int = 0, *, kind: str = "issuance", actor: str = "km", subject: str | None = "dev-1", **data: Any
) -> AuditEntry:
    return AuditEntry(at=T0 + dt.timedelta(seconds=i), kind=kind, actor=actor, subject=subject, data={"i": i, **data})


def _check_chain(records: list[AuditRecord]) -> None:
    """Sequence 1..n with no gap, each record hashing to its stored hash and following the one before."""
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    prev = wire_audit.GENESIS_HASH
    for rec in records:
        assert rec.prev_hash == prev, rec.seq
        assert rec.hash == wire_audit.record_hash(
            rec.prev_hash, rec.seq, rec.at, rec.kind, rec.actor, rec.subject, rec.data_json
        ), rec.seq
        prev = rec.hash


def _run_together(n: int, work: Callable[[int], T]) -> list[T]:
    barrier = threading.Barrier(n)

    def start(i: int) -> T:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(start, range(n)))


# --- records -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "gossip"}, "audit kind must be one of"),
        ({"at": dt.datetime(2025, 1, 1)}, "at must be timezone-aware"),
        ({"actor": "a" * 256}, "actor is 256 characters long"),
        ({"actor": "\ud800"}, "actor must be encodable as UTF-8"),
        ({"subject": "s\x00"}, "subject must not contain NUL"),
        ({"subject": "s" * 1025}, "subject is 1025 characters long"),
        ({"data": ["not", "a", "dict"]}, "audit data must be a dict"),
        ({"data": {"when": T0}}, "JSON-serialisable"),
        ({"data": {"s": {1, 2}}}, "JSON-serialisable"),
        ({"data": {"x": math.nan}}, "JSON-serialisable"),
        ({"data": {"x": [math.inf]}}, "JSON-serialisable"),
        ({"data": {1: "a", "b": 2}}, "JSON-serialisable"),  # mixed key types cannot be sorted
        ({"data": {"text": "lone \udc80 surrogate"}}, "encodable as UTF-8"),
    ],
)
def test_audit_entry_validates(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(_entry(), **change)  # type: ignore[arg-type]


def test_audit_checkpoint_validates() -> None:
    good = AuditCheckpoint(seq=1, hash="a" * 64, at=T0, signer="f" * 64, signature=b"sig")
    for change, message in (
        ({"seq": 0}, "seq must be in"),
        ({"hash": "A" * 64}, "hash must be 64 lowercase hex"),
        ({"hash": "a" * 63}, "hash must be 64 lowercase hex"),
        ({"at": dt.datetime(2025, 1, 1)}, "timezone-aware"),
        ({"signer": "s" * 256}, "signer is 256"),
        ({"signature": b""}, "signature must be non-empty bytes"),
    ):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(good, **change)


# --- appending and reading ---------------------------------------------------------------------------


def test_empty_log(store: Store) -> None:
    assert store.audit_head() is None
    assert store.count_audit() == 0
    assert list(store.iter_audit()) == []
    assert store.list_audit() == []
    assert store.append_audit([]) == []
    assert store.count_audit() == 0


def test_appended_records_chain_and_read_back_hashing_to_their_hash(store: Store) -> None:
    at = dt.datetime(2025, 3, 1, 13, 30, 15, 123456, tzinfo=CET)
    first = store.append_audit([AuditEntry(at=at, kind="login", actor="op:ü", subject=None, data={})])
    more = store.append_audit([_entry(1, note="ünïcödé ✓ \x00 \u2028"), _entry(2, kind="revocation")])
    written = first + more
    assert [r.seq for r in written] == [1, 2, 3]
    assert written[0].prev_hash == wire_audit.GENESIS_HASH
    assert written[0].at == at
    assert written[0].at.utcoffset() == dt.timedelta(0)  # normalised to UTC
    assert written[0].at.microsecond == 123456
    assert written[0].data_json == "{}"
    assert written[1].data == {"i": 1, "note": "ünïcödé ✓ \x00 \u2028"}
    assert written[1].data_json == wire_audit.canonical_data({"note": "ünïcödé ✓ \x00 \u2028", "i": 1})

    stored = list(store.iter_audit())
    assert stored == written  # what append returned is what a reader gets
    _check_chain(stored)
    assert all(r.computed_hash() == r.hash for r in stored)
    assert store.audit_head() == written[-1]
    assert store.count_audit() == 3


def test_appending_one_by_one_or_in_a_batch_gives_the_same_chain(store: Store) -> None:
    entries = [_entry(i) for i in range(5)]
    one_by_one = [store.append_audit([e])[0] for e in entries]
    _check_chain(one_by_one)
    # same entries, same positions, hence the same hashes: the chain is a pure function of its content
    recomputed = []
    prev = wire_audit.GENESIS_HASH
    for seq, e in enumerate(entries, 1):
        prev = wire_audit.record_hash(prev, seq, e.at, e.kind, e.actor, e.subject, wire_audit.canonical_data(e.data))
        recomputed.append(prev)
    assert [r.hash for r in one_by_one] == recomputed


def test_a_tampered_record_no_longer_hashes_to_its_hash(store: Store) -> None:
    """Guards the chain checks above against passing vacuously."""
    [rec] = store.append_audit([_entry(1)])
    tampered = dataclasses.replace(rec, data_json=rec.data_json.replace("1", "2"))
    assert tampered.computed_hash() != rec.hash
    assert dataclasses.replace(rec, at=rec.at + dt.timedelta(microseconds=1)).computed_hash() != rec.hash
    assert dataclasses.replace(rec, seq=2).computed_hash() != rec.hash


def test_list_audit_filters_and_pages_newest_first(store: Store) -> None:
    kinds = itertools.cycle(["issuance", "revocation", "login"])
    actors = itertools.cycle(["km", "op:alice"])
    store.append_audit([_entry(i, kind=next(kinds), actor=next(actors)) for i in range(1, 13)])
    assert [r.seq for r in store.list_audit()] == list(range(12, 0, -1))
    assert [r.seq for r in store.list_audit(kind="revocation")] == [11, 8, 5, 2]
    assert [r.seq for r in store.list_audit(actor="op:alice")] == [12, 10, 8, 6, 4, 2]
    assert [r.seq for r in store.list_audit(kind="revocation", actor="op:alice")] == [8, 2]
    assert [r.seq for r in store.list_audit(limit=5, offset=5)] == [7, 6, 5, 4, 3]
    assert store.list_audit(kind="crl") == []
    assert store.list_audit(kind="k" * 33) == []
    assert store.list_audit(actor="a\x00") == []
    with pytest.raises(ValueError, match="limit and offset"):
        store.list_audit(offset=-1)


def test_iter_audit_pages_with_bounded_queries(store: Store) -> None:
    store.append_audit([_entry(i) for i in range(1, 26)])
    with count_statements(store, "SELECT") as selects:
        it = store.iter_audit(batch=10)
        assert selects == []
        assert next(it).seq == 1
        assert len(selects) == 1
        rest = list(it)
    assert [r.seq for r in rest] == list(range(2, 26))
    assert len(selects) == 3  # 10 + 10 + 5
    assert [r.seq for r in store.iter_audit(start_seq=20, batch=2)] == [20, 21, 22, 23, 24, 25]
    assert list(store.iter_audit(start_seq=26)) == []
    with pytest.raises(ValueError, match="batch must be"):
        store.iter_audit(batch=0)


# --- concurrency ---------------------------------------------------------------------------------------


def test_concurrent_appenders_make_one_unbroken_chain(store: Store) -> None:
    def work(t: int) -> list[int]:
        return [store.append_audit([_entry(i, actor=f"thread-{t}")])[0].seq for i in range(50)]

    got = _run_together(4, work)
    seqs = [s for chunk in got for s in chunk]
    assert sorted(seqs) == list(range(1, 201))
    records = list(store.iter_audit())
    _check_chain(records)
    assert {r.actor for r in records} == {f"thread-{t}" for t in range(4)}


def test_appends_revocations_and_issuance_interleave_without_breaking_the_chain(store: Store) -> None:
    store.add_certificates([make_cert(s) for s in range(1, 31)])

    def work(t: int) -> None:
        for i in range(30):
            if t == 0:
                store.append_audit([_entry(i, kind="login")])
            elif t == 1:
                store.revoke_certificate(CA, i + 1, reason=None, at=T0, actor="op")
            else:
                serial = 1000 + t * 100 + i
                store.add_certificates([make_cert(serial)], audit=[_entry(i, subject=f"{serial:x}")])

    _run_together(4, work)
    records = list(store.iter_audit())
    assert len(records) == 4 * 30
    _check_chain(records)
    assert store.count_certificates(status="revoked") == 30
    assert store.count_certificates() == 30 + 2 * 30


# --- add_certificates with audit records ---------------------------------------------------------------


def test_certificates_and_their_audit_records_commit_together(store: Store) -> None:
    entries = [_entry(1, kind="issuance", serial="1"), _entry(2, kind="issuance", serial="2")]
    store.add_certificates([make_cert(1), make_cert(2)], audit=entries)
    assert store.count_certificates() == 2
    records = list(store.iter_audit())
    assert [r.data["serial"] for r in records] == ["1", "2"]
    _check_chain(records)


def test_a_serial_collision_stores_neither_certificates_nor_audit_records(store: Store) -> None:
    store.add_certificates([make_cert(5)], audit=[_entry(0)])
    head = store.audit_head()
    with pytest.raises(SerialCollisionError):
        store.add_certificates([make_cert(6), make_cert(5, device_id="dev-9")], audit=[_entry(1), _entry(2)])
    with pytest.raises(errors.ConflictError):
        store.add_certificates([make_cert(7, der=make_cert(5).der)], audit=[_entry(3)])
    with pytest.raises(SerialCollisionError):  # twice in one batch: refused before the database
        store.add_certificates([make_cert(8), make_cert(8, der=b"x")], audit=[_entry(4)])
    assert store.count_certificates() == 1
    assert store.count_audit() == 1
    assert store.audit_head() == head
    store.add_certificates([make_cert(6)], audit=[_entry(5)])  # the chain goes on from where it was
    _check_chain(list(store.iter_audit()))


def test_audit_records_alone_through_add_certificates(store: Store) -> None:
    store.add_certificates([], audit=[_entry(1)])
    assert store.count_audit() == 1
    assert store.count_certificates() == 0
    with pytest.raises(ValueError, match="must be AuditEntry"):
        store.add_certificates([make_cert(1)], audit=[{"kind": "issuance"}])  # type: ignore[list-item]
    assert store.count_certificates() == 0


# --- checkpoints ---------------------------------------------------------------------------------------


def test_checkpoints(store: Store) -> None:
    records = store.append_audit([_entry(i) for i in range(1, 6)])
    assert store.list_audit_checkpoints() == []
    later = AuditCheckpoint(
        seq=5, hash=records[4].hash, at=dt.datetime(2025, 2, 1, tzinfo=CET), signer="f" * 64, signature=b"\x00sig"
    )
    earlier = AuditCheckpoint(seq=2, hash=records[1].hash, at=T0, signer="e" * 64, signature=b"s2")
    store.add_audit_checkpoint(later)
    store.add_audit_checkpoint(earlier)
    got = store.list_audit_checkpoints()
    assert got == [earlier, later]
    assert got[1].at.utcoffset() == dt.timedelta(0)
    assert type(got[1].signature) is bytes

    with pytest.raises(errors.ConflictError, match="already has a checkpoint"):
        store.add_audit_checkpoint(dataclasses.replace(later, signature=b"another"))
    with pytest.raises(errors.ConflictError, match="is not the hash of audit record 3"):
        store.add_audit_checkpoint(dataclasses.replace(earlier, seq=3))
    with pytest.raises(errors.NotFoundError, match="no audit record 6"):
        store.add_audit_checkpoint(dataclasses.replace(later, seq=6))
    assert store.list_audit_checkpoints() == [earlier, later]


def test_checkpoints_keep_their_tree_head_and_the_newest_is_found(store: Store) -> None:
    assert store.latest_audit_checkpoint() is None
    records = store.append_audit([_entry(i) for i in range(1, 4)])
    old = AuditCheckpoint(seq=1, hash=records[0].hash, at=T0, signer="e" * 64, signature=b"s1")
    new = AuditCheckpoint(seq=3, hash=records[2].hash, at=T0, signer="e" * 64, signature=b"s3", root="ab" * 32)
    store.add_audit_checkpoint(new)
    store.add_audit_checkpoint(old)
    assert store.list_audit_checkpoints() == [old, new]
    assert store.latest_audit_checkpoint() == new
    with pytest.raises(ValueError, match="root must be 64 lowercase hex"):
        dataclasses.replace(new, root="AB" * 32)


def test_racing_checkpoints_of_one_record_let_exactly_one_through(store: Store) -> None:
    [rec] = store.append_audit([_entry(1)])

    def attempt(i: int) -> bool:
        try:
            store.add_audit_checkpoint(
                AuditCheckpoint(seq=1, hash=rec.hash, at=T0, signer="f" * 64, signature=f"sig{i}".encode())
            )
        except errors.ConflictError:
            return False
        return True

    assert _run_together(4, attempt).count(True) == 1
    assert len(store.list_audit_checkpoints()) == 1


# --- properties ----------------------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20,
)
_names = st.text(alphabet=st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.dictionaries(_text, _json, max_size=6),
    actor=_names,
    subject=st.none() | _names,
    micros=st.integers(min_value=0, max_value=999_999),
    offset_min=st.integers(min_value=-14 * 60, max_value=14 * 60),
)
def test_any_json_data_round_trips_to_the_same_hash(
    store: Store, data: dict[str, Any], actor: str, subject: str | None, micros: int, offset_min: int
) -> None:
    tz = dt.timezone(dt.timedelta(minutes=offset_min))
    at = dt.datetime(2025, 7, 1, 12, 0, 0, micros, tzinfo=tz)
    kind = sorted(wire_audit.KINDS)[micros % len(wire_audit.KINDS)]
    [written] = store.append_audit([AuditEntry(at=at, kind=kind, actor=actor, subject=subject, data=data)])
    read = store.audit_head()
    assert read is not None
    assert read == written
    assert read.data_json == wire_audit.canonical_data(data)
    assert read.data == data
    assert read.at == at
    assert read.hash == wire_audit.record_hash(read.prev_hash, read.seq, at, kind, actor, subject, read.data_json)
    assert (read.actor, read.subject) == (actor, subject)
