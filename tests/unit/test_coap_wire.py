"""iotdlm.wire.coap_est: the CoAP enrollment payloads and EDHOC credentials (named cases, then
Hypothesis: whatever bytes arrive, the parsers answer a value or a RejectedError, never a crash)."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError, RejectedError, TooLargeError, UnsupportedError
from iotdlm.wire import coap_est as wire

KEY = ec.generate_private_key(ec.SECP256R1())
CCS = wire.ccs_for(KEY.public_key(), "dev-1", b"\x01\x02")


def test_enroll_round_trip() -> None:
    payload = wire.encode_enroll(b"csr", b"cert", "nonce sig")
    assert wire.decode_enroll(payload) == (b"csr", b"cert", "nonce sig")
    # RFC 8710 multipart-core: the Content-Formats interleaved with the representations
    assert cbor2.loads(payload)[0::2] == [wire.PKCS10, wire.PKIX_CERT, wire.TEXT_PLAIN]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", BadRequestError),
        (b"\xff", BadRequestError),
        (cbor2.dumps({"a": 1}), BadRequestError),
        (cbor2.dumps([286, b"c", 287, b"x"]), BadRequestError),  # no proof
        (cbor2.dumps([287, b"c", 286, b"x", 0, b"p"]), BadRequestError),  # formats swapped
        (cbor2.dumps([286, "c", 287, b"x", 0, b"p"]), BadRequestError),  # text, not bytes
        (cbor2.dumps([286, b"", 287, b"x", 0, b"p"]), BadRequestError),  # empty CSR
        (cbor2.dumps([286, b"c", 287, b"x", 0, b"\xff"]), BadRequestError),  # proof not ASCII
        (cbor2.dumps([286, b"c", 287, b"x" * 9000, 0, b"p"]), TooLargeError),
        (b"\x00" * (wire.MAX_ENROLL_BYTES + 1), TooLargeError),
    ],
    ids=["empty", "not-cbor", "map", "short", "swapped", "text", "empty-csr", "binary-proof", "big-cert", "huge"],
)
def test_enroll_refusals(payload: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        wire.decode_enroll(payload)


def test_ccs_round_trip_and_refusals() -> None:
    id_cred = cbor2.dumps({14: CCS})
    assert wire.parse_id_cred_by_value(id_cred) == CCS
    assert wire.same_key(KEY.public_key(), wire.ccs_public_key(CCS))
    with pytest.raises(UnsupportedError, match="by value"):
        wire.parse_id_cred_by_value(cbor2.dumps({4: b"\x01"}))  # by kid
    bad_point = {2: "x", 8: {1: {1: 2, -1: 1, -2: b"\x00" * 32, -3: b"\x01" * 32}}}
    with pytest.raises(BadRequestError, match="not a point"):
        wire.ccs_public_key(bad_point)
    with pytest.raises(UnsupportedError, match="P-256"):
        wire.ccs_public_key({8: {1: {1: 1, -1: 6, -2: b"\x00" * 32}}})  # an OKP (Ed25519) key
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(UnsupportedError):
        wire.ccs_for(p384, "x", b"\x01")


def test_certificate_kid_is_a_truncated_x5t() -> None:
    assert len(wire.certificate_kid(b"cert")) == wire.KID_BYTES
    assert wire.certificate_kid(b"a") != wire.certificate_kid(b"b")


def test_load_certificate_refuses_garbage() -> None:
    with pytest.raises(BadRequestError, match=r"not a DER X\.509"):
        wire.load_certificate(b"\x30\x03\x02\x01\x01", "the certificate sent")


_cbor_leaves = st.one_of(st.integers(-(2**64), 2**64), st.binary(max_size=40), st.text(max_size=10), st.none())
_cbor = st.recursive(
    _cbor_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=7), st.dictionaries(st.integers(-5, 20), inner, max_size=5)),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), _cbor.map(cbor2.dumps)))
def test_decode_enroll_never_crashes(data: bytes) -> None:
    try:
        csr, cert, proof = wire.decode_enroll(data)
    except RejectedError:
        return
    assert csr
    assert cert
    assert isinstance(proof, str)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), _cbor.map(lambda v: cbor2.dumps({14: v})), _cbor.map(cbor2.dumps)))
def test_parse_id_cred_never_crashes(data: bytes) -> None:
    try:
        ccs = wire.parse_id_cred_by_value(data)
    except RejectedError:
        return
    assert isinstance(wire.ccs_public_key(ccs), ec.EllipticCurvePublicKey)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_ccs_public_key_on_any_coordinates(x: bytes, y: bytes) -> None:
    try:
        key = wire.ccs_public_key({8: {1: {1: 2, -1: 1, -2: x, -3: y}}})
    except RejectedError:
        return
    assert key.public_numbers().x == int.from_bytes(x, "big")


# --- C509 on the wire and the compact enrollment request (ADR 0029) ----------------------------------
_VECTORS = Path(__file__).resolve().parents[1] / "vectors"
#: the draft's Appendix A.1 certificate (RFC 7925 example): DER 316 B, C509 141 B with its array head
RFC7925_DER = bytes.fromhex("".join((_VECTORS / "c509_rfc7925.der.hex").read_text().split()))


def test_enroll_request_in_its_three_forms() -> None:
    full = wire.decode_enroll_request(wire.encode_enroll(b"csr", RFC7925_DER, "n s"))
    assert full == wire.EnrollRequest(b"csr", RFC7925_DER, "n s")
    c509 = wire.encode_enroll_c509(b"csr", RFC7925_DER, "n s")
    assert cbor2.loads(c509)[2] == wire.C509_CERT
    assert wire.decode_enroll_request(c509) == full  # decoded back to the identical DER
    compact = wire.encode_enroll_compact(b"csr", "n s")
    assert cbor2.loads(compact) == [wire.PKCS10, b"csr", wire.TEXT_PLAIN, b"n s"]
    assert wire.decode_enroll_request(compact) == wire.EnrollRequest(b"csr", None, "n s")
    assert len(compact) < len(c509) < len(wire.encode_enroll(b"csr", RFC7925_DER, "n s"))


def test_certificate_formats() -> None:
    c509 = wire.encode_certificate(RFC7925_DER, wire.C509_CERT)
    assert len(c509) < len(RFC7925_DER)
    assert wire.decode_certificate(c509, wire.C509_CERT, "it") == RFC7925_DER
    assert wire.decode_certificate(RFC7925_DER, wire.PKIX_CERT, "it") == RFC7925_DER
    assert wire.encode_certificate(RFC7925_DER, wire.PKIX_CERT) == RFC7925_DER
    with pytest.raises(UnsupportedError, match="not a certificate"):
        wire.decode_certificate(RFC7925_DER, wire.CWT, "it")
    with pytest.raises(BadRequestError):
        wire.decode_certificate(b"\x01\x02", wire.C509_CERT, "it")
    with pytest.raises(TooLargeError):
        wire.decode_certificate(b"\x00" * (wire.MAX_CERT_BYTES + 1), wire.C509_CERT, "it")


def test_crts_in_both_formats() -> None:
    for fmt in (wire.CERTS_ONLY, wire.C509_BAG):
        assert wire.decode_crts(wire.encode_crts([RFC7925_DER, RFC7925_DER], fmt), fmt) == [RFC7925_DER] * 2
    with pytest.raises(BadRequestError):
        wire.decode_crts(b"\x30\x00", wire.CERTS_ONLY)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), _cbor.map(cbor2.dumps), _cbor.map(lambda v: cbor2.dumps([286, v, 0, v]))))
def test_decode_enroll_request_never_crashes(data: bytes) -> None:
    try:
        out = wire.decode_enroll_request(data)
    except RejectedError:
        return
    assert out.csr
    assert out.certificate is None or out.certificate
    assert isinstance(out.proof, str)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300), _cbor.map(cbor2.dumps), st.binary(max_size=40).map(lambda b: RFC7925_DER[:-40] + b)
    ),
    st.sampled_from([wire.PKIX_CERT, wire.C509_CERT, wire.C509_BAG, wire.CERTS_ONLY]),
)
def test_certificate_and_crts_decoders_never_crash(data: bytes, fmt: int) -> None:
    for decode in (lambda: [wire.decode_certificate(data, fmt, "it")], lambda: wire.decode_crts(data, fmt)):
        try:
            ders = decode()
        except RejectedError:
            continue
        assert all(isinstance(d, bytes) and d for d in ders)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.text(st.characters(codec="ascii"), max_size=100))
def test_compact_enroll_round_trips(csr: bytes, proof: str) -> None:
    assert wire.decode_enroll_request(wire.encode_enroll_compact(csr, proof)) == wire.EnrollRequest(csr, None, proof)
