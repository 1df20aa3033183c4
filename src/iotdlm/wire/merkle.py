"""RFC 9162 Merkle trees over the audit log (pure): tree heads and consistency proofs.

Leaves are the audit records' hashes (hex, as stored); a leaf is hashed as
``SHA-256(0x00 || bytes.fromhex(record hash))`` and an inner node as ``SHA-256(0x01 || left || right)``
(RFC 9162 section 2.1.1). :func:`root` is the Merkle Tree Hash MTH(D[n]); :func:`consistency_proof`
and :func:`verify_consistency` are RFC 9162 sections 2.1.4.1 and 2.1.4.2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

#: MTH of the empty tree: SHA-256 of nothing
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def root_of_leaf_hashes(leaves: Sequence[bytes]) -> bytes:
    """MTH over already leaf-hashed entries (iterative, O(n) time, O(log n) memory)."""
    cr = CompactRange()
    for h in leaves:
        cr.append(h)
    return cr.root()


def root(entries: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of the raw entries (RFC 9162 2.1.1)."""
    return root_of_leaf_hashes([leaf_hash(e) for e in entries])


def consistency_proof(m: int, entries: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) (RFC 9162 2.1.4.1): shows the tree of the first ``m`` entries is a prefix of
    the tree of all ``n``. Empty for m == n; ``0 < m <= n`` is required."""
    n = len(entries)
    if not 0 < m <= n:
        raise ValueError(f"a consistency proof needs 0 < m <= n, got m={m}, n={n}")
    return _subproof(m, [leaf_hash(e) for e in entries], True)


def _subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root_of_leaf_hashes(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), root_of_leaf_hashes(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), root_of_leaf_hashes(leaves[:k])]


def verify_consistency(m: int, n: int, first: bytes, second: bytes, proof: Sequence[bytes]) -> bool:
    """True if ``proof`` shows that the tree of size ``m`` with root ``first`` is a prefix of the
    tree of size ``n`` with root ``second`` (RFC 9162 2.1.4.2)."""
    if not 0 < m <= n:
        return False
    if m == n:
        return not proof and first == second
    path = list(proof)
    if m & (m - 1) == 0:  # m is a power of two: the first tree is a complete subtree
        path.insert(0, first)
    if not path:
        return False
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn != 0 and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first and sr == second


class CompactRange:
    """The Merkle tree head of a growing list of leaves in O(log n) memory: append leaf hashes one
    by one, ask :meth:`root` at any size (RFC 9162 2.1.1 over the leaves so far)."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[tuple[int, bytes]] = []

    def append(self, leaf: bytes) -> None:
        node, height = leaf, 0
        while self._stack and self._stack[-1][0] == height:
            node = node_hash(self._stack.pop()[1], node)
            height += 1
        self._stack.append((height, node))
        self.size += 1

    def copy(self) -> CompactRange:
        out = CompactRange()
        out.size, out._stack = self.size, list(self._stack)
        return out

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _height, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node
