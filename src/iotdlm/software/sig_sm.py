"""``sig_sm``: sm's signature over the metadata bundle and the image (Fig. 8).

Hash-then-sign, so a 1 GiB image never sits in memory::

    digest = SHA-256(meta || sw)            # meta = the bundle bytes (plaintext), sw = image
    sig_sm = iotdlm.pki.keys.sign_bytes(sk_sm, digest)

``sign_bytes`` over the 32-byte digest means: ECDSA P-256 with SHA-256 (P-384: SHA-384) over the
digest, DER-encoded (r, s); Ed25519 over the digest; RSA PKCS#1 v1.5 with SHA-256 over the digest.
The ``sig_sm`` file holds the raw signature bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from iotdlm.pki.keys import PrivateKey, sign_bytes
from iotdlm.software.hashing import Hasher, stream_image

#: longer than any signature sm makes
MAX_SIG_BYTES = 1024


def sig_sm_hasher(meta: bytes) -> Hasher:
    """A SHA-256 already fed with ``meta``: feed it the image, then :func:`sign_sig_sm` its digest."""
    h = hashlib.sha256()
    h.update(meta)
    return h


def sign_sig_sm(sk_sm: PrivateKey, digest: bytes) -> bytes:
    """``sig_sm`` = sign(sk_sm, SHA-256(meta || sw)); ``digest`` is that SHA-256 (32 bytes)."""
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError("sig_sm signs the 32-byte SHA-256 of meta || sw")
    return sign_bytes(sk_sm, digest)


def compute_sig_sm(sk_sm: PrivateKey, meta: bytes, image: Path | BinaryIO) -> bytes:
    """Sign ``meta || image`` (streamed) as sm does; for tools and tests."""
    h = sig_sm_hasher(meta)
    stream_image(image, [h.update])
    return sign_sig_sm(sk_sm, h.digest())


__all__ = ["MAX_SIG_BYTES", "compute_sig_sm", "sig_sm_hasher", "sign_sig_sm"]
