"""iotdlm.wire.coap_est: the CoAP enrollment payloads and EDHOC credentials (named cases, then
Hypothesis: whatever bytes arrive, the parsers answer a value or a RejectedError, never a crash)."""

from __future__ import annotations

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
