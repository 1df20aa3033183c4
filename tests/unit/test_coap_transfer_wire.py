"""The transfer routes' CoAP payloads (:mod:`iotdlm.wire.coap_transfer`): round trips, refusals in
words, and Hypothesis on both decoders (a RejectedError or a value, never another exception)."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError, RejectedError, TooLargeError
from iotdlm.wire import coap_est as est
from iotdlm.wire import coap_transfer as wire
from tests.unit.test_coap_wire import RFC7925_DER, _cbor


def test_request_round_trips_in_both_certificate_formats() -> None:
    for fmt in est.CERT_FORMATS:
        out = wire.decode_request(wire.encode_request(RFC7925_DER, fmt, b'{"a": 1}'))
        assert out == wire.TransferRequest(RFC7925_DER, b'{"a": 1}')
    c509 = wire.encode_request(RFC7925_DER, est.C509_CERT)
    assert len(c509) < len(wire.encode_request(RFC7925_DER, est.PKIX_CERT))


@pytest.mark.parametrize(
    ("payload", "error", "words"),
    [
        (b"\x83\x01", BadRequestError, "not CBOR"),
        (cbor2.dumps([est.PKIX_CERT, RFC7925_DER]), BadRequestError, "certificate format, certificate, body"),
        (cbor2.dumps([est.CWT, RFC7925_DER, b""]), BadRequestError, "certificate format must be"),
        (cbor2.dumps([True, RFC7925_DER, b""]), BadRequestError, "certificate format must be"),
        (cbor2.dumps([est.PKIX_CERT, "text", b""]), BadRequestError, "byte strings"),
        (cbor2.dumps([est.PKIX_CERT, RFC7925_DER, b"x" * 11]), TooLargeError, "body exceeds 10 bytes"),
        (cbor2.dumps([est.PKIX_CERT, b"\x30\x00", b""]), RejectedError, "certificate"),
    ],
)
def test_request_refusals(payload: bytes, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        wire.decode_request(payload, 10)


def test_update_round_trip_and_refusals() -> None:
    answer = wire.UpdateAnswer("ab" * 32, "2", "cd" * 32, b"\x00" * 3000)
    assert wire.decode_update(wire.encode_update(answer)) == answer
    with pytest.raises(BadRequestError, match="transfer, version, sha256, image"):
        wire.decode_update(cbor2.dumps(["ab", "2", "cd"]))
    with pytest.raises(BadRequestError, match="texts and bytes"):
        wire.decode_update(cbor2.dumps(["ab", "", "cd", b"x"]))
    with pytest.raises(TooLargeError):
        wire.decode_update(b"\x00" * (wire.MAX_IMAGE + 257))


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        _cbor.map(cbor2.dumps),
        _cbor.map(lambda v: cbor2.dumps([est.PKIX_CERT, v, b""])),
        _cbor.map(lambda v: cbor2.dumps([est.C509_CERT, v, v])),
    )
)
def test_decode_request_never_crashes(data: bytes) -> None:
    with contextlib.suppress(RejectedError):
        wire.decode_request(data)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), _cbor.map(cbor2.dumps), _cbor.map(lambda v: cbor2.dumps(["a", "b", "c", v]))))
def test_decode_update_never_crashes(data: bytes) -> None:
    with contextlib.suppress(RejectedError):
        wire.decode_update(data)
