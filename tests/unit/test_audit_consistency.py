"""Served consistency proofs (issue 11 section 2, docs/adr/0005-audit-anchors.md): km's proof
between two sizes of the audit log, the query cm parses for ``GET /audit/consistency``, and the
wire form of requests and proofs. Hostile inputs get a clear BadRequestError, never a traceback."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError, ConflictError
from iotdlm.km import audit as km_audit
from iotdlm.store import Store
from iotdlm.wire import audit as fmt
from iotdlm.wire import merkle
from tests.helpers import NOW, make_pki

PKI = make_pki()
KM = PKI.module("km")


def _log(tmp_path: Path, n: int = 15) -> tuple[Store, Path]:
    db = tmp_path / "audit.db"
    store = Store.open(f"sqlite:///{db}")
    for i in range(1, n + 1):
        store.append_audit([km_audit.entry(NOW + dt.timedelta(seconds=i), fmt.ISSUANCE, "admin", f"s{i}", n=i)])
    assert km_audit.checkpoint(store, KM.key, KM.cert, NOW + dt.timedelta(seconds=n + 1)) is not None
    return store, db


def test_every_proof_km_serves_verifies_between_its_tree_heads(tmp_path: Path) -> None:
    store, _db = _log(tmp_path)
    roots = {m: bytes.fromhex(km_audit.tree_head(store, m)) for m in range(1, 16)}
    for m in range(1, 16):
        for n in range(m, 16):
            p = km_audit.consistency(store, m, n)
            assert (p.first, p.second) == (m, n)
            proof = [bytes.fromhex(h) for h in p.proof]
            assert merkle.verify_consistency(m, n, roots[m], roots[n], proof), (m, n)
            if m < n:  # and it proves nothing about another first tree
                assert not merkle.verify_consistency(m, n, roots[n], roots[n], proof), (m, n)


def test_a_proof_from_a_rewritten_store_fails_against_the_head_kept_before(tmp_path: Path) -> None:
    store, db = _log(tmp_path)
    kept = bytes.fromhex(km_audit.tree_head(store, 10))
    with sqlite3.connect(db) as c:  # record 4 rewritten and the chain recomputed
        prev = c.execute("SELECT hash FROM audit_log WHERE seq = 3").fetchone()[0]
        for seq, kind, actor, subject, data in c.execute(
            "SELECT seq, kind, actor, subject, data FROM audit_log WHERE seq >= 4 ORDER BY seq"
        ).fetchall():
            actor = "mallory" if seq == 4 else actor
            h = fmt.record_hash(prev, seq, NOW + dt.timedelta(seconds=seq), kind, actor, subject, data)
            c.execute("UPDATE audit_log SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?", (actor, prev, h, seq))
            prev = h
    now_root = bytes.fromhex(km_audit.tree_head(store, 15))
    p = km_audit.consistency(store, 10, 15)
    assert not merkle.verify_consistency(10, 15, kept, now_root, [bytes.fromhex(h) for h in p.proof])


@pytest.mark.parametrize(
    ("first", "second", "error", "words"),
    [
        (0, 5, BadRequestError, "first must be a record count from 1"),
        (6, 5, BadRequestError, "second must be at least first (6), not 5"),
        (1, 16, BadRequestError, "second=16 is beyond the newest signed tree head (15 records)"),
    ],
)
def test_sizes_out_of_range_are_refused(
    tmp_path: Path, first: int, second: int, error: type[Exception], words: str
) -> None:
    store, _db = _log(tmp_path)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        km_audit.consistency(store, first, second)


def test_no_signed_head_yet_and_deleted_records_are_named(tmp_path: Path) -> None:
    empty = Store.open(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(BadRequestError, match="no signed tree head yet"):
        km_audit.consistency(empty, 1, 1)
    store, db = _log(tmp_path)
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM audit_log WHERE seq > 12")
    with pytest.raises(ConflictError, match="the store holds 12 of the first 15 audit records"):
        km_audit.consistency(store, 5, 15)


# --- the query of GET /audit/consistency -------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2**63 - 1), st.integers(0, 2**40), st.booleans())
def test_a_well_formed_query_is_read_whatever_the_order(m: int, extra: int, swapped: bool) -> None:
    n = min(m + extra, 2**63 - 1)
    q = f"second={n}&first={m}" if swapped else f"first={m}&second={n}"
    assert fmt.parse_consistency_query(q) == (m, n)


_query_chars = st.sampled_from(list("first=second&0123456789%;+-. x\u0661\x00"))


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=300), st.text(_query_chars, max_size=60)))
def test_any_query_is_sizes_in_order_or_a_clear_refusal(query: str) -> None:
    try:
        m, n = fmt.parse_consistency_query(query)
    except BadRequestError as exc:
        message = exc.message
    else:
        assert 0 < m <= n < 2**63
        return
    assert message
    assert "Traceback" not in message


# --- the wire form of requests and proofs ---------------------------------------------------------------

_proofs = st.builds(
    fmt.ConsistencyProof,
    first=st.integers(1, 2**62),
    second=st.integers(2**62, 2**63 - 1),
    proof=st.lists(st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=fmt.MAX_PROOF_HASHES),
)


@settings(max_examples=100, deadline=None)
@given(_proofs)
def test_proofs_round_trip(p: fmt.ConsistencyProof) -> None:
    assert fmt.decode_consistency_proof(fmt.encode_consistency_proof(p)) == p


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda f, s, h: f'{{"first":{f},"second":{s},"proof":["{h}"]}}'.encode(),
            st.integers(-3, 3),
            st.integers(-3, 3),
            st.text(max_size=70),
        ),
    )
)
def test_anything_else_is_not_a_proof(data: bytes) -> None:
    try:
        p = fmt.decode_consistency_proof(data, where="cm's proof")
    except BadRequestError as exc:
        message = exc.message
    else:
        assert 0 < p.first <= p.second
        assert all(len(h) == 64 for h in p.proof)
        return
    assert message.startswith("cm's proof")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_a_consistency_request_is_checked(data: bytes) -> None:
    try:
        req = fmt.decode_consistency_request(data)
    except BadRequestError:
        return
    assert 0 < req.first <= req.second
