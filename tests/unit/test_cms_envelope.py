"""Server-generated keys encrypted to the device (RFC 7030 4.4.2, ADR 0009): openssl decrypts what
km makes (the interop test), we decrypt what openssl makes, a key for one device does not open with
another's, Ed25519 is refused, and the device's parser turns any bytes into a key or a clear error
(Hypothesis)."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc5652, rfc5958

from iotdlm.errors import BadRequestError, UnsupportedError
from iotdlm.pki import cms_envelope
from iotdlm.pki.keys import Algorithm, PrivateKey, generate_key, private_key_to_pem

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
#: the recipient key types a device credential may have that can decrypt (Ed25519 cannot)
RECIPIENTS = [Algorithm.P256, Algorithm.P384, Algorithm.RSA3072]
_DAY = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def _cert(key: PrivateKey, serial: int = 4242) -> x509.Certificate:
    """A self-signed stand-in for the device's factory or operational certificate."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_DAY)
        .not_valid_after(_DAY + dt.timedelta(days=1))
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )


def _pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# one recipient of each kind, made once (RSA-3072 generation is slow)
_KEYS = {alg: generate_key(alg) for alg in RECIPIENTS}
_NEW = generate_key(Algorithm.P256)
_ENVELOPES = {alg: cms_envelope.encrypt_key(_pkcs8(_NEW), _cert(k)) for alg, k in _KEYS.items()}


@pytest.mark.parametrize("alg", RECIPIENTS)
@pytest.mark.parametrize("new_alg", [Algorithm.P256, Algorithm.ED25519, Algorithm.RSA3072])
def test_the_device_decrypts_the_exact_key(alg: Algorithm, new_alg: Algorithm) -> None:
    device = _KEYS[alg]
    new = _NEW if new_alg is Algorithm.P256 else generate_key(new_alg)
    envelope = cms_envelope.encrypt_key(_pkcs8(new), _cert(device))
    assert _pkcs8(new) not in envelope
    assert cms_envelope.decrypt_key(envelope, device) == _pkcs8(new)


@pytest.mark.parametrize("alg", RECIPIENTS)
def test_the_envelope_is_rfc5652_enveloped_data_of_an_asymmetric_key_package(alg: Algorithm) -> None:
    ci, rest = der_decoder.decode(_ENVELOPES[alg], asn1Spec=rfc5652.ContentInfo())
    assert not rest
    assert ci["contentType"] == rfc5652.id_envelopedData
    env, _ = der_decoder.decode(bytes(ci["content"]), asn1Spec=rfc5652.EnvelopedData())
    (ri,) = list(env["recipientInfos"])
    eci = env["encryptedContentInfo"]
    assert eci["contentType"] == rfc5958.id_ct_KP_aKeyPackage
    assert str(eci["contentEncryptionAlgorithm"]["algorithm"]) == "2.16.840.1.101.3.4.1.42"  # aes256-CBC
    if alg is Algorithm.RSA3072:
        assert (int(env["version"]), ri.getName()) == (0, "ktri")
        assert str(ri["ktri"]["keyEncryptionAlgorithm"]["algorithm"]) == "1.2.840.113549.1.1.7"  # RSAES-OAEP
        assert int(ri["ktri"]["rid"]["issuerAndSerialNumber"]["serialNumber"]) == 4242
    else:
        assert (int(env["version"]), ri.getName()) == (2, "kari")
        scheme = "1.3.132.1.11.1" if alg is Algorithm.P256 else "1.3.132.1.11.2"  # stdDH-sha256/384kdf
        assert str(ri["kari"]["keyEncryptionAlgorithm"]["algorithm"]) == scheme
        (rek,) = list(ri["kari"]["recipientEncryptedKeys"])
        assert int(rek["rid"]["issuerAndSerialNumber"]["serialNumber"]) == 4242


