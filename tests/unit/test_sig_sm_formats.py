"""``sig_sm`` format 2 (ADR 0024): one hash pass signs; pm's Algorithm 1 verifies both formats.

Format 1 (what sm stored before ADR 0024) must stay readable: the other test files sign with
``compute_sig_sm`` (format 1) and verify with ``verify_software``; here the same store holds both,
format 2 is computed independently from its definition, and the two formats never verify as each other.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm import software
from iotdlm.clock import SystemClock
from iotdlm.errors import BadSignatureError, IotdlmError
from iotdlm.pki.keys import Algorithm, generate_key, verify_bytes
from iotdlm.repository import VendorRepository
from iotdlm.software.sig_sm import V2_TAG, is_v2, sig_sm_digest, verify_sig_sm
from tests.unit.test_software_check import bundle_of  # the bundle exactly as pm's tests build it

NOW = SystemClock().now().replace(microsecond=0)
DTYPE = "boardA"
IMAGE = os.urandom(200_000)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    """(image path, meta bundle, trusted root) of a release published by a real VendorRepository."""
    tmp = tmp_path_factory.mktemp("sigsm")
    repo = VendorRepository.init(tmp / "repo", now=NOW)
    image = tmp / "fw.bin"
    image.write_bytes(IMAGE)
    repo.publish(DTYPE, 3, image, now=NOW)
    return image, bundle_of(repo, DTYPE, f"{DTYPE}/fw.bin"), repo.trusted_root()


@pytest.mark.parametrize("alg", [Algorithm.P256, Algorithm.P384, Algorithm.ED25519, Algorithm.RSA3072])
def test_format_2_verifies_with_algorithm_1_for_every_key_type(
    published: tuple[Path, bytes, bytes], alg: Algorithm
) -> None:
    image, meta, root = published
    sk = generate_key(alg)
    sig = software.compute_sig_sm_v2(sk, meta, image)
    assert is_v2(sig)
    out = software.verify_software(image, meta, sig, sk.public_key(), root, dtype=DTYPE)
    assert out.sha256 == hashlib.sha256(IMAGE).hexdigest()
    # the definition, computed independently: sign_bytes over SHA-256(tag || SHA-256(sw) || meta)
    digest = hashlib.sha256(V2_TAG + hashlib.sha256(IMAGE).digest() + meta).digest()
    verify_bytes(sk.public_key(), sig[len(V2_TAG) :], digest)


def test_format_1_stays_readable_beside_format_2(published: tuple[Path, bytes, bytes]) -> None:
    image, meta, root = published
    sk = generate_key(Algorithm.P256)
    old = software.compute_sig_sm(sk, meta, image)
    assert not is_v2(old)
    for sig in (old, software.compute_sig_sm_v2(sk, meta, image)):
        assert software.verify_software(image, meta, sig, sk.public_key(), root, dtype=DTYPE).length == len(IMAGE)


def test_a_signature_of_one_format_never_verifies_as_the_other(published: tuple[Path, bytes, bytes]) -> None:
    image, meta, root = published
    sk = generate_key(Algorithm.P256)
    old = software.compute_sig_sm(sk, meta, image)
    new = software.compute_sig_sm_v2(sk, meta, image)
    for forged in (V2_TAG + old, new[len(V2_TAG) :]):
        with pytest.raises(BadSignatureError) as info:
            software.verify_software(image, meta, forged, sk.public_key(), root, dtype=DTYPE)
        assert info.value.field == "sig_sm"


def test_format_2_over_an_altered_image_or_metadata_fails(published: tuple[Path, bytes, bytes]) -> None:
    image, meta, root = published
    sk = generate_key(Algorithm.P256)
    sig = software.compute_sig_sm_v2(sk, meta, image)
    bad = bytearray(IMAGE)
    bad[7] ^= 1
    with pytest.raises(BadSignatureError) as info:
        software.verify_software(io.BytesIO(bytes(bad)), meta, sig, sk.public_key(), root, dtype=DTYPE)
    assert (info.value.field, "the image was altered" in info.value.message) == ("sig_sm", True)
    with pytest.raises(BadSignatureError):
        verify_sig_sm(
            sk.public_key(), sig, meta=meta + b" ", image_sha256=hashlib.sha256(IMAGE).digest(), v1_digest=None
        )


def test_format_1_without_its_digest_is_a_misuse() -> None:
    sk = generate_key(Algorithm.P256)
    with pytest.raises(ValueError, match="format-1"):
        verify_sig_sm(sk.public_key(), b"\x30\x00", meta=b"{}", image_sha256=bytes(32), v1_digest=None)
    with pytest.raises(ValueError, match="32-byte"):
        sig_sm_digest(b"{}", b"short")


@settings(max_examples=150, deadline=None)
@given(sig=st.binary(max_size=200), meta=st.binary(max_size=300))
def test_any_sig_sm_bytes_are_refused_with_an_error_not_a_crash(sig: bytes, meta: bytes) -> None:
    """Hostile sig_sm files of either format (tagged garbage included) fail cleanly."""
    sk = generate_key(Algorithm.P256)
    for candidate in (sig, V2_TAG + sig):
        with pytest.raises(BadSignatureError):
            verify_sig_sm(
                sk.public_key(),
                candidate,
                meta=meta,
                image_sha256=bytes(32),
                v1_digest=hashlib.sha256(meta).digest(),
            )
    with pytest.raises(IotdlmError):
        software.verify_software(io.BytesIO(b"image"), meta, V2_TAG + sig, sk.public_key(), b"{}", dtype=DTYPE)
