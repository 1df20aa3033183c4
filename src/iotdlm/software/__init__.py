"""Software in the local repository: the metadata bundle, ``sig_sm``, metadata at rest, Algorithm 1.

Pure (no I/O besides reading the image handed in). sm writes what is described here, pm checks it.
The messages sm and pm exchange about it are in :mod:`iotdlm.wire.software`.

- :mod:`.bundle` the metadata bundle ``meta_repo``; :mod:`.sig_sm` sm's signature;
  :mod:`.meta_enc` metadata at rest; :mod:`.hashing` hashing the image (Algorithm 2);
  :mod:`.repo_metadata` verifying the repository's TUF metadata with ``pk_repo`` (Algorithm 1, step 2);
  :mod:`.algorithm1` Algorithm 1 as pm runs it before flashing.

Each format is described, byte by byte, in its module: ``meta_repo`` in :mod:`.bundle`, ``sig_sm``
(Fig. 8) in :mod:`.sig_sm`, ``meta.enc`` (Section 5.2.4) in :mod:`.meta_enc`.
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
from iotdlm.software.sig_sm import (
    MAX_SIG_BYTES,
    compute_sig_sm,
    compute_sig_sm_v2,
    sig_sm_hasher,
    sign_sig_sm,
    sign_sig_sm_v2,
)

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
    "compute_sig_sm_v2",
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
    "sign_sig_sm_v2",
    "stream_image",
    "verify_repo_metadata",
    "verify_software",
]
