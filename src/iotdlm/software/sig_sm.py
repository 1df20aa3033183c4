"""``sig_sm``: sm's signature over the metadata bundle and the image (Fig. 8).

Hash-then-sign, so a 1 GiB image never sits in memory. Two formats (ADR 0024); sm writes format 2,
pm verifies both (versions stored before format 2 stay readable).

Format 2 (the ``sig_sm`` file starts with :data:`V2_TAG`), one pass over the image: the SHA-256 of
the image that Algorithm 2 checks against the repository's signed hash is the one signed::

    digest = SHA-256(V2_TAG || SHA-256(sw) || meta)     # meta = the bundle bytes (plaintext)
    sig_sm = V2_TAG || iotdlm.pki.keys.sign_bytes(sk_sm, digest)

Format 1 (any other ``sig_sm`` file; what sm wrote until ADR 0024), a second hash pass::

    digest = SHA-256(meta || sw)
    sig_sm = iotdlm.pki.keys.sign_bytes(sk_sm, digest)

``sign_bytes`` over the 32-byte digest means: ECDSA P-256 with SHA-256 (P-384: SHA-384) over the
digest, DER-encoded (r, s); Ed25519 over the digest; RSA PKCS#1 v1.5 with SHA-256 over the digest.
The tag both marks the format and separates the two domains: a format-2 digest starts its hashed
input with the tag, which no bundle (JSON, starting with ``{``) does, so no signature of one format
verifies as the other. A format-1 file starting with the 17-byte tag by chance (a raw Ed25519 or RSA
signature, odds 2^-136) would fail verification, never pass a wrong one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from iotdlm.pki.keys import PrivateKey, PublicKey, sign_bytes, verify_bytes
from iotdlm.software.hashing import Hasher, stream_image

#: longer than any signature sm makes (the tag included)
MAX_SIG_BYTES = 1024
#: first bytes of a format-2 ``sig_sm`` file, and first bytes of what its digest hashes
V2_TAG = b"iotdlm sig_sm v2\n"
_SHA256_BYTES = 32


def sig_sm_hasher(meta: bytes) -> Hasher:
    """Format 1: a SHA-256 already fed with ``meta``: feed it the image, then sign its digest."""
    h = hashlib.sha256()
    h.update(meta)
    return h


def sign_sig_sm(sk_sm: PrivateKey, digest: bytes) -> bytes:
    """Format 1: ``sig_sm`` = sign(sk_sm, SHA-256(meta || sw)); ``digest`` is that SHA-256 (32 bytes)."""
    if len(digest) != _SHA256_BYTES:
        raise ValueError("sig_sm signs the 32-byte SHA-256 of meta || sw")
    return sign_bytes(sk_sm, digest)


def sig_sm_digest(meta: bytes, image_sha256: bytes) -> bytes:
    """Format 2: SHA-256(V2_TAG || SHA-256(sw) || meta), from the image's 32-byte SHA-256."""
    if len(image_sha256) != _SHA256_BYTES:
        raise ValueError("sig_sm format 2 signs over the 32-byte SHA-256 of the image")
    return hashlib.sha256(V2_TAG + image_sha256 + meta).digest()


def sign_sig_sm_v2(sk_sm: PrivateKey, meta: bytes, image_sha256: bytes) -> bytes:
    """Format 2 ``sig_sm`` (what sm stores) from ``meta`` and the image's 32-byte SHA-256."""
    return V2_TAG + sign_bytes(sk_sm, sig_sm_digest(meta, image_sha256))


def is_v2(sig_sm: bytes) -> bool:
    """Whether a ``sig_sm`` file is format 2 (else format 1)."""
    return sig_sm.startswith(V2_TAG)


def verify_sig_sm(
    pk_sm: PublicKey, sig_sm: bytes, *, meta: bytes, image_sha256: bytes, v1_digest: bytes | None
) -> None:
    """Verify either format; ``v1_digest`` (SHA-256(meta || sw)) is needed only for format 1.
    Raises BadSignatureError (or ValueError when a format-1 file comes without ``v1_digest``)."""
    if is_v2(sig_sm):
        verify_bytes(pk_sm, sig_sm[len(V2_TAG) :], sig_sm_digest(meta, image_sha256))
        return
    if v1_digest is None:
        raise ValueError("a format-1 sig_sm needs SHA-256(meta || sw)")
    verify_bytes(pk_sm, sig_sm, v1_digest)


def compute_sig_sm(sk_sm: PrivateKey, meta: bytes, image: Path | BinaryIO) -> bytes:
    """Format 1: sign ``meta || image`` (streamed) as sm did before ADR 0024; for tools and tests."""
    h = sig_sm_hasher(meta)
    stream_image(image, [h.update])
    return sign_sig_sm(sk_sm, h.digest())


def compute_sig_sm_v2(sk_sm: PrivateKey, meta: bytes, image: Path | BinaryIO) -> bytes:
    """Format 2: sign as sm does now (one SHA-256 pass over the streamed image); for tools and tests."""
    h = hashlib.sha256()
    stream_image(image, [h.update])
    return sign_sig_sm_v2(sk_sm, meta, h.digest())


__all__ = [
    "MAX_SIG_BYTES",
    "V2_TAG",
    "compute_sig_sm",
    "compute_sig_sm_v2",
    "is_v2",
    "sig_sm_digest",
    "sig_sm_hasher",
    "sign_sig_sm",
    "sign_sig_sm_v2",
    "verify_sig_sm",
]
