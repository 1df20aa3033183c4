"""CRMF (RFC 4211) build and parse: round trips, POP checks, hostile input, OpenSSL interop."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa, x25519
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc3280, rfc4211

from iotdlm import errors
from iotdlm.pki import crmf

VECTORS = Path(__file__).resolve().parent.parent / "vectors"

# ------------------------------------------------------------------------------------------ keys

KEY_TYPES = ["p256", "p384", "ed25519", "rsa2048"]


@functools.cache
def private_key(kind: str, n: int = 0) -> crmf.PrivateKey:
    """A cached key per (kind, n): RSA generation is slow, and n gives a second, different key."""
    del n  # only part of the cache key
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise AssertionError(kind)


def spki_der(key: Any) -> bytes:
    out: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return out


SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Plant"),
        x509.NameAttribute(NameOID.COMMON_NAME, "device-0001"),
    ]
)
OTHER_SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-0002")])

# ----------------------------------------------------------------------------------- DER helpers


def der_seq(content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return b"\x30" + bytes([n]) + content
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x30" + bytes([0x80 | len(body)]) + body + content


def inner(der: bytes) -> bytes:
    """The content of the outer SEQUENCE (the concatenated CertReqMsg DERs)."""
    header = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    assert der_seq(der[header:]) == der
    return der[header:]


def hand_message(template: bytes, *, cert_req_id: bytes = b"\x02\x01\x01", popo: bytes = b"\x80\x00") -> bytes:
    """CertReqMessages with one CertReqMsg written byte by byte (for encodings pyasn1 will not produce)."""
    return der_seq(der_seq(der_seq(cert_req_id + der_seq(template)) + popo))


def implicit_spki(public_key: Any) -> bytes:
    """[6] IMPLICIT SubjectPublicKeyInfo: the SEQUENCE tag 0x30 replaced by 0xA6."""
    return b"\xa6" + spki_der(public_key)[1:]


def explicit_name(name: x509.Name) -> bytes:
    """[5] EXPLICIT Name (Name is a CHOICE, so the tag cannot be implicit)."""
    encoded = name.public_bytes()
    assert len(encoded) < 0x80
    return b"\xa5" + bytes([len(encoded)]) + encoded


def mutate(der: bytes, change: Callable[[Any], None], index: int = 0) -> bytes:
    """Decode CertReqMessages with pyasn1, let ``change`` edit message ``index``, re-encode."""
    messages, rest = der_decoder.decode(der, asn1Spec=rfc4211.CertReqMessages())
    assert rest == b""
    change(messages[index])
    out: bytes = der_encoder.encode(messages)
    return out


def set_spki(template: Any, spki: bytes) -> None:
    decoded, _ = der_decoder.decode(spki, asn1Spec=rfc3280.SubjectPublicKeyInfo())
    target = template["publicKey"]
    target["algorithm"] = decoded["algorithm"]
    target["subjectPublicKey"] = decoded["subjectPublicKey"]


def set_subject(template: Any, name: x509.Name) -> None:
    decoded, _ = der_decoder.decode(name.public_bytes(), asn1Spec=rfc3280.Name())
    template["subject"].setComponentByName("rdnSequence", decoded["rdnSequence"])


def set_pop_alg(message: Any, oid: str | tuple[int, ...], params: bytes | None = None) -> None:
    algorithm = message["popo"]["signature"]["algorithmIdentifier"]
    algorithm["algorithm"] = univ.ObjectIdentifier(oid)
    if params is not None:
        algorithm["parameters"] = params


def set_pop_signature(message: Any, signature: bytes) -> None:
    message["popo"]["signature"]["signature"] = univ.BitString.fromOctetString(signature)


def cert_req_der(message: Any) -> bytes:
    out: bytes = der_encoder.encode(message["certReq"])
    return out


def strip_popo(message: Any) -> Any:
    """A copy of ``message`` with certReq only (no popo)."""
    out = rfc4211.CertReqMsg()
    out["certReq"] = message["certReq"]
    return out


def replace_message(der: bytes, build: Callable[[Any], Any]) -> bytes:
    messages, _ = der_decoder.decode(der, asn1Spec=rfc4211.CertReqMessages())
    out = rfc4211.CertReqMessages()
    out.append(build(messages[0]))
    encoded: bytes = der_encoder.encode(out)
    return encoded


def raises_exactly(cls: type[errors.IotdlmError], der: bytes, **kwargs: int) -> errors.IotdlmError:
    """parse(der) must raise exactly ``cls`` (not a subclass: TooLargeError is a BadRequestError)."""
    with pytest.raises(errors.IotdlmError) as info:
        crmf.parse(der, **kwargs)
    assert type(info.value) is cls, f"expected {cls.__name__}, got {type(info.value).__name__}: {info.value}"
    return info.value


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_signed_round_trip(kind: str) -> None:
    key = private_key(kind)
    der = crmf.build_signed(42, SUBJECT, key)
    [request] = crmf.parse(der)
    assert request.cert_req_id == 42
    assert request.subject == SUBJECT
    assert request.subject is not None
    assert request.subject.public_bytes() == SUBJECT.public_bytes()
    assert request.public_key == key.public_key()
    assert request.pop == "signature"
    assert der_seq(request.der) == der


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_ra_verified_round_trip(kind: str) -> None:
    public_key = private_key(kind).public_key()
    der = crmf.build_ra_verified(0, SUBJECT, public_key)
    [request] = crmf.parse(der)
    assert (request.cert_req_id, request.subject, request.public_key, request.pop) == (
        0,
        SUBJECT,
        public_key,
        "ra_verified",
    )
    assert der_seq(request.der) == der


def test_many_ra_verified_in_one_message_keep_order() -> None:
    items = [
        (i * 7, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dev-{i}")]), private_key(kind).public_key())
        for i, kind in enumerate(KEY_TYPES * 3)
    ]
    der = crmf.build_ra_verified_many(items)
    requests = crmf.parse(der)
    assert [(r.cert_req_id, r.subject, r.public_key, r.pop) for r in requests] == [
        (i, s, k, "ra_verified") for i, s, k in items
    ]
    assert der_seq(b"".join(r.der for r in requests)) == der


def test_signed_and_ra_verified_mixed_and_each_der_parses_alone() -> None:
    parts = [
        crmf.parse(crmf.build_signed(1, SUBJECT, private_key("p256")))[0].der,
        crmf.parse(crmf.build_ra_verified(2, OTHER_SUBJECT, private_key("ed25519").public_key()))[0].der,
        crmf.parse(crmf.build_signed(3, OTHER_SUBJECT, private_key("rsa2048")))[0].der,
    ]
    requests = crmf.parse(der_seq(b"".join(parts)))
    assert [(r.cert_req_id, r.pop) for r in requests] == [(1, "signature"), (2, "ra_verified"), (3, "signature")]
    for part, request in zip(parts, requests, strict=True):
        assert crmf.parse(der_seq(part)) == [request]


def test_subject_string_types_and_multi_valued_rdn_survive_byte_for_byte() -> None:
    # private, but only here: the one way to ask cryptography for a non-default string type
    from cryptography.x509.name import _ASN1Type

    subject = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")]),
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Ligne 3"),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN 0042"),
                ]
            ),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "capteur-é-1")]),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.LOCALITY_NAME, "Lyon", _type=_ASN1Type.PrintableString)]
            ),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ops@example.com")]),
        ]
    )
    for der in (
        crmf.build_ra_verified(1, subject, private_key("p256").public_key()),
        crmf.build_signed(1, subject, private_key("p256")),
    ):
        [request] = crmf.parse(der)
        assert request.subject is not None
        assert request.subject.public_bytes() == subject.public_bytes()


def test_subject_absent_is_reported_as_none_for_ra_verified() -> None:
    def drop_subject(message: Any) -> Any:
        template = rfc4211.CertTemplate()
        template["publicKey"] = message["certReq"]["certTemplate"]["publicKey"]
        message["certReq"]["certTemplate"] = template
        return message

    der = replace_message(crmf.build_ra_verified(9, SUBJECT, private_key("p256").public_key()), drop_subject)
    [request] = crmf.parse(der)
    assert request.subject is None
    assert request.pop == "ra_verified"


def test_extra_template_fields_are_ignored() -> None:
    def add_serial_and_version(message: Any) -> None:
        message["certReq"]["certTemplate"]["version"] = 2
        message["certReq"]["certTemplate"]["serialNumber"] = 12345

    der = mutate(crmf.build_ra_verified(5, SUBJECT, private_key("p384").public_key()), add_serial_and_version)
    [request] = crmf.parse(der)
    assert (request.cert_req_id, request.subject) == (5, SUBJECT)


@settings(max_examples=40, deadline=None)
@given(
    cert_req_id=st.integers(min_value=0, max_value=2**31 - 1),
    common_name=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=16),
)
def test_round_trip_any_id_and_common_name(cert_req_id: int, common_name: str) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    [request] = crmf.parse(crmf.build_signed(cert_req_id, subject, private_key("ed25519")))
    assert (request.cert_req_id, request.subject, request.pop) == (cert_req_id, subject, "signature")


# ----------------------------------------------------------------------------- OpenSSL vectors


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_openssl_signed_vectors_verify(kind: str) -> None:
    der = (VECTORS / f"crmf_openssl_{kind}.der").read_bytes()
    expected_key = serialization.load_pem_public_key((VECTORS / f"crmf_openssl_{kind}.pub.pem").read_bytes())
    [request] = crmf.parse(der)
    assert request.pop == "signature"
    assert request.cert_req_id == 0
    assert request.public_key == expected_key
    assert request.subject is not None
    assert request.subject.rfc4514_string() == f"O=Example,CN=device-{kind}"
    # and a flipped bit in OpenSSL's signature is caught
    broken = bytearray(der)
    broken[-1] ^= 0x01
    err = raises_exactly(errors.BadSignatureError, bytes(broken))
    assert "certReqId 0" in err.message


def test_openssl_ra_verified_vector() -> None:
    der = (VECTORS / "crmf_openssl_p256_raverified.der").read_bytes()
    expected_key = serialization.load_pem_public_key((VECTORS / "crmf_openssl_p256.pub.pem").read_bytes())
    [request] = crmf.parse(der)
    assert (request.pop, request.public_key) == ("ra_verified", expected_key)
    assert request.subject is not None
    assert request.subject.rfc4514_string() == "O=Example,CN=device-ra"


def test_openssl_p384_with_sha256_is_accepted_as_pkcs10_accepts_it() -> None:
    """Issue 10 item 11: `openssl cmp` signs a P-384 key's POP with SHA-256 by default; one POP policy
    (iotdlm.pki.pop) for CRMF and PKCS#10 now accepts it (it was refused as CRMF, accepted as PKCS#10)."""
    [request] = crmf.parse((VECTORS / "crmf_openssl_p384_sha256.der").read_bytes())
    assert request.pop == "signature"
    assert request.subject is not None
    assert request.subject.rfc4514_string() == "O=Example,CN=device-p384-sha256"


