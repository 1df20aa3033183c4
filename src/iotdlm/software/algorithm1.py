"""Algorithm 1: pm verifies software from the local repository before flashing it.

sm's signature ``sig_sm`` with ``pk_sm`` first, then the repository's metadata with ``pk_repo``,
then the image against the signed target; the image is read once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
from tuf.api._payload import TargetFile, Targets
from tuf.api.metadata import Metadata

from iotdlm.errors import BadSignatureError, IotdlmError, TooLargeError
from iotdlm.pki.keys import PublicKey
from iotdlm.software.bundle import MAX_BUNDLE_BYTES, MetaBundle, decode_bundle
from iotdlm.software.hashing import Hasher, check_hashes, new_hasher, stream_image
from iotdlm.software.repo_metadata import verify_repo_metadata
from iotdlm.software.sig_sm import MAX_SIG_BYTES, is_v2, sig_sm_hasher, verify_sig_sm
from iotdlm.wire.software import check_dtype


def _peek_target(meta: bytes) -> TargetFile | None:
    """The target the (still untrusted) bundle names: only to choose which hashes to compute in the
    one pass over the image, and to say what looks altered when sig_sm fails. Nothing is decided on it."""
    try:
        bundle = msgspec.json.decode(meta, type=MetaBundle)
        role: Metadata[Any] = Metadata.from_bytes(bundle.role)
        return role.signed.targets.get(bundle.target_path) if isinstance(role.signed, Targets) else None
    except Exception:  # a hint only; step 2 reports the real problem
        return None


def _peek_algorithms(meta: bytes) -> set[str]:
    algs = {"sha256"}
    target = _peek_target(meta)
    if target is not None:
        for alg in target.hashes:
            try:
                new_hasher(alg)
            except IotdlmError:
                continue
            algs.add(alg)
    return algs


def _diagnose(meta: bytes, hashers: dict[str, Hasher], length: int) -> str:
    target = _peek_target(meta)
    if target is None:
        return "the metadata is not readable either: the metadata was altered"
    matches = target.length == length and all(
        alg in hashers and hashers[alg].hexdigest() == want.lower() for alg, want in target.hashes.items()
    )
    if matches:
        return "the image matches the metadata: sig_sm or the metadata was altered"
    return "the image does not match the metadata's hash: the image was altered"


@dataclass(frozen=True)
class VerifiedSoftware:
    """What Algorithm 1 established: sm signed this image and metadata, and the repository signed
    this image for ``dtype`` at ``release_counter``."""

    dtype: str
    release_counter: int
    target_path: str
    length: int
    sha256: str
    hashes: dict[str, str]
    custom: dict[str, Any]


def verify_software(
    image: Path | BinaryIO,
    meta: bytes,
    sig_sm: bytes,
    pk_sm: PublicKey,
    trusted_root: bytes,
    *,
    dtype: str,
) -> VerifiedSoftware:
    """Algorithm 1: verify software from the local repository before flashing it, in the paper's order.

    1. ``sig_sm`` with ``pk_sm`` over meta and sw (either format of :mod:`.sig_sm`). Failure raises
       BadSignatureError with ``field="sig_sm"``: sm's signature failed -- the local repository was
       altered or sm is compromised; pm must halt and raise an alarm.
    2. ``meta`` (the plaintext bundle) with ``pk_repo``: the pinned ``trusted_root`` (rotations
       followed through the bundle's root history), the top-level targets, the ``dtype-D`` role, the
       target with ``custom.hardware_id == dtype`` (:func:`verify_repo_metadata`); ``field="meta_repo"``.
    3. The image's length and hashes against the signed target; ``field="image"``.

    Expiry is NOT checked: the factory may be offline for days between sm's download and pm's
    flashing, and sm checked freshness (timestamp, snapshot, targets, role expiry; rollback of
    metadata versions) when it downloaded. Neither are release counters compared with what a device
    runs: that is pm's policy, with ``release_counter`` of the result.

    The image is read once (step 1's digest and step 3's hashes together); the decisions are taken
    in the order above. ``image`` may be a path or a binary file object positioned at its start.
    """
    check_dtype(dtype)
    if len(sig_sm) > MAX_SIG_BYTES:
        raise TooLargeError(f"sig_sm of {len(sig_sm)} bytes is not a signature", field="sig_sm")
    if len(meta) > MAX_BUNDLE_BYTES:
        raise TooLargeError(f"metadata bundle of {len(meta)} bytes exceeds {MAX_BUNDLE_BYTES}", field="meta_repo")
    # format 2 signs over the image's SHA-256, computed anyway for step 3; format 1 needs a second hash
    sig_h = None if is_v2(sig_sm) else sig_sm_hasher(meta)
    hashers = {alg: new_hasher(alg) for alg in sorted(_peek_algorithms(meta))}
    sinks: list[Callable[[bytes], object]] = [h.update for h in hashers.values()]
    length = stream_image(image, sinks if sig_h is None else [sig_h.update, *sinks])

    # step 1: sm's signature over meta and sw
    try:
        verify_sig_sm(
            pk_sm,
            sig_sm,
            meta=meta,
            image_sha256=hashers["sha256"].digest(),
            v1_digest=None if sig_h is None else sig_h.digest(),
        )
    except BadSignatureError:
        raise BadSignatureError(
            "sm's signature sig_sm over the metadata and image does not verify with pk_sm: the local repository "
            f"was altered or sm is compromised; halt ({_diagnose(meta, hashers, length)})",
            field="sig_sm",
        ) from None

    # step 2: the repository's metadata with pk_repo
    bundle = decode_bundle(meta)
    target = verify_repo_metadata(bundle, trusted_root, dtype=dtype)

    # step 3: the image against the signed target
    observed = {alg: h.hexdigest() for alg, h in hashers.items()}
    for alg in target.hashes:
        if alg not in observed:  # the one pass computed every supported algorithm the target lists
            new_hasher(alg)  # UnsupportedError
            raise RuntimeError(f"hash {alg} was not computed")
    check_hashes(target.hashes, observed, target.length, length)
    sha = observed["sha256"]
    return VerifiedSoftware(
        dtype=dtype,
        release_counter=target.release_counter,
        target_path=target.target_path,
        length=length,
        sha256=sha,
        hashes=dict(target.hashes),
        custom=target.custom,
    )


__all__ = ["VerifiedSoftware", "verify_software"]
