"""RFC 9162 Merkle tree heads and consistency proofs (iotdlm.wire.merkle), against the RFC 6962
reference vectors of the Certificate Transparency implementations and by properties."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.wire import merkle

LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip


@pytest.mark.parametrize("n", range(len(ROOTS)))
def test_tree_heads_match_the_reference(n: int) -> None:
    assert merkle.root(LEAVES[:n]).hex() == ROOTS[n]


@pytest.mark.parametrize(("m", "n", "proof"), CONSISTENCY)
def test_consistency_proofs_match_the_reference(m: int, n: int, proof: list[str]) -> None:
    got = merkle.consistency_proof(m, LEAVES[:n])
    assert [p.hex() for p in got] == proof
    first, second = bytes.fromhex(ROOTS[m]), bytes.fromhex(ROOTS[n])
    assert merkle.verify_consistency(m, n, first, second, got)
    assert not merkle.verify_consistency(m, n, second if m != n else hashlib.sha256(b"x").digest(), second, got)


def test_a_proof_needs_a_non_empty_prefix() -> None:
    with pytest.raises(ValueError, match="0 < m <= n"):
        merkle.consistency_proof(0, LEAVES)
    with pytest.raises(ValueError, match="0 < m <= n"):
        merkle.consistency_proof(9, LEAVES)
    assert not merkle.verify_consistency(0, 3, merkle.EMPTY_ROOT, merkle.root(LEAVES[:3]), [])


def _reference_root(entries: list[bytes]) -> bytes:
    """RFC 9162 2.1.1 written recursively, as the RFC does."""
    n = len(entries)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + entries[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + _reference_root(entries[:k]) + _reference_root(entries[k:])).digest()


_entries = st.lists(st.binary(max_size=8), min_size=1, max_size=70)


@settings(max_examples=150, deadline=None)
@given(_entries, st.data())
def test_every_prefix_is_proved_consistent_and_a_rewritten_one_is_not(
    entries: list[bytes], data: st.DataObject
) -> None:
    n = len(entries)
    m = data.draw(st.integers(1, n))
    assert merkle.root(entries) == _reference_root(entries)
    cr = merkle.CompactRange()
    for k, e in enumerate(entries, 1):
        cr.append(merkle.leaf_hash(e))
        if k in (1, m, n):
            assert cr.root() == _reference_root(entries[:k])
    proof = merkle.consistency_proof(m, entries)
    first, second = merkle.root(entries[:m]), merkle.root(entries)
    assert merkle.verify_consistency(m, n, first, second, proof)
    # a rewritten record inside the old tree, a wrong size or a tampered proof: all rejected
    i = data.draw(st.integers(0, m - 1))
    rewritten = [*entries[:i], entries[i] + b"!", *entries[i + 1 :]]
    assert not merkle.verify_consistency(m, n, merkle.root(rewritten[:m]), second, proof)
    assert not merkle.verify_consistency(m, n, first, merkle.root(rewritten), proof)
    if m < n:
        j = data.draw(st.integers(0, len(proof) - 1))
        bad = [*proof[:j], hashlib.sha256(proof[j]).digest(), *proof[j + 1 :]]
        assert not merkle.verify_consistency(m, n, first, second, bad)
        assert not merkle.verify_consistency(m, n, first, second, proof[:-1])