@pytest.mark.openssl
def test_openssl_asn1parse_reads_our_output() -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command-line tool not installed")
    cases = {
        "signed": crmf.build_signed(7, SUBJECT, private_key("p256")),
        "ra": crmf.build_ra_verified(8, SUBJECT, private_key("rsa2048").public_key()),
    }
    for label, der in cases.items():
        done = subprocess.run(
            ["openssl", "asn1parse", "-inform", "DER", "-i"], input=der, capture_output=True, check=False
        )
        assert done.returncode == 0, done.stderr
        text = done.stdout.decode()
        assert "error" not in text.lower()
        # "   14:d=4  hl=2 l=  30 cons:     cont [ 5 ]" -> "cont [ 5 ]"
        kinds = [re.split(r"(?:cons|prim):", line, maxsplit=1)[1].strip() for line in text.splitlines()]
        # [5] subject is EXPLICIT (Name is a CHOICE): cont [ 5 ], then the Name SEQUENCE
        subject_at = kinds.index("cont [ 5 ]")
        assert kinds[subject_at + 1] == "SEQUENCE"
        # [6] publicKey is IMPLICIT: cont [ 6 ], then straight into AlgorithmIdentifier (SEQUENCE, OBJECT)
        spki_at = kinds.index("cont [ 6 ]")
        assert kinds[spki_at + 1] == "SEQUENCE"
        assert kinds[spki_at + 2].startswith("OBJECT")
        # popo: [1] POPOSigningKey (constructed) or [0] raVerified (primitive, empty)
        popo = "cont [ 1 ]" if label == "signed" else "cont [ 0 ]"
        assert popo in kinds[spki_at:], kinds


