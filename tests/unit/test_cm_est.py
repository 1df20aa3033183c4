"""cm's EST codec (pure): base64 bodies, media types, certs-only CMS, CsrAttrs, the serverkeygen
multipart -- named cases, hostile inputs, and Hypothesis on every parser."""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy

import pytest
from cryptography.hazmat.primitives.serialization import pkcs7
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.type import univ
from pyasn1_modules import rfc7030

from iotdlm.cm import est
from iotdlm.errors import BadRequestError, TooLargeError
from iotdlm.pki.keys import Algorithm, generate_key
from tests.helpers import make_csr, make_pki

PKI = make_pki()
CSR = make_csr(generate_key(Algorithm.P256), "dev-1")


# --- base64 request bodies ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(base64.b64encode(CSR), id="one-line"),
        pytest.param(base64.encodebytes(CSR), id="mime-lines"),
        pytest.param(base64.encodebytes(CSR).replace(b"\n", b"\r\n"), id="crlf"),
        pytest.param(b"  \t" + base64.b64encode(CSR) + b"\r\n\r\n", id="surrounding-blanks"),
        pytest.param(base64.b64encode(CSR).rstrip(b"="), id="no-padding"),
        pytest.param(
            b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(CSR) + b"-----END CERTIFICATE REQUEST-----\n",
            id="pem-armour",
        ),
    ],
)
def test_base64_bodies_we_take(body: bytes) -> None:
    assert est.decode_base64_body(body, what="csr", max_decoded=16 * 1024) == CSR


@pytest.mark.parametrize(
    ("body", "match"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b" \r\n\t", "empty", id="only-blanks"),
        pytest.param(b"====", "not base64", id="only-padding"),
        pytest.param(b"QUJD=RA==", "not base64", id="padding-inside"),
        pytest.param(b"QUJDRA===", "not base64", id="three-pad"),
        pytest.param(b"QUJDR", "truncated", id="one-char-over"),
        pytest.param(b"QUJD\x00RA==", "not base64", id="nul"),
        pytest.param("QUJDRA==é".encode(), "not base64", id="non-ascii"),
        pytest.param(b"QUJD-_RA", "not base64", id="url-alphabet"),
        pytest.param(b"\x30\x82\x01\x00", "not base64", id="raw-der"),
        pytest.param(b"-----BEGIN CERTIFICATE REQUEST-----\nQUJD\n", "footer", id="pem-no-footer"),
        pytest.param(
            b"-----BEGIN X-----\nProc-Type: 4,ENCRYPTED\nQUJD\n-----END X-----\n", "encrypted", id="pem-headers"
        ),
    ],
)
def test_base64_bodies_we_refuse(body: bytes, match: str) -> None:
    with pytest.raises(BadRequestError, match=match):
        est.decode_base64_body(body, what="csr", max_decoded=1024)


def test_base64_body_over_the_limit_is_too_large_before_decoding() -> None:
    with pytest.raises(TooLargeError):
        est.decode_base64_body(base64.b64encode(b"x" * 2000), what="csr", max_decoded=1000)
    assert est.decode_base64_body(base64.b64encode(b"x" * 1000), what="csr", max_decoded=1000) == b"x" * 1000


@given(
    data=st.binary(min_size=1, max_size=600),
    cuts=st.lists(st.integers(0, 900), max_size=8),
    eol=st.sampled_from([b"\n", b"\r\n", b" ", b"\t"]),
)
def test_base64_roundtrip_with_any_line_breaks(data: bytes, cuts: list[int], eol: bytes) -> None:
    text = base64.b64encode(data)
    for c in sorted(set(cuts), reverse=True):
        text = text[:c] + eol + text[c:]
    assert est.decode_base64_body(text, what="x", max_decoded=1024) == data


@given(st.binary(max_size=300))
def test_base64_decoder_never_fails_another_way(body: bytes) -> None:
    try:
        out = est.decode_base64_body(body, what="x", max_decoded=128)
    except BadRequestError:
        return
    assert 0 < len(out) <= 128


@given(st.binary(min_size=1, max_size=400))
def test_our_response_encoding_reads_back(der: bytes) -> None:
    text = est.encode_base64_body(der)
    assert all(len(line) <= 64 for line in text.split(b"\r\n"))
    assert est.decode_base64_body(text, what="x", max_decoded=1024) == der
    assert base64.b64decode(text) == der  # what `base64 -d` and every MIME reader do