@pytest.mark.parametrize("alg", RECIPIENTS)
@pytest.mark.parametrize("other", RECIPIENTS)
def test_another_devices_key_does_not_open_it(alg: Algorithm, other: Algorithm) -> None:
    """Same algorithm, another key (the ECDH or OAEP check fails); or another kind of key (no
    recipient info for it, or a point not on its curve)."""
    key = generate_key(other) if other is alg else _KEYS[other]
    with pytest.raises(BadRequestError, match=r"not encrypted to this device's key|not a point on the device"):
        cms_envelope.decrypt_key(_ENVELOPES[alg], key)


def test_ed25519_credentials_are_refused_with_the_reason() -> None:
    device = generate_key(Algorithm.ED25519)
    with pytest.raises(UnsupportedError, match="signature-only key") as caught:
        cms_envelope.encrypt_key(_pkcs8(_NEW), _cert(device))
    assert 'est_serverkeygen = "off"' in caught.value.message
    with pytest.raises(BadRequestError, match="Ed25519 key cannot decrypt"):
        cms_envelope.decrypt_key(_ENVELOPES[Algorithm.P256], device)


def test_encrypt_takes_only_a_pkcs8_key() -> None:
    with pytest.raises(ValueError, match="PKCS#8"):
        cms_envelope.encrypt_key(b"\x30\x03\x02\x01\x00", _cert(_KEYS[Algorithm.P256]))


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    [
        ("empty", lambda b: b"", "not a CMS ContentInfo"),
        ("trailing data", lambda b: b + b"\x00", "trailing data"),
        ("truncated", lambda b: b[:-5], "not a CMS ContentInfo"),
        ("certs-only instead", lambda b: _certs_only(), "not an EnvelopedData"),
        ("too large", lambda b: b"\x30" * (cms_envelope.MAX_ENVELOPE_BYTES + 1), "exceeds"),
    ],
)  # fmt: skip
def test_hostile_envelopes_are_bad_requests(name: str, mutate: object, message: str) -> None:
    assert callable(mutate)
    with pytest.raises(BadRequestError, match=message):
        cms_envelope.decrypt_key(mutate(_ENVELOPES[Algorithm.P256]), _KEYS[Algorithm.P256])


def test_cbc_has_no_integrity_so_a_flipped_byte_gives_another_key() -> None:
    """AES-CBC does not authenticate: cm could flip bits and the device would decrypt garbage (or a
    padding error). That is why the EST client checks the decrypted key against the certificate's
    public key (ADR 0009); here, only that the result is never the key km made."""
    good = _ENVELOPES[Algorithm.P256]
    flipped = good[:-20] + bytes([good[-20] ^ 1]) + good[-19:]
    try:
        out = cms_envelope.decrypt_key(flipped, _KEYS[Algorithm.P256])
    except BadRequestError:
        return
    assert out != _pkcs8(_NEW)


def _certs_only() -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

    return pkcs7.serialize_certificates([_cert(_KEYS[Algorithm.P256])], Encoding.DER)


def test_an_rsa_pkcs1v15_envelope_is_refused() -> None:
    """cryptography's PKCS7EnvelopeBuilder makes PKCS #1 v1.5 key transport: the device refuses it
    (a padding oracle), saying so."""
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

    device = _KEYS[Algorithm.RSA3072]
    der = pkcs7.PKCS7EnvelopeBuilder().set_data(_pkcs8(_NEW)).add_recipient(_cert(device)).encrypt(Encoding.DER, [])
    with pytest.raises(BadRequestError, match="not RSAES-OAEP"):
        cms_envelope.decrypt_key(der, device)


_OUR_MESSAGES = (
    "the server-generated key",
    "an Ed25519",
    "RSAES",
    "key wrap",
    "the key agreement",
    "the AsymmetricKeyPackage",
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_are_a_key_or_a_bad_request(data: bytes) -> None:
    try:
        out = cms_envelope.decrypt_key(data, _KEYS[Algorithm.P256])
    except BadRequestError as exc:
        error: BadRequestError | None = exc
    else:  # pragma: no cover - random bytes do not decrypt
        error = None
        assert out
    if error is not None:
        assert error.message.startswith(_OUR_MESSAGES)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255))