def _libcrypto() -> Any:
    name = ctypes.util.find_library("crypto")
    if name is None:
        pytest.skip("libcrypto not found")
    try:
        lib = ctypes.CDLL(name)
        lib.d2i_OSSL_CRMF_MSGS.restype = ctypes.c_void_p
    except (OSError, AttributeError):
        pytest.skip("libcrypto without CRMF (needs OpenSSL 3)")
    lib.d2i_OSSL_CRMF_MSGS.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]
    lib.i2d_OSSL_CRMF_MSGS.restype = ctypes.c_int
    lib.i2d_OSSL_CRMF_MSGS.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.OSSL_CRMF_MSGS_verify_popo.restype = ctypes.c_int
    lib.OSSL_CRMF_MSGS_verify_popo.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_char_p,
    ]
    lib.OSSL_CRMF_MSGS_free.argtypes = [ctypes.c_void_p]
    lib.OSSL_CRMF_MSGS_free.restype = None
    lib.ERR_clear_error.argtypes = []
    lib.ERR_clear_error.restype = None
    return lib


def _openssl_check(lib: Any, der: bytes, accept_ra_verified: int) -> tuple[bytes, int]:
    """(OpenSSL's re-encoding, OSSL_CRMF_MSGS_verify_popo result for message 0)."""
    buf = ctypes.create_string_buffer(der, len(der))
    cursor = ctypes.c_char_p(ctypes.addressof(buf))
    msgs = lib.d2i_OSSL_CRMF_MSGS(None, ctypes.byref(cursor), len(der))
    assert msgs, "OpenSSL could not decode the CertReqMessages"
    try:
        size = lib.i2d_OSSL_CRMF_MSGS(msgs, None)
        out = ctypes.create_string_buffer(size)
        out_cursor = ctypes.c_void_p(ctypes.addressof(out))
        lib.i2d_OSSL_CRMF_MSGS(msgs, ctypes.byref(out_cursor))
        verified = lib.OSSL_CRMF_MSGS_verify_popo(msgs, 0, accept_ra_verified, None, None)
    finally:
        lib.OSSL_CRMF_MSGS_free(msgs)
        lib.ERR_clear_error()
    return out.raw, int(verified)


@pytest.mark.openssl
@pytest.mark.parametrize("kind", KEY_TYPES)
def test_openssl_libcrypto_decodes_and_verifies_our_pop(kind: str) -> None:
    lib = _libcrypto()
    signed = crmf.build_signed(5, SUBJECT, private_key(kind))
    assert _openssl_check(lib, signed, 0) == (signed, 1)
    tampered = bytearray(signed)
    tampered[-1] ^= 0x01
    assert _openssl_check(lib, bytes(tampered), 0)[1] == 0
    ra = crmf.build_ra_verified(6, SUBJECT, private_key(kind).public_key())
    assert _openssl_check(lib, ra, 1) == (ra, 1)
    assert _openssl_check(lib, ra, 0)[1] == 0  # OpenSSL too leaves raVerified to policy