# --- media types ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("application/pkcs10", "application/pkcs10"),
        ("Application/PKCS10", "application/pkcs10"),
        (" application/pkcs10 ; charset=x", "application/pkcs10"),
        ("", ""),
        (None, ""),
        (";", ""),
    ],
)
def test_media_type(header: str | None, expected: str) -> None:
    assert est.media_type(header) == expected


def test_require_media_type() -> None:
    est.require_media_type("application/pkcs10; x=y", est.PKCS10)
    with pytest.raises(est.UnsupportedMediaTypeError, match="not application/json"):
        est.require_media_type("application/json", est.PKCS10)
    with pytest.raises(est.UnsupportedMediaTypeError, match="not none"):
        est.require_media_type(None, est.PKCS10)
    assert est.media_type_params('multipart/mixed; boundary="a b"; X=1') == {"boundary": "a b", "x": "1"}


@given(st.text(max_size=100))
def test_media_type_parsers_take_any_text(header: str) -> None:
    assert est.media_type(header) == est.media_type(header).lower()
    assert isinstance(est.media_type_params(header), dict)
    with contextlib.suppress(est.UnsupportedMediaTypeError):
        est.require_media_type(header, est.PKCS10)


# --- certs-only, csrattrs, serverkeygen ----------------------------------------------------------
def test_certs_only_carries_the_certificates() -> None:
    certs = [PKI.cas["operational"].certificate, PKI.root]
    # CMS certificates are a SET OF: DER sorts them, so no order is promised
    assert set(pkcs7.load_der_pkcs7_certificates(est.certs_only(certs))) == set(certs)
    with pytest.raises(ValueError, match="at least one"):
        est.certs_only([])


@pytest.mark.parametrize(
    ("alg", "oids"),
    [
        (Algorithm.P256, ["1.2.840.10045.4.3.2", ("1.2.840.10045.2.1", "1.2.840.10045.3.1.7")]),
        (Algorithm.P384, ["1.2.840.10045.4.3.3", ("1.2.840.10045.2.1", "1.3.132.0.34")]),
        (Algorithm.ED25519, ["1.3.101.112"]),
        (Algorithm.RSA3072, ["1.2.840.113549.1.1.11"]),
        (None, []),
    ],
)
def test_csrattrs_decode_as_rfc7030_csrattrs(alg: Algorithm | None, oids: list[object]) -> None:
    der = est.csrattrs_der(alg)
    attrs, rest = der_decoder.decode(der, asn1Spec=rfc7030.CsrAttrs())
    assert rest == b""
    got: list[object] = []
    for item in attrs:
        if item.getName() == "oid":
            got.append(str(item["oid"]))
        else:
            a = item["attribute"]
            (value,) = a["attrValues"]
            curve, _ = der_decoder.decode(bytes(value), asn1Spec=univ.ObjectIdentifier())
            got.append((str(a["attrType"]), str(curve)))
    assert got == oids


@pytest.mark.parametrize(
    ("encrypted", "key_type", "smime_type"),
    [(True, "application/pkcs7-mime", "server-generated-key"), (False, "application/pkcs8", None)],
)
def test_serverkeygen_multipart_is_rfc7030_shaped(encrypted: bool, key_type: str, smime_type: str | None) -> None:
    """RFC 7030 4.4.2: the key part (encrypted to the device: application/pkcs7-mime;
    smime-type=server-generated-key; in the clear: application/pkcs8), then certs-only."""
    key_der = b"\x30\x03\x02\x01\x00"
    certs = est.certs_only([PKI.root])
    ctype, body = est.serverkeygen_multipart(key_der, certs, encrypted=encrypted, boundary="est-boundary")
    assert ctype == 'multipart/mixed; boundary="est-boundary"'
    msg = email.message_from_bytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body, policy=email.policy.default)
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [key_type, "application/pkcs7-mime"]
    assert parts[0].get_param("smime-type") == smime_type
    assert parts[1].get_param("smime-type") == "certs-only"
    assert parts[0].get_payload(decode=True) == key_der
    certs_der = parts[1].get_payload(decode=True)
    assert isinstance(certs_der, bytes)
    assert pkcs7.load_der_pkcs7_certificates(certs_der) == [PKI.root]


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=30)
@given(st.binary(min_size=1, max_size=300))
def test_serverkeygen_boundary_is_random_and_absent_from_the_body(key: bytes) -> None:
    ctype, body = est.serverkeygen_multipart(key, est.certs_only([PKI.root]), encrypted=True)
    boundary = est.media_type_params(ctype)["boundary"]
    assert body.count(b"--" + boundary.encode()) == 3
    assert body.endswith(b"--" + boundary.encode() + b"--\r\n")