def test_any_one_byte_change_is_the_key_or_a_bad_request(position: int, value: int) -> None:
    """Mutations of a real envelope reach deep into the parser (the recipient info, the KDF, the
    cipher) where random bytes do not."""
    good = _ENVELOPES[Algorithm.P256]
    i = position % len(good)
    data = good[:i] + bytes([value]) + good[i + 1 :]
    try:
        out = cms_envelope.decrypt_key(data, _KEYS[Algorithm.P256])
    except BadRequestError:
        return
    # a change that still decrypts (the recipient's name, which nothing checks) yields a PKCS#8 key
    key, rest = der_decoder.decode(out, asn1Spec=rfc5958.OneAsymmetricKey())
    assert not rest
    assert key["privateKey"].isValue


# --- interop: openssl cms ----------------------------------------------------------------------
@pytest.mark.openssl
@needs_openssl
@pytest.mark.parametrize("alg", RECIPIENTS)
def test_openssl_decrypts_what_km_makes(tmp_path: Path, alg: Algorithm) -> None:
    """``openssl cms -decrypt`` with the device's key recovers the key package: one
    OneAsymmetricKey, byte for byte the PKCS#8 key km made."""
    (tmp_path / "device.key").write_bytes(private_key_to_pem(_KEYS[alg], None))
    (tmp_path / "env.der").write_bytes(_ENVELOPES[alg])
    out = subprocess.run(
        ["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-inkey", "device.key", "-in", "env.der"],
        cwd=tmp_path, capture_output=True, check=True,
    ).stdout  # fmt: skip
    package, rest = der_decoder.decode(out, asn1Spec=rfc5958.AsymmetricKeyPackage())
    assert not rest
    assert len(package) == 1
    assert bytes(der_encoder.encode(package[0])) == _pkcs8(_NEW)
    # and openssl reads the key inside as the key km made
    (tmp_path / "key.der").write_bytes(bytes(der_encoder.encode(package[0])))
    pub = subprocess.run(
        ["openssl", "pkey", "-inform", "DER", "-in", "key.der", "-pubout", "-outform", "DER"],
        cwd=tmp_path, capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert pub == _NEW.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.openssl
@needs_openssl
def test_openssl_refuses_the_wrong_key(tmp_path: Path) -> None:
    (tmp_path / "other.key").write_bytes(private_key_to_pem(generate_key(Algorithm.P256), None))
    (tmp_path / "env.der").write_bytes(_ENVELOPES[Algorithm.P256])
    res = subprocess.run(
        ["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-inkey", "other.key", "-in", "env.der"],
        cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    assert res.returncode != 0
    assert _pkcs8(_NEW) not in res.stdout


@pytest.mark.openssl
@needs_openssl
@pytest.mark.parametrize(
    ("alg", "keyopts"),
    [
        (Algorithm.P256, ["-keyopt", "ecdh_kdf_md:sha256"]),
        (Algorithm.P384, ["-keyopt", "ecdh_kdf_md:sha384"]),
        (Algorithm.RSA3072, ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256",
                             "-keyopt", "rsa_mgf1_md:sha256"]),
    ],
)  # fmt: skip
def test_the_device_decrypts_what_openssl_makes(tmp_path: Path, alg: Algorithm, keyopts: list[str]) -> None:
    """The other direction: an EnvelopedData from ``openssl cms -encrypt`` (content id-data holding
    the PKCS#8 key) decrypts on the device."""
    (tmp_path / "key.der").write_bytes(_pkcs8(_NEW))
    (tmp_path / "device.crt").write_bytes(_cert(_KEYS[alg]).public_bytes(serialization.Encoding.PEM))
    subprocess.run(
        ["openssl", "cms", "-encrypt", "-binary", "-aes256", "-outform", "DER", "-in", "key.der",
         "-out", "env.der", "-recip", "device.crt", *keyopts],
        cwd=tmp_path, capture_output=True, check=True,
    )  # fmt: skip
    assert cms_envelope.decrypt_key((tmp_path / "env.der").read_bytes(), _KEYS[alg]) == _pkcs8(_NEW)