# ------------------------------------------------------------------------------ signature POP


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_tampered_signature_is_bad_signature_naming_the_id(kind: str) -> None:
    der = crmf.build_signed(77, SUBJECT, private_key(kind))

    def flip(message: Any) -> None:
        signature = bytearray(message["popo"]["signature"]["signature"].asOctets())
        signature[len(signature) // 2] ^= 0x40
        set_pop_signature(message, bytes(signature))

    err = raises_exactly(errors.BadSignatureError, mutate(der, flip))
    assert "certReqId 77" in err.message


def sign_as_crmf_does(key: crmf.PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        digest = hashes.SHA256() if isinstance(key.curve, ec.SECP256R1) else hashes.SHA384()
        return key.sign(data, ec.ECDSA(digest))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_signature_by_another_key_is_bad_signature(kind: str) -> None:
    der = crmf.build_signed(3, SUBJECT, private_key(kind))

    def resign_with(key: crmf.PrivateKey) -> Callable[[Any], None]:
        return lambda message: set_pop_signature(message, sign_as_crmf_does(key, cert_req_der(message)))

    # control: a fresh signature by the right key over this certReq passes (ECDSA signatures differ each time)
    assert crmf.parse(mutate(der, resign_with(private_key(kind))))[0].pop == "signature"
    # a valid signature over the same certReq, by a different key of the same type, does not
    err = raises_exactly(errors.BadSignatureError, mutate(der, resign_with(private_key(kind, 1))))
    assert "certReqId 3" in err.message


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_signature_over_a_modified_template_is_bad_signature(kind: str) -> None:
    der = crmf.build_signed(11, SUBJECT, private_key(kind))
    changed = mutate(der, lambda m: set_subject(m["certReq"]["certTemplate"], OTHER_SUBJECT))
    raises_exactly(errors.BadSignatureError, changed)
    # swapping in another key of the same type keeps the structure valid; the POP must not verify
    swapped = mutate(der, lambda m: set_spki(m["certReq"]["certTemplate"], spki_der(private_key(kind, 1).public_key())))
    raises_exactly(errors.BadSignatureError, swapped)
    # and changing the certReqId alone breaks it too
    renumbered = mutate(der, lambda m: m["certReq"].setComponentByName("certReqId", 12))
    err = raises_exactly(errors.BadSignatureError, renumbered)
    assert "certReqId 12" in err.message


def test_one_bad_signature_among_many_names_its_id() -> None:
    good = crmf.parse(crmf.build_signed(1, SUBJECT, private_key("p256")))[0].der
    bad = inner(
        mutate(
            crmf.build_signed(2, SUBJECT, private_key("ed25519")),
            lambda m: set_subject(m["certReq"]["certTemplate"], OTHER_SUBJECT),
        )
    )
    err = raises_exactly(errors.BadSignatureError, der_seq(good + bad))
    assert "certReqId 2" in err.message


@pytest.mark.parametrize(
    ("kind", "oid", "params", "expected"),
    [
        # a known algorithm for the wrong key type or curve: the POP does not match the key
        ("p256", SignatureAlgorithmOID.RSA_WITH_SHA256.dotted_string, b"\x05\x00", errors.BadSignatureError),
        ("p256", SignatureAlgorithmOID.ECDSA_WITH_SHA384.dotted_string, None, errors.BadSignatureError),
        ("p384", SignatureAlgorithmOID.ECDSA_WITH_SHA256.dotted_string, None, errors.BadSignatureError),
        ("ed25519", SignatureAlgorithmOID.ECDSA_WITH_SHA256.dotted_string, None, errors.BadSignatureError),
        ("rsa2048", SignatureAlgorithmOID.ED25519.dotted_string, None, errors.BadSignatureError),
        # algorithms not supported at all
        # accepted by the policy, but the signature was made with another digest
        ("p256", SignatureAlgorithmOID.ECDSA_WITH_SHA512.dotted_string, None, errors.BadSignatureError),
        ("p256", SignatureAlgorithmOID.ECDSA_WITH_SHA224.dotted_string, None, errors.UnsupportedError),
        ("rsa2048", SignatureAlgorithmOID.RSA_WITH_SHA1.dotted_string, b"\x05\x00", errors.UnsupportedError),
        ("rsa2048", SignatureAlgorithmOID.RSASSA_PSS.dotted_string, None, errors.UnsupportedError),
        ("ed25519", "1.2.3.4.5", None, errors.UnsupportedError),
        # right algorithm, wrong parameters
        ("ed25519", SignatureAlgorithmOID.ED25519.dotted_string, b"\x05\x00", errors.BadRequestError),
        ("p256", SignatureAlgorithmOID.ECDSA_WITH_SHA256.dotted_string, b"\x05\x00", errors.BadRequestError),
        ("rsa2048", SignatureAlgorithmOID.RSA_WITH_SHA256.dotted_string, b"\x02\x01\x00", errors.BadRequestError),
    ],
)
def test_pop_algorithm_must_match_the_key(
    kind: str, oid: str, params: bytes | None, expected: type[errors.IotdlmError]
) -> None:
    def set_alg(message: Any) -> None:
        message["popo"]["signature"]["algorithmIdentifier"] = rfc3280.AlgorithmIdentifier()
        set_pop_alg(message, oid, params)

    der = mutate(crmf.build_signed(4, SUBJECT, private_key(kind)), set_alg)
    raises_exactly(expected, der)


def test_rsa_pop_without_null_parameters_is_accepted() -> None:
    def drop_params(message: Any) -> None:
        message["popo"]["signature"]["algorithmIdentifier"] = rfc3280.AlgorithmIdentifier()
        set_pop_alg(message, SignatureAlgorithmOID.RSA_WITH_SHA256.dotted_string)

    def pop_params(der: bytes) -> Any:
        messages, _ = der_decoder.decode(der, asn1Spec=rfc4211.CertReqMessages())
        return messages[0]["popo"]["signature"]["algorithmIdentifier"]["parameters"]

    original = crmf.build_signed(4, SUBJECT, private_key("rsa2048"))
    der = mutate(original, drop_params)
    # the NULL really went away (read from the structure: the signature's bytes may hold 05 00 by chance)
    assert pop_params(original).isValue
    assert not pop_params(der).isValue
    [request] = crmf.parse(der)
    assert request.pop == "signature"


@pytest.mark.parametrize("signature", [b"", b"\x30\x00", b"\x00" * 64, b"\xff" * 300])
def test_garbage_signature_bytes_are_bad_signature(signature: bytes) -> None:
    for kind in KEY_TYPES:
        der = mutate(crmf.build_signed(1, SUBJECT, private_key(kind)), lambda m: set_pop_signature(m, signature))
        raises_exactly(errors.BadSignatureError, der)


def test_signature_bit_string_with_unused_bits_is_bad_signature() -> None:
    def odd_bits(message: Any) -> None:
        octets = message["popo"]["signature"]["signature"].asOctets()
        message["popo"]["signature"]["signature"] = univ.BitString.fromOctetString(octets, padding=1)

    der = mutate(crmf.build_signed(1, SUBJECT, private_key("ed25519")), odd_bits)
    raises_exactly(errors.BadSignatureError, der)


# --------------------------------------------------------------------------- POP kinds, template


def _with_popo(build_popo: Callable[[], Any]) -> Callable[[Any], Any]:
    def build(message: Any) -> Any:
        out = strip_popo(message)
        out["popo"] = build_popo()
        return out

    return build


def _key_encipherment() -> Any:
    popo = rfc4211.ProofOfPossession()
    popo["keyEncipherment"]["subsequentMessage"] = 0
    return popo


def _key_agreement() -> Any:
    popo = rfc4211.ProofOfPossession()
    popo["keyAgreement"]["subsequentMessage"] = 1  # challengeResp
    return popo


@pytest.mark.parametrize(
    ("name", "build_popo"), [("keyEncipherment", _key_encipherment), ("keyAgreement", _key_agreement)]
)
def test_other_pop_kinds_are_unsupported(name: str, build_popo: Callable[[], Any]) -> None:
    der = replace_message(crmf.build_ra_verified(1, SUBJECT, private_key("p256").public_key()), _with_popo(build_popo))
    err = raises_exactly(errors.UnsupportedError, der)
    assert name in err.message
    assert "certReqId 1" in err.message


def test_missing_pop_is_bad_request() -> None:
    der = replace_message(crmf.build_ra_verified(1, SUBJECT, private_key("p256").public_key()), strip_popo)
    err = raises_exactly(errors.BadRequestError, der)
    assert "proof of possession" in err.message


def test_poposk_input_present_is_refused() -> None:
    def add_poposk_input(message: Any) -> None:
        poposk_input = message["popo"]["signature"]["poposkInput"]
        poposk_input["authInfo"]["publicKeyMAC"]["algId"]["algorithm"] = univ.ObjectIdentifier("1.2.840.113533.7.66.13")
        poposk_input["authInfo"]["publicKeyMAC"]["value"] = univ.BitString.fromOctetString(b"\x00" * 20)
        set_spki(poposk_input, spki_der(private_key("p256").public_key()))

    signed = crmf.build_signed(1, SUBJECT, private_key("p256"))
    # with subject and publicKey in the template RFC 4211 forbids poposkInput
    raises_exactly(errors.BadRequestError, mutate(signed, add_poposk_input))

    def also_drop_subject(message: Any) -> None:
        add_poposk_input(message)
        template = rfc4211.CertTemplate()
        template["publicKey"] = message["certReq"]["certTemplate"]["publicKey"]
        message["certReq"]["certTemplate"] = template

    # without a subject it would be legal CRMF, but the poposkInput forms are not supported here
    raises_exactly(errors.UnsupportedError, mutate(signed, also_drop_subject))


def test_signature_pop_without_subject_and_without_poposk_input_is_bad_request() -> None:
    def drop_subject(message: Any) -> None:
        template = rfc4211.CertTemplate()
        template["publicKey"] = message["certReq"]["certTemplate"]["publicKey"]
        message["certReq"]["certTemplate"] = template

    raises_exactly(errors.BadRequestError, mutate(crmf.build_signed(1, SUBJECT, private_key("ed25519")), drop_subject))


def test_missing_public_key_is_bad_request() -> None:
    def drop_key(message: Any) -> None:
        template = rfc4211.CertTemplate()
        set_subject(template, SUBJECT)
        message["certReq"]["certTemplate"] = template

    err = raises_exactly(
        errors.BadRequestError, mutate(crmf.build_ra_verified(8, SUBJECT, private_key("p256").public_key()), drop_key)
    )
    assert "publicKey" in err.message
    assert "certReqId 8" in err.message


def test_hand_built_message_matches_the_builder() -> None:
    """The byte-level helper used below writes exactly what build_ra_verified writes."""
    public_key = private_key("p256").public_key()
    by_hand = hand_message(explicit_name(SUBJECT) + implicit_spki(public_key))
    assert by_hand == crmf.build_ra_verified(1, SUBJECT, public_key)


def test_empty_subject_is_bad_request() -> None:
    # [5] { SEQUENCE {} } by hand: pyasn1 drops an empty OPTIONAL SEQUENCE OF when encoding
    der = hand_message(b"\xa5\x02\x30\x00" + implicit_spki(private_key("p256").public_key()))
    assert der_decoder.decode(der, asn1Spec=rfc4211.CertReqMessages())[1] == b""
    err = raises_exactly(errors.BadRequestError, der)
    assert "empty subject" in err.message


def test_subject_with_non_string_attribute_is_bad_request() -> None:
    def integer_cn(message: Any) -> None:
        subject = message["certReq"]["certTemplate"]["subject"]["rdnSequence"]
        subject[0][0]["value"] = univ.Any(b"\x02\x01\x05")

    der = mutate(crmf.build_ra_verified(1, OTHER_SUBJECT, private_key("p256").public_key()), integer_cn)
    raises_exactly(errors.BadRequestError, der)


def test_subject_that_cryptography_would_re_encode_differently_is_bad_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard against a future cryptography that normalises a Name while parsing it: the CA must sign
    exactly the subject that was asked for. Simulated by a loader that hands back another Name."""
    real_loader = x509.load_der_x509_csr

    class Normalised:
        def __init__(self, der: bytes) -> None:
            self.csr = real_loader(der)

        @property
        def subject(self) -> x509.Name:
            return x509.Name([*self.csr.subject, x509.NameAttribute(NameOID.LOCALITY_NAME, "elsewhere")])

    der = crmf.build_ra_verified(1, SUBJECT, private_key("p256").public_key())
    assert crmf.parse(der)[0].subject == SUBJECT
    monkeypatch.setattr(x509, "load_der_x509_csr", Normalised)
    err = raises_exactly(errors.BadRequestError, der)
    assert "re-encode" in err.message


@pytest.mark.filterwarnings("ignore:Attribute's length")
@pytest.mark.parametrize("value", [b"\x13\x03DEU", b"\x13\x01D"])
def test_country_name_of_wrong_length_is_bad_request(value: bytes) -> None:
    def bad_country(message: Any) -> None:
        subject = message["certReq"]["certTemplate"]["subject"]["rdnSequence"]
        subject[0][0]["value"] = univ.Any(value)

    der = mutate(crmf.build_ra_verified(1, SUBJECT, private_key("p256").public_key()), bad_country)
    raises_exactly(errors.BadRequestError, der)


@pytest.mark.parametrize(
    "value",
    [
        b"\x13\x03a@b",  # '@' is not a PrintableString character
        b"\x0c\x02\xc3\x28",  # invalid UTF-8
        b"\x1e\x02\xd8\x00",  # BMPString lone surrogate
        b"\x03\x02\x00\x41",  # BIT STRING under CN: cryptography raises TypeError here (found by Hypothesis)
    ],
)
def test_invalid_string_values_in_subject_are_bad_request(value: bytes) -> None:
    def bad_cn(message: Any) -> None:
        message["certReq"]["certTemplate"]["subject"]["rdnSequence"][0][0]["value"] = univ.Any(value)

    der = mutate(crmf.build_ra_verified(1, OTHER_SUBJECT, private_key("p256").public_key()), bad_cn)
    raises_exactly(errors.BadRequestError, der)


# --------------------------------------------------------------------------------- unsupported


def _unsupported_keys() -> list[tuple[str, Any]]:
    return [
        ("secp256k1", ec.generate_private_key(ec.SECP256K1()).public_key()),
        ("secp521r1", ec.generate_private_key(ec.SECP521R1()).public_key()),
        ("rsa1024", rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()),  # noqa: S505 - must be refused
        ("x25519", x25519.X25519PrivateKey.generate().public_key()),
        ("ed448", ed448.Ed448PrivateKey.generate().public_key()),
    ]


@pytest.mark.parametrize(("label", "public_key"), _unsupported_keys(), ids=lambda v: v if isinstance(v, str) else "")
def test_unsupported_keys_in_a_request_are_unsupported(label: str, public_key: Any) -> None:
    der = mutate(
        crmf.build_ra_verified(1, SUBJECT, private_key("p256").public_key()),
        lambda m: set_spki(m["certReq"]["certTemplate"], spki_der(public_key)),
    )
    raises_exactly(errors.UnsupportedError, der)


@pytest.mark.parametrize(("label", "public_key"), _unsupported_keys(), ids=lambda v: v if isinstance(v, str) else "")
def test_builders_refuse_unsupported_keys(label: str, public_key: Any) -> None:
    with pytest.raises(errors.UnsupportedError):
        crmf.build_ra_verified(1, SUBJECT, public_key)


def test_build_signed_refuses_unsupported_private_keys() -> None:
    with pytest.raises(errors.UnsupportedError):
        crmf.build_signed(1, SUBJECT, ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(errors.UnsupportedError):
        crmf.build_signed(1, SUBJECT, rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505


def test_garbage_public_key_bits_are_bad_request() -> None:
    def garbage_point(message: Any) -> None:
        target = message["certReq"]["certTemplate"]["publicKey"]
        target["subjectPublicKey"] = univ.BitString.fromOctetString(b"\x04" + b"\x01" * 64)

    der = mutate(crmf.build_ra_verified(1, SUBJECT, private_key("p256").public_key()), garbage_point)
    raises_exactly(errors.BadRequestError, der)


# -------------------------------------------------------------------------- malformed and sizes


def _valid() -> bytes:
    return crmf.build_ra_verified(1, SUBJECT, private_key("p256").public_key())


@pytest.mark.parametrize(
    ("label", "der"),
    [
        ("empty", b""),
        ("one byte", b"\x30"),
        ("zero byte", b"\x00"),
        ("text", b"hello, CA"),
        ("empty SEQUENCE", b"\x30\x00"),
        ("SET instead of SEQUENCE", b"\x31" + _valid()[1:]),
        ("indefinite length", b"\x30\x80" + _valid()[2:] + b"\x00\x00"),
        ("non-minimal length", b"\x30\x81" + _valid()[1:]),
        ("length too long", b"\x30\x85\x00\x00\x00\x00\x10"),
        ("high tag number", b"\x3f\x81\x00"),
        ("inner element not a SEQUENCE", der_seq(b"\x02\x01\x00")),
        ("inner empty SEQUENCE", der_seq(b"\x30\x00")),
        ("trailing garbage", _valid() + b"\x00"),
        ("two concatenated", _valid() + _valid()),
        ("a certificate-ish blob", der_seq(der_seq(b"\x02\x01\x01" + der_seq(b"")))),
    ],
)
def test_malformed_input_is_bad_request(label: str, der: bytes) -> None:
    raises_exactly(errors.BadRequestError, der)


def test_every_truncation_is_bad_request() -> None:
    for der in (_valid(), crmf.build_signed(1, SUBJECT, private_key("ed25519"))):
        for cut in range(len(der)):
            raises_exactly(errors.BadRequestError, der[:cut])


@pytest.mark.parametrize(
    ("label", "cert_req_id", "popo"),
    [
        ("INTEGER with a leading zero", b"\x02\x02\x00\x01", b"\x80\x00"),
        ("long-form length where short form fits", b"\x02\x81\x01\x01", b"\x80\x00"),
        ("constructed NULL-ish raVerified", b"\x02\x01\x01", b"\xa0\x00"),
    ],
)
def test_non_canonical_der_inside_a_message_is_bad_request(label: str, cert_req_id: bytes, popo: bytes) -> None:
    template = explicit_name(SUBJECT) + implicit_spki(private_key("p256").public_key())
    assert crmf.parse(hand_message(template))  # the canonical twin parses
    raises_exactly(errors.BadRequestError, hand_message(template, cert_req_id=cert_req_id, popo=popo))


@pytest.mark.parametrize("cert_req_id", [-1, 2**31, 10**5000], ids=["negative", "2^31", "5001-digits"])
def test_cert_req_id_out_of_range_is_bad_request(cert_req_id: int) -> None:
    der = mutate(_valid(), lambda m: m["certReq"].setComponentByName("certReqId", cert_req_id))
    raises_exactly(errors.BadRequestError, der, max_bytes=10**6)


@pytest.mark.parametrize(
    ("arc", "expected"),
    [
        # pyasn1 >= 0.6.2 refuses arcs over 20 continuation octets while decoding
        (10**5000, errors.BadRequestError),
        # arcs it does decode are still never formatted in full (older pyasn1 has no such limit)
        (2**140, errors.UnsupportedError),
    ],
    ids=["5001-digit-arc", "140-bit-arc"],
)
def test_oversized_arcs_in_pop_algorithm_do_not_escape(arc: int, expected: type[errors.IotdlmError]) -> None:
    der = mutate(crmf.build_signed(1, SUBJECT, private_key("p256")), lambda m: set_pop_alg(m, (1, 2, arc)))
    err = raises_exactly(expected, der, max_bytes=10**6)
    assert len(err.message) < 200


def test_duplicate_cert_req_ids_are_bad_request() -> None:
    one = inner(_valid())
    err = raises_exactly(errors.BadRequestError, der_seq(one + one))
    assert "more than once" in err.message


def test_size_limit() -> None:
    der = _valid()
    assert crmf.parse(der, max_bytes=len(der))
    raises_exactly(errors.TooLargeError, der, max_bytes=len(der) - 1)
    raises_exactly(errors.TooLargeError, b"\x30" * (crmf.MAX_CRMF_BYTES + 1))
    assert crmf.MAX_CRMF_BYTES == 64 * 1024


def test_message_count_limit() -> None:
    items = [(i, OTHER_SUBJECT, private_key("ed25519").public_key()) for i in range(5)]
    der = crmf.build_ra_verified_many(items)
    assert len(crmf.parse(der, max_messages=5)) == 5
    raises_exactly(errors.TooLargeError, der, max_messages=4)
    # the default limit of 1000 is enforced before any message is decoded (these are identical copies)
    one = inner(crmf.build_ra_verified(1, OTHER_SUBJECT, private_key("ed25519").public_key()))
    raises_exactly(errors.TooLargeError, der_seq(one * 1001), max_bytes=10**6)
    raises_exactly(errors.BadRequestError, der_seq(one * 1000), max_bytes=10**6)  # duplicates, but counted ok


def test_builder_misuse_is_a_programming_error() -> None:
    public_key = private_key("p256").public_key()
    with pytest.raises(ValueError, match="cert_req_id"):
        crmf.build_ra_verified(-1, SUBJECT, public_key)
    with pytest.raises(ValueError, match="cert_req_id"):
        crmf.build_signed(2**31, SUBJECT, private_key("p256"))
    with pytest.raises(ValueError, match="RDN"):
        crmf.build_ra_verified(1, x509.Name([]), public_key)
    with pytest.raises(ValueError, match="at least one"):
        crmf.build_ra_verified_many([])
    with pytest.raises(ValueError, match="unique"):
        crmf.build_ra_verified_many([(1, SUBJECT, public_key), (1, OTHER_SUBJECT, public_key)])
    with pytest.raises(ValueError, match="positive"):
        crmf.parse(_valid(), max_messages=0)


# ---------------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_only_iotdlm_errors(der: bytes) -> None:
    try:
        requests = crmf.parse(der)
    except errors.IotdlmError:
        return
    # whatever got through is well formed
    assert requests
    for request in requests:
        assert request.pop in ("signature", "ra_verified")
        assert 0 <= request.cert_req_id < 2**31


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes_raise_only_iotdlm_errors(der: bytes) -> None:
    _parse_only_iotdlm_errors(der)


@FUZZ
@given(st.binary(max_size=300).map(lambda b: b"\x30" + bytes([min(len(b), 0x7F)]) + b))
def test_fuzz_sequence_shaped_bytes_raise_only_iotdlm_errors(der: bytes) -> None:
    _parse_only_iotdlm_errors(der)


@functools.cache
def _seeds() -> tuple[bytes, ...]:
    return (
        crmf.build_ra_verified(1, SUBJECT, private_key("p256").public_key()),
        crmf.build_signed(2, SUBJECT, private_key("p384")),
        crmf.build_signed(3, OTHER_SUBJECT, private_key("ed25519")),
        crmf.build_signed(4, OTHER_SUBJECT, private_key("rsa2048")),
        crmf.build_ra_verified_many(
            [(5, SUBJECT, private_key("ed25519").public_key()), (6, OTHER_SUBJECT, private_key("p256").public_key())]
        ),
        (VECTORS / "crmf_openssl_p256.der").read_bytes(),
    )


@st.composite
def mutated_der(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_seeds())))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        at = draw(st.integers(min_value=0, max_value=len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "set" and at < len(data):
            data[at] = draw(st.integers(min_value=0, max_value=255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(min_value=1, max_value=4))]
    return bytes(data)


@FUZZ
@given(mutated_der())
def test_fuzz_mutated_valid_der_raises_only_iotdlm_errors(der: bytes) -> None:
    _parse_only_iotdlm_errors(der)


@FUZZ
@given(st.sampled_from([1, 2, 3]), st.data())
def test_fuzz_mutating_a_signed_cert_request_never_verifies(seed: int, data: st.DataObject) -> None:
    """Any change to the signed certReq bytes must fail: the signature covers all of them."""
    der = _seeds()[seed]
    # CertReqMessages(30 L) CertReqMsg(30 L[L]) certReq(30 L[L]): mutate strictly inside certReq's content
    request_der = crmf.parse(der)[0].der
    inner_start = 2 if request_der[1] < 0x80 else 2 + (request_der[1] & 0x7F)
    header = request_der[inner_start + 1]
    cert_req_len = (
        header
        if header < 0x80
        else int.from_bytes(request_der[inner_start + 2 : inner_start + 2 + (header & 0x7F)], "big")
    )
    content_start = inner_start + 2 + (0 if header < 0x80 else header & 0x7F)
    offset = der.index(request_der) + content_start
    at = data.draw(st.integers(min_value=offset, max_value=offset + cert_req_len - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    changed = bytearray(der)
    changed[at] ^= 1 << bit
    with pytest.raises(errors.IotdlmError) as info:
        crmf.parse(bytes(changed))
    assert isinstance(info.value, errors.BadRequestError | errors.BadSignatureError | errors.UnsupportedError)
