"""describe_der_problem, and what the request parsers say about bad bytes (issue 10 item 12):
the requester's words (truncated, not DER, base64, PEM...), never a parser's debug text."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm import errors
from iotdlm.pki import crmf
from iotdlm.pki.chain import load_certificate, load_certificates_pem
from iotdlm.pki.csr import parse_csr
from iotdlm.pki.der import describe_der_problem
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import device_subject
from tests.helpers import make_csr, make_pki

CSR = make_csr(generate_key(Algorithm.P256), "dev-1")
CERT = make_pki().cas["factory"].certificate.public_bytes(serialization.Encoding.DER)
CRMF = crmf.build_ra_verified(1, device_subject("dev-1", "O", "u"), generate_key(Algorithm.P256).public_key())
CSR_PEM = x509.load_der_x509_csr(CSR).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty: no bytes given"),
        (CSR[:40], f"truncated: the DER says {len(CSR)} bytes, 40 given"),
        (CSR + b"\x00\x00", f"trailing bytes after the DER: 2 bytes after the {len(CSR)} the DER says"),
        (base64.b64encode(CSR), "not DER: looks like base64"),
        (base64.encodebytes(CSR), "not DER: looks like base64"),
        (b"this is not a request", "not DER: looks like text"),
        (CSR_PEM, "not DER: looks like PEM (-----BEGIN CERTIFICATE REQUEST-----)"),
        (b"\x30\x80" + CSR[2:] + b"\x00\x00", "not DER: indefinite length (BER)"),
        (b"\x30\x81\x05" + b"\x02\x01\x00\x05\x00", "not DER: a length is not in its shortest form"),
        (b"\x02\x01\x05", "not a PKCS#10 request: the DER holds an INTEGER, a PKCS#10 request is a SEQUENCE"),
        (b"\x30\x03\x02\x05\x00", "not DER: the element at byte 2 says 5 bytes but only 1 remain"),
        (b"\x30\x03\x02\x01\x00", "not a PKCS#10 request: well-formed DER, but not the structure"),
        (b"\x30\x82\x01", "truncated: the DER header is cut short"),
    ],
    ids=[
        "empty",
        "truncated",
        "trailing",
        "base64",
        "base64-lines",
        "text",
        "pem",
        "ber",
        "non-minimal",
        "integer",
        "inner-overrun",
        "wrong-structure",
        "one-byte",
    ],
)
def test_describe(data: bytes, expected: str) -> None:
    assert describe_der_problem(data, "PKCS#10 request").startswith(expected)


def test_pem_accepted_by_the_caller_is_unwrapped() -> None:
    labels = ("CERTIFICATE REQUEST",)
    cut = CSR_PEM[: len(CSR_PEM) // 2]
    assert describe_der_problem(cut, "PKCS#10 request", pem_labels=labels) == (
        "truncated PEM: no -----END CERTIFICATE REQUEST----- line"
    )
    lines = CSR_PEM.splitlines()
    short = b"\n".join([lines[0], lines[1], lines[-1]]) + b"\n"  # one body line of several
    assert describe_der_problem(short, "PKCS#10 request", pem_labels=labels).startswith(
        "PEM CERTIFICATE REQUEST: truncated: the DER says"
    )
    cert_pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    assert describe_der_problem(cert_pem, "PKCS#10 request", pem_labels=labels).startswith(
        "not a PKCS#10 request: PEM of a CERTIFICATE"
    )


def test_truncated_csr_says_so() -> None:
    """It used to say `... error parsing asn1 value: ParseError { kind: ShortData { needed: N } }`."""
    with pytest.raises(errors.BadRequestError) as info:
        parse_csr(CSR[:100])
    assert info.value.message == f"CSR: truncated: the DER says {len(CSR)} bytes, 100 given"


def test_base64_csr_says_so() -> None:
    with pytest.raises(errors.BadRequestError, match="looks like base64"):
        parse_csr(base64.b64encode(CSR))


def test_truncated_certificate_says_so() -> None:
    with pytest.raises(errors.BadRequestError) as info:
        load_certificate(CERT[:-10])
    assert info.value.message == f"certificate: truncated: the DER says {len(CERT)} bytes, {len(CERT) - 10} given"


def test_der_given_as_pem_bundle_says_so() -> None:
    with pytest.raises(errors.BadRequestError, match="binary, not PEM"):
        load_certificates_pem(CERT)


def test_truncated_crmf_says_so() -> None:
    with pytest.raises(errors.BadRequestError) as info:
        crmf.parse(CRMF[:50])
    assert info.value.message == f"CertReqMessages: truncated: the DER says {len(CRMF)} bytes, 50 given"


_FORBIDDEN = ("ParseError", "kind:", "pyasn1", "PyAsn1", "Traceback", "ShortData", "asn1 value")


def _refusal(parse: object, data: bytes) -> errors.IotdlmError | None:
    assert callable(parse)
    try:
        parse(data)
    except errors.IotdlmError as exc:
        return exc
    return None


def _check(parse: object, data: bytes) -> None:
    exc = _refusal(parse, data)
    if exc is not None:
        assert isinstance(exc, errors.RejectedError)
        assert not any(word in exc.message for word in _FORBIDDEN), exc.message
        assert exc.message.strip()


PARSERS = [parse_csr, crmf.parse, crmf.unwrap_cmp, load_certificate, load_certificates_pem]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500), st.sampled_from(PARSERS))
def test_arbitrary_bytes_give_clear_refusals(data: bytes, parse: object) -> None:
    _check(parse, data)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([(parse_csr, CSR), (crmf.parse, CRMF), (load_certificate, CERT), (parse_csr, CSR_PEM)]),
    st.data(),
)
def test_mutated_valid_input_gives_clear_refusals(case: tuple[object, bytes], data: st.DataObject) -> None:
    parse, valid = case
    pos = data.draw(st.integers(0, len(valid) - 1))
    how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    buf = bytearray(valid)
    if how == "flip":
        buf[pos] = data.draw(st.integers(0, 255))
    elif how == "cut":
        del buf[pos:]
    else:
        buf.insert(pos, data.draw(st.integers(0, 255)))
    _check(parse, bytes(buf))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=800), st.text(max_size=20))
def test_describe_never_raises(data: bytes, what: str) -> None:
    assert describe_der_problem(data, what or "thing", pem_labels=("CERTIFICATE",))
