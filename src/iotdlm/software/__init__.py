"""Software in the local repository: the metadata bundle, ``sig_sm``, metadata at rest, Algorithm 1.

Pure (no I/O besides reading the image handed in). sm writes what is described here, pm checks it.
The messages sm and pm exchange about it are in :mod:`iotdlm.wire.software`.

- :mod:`.bundle` the metadata bundle ``meta_repo``; :mod:`.sig_sm` sm's signature;
  :mod:`.meta_enc` metadata at rest; :mod:`.hashing` hashing the image (Algorithm 2);
  :mod:`.repo_metadata` verifying the repository's TUF metadata with ``pk_repo`` (Algorithm 1, step 2);
  :mod:`.algorithm1` Algorithm 1 as pm runs it before flashing.

**The metadata bundle** (the paper's ``meta_repo``: what pm verifies with ``pk_repo``) is canonical
JSON, UTF-8, no whitespace, keys in this order (alphabetical)::

    {"dtype": "<D>",
     "format": "iotdlm.sm.meta/1",
     "role": "<base64 of the dtype-D delegated targets metadata, bytes as served by the repository>",
     "roots": ["<base64 of N.root.json>", ...],   # root history, ascending and contiguous, the
                                                  # last one is the root sm trusted at download
     "target_path": "<D>/<name>",
     "targets": "<base64 of the top-level targets metadata, bytes as served>"}

Base64 is standard with padding (msgspec's encoding of ``bytes``). :func:`decode_bundle` accepts
only the exact canonical encoding (it re-encodes and compares), so the bundle has one byte string
and ``meta || sw`` cannot be re-split into another valid (meta, sw) pair.

**sig_sm** (Fig. 8, hash-then-sign so a 1 GiB image never sits in memory)::

    digest = SHA-256(meta || sw)            # meta = the bundle bytes above (plaintext), sw = image
    sig_sm = iotdlm.pki.keys.sign_bytes(sk_sm, digest)

``sign_bytes`` over the 32-byte digest means: ECDSA P-256 with SHA-256 (P-384: SHA-384) over the
digest, DER-encoded (r, s); Ed25519 over the digest; RSA PKCS#1 v1.5 with SHA-256 over the digest.
The ``sig_sm`` file holds the raw signature bytes.

**meta.enc** (Section 5.2.4: metadata encrypted at rest, key shared only by sm and pm)::

    meta.enc = 0x01 || nonce (12 random bytes) || AES-256-GCM(key, nonce, meta, aad) (ciphertext || 16-byte tag)
    aad      = UTF-8 of f"{dtype}/{release_counter}"

The AAD binds the ciphertext to its place in the local repository: a meta.enc moved to another
dtype or version does not decrypt.
"""

from iotdlm.software.algorithm1 import VerifiedSoftware, verify_software
from iotdlm.software.bundle import BUNDLE_FORMAT, MAX_BUNDLE_BYTES, MAX_ROOTS, MetaBundle, decode_bundle, encode_bundle
from iotdlm.software.hashing import CHUNK, Hasher, check_hashes, new_hasher, stream_image
from iotdlm.software.meta_enc import KEY_BYTES, decrypt_meta, encrypt_meta
from iotdlm.software.repo_metadata import (
    VerifiedTarget,
    custom_fields,
    delegated_role,
    load_trusted_root,
    role_name,
    verify_repo_metadata,
)
from iotdlm.software.sig_sm import MAX_SIG_BYTES, compute_sig_sm, sig_sm_hasher, sign_sig_sm

__all__ = [
    "BUNDLE_FORMAT",
    "CHUNK",
    "KEY_BYTES",
    "MAX_BUNDLE_BYTES",
    "MAX_ROOTS",
    "MAX_SIG_BYTES",
    "Hasher",
    "MetaBundle",
    "VerifiedSoftware",
    "VerifiedTarget",
    "check_hashes",
    "compute_sig_sm",
    "custom_fields",
    "decode_bundle",
    "decrypt_meta",
    "delegated_role",
    "encode_bundle",
    "encrypt_meta",
    "load_trusted_root",
    "new_hasher",
    "role_name",
    "sig_sm_hasher",
    "sign_sig_sm",
    "stream_image",
    "verify_repo_metadata",
    "verify_software",
]
