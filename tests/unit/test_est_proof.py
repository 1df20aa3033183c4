"""The EST proof format (ADR 0008): the header's parser on any input (Hypothesis), the signed
message, km's nonces (bound to a credential, fresh, km's own), and openssl making a proof."""

from __future__ import annotations

import base64
import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError, UntrustedError
from iotdlm.pki import est_proof
from iotdlm.pki.keys import Algorithm, generate_key, private_key_to_pem

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
KEY = b"k" * 32
FP = "ab" * 32


@given(st.text(max_size=900))
def test_parse_any_text_is_a_proof_or_a_bad_request(text: str) -> None:
    error: BadRequestError | None = None
    try:
        proof = est_proof.parse(text)
    except BadRequestError as exc:
        error = exc
    if error is not None:
        assert "Iotdlm-Est-Proof" in error.message
        assert error.field == "proof"
    else:
        assert len(proof.nonce) == est_proof.NONCE_CHARS
        assert proof.signature


@given(st.binary(min_size=1, max_size=512), st.binary(min_size=16, max_size=16))
def test_parse_reads_what_make_writes(signature: bytes, rand: bytes) -> None:
    nonce = est_proof.issue_nonce(KEY, FP, NOW, rand=rand)
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        proof = est_proof.parse(f"{nonce} {encode(signature).decode()}")
        assert proof == est_proof.Proof(nonce, signature)


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=0, max_size=80))
def test_nonce_expiry_refuses_what_km_did_not_issue(nonce: str) -> None:
    with pytest.raises(UntrustedError):
        est_proof.nonce_expiry(nonce, KEY, FP, NOW)


def test_a_nonce_is_km_s_for_one_credential_and_fresh_for_five_minutes() -> None:
    nonce = est_proof.issue_nonce(KEY, FP, NOW)
    assert est_proof.nonce_expiry(nonce, KEY, FP, NOW + dt.timedelta(minutes=4)) == NOW + est_proof.NONCE_TTL
    with pytest.raises(UntrustedError, match="expired"):
        est_proof.nonce_expiry(nonce, KEY, FP, NOW + est_proof.NONCE_TTL)
    with pytest.raises(UntrustedError, match="client certificate presented"):
        est_proof.nonce_expiry(nonce, KEY, "cd" * 32, NOW)
    with pytest.raises(UntrustedError, match="not one km issued"):
        est_proof.nonce_expiry(nonce, b"other key" * 4, FP, NOW)
    with pytest.raises(UntrustedError, match="expired"):  # from km's future: a clock gone wrong
        est_proof.nonce_expiry(nonce, KEY, FP, NOW - dt.timedelta(minutes=2))
    assert est_proof.issue_nonce(KEY, FP, NOW) != nonce  # random part


@pytest.mark.parametrize("alg", list(Algorithm))
def test_verify_binds_key_operation_nonce_and_new_key(alg: Algorithm) -> None:
    current, new, other = generate_key(alg), generate_key(Algorithm.P256), generate_key(Algorithm.P256)
    nonce = est_proof.issue_nonce(KEY, FP, NOW)
    proof = est_proof.parse(est_proof.make(current, "simpleenroll", nonce, new.public_key()))
    est_proof.verify(proof, current.public_key(), "simpleenroll", new.public_key())
    for key, op, new_key in (
        (other.public_key(), "simpleenroll", new.public_key()),
        (current.public_key(), "simplereenroll", new.public_key()),
        (current.public_key(), "simpleenroll", other.public_key()),
    ):
        with pytest.raises(UntrustedError, match="does not verify"):
            est_proof.verify(proof, key, op, new_key)
    moved = est_proof.Proof(est_proof.issue_nonce(KEY, FP, NOW), proof.signature)
    with pytest.raises(UntrustedError):
        est_proof.verify(moved, current.public_key(), "simpleenroll", new.public_key())


def test_message_is_the_documented_text() -> None:
    new = generate_key(Algorithm.P256)
    text = est_proof.message("simplereenroll", "N" * 54, new.public_key()).decode()
    assert text == f"iotdlm-est-proof-v1\nsimplereenroll\n{'N' * 54}\n{est_proof.spki_sha256(new.public_key())}\n"
    with pytest.raises(ValueError, match="unknown EST operation"):
        est_proof.message("enroll", "N" * 54, new.public_key())


@pytest.mark.openssl
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_makes_a_proof_km_accepts(tmp_path: Path) -> None:
    """The operator's recipe (docs/operations.md): openssl hashes the SPKI and signs the message."""
    tmp = tmp_path
    current, new = generate_key(Algorithm.P256), generate_key(Algorithm.P256)
    (tmp / "k.pem").write_bytes(private_key_to_pem(current, None))
    (tmp / "new.pub").write_bytes(
        new.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    spki = subprocess.run(
        ["bash", "-c", "openssl pkey -pubin -in new.pub -outform DER | openssl dgst -sha256 -r | cut -d' ' -f1"],
        cwd=tmp, capture_output=True, check=True,
    ).stdout.decode().strip()  # fmt: skip
    assert spki == est_proof.spki_sha256(new.public_key())
    nonce = est_proof.issue_nonce(KEY, FP, NOW)
    (tmp / "m").write_bytes(est_proof.message("simpleenroll", nonce, new.public_key()))
    sig = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", "k.pem", "m"], cwd=tmp, capture_output=True, check=True
    ).stdout
    proof = est_proof.parse(f"{nonce} {base64.b64encode(sig).decode()}")
    est_proof.verify(proof, current.public_key(), "simpleenroll", new.public_key())
