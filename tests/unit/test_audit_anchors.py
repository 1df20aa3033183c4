"""Issue 11 section 2: tampering by someone who can write the database -- cutting off the newest
records with their checkpoints, emptying the log, deleting a record in the middle and recomputing
the chain -- is caught by the signed tree heads km also keeps outside the database (the anchor
folder). Each attack first passes a check of the database alone (what `audit verify` did before),
then fails against the anchors with a message naming what is missing."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError
from iotdlm.km import audit as km_audit
from iotdlm.store import Store
from iotdlm.wire import audit as fmt
from iotdlm.wire import merkle
from tests.helpers import NOW, make_pki

PKI = make_pki()
KM = PKI.module("km")
EVERY = dt.timedelta(minutes=1)


def _key(fp: str) -> object:
    return KM.cert.public_key()


def _log(tmp_path: Path) -> tuple[Store, Path, Path]:
    """15 records (every third a revocation), checkpoints at 5, 10 and 15, each also in the anchors."""
    db = tmp_path / "audit.db"
    anchors = tmp_path / "anchors"
    store = Store.open(f"sqlite:///{db}")
    for i in range(1, 16):
        kind = fmt.REVOCATION if i % 3 == 0 else fmt.ISSUANCE
        store.append_audit([km_audit.entry(NOW + dt.timedelta(seconds=i), kind, "admin", f"serial-{i}", n=i)])
        if i % 5 == 0:
            at = NOW + dt.timedelta(seconds=i, milliseconds=500)
            assert km_audit.checkpoint(store, KM.key, KM.cert, at, anchor_dir=anchors) is not None
    return store, db, anchors


def _verify(store: Store, anchors: Path | None, *, now: dt.datetime | None = None) -> km_audit.AuditReport:
    found = km_audit.read_anchor_dir(anchors)[0] if anchors else []
    return km_audit.verify(store, _key, anchors=found, now=now, checkpoint_every=EVERY)  # type: ignore[arg-type]


def test_an_untouched_log_is_intact_against_its_anchors(tmp_path: Path) -> None:
    store, _db, anchors = _log(tmp_path)
    assert sorted(p.name for p in anchors.iterdir()) == [f"tree-head-{n:012d}.json" for n in (5, 10, 15)]
    report = _verify(store, anchors, now=NOW + dt.timedelta(seconds=30))
    assert report.ok, report.problems
    assert report.warnings == []
    assert report.newest is not None
    assert report.newest[0] == 15
    (cp15,) = [cp for cp in store.list_audit_checkpoints() if cp.seq == 15]
    assert cp15.root == km_audit.tree_head(store, 15)
    assert cp15.root == merkle.root([bytes.fromhex(r.hash) for r in store.iter_audit()]).hex()


def test_cutting_off_the_newest_records_with_their_checkpoints(tmp_path: Path) -> None:
    store, db, anchors = _log(tmp_path)
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM audit_log WHERE seq > 12")
        c.execute("DELETE FROM audit_checkpoints WHERE seq > 12")
    alone = _verify(store, None)
    assert alone.ok  # the database alone cannot see it
    assert any("no checkpoint kept outside the database" in w for w in alone.warnings)
    report = _verify(store, anchors)
    assert not report.ok
    assert report.first_bad_seq == 13
    assert any(
        "the store has 12 records; the checkpoint of" in p
        and "tree-head-000000000015.json commits to 15: 3 records after #12 were deleted" in p
        for p in report.problems
    ), report.problems


def test_deleting_every_record_and_checkpoint(tmp_path: Path) -> None:
    store, db, anchors = _log(tmp_path)
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM audit_log")
        c.execute("DELETE FROM audit_checkpoints")
    assert _verify(store, None).ok
    report = _verify(store, anchors)
    assert not report.ok
    assert report.records == 0
    assert any("the store has 0 records" in p and "commits to 15: 15 records after #0" in p for p in report.problems)


def test_deleting_a_revocation_in_the_middle_and_recomputing_the_chain(tmp_path: Path) -> None:
    store, db, anchors = _log(tmp_path)
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT kind FROM audit_log WHERE seq = 6").fetchone() == ("revocation",)
        c.execute("DELETE FROM audit_log WHERE seq = 6")
        c.execute("DELETE FROM audit_checkpoints WHERE seq >= 6")
        prev = c.execute("SELECT hash FROM audit_log WHERE seq = 5").fetchone()[0]
        rows = c.execute("SELECT seq, kind, actor, subject, data FROM audit_log WHERE seq > 6 ORDER BY seq").fetchall()
        for old_seq, kind, actor, subject, data in rows:
            seq = old_seq - 1
            at = NOW + dt.timedelta(seconds=old_seq)
            h = fmt.record_hash(prev, seq, at, kind, actor, subject, data)
            c.execute("UPDATE audit_log SET seq = ?, prev_hash = ?, hash = ? WHERE seq = ?", (seq, prev, h, old_seq))
            prev = h
    assert [r.seq for r in store.iter_audit()] == list(range(1, 15))
    alone = _verify(store, None)
    assert alone.ok, alone.problems  # a consistent, shorter chain with the checkpoint at 5 still good
    report = _verify(store, anchors)
    assert not report.ok
    assert any("record 10 differs from what the checkpoint of" in p and "rewritten chain" in p for p in report.problems)
    assert any("the store has 14 records" in p and "1 record after #14 was deleted" in p for p in report.problems)


def test_a_forged_anchor_file_is_refused(tmp_path: Path) -> None:
    store, _db, anchors = _log(tmp_path)
    path = anchors / "tree-head-000000000015.json"
    th = fmt.decode_tree_head(path.read_bytes())
    (anchors / "tree-head-000000000020.json").write_bytes(fmt.encode_tree_head(msgspec.structs.replace(th, size=20)))
    (anchors / "tree-head-000000000021.json").write_bytes(b"{not json")
    found, bad = km_audit.read_anchor_dir(anchors)
    assert len(found) == 4
    assert len(bad) == 1
    assert "tree-head-000000000021.json is not a signed tree head (not JSON)" in bad[0]
    report = km_audit.verify(store, _key, anchors=found)  # type: ignore[arg-type]
    assert not report.ok
    assert any("tree-head-000000000020.json (record 20) has a bad signature" in p for p in report.problems)


def test_an_anchor_file_is_never_rewritten(tmp_path: Path) -> None:
    _store, _db, anchors = _log(tmp_path)
    path = anchors / "tree-head-000000000015.json"
    before = path.read_bytes()
    th = fmt.decode_tree_head(before)
    km_audit.write_anchor(anchors, msgspec.structs.replace(th, at=th.at + dt.timedelta(hours=1)))
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("late", "words"),
    [
        (dt.timedelta(hours=3), "nothing was logged since, or the newest records were deleted"),
        (dt.timedelta(days=3), "3 days old"),
    ],
)
def test_a_newest_checkpoint_older_than_the_schedule_is_reported(
    tmp_path: Path, late: dt.timedelta, words: str
) -> None:
    store, _db, anchors = _log(tmp_path)
    cp_at = NOW + dt.timedelta(seconds=15, milliseconds=500)
    assert _verify(store, anchors, now=cp_at + dt.timedelta(seconds=90)).warnings == []
    report = _verify(store, anchors, now=cp_at + late)
    assert report.ok  # old is not damaged: it is reported, for a person to look
    assert any("the newest checkpoint (record 15" in w and "km takes one every 60 s" in w for w in report.warnings)
    assert any(words in w for w in report.warnings), report.warnings


def test_records_left_unsigned_past_the_schedule_are_named(tmp_path: Path) -> None:
    store, _db, anchors = _log(tmp_path)
    store.append_audit([km_audit.entry(NOW + dt.timedelta(hours=2), fmt.ISSUANCE, "admin", "late")])
    report = _verify(store, anchors, now=NOW + dt.timedelta(hours=2, minutes=5))
    assert any("records 16..16 are not covered (is km's schedule running?)" in w for w in report.warnings)


def test_a_checkpoint_from_before_tree_heads_still_verifies(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'old.db'}")
    (rec,) = store.append_audit([km_audit.entry(NOW, fmt.ISSUANCE, "admin", "x")])
    from iotdlm.pki.ca import fingerprint
    from iotdlm.pki.keys import sign_bytes
    from iotdlm.store import AuditCheckpoint

    sig = sign_bytes(KM.key, fmt.checkpoint_message(1, rec.hash))
    store.add_audit_checkpoint(
        AuditCheckpoint(seq=1, hash=rec.hash, at=NOW, signer=fingerprint(KM.cert), signature=sig)
    )
    assert km_audit.verify(store, _key).ok  # type: ignore[arg-type]
    with sqlite3.connect(tmp_path / "old.db") as c:
        c.execute("UPDATE audit_checkpoints SET signature = X'00'")
    assert not km_audit.verify(store, _key).ok  # type: ignore[arg-type]


# --- the tree head's format (anchor files, cm's copy) ------------------------------------------------------

_hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_heads = st.builds(
    fmt.TreeHead,
    size=st.integers(1, 2**63 - 1),
    hash=_hex64,
    root=_hex64,
    at=st.datetimes(timezones=st.just(dt.UTC)),
    signer=st.text(alphabet="0123456789abcdef", max_size=64),
    signature=st.binary(min_size=1, max_size=80).map(bytes.hex),
)


@settings(max_examples=80, deadline=None)
@given(_heads)
def test_tree_heads_round_trip(th: fmt.TreeHead) -> None:
    assert fmt.decode_tree_head(fmt.encode_tree_head(th)) == th


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        _heads.map(lambda t: json.loads(fmt.encode_tree_head(t))).flatmap(
            lambda d: st.sampled_from(sorted(d)).map(lambda k: json.dumps({**d, k: 0}).encode())
        ),
    )
)
def test_anything_else_is_a_clear_refusal(data: bytes) -> None:
    with pytest.raises(BadRequestError) as exc:
        fmt.decode_tree_head(data, where="the file")
    assert exc.value.message.startswith("the file")
    assert "Traceback" not in exc.value.message


def test_kms_tree_cache_gives_the_same_heads_and_keeps_what_it_read(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    store = Store.open(f"sqlite:///{db}")
    cache = merkle.CompactRange()
    for i in range(1, 8):
        store.append_audit([km_audit.entry(NOW + dt.timedelta(seconds=i), fmt.ISSUANCE, "admin", f"s{i}")])
        if i in (3, 5):
            cp = km_audit.checkpoint(store, KM.key, KM.cert, NOW + dt.timedelta(seconds=i), cache=cache)
            assert cp is not None
            assert cp.root == km_audit.tree_head(store, i)
            assert cache.size == i
    # someone rewrites record 2 and the chain after it; km's cache still holds what it read
    with sqlite3.connect(db) as c:
        prev = c.execute("SELECT hash FROM audit_log WHERE seq = 1").fetchone()[0]
        for seq, _at, kind, actor, subject, data in c.execute(
            "SELECT seq, at, kind, actor, subject, data FROM audit_log WHERE seq >= 2 ORDER BY seq"
        ).fetchall():
            actor = "mallory" if seq == 2 else actor
            h = fmt.record_hash(prev, seq, NOW + dt.timedelta(seconds=seq), kind, actor, subject, data)
            c.execute("UPDATE audit_log SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?", (actor, prev, h, seq))
            prev = h
        c.execute("DELETE FROM audit_checkpoints")
    cp = km_audit.checkpoint(store, KM.key, KM.cert, NOW + dt.timedelta(seconds=8), cache=cache)
    assert cp is not None
    assert cp.root != km_audit.tree_head(store, 7)  # km signed the tree it had read, not the rewritten one
    report = km_audit.verify(store, _key)  # type: ignore[arg-type]
    assert any("records 1..7 do not reproduce the tree head" in p for p in report.problems), report.problems
