"""One proof-of-possession policy for PKCS#10 and CRMF (issue 10 item 11).

Every (key, signature digest) pair gets the same answer from both parsers: accepted, or refused with
the same error class. OpenSSL-made vectors of both forms hold the policy to what real tools send.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID
from hypothesis import given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc4211

from iotdlm import errors
from iotdlm.pki import crmf, pop
from iotdlm.pki.csr import parse_csr

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-policy")])

KEYS: dict[str, Any] = {
    "p256": ec.generate_private_key(ec.SECP256R1()),
    "p384": ec.generate_private_key(ec.SECP384R1()),
    "rsa2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
}
DIGESTS = {"sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256, "sha384": hashes.SHA384}
DIGESTS["sha512"] = hashes.SHA512
_EC_OIDS = {
    "sha1": SignatureAlgorithmOID.ECDSA_WITH_SHA1,
    "sha224": SignatureAlgorithmOID.ECDSA_WITH_SHA224,
    "sha256": SignatureAlgorithmOID.ECDSA_WITH_SHA256,
    "sha384": SignatureAlgorithmOID.ECDSA_WITH_SHA384,
    "sha512": SignatureAlgorithmOID.ECDSA_WITH_SHA512,
}
_RSA_OIDS = {
    "sha1": SignatureAlgorithmOID.RSA_WITH_SHA1,
    "sha224": SignatureAlgorithmOID.RSA_WITH_SHA224,
    "sha256": SignatureAlgorithmOID.RSA_WITH_SHA256,
    "sha384": SignatureAlgorithmOID.RSA_WITH_SHA384,
    "sha512": SignatureAlgorithmOID.RSA_WITH_SHA512,
}


def _csr(kind: str, digest: str | None) -> bytes:
    key = KEYS[kind]
    builder = x509.CertificateSigningRequestBuilder().subject_name(SUBJECT)
    algorithm = None if digest is None else DIGESTS[digest]()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def _crmf(kind: str, digest: str | None) -> bytes:
    """A signature-POP CertReqMessages signed with ``digest`` (pyasn1, the way OpenSSL lays it out)."""
    key = KEYS[kind]
    base = crmf.build_signed(1, SUBJECT, key)
    messages, _ = der_decoder.decode(base, asn1Spec=rfc4211.CertReqMessages())
    message = messages[0]
    data = der_encoder.encode(message["certReq"])
    algorithm = message["popo"]["signature"]["algorithmIdentifier"]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert digest is not None
        signature = key.sign(data, ec.ECDSA(DIGESTS[digest]()))
        algorithm["algorithm"] = univ.ObjectIdentifier(_EC_OIDS[digest].dotted_string)
    elif isinstance(key, rsa.RSAPrivateKey):
        assert digest is not None
        signature = key.sign(data, padding.PKCS1v15(), DIGESTS[digest]())
        algorithm["algorithm"] = univ.ObjectIdentifier(_RSA_OIDS[digest].dotted_string)
    else:
        signature = key.sign(data)
    message["popo"]["signature"]["signature"] = univ.BitString.fromOctetString(signature)
    out: bytes = der_encoder.encode(messages)
    return out


def _outcome(parse: Any, data: bytes) -> str:
    try:
        parse(data)
    except errors.IotdlmError as exc:
        return type(exc).__name__
    return "accepted"


# (cryptography no longer signs with SHA-1: the openssl-made SHA-1 vectors below cover it)
CASES = [(k, d) for k in ("p256", "p384", "rsa2048") for d in DIGESTS if d != "sha1"] + [("ed25519", None)]


@pytest.mark.parametrize(("kind", "digest"), CASES, ids=[f"{k}-{d}" for k, d in CASES])
def test_pkcs10_and_crmf_give_the_same_answer(kind: str, digest: str | None) -> None:
    as_csr = _outcome(parse_csr, _csr(kind, digest))
    as_crmf = _outcome(crmf.parse, _crmf(kind, digest))
    expected = "UnsupportedError" if digest == "sha224" else "accepted"
    assert (as_csr, as_crmf) == (expected, expected)


@pytest.mark.parametrize(
    ("csr", "crmf_or_cmp"),
    [
        ("csr_openssl_p384_sha256.der", "crmf_openssl_p384_sha256.der"),
        ("csr_openssl_rsa2048_sha384.der", "cmp_openssl_ir_rsa2048_sha384.der"),
    ],
)
def test_openssl_vectors_accepted_in_both_forms(csr: str, crmf_or_cmp: str) -> None:
    """P-384 with SHA-256 and RSA with SHA-384, as openssl req / openssl cmp make them."""
    assert parse_csr((VECTORS / csr).read_bytes()).subject is not None
    raw = (VECTORS / crmf_or_cmp).read_bytes()
    der = crmf.unwrap_cmp(raw).cert_req_messages if crmf.looks_like_cmp(raw) else raw
    [request] = crmf.parse(der)
    assert request.pop == "signature"


def test_openssl_sha1_refused_in_both_forms() -> None:
    with pytest.raises(errors.UnsupportedError) as as_csr:
        parse_csr((VECTORS / "csr_openssl_p256_sha1.der").read_bytes())
    cmp = crmf.unwrap_cmp((VECTORS / "cmp_openssl_ir_p256_sha1.der").read_bytes())
    with pytest.raises(errors.UnsupportedError) as as_crmf:
        crmf.parse(cmp.cert_req_messages)
    for exc in (as_csr.value, as_crmf.value):
        assert "ecdsa-with-SHA1 is not accepted" in exc.message
        assert "ecdsa-with-SHA256" in exc.message  # says what is accepted


def test_rsa_above_the_verification_bound_is_refused_in_both_forms() -> None:
    """The key bounds are one policy too (PKCS#10 used to take any RSA size from 2048 up)."""
    # made by OpenSSL (tests/vectors/README.md): generating an RSA-8200 key here took 20-100 s per run
    der = (VECTORS / "csr_openssl_rsa8200.der").read_bytes()
    big = x509.load_der_x509_csr(der).public_key()
    assert isinstance(big, rsa.RSAPublicKey)
    assert big.key_size == 8200
    with pytest.raises(errors.UnsupportedError, match="RSA-8200"):
        parse_csr(der)
    with pytest.raises(errors.UnsupportedError, match="RSA-8200"):
        crmf.build_ra_verified(1, SUBJECT, big)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted({*pop._NAMES, "1.2.3.4", "2.16.840.1.101.3.4.3.10"})), st.sampled_from(sorted(KEYS)))
def test_policy_answers_only_with_a_hash_or_an_iotdlm_error(oid: str, kind: str) -> None:
    key = KEYS[kind].public_key()
    if oid not in pop.accepted_algorithms(key):
        with pytest.raises((errors.UnsupportedError, errors.BadSignatureError), match=pop.algorithm_name(oid)):
            pop.check_pop_algorithm(key, oid)
        return
    assert (pop.check_pop_algorithm(key, oid) is None) == (kind == "ed25519")
