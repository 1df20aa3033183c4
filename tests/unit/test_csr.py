"""PKCS#10 parsing: proof of possession, limits, hostile input."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError, BadSignatureError, IotdlmError, TooLargeError, UnsupportedError
from iotdlm.pki.csr import parse_csr
from iotdlm.pki.keys import Algorithm, generate_key
from tests.helpers import hashes, make_csr


@pytest.mark.parametrize("alg", list(Algorithm), ids=lambda a: a.value)
def test_valid_csr_parses(alg: Algorithm) -> None:
    key = generate_key(alg)
    req = parse_csr(make_csr(key, "dev-1"))
    assert req.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert req.public_key.public_bytes(*_spki()) == key.public_key().public_bytes(*_spki())


def _spki() -> tuple[serialization.Encoding, serialization.PublicFormat]:
    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def test_pem_csr_parses() -> None:
    key = generate_key(Algorithm.P256)
    csr = x509.load_der_x509_csr(make_csr(key, "dev-1"))
    assert parse_csr(csr.public_bytes(serialization.Encoding.PEM)).subject == csr.subject


@pytest.mark.parametrize("alg", list(Algorithm), ids=lambda a: a.value)
def test_the_request_der_is_the_csr_as_cryptography_encodes_it(alg: Algorithm) -> None:
    """parse_csr hands back the DER it was given (not encoded again): the same bytes cryptography
    writes, for DER in and for PEM in; DER with a byte after it, or a length in long form where
    short form fits, is no CSR (so the bytes given are always the canonical encoding)."""
    der = make_csr(generate_key(alg), "dev-1")
    canonical = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.DER)
    assert parse_csr(der).der == canonical
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    assert parse_csr(b"\n" + pem).der == canonical
    for bad in (der + b"\x00", _length_one_octet_longer(der)):
        with pytest.raises(BadRequestError):
            parse_csr(bad)


def _length_one_octet_longer(der: bytes) -> bytes:
    """The same DER element with its length in one octet more than it needs (valid BER, not DER)."""
    octets = der[1] & 0x7F if der[1] & 0x80 else 0
    length = int.from_bytes(der[2 : 2 + octets], "big") if octets else der[1]
    size = length.to_bytes(octets + 1, "big")
    return der[:1] + bytes([0x80 | len(size)]) + size + der[2 + octets :]


def test_tampered_csr_signature_is_refused() -> None:
    der = bytearray(make_csr(generate_key(Algorithm.P256), "dev-1"))
    der[-5] ^= 0x01  # inside the signature BIT STRING
    with pytest.raises((BadSignatureError, BadRequestError)):
        parse_csr(bytes(der))


def test_csr_signed_by_other_key_is_refused() -> None:
    """Swap the public key: the signature no longer proves possession."""
    k1, k2 = generate_key(Algorithm.P256), generate_key(Algorithm.P256)
    good = make_csr(k1, "dev-1")
    spki1 = k1.public_key().public_bytes(*_spki())
    spki2 = k2.public_key().public_bytes(*_spki())
    forged = good.replace(spki1, spki2)
    assert forged != good
    with pytest.raises(BadSignatureError):
        parse_csr(forged)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", BadRequestError),
        (b"garbage", BadRequestError),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n", BadRequestError),
        (b"\x30\x82\xff\xff" + b"\x00" * 10, BadRequestError),
        (b"0" * 20000, TooLargeError),
    ],
    ids=["empty", "garbage", "truncated-pem", "bad-der-length", "oversize"],
)
def test_bad_input(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_csr(data)


def test_unsupported_keys() -> None:
    k1 = ec.generate_private_key(ec.SECP256K1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(k1, hashes.SHA256())
    with pytest.raises(UnsupportedError):
        parse_csr(csr.public_bytes(serialization.Encoding.DER))
    k2 = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 -- the point: too short is refused
    csr2 = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(k2, hashes.SHA256())
    with pytest.raises(UnsupportedError):
        parse_csr(csr2.public_bytes(serialization.Encoding.DER))


@pytest.mark.openssl
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
@pytest.mark.parametrize("newkey", ["ec -pkeyopt ec_paramgen_curve:P-256", "ed25519", "rsa:3072"])
def test_openssl_req_csr_is_accepted(tmp_path: Path, newkey: str) -> None:
    key, csr = tmp_path / "k.pem", tmp_path / "r.csr"
    cmd = ["openssl", "req", "-new", "-nodes", "-subj", "/CN=dev-openssl", "-keyout", str(key), "-out", str(csr)]
    parts = newkey.split()
    cmd += ["-newkey", parts[0], *parts[1:]]
    subprocess.run(cmd, check=True, capture_output=True)
    req = parse_csr(csr.read_bytes())
    assert req.subject.rfc4514_string() == "CN=dev-openssl"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(IotdlmError):
        parse_csr(data)


_VALID = make_csr(generate_key(Algorithm.P256), "dev-h")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255), st.sampled_from(["flip", "cut", "insert"]))
def test_mutated_csr_never_crashes(pos: int, byte: int, how: str) -> None:
    data = bytearray(_VALID)
    if how == "flip":
        data[pos] = byte
    elif how == "cut":
        del data[pos:]
    else:
        data.insert(pos, byte)
    with contextlib.suppress(IotdlmError):
        parse_csr(bytes(data))
