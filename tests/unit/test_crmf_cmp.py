"""CMP (RFC 4210) PKIMessages given where CertReqMessages are expected (issue 10 item 10)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc2459, rfc4210, rfc4211

from iotdlm import errors
from iotdlm.pki import crmf

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
KEY = ec.generate_private_key(ec.SECP256R1())
SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-pyasn1")])


def _pki_message(body_name: str, messages_der: bytes) -> bytes:
    """An unprotected PKIMessage built with pyasn1-modules rfc4210, body ``body_name`` = CertReqMessages."""
    message = rfc4210.PKIMessage()
    header = message["header"]
    header["pvno"] = 2
    for field in ("sender", "recipient"):
        name, _ = der_decoder.decode(SUBJECT.public_bytes(), asn1Spec=rfc2459.Name())
        header[field]["directoryName"].setComponentByPosition(0, name.getComponentByPosition(0))
    body = message["body"]
    reqs, _ = der_decoder.decode(messages_der, asn1Spec=rfc4211.CertReqMessages())
    target = body[body_name]
    for r in reqs:
        target.append(r)
    out: bytes = der_encoder.encode(message)
    return out


@pytest.mark.parametrize(
    ("name", "body", "protection", "cn"),
    [
        ("cmp_openssl_ir_p256.der", "ir", "password-based MAC", "dev-cmp"),
        ("cmp_openssl_cr_unprotected.der", "cr", None, "dev-cr"),
        ("cmp_openssl_kur_p256.der", "kur", "password-based MAC", "dev-kur"),
    ],
)
def test_openssl_cmp_requests_are_unwrapped_and_their_pop_checked(
    name: str, body: str, protection: str | None, cn: str
) -> None:
    raw = (VECTORS / name).read_bytes()
    assert crmf.looks_like_cmp(raw)
    cmp = crmf.unwrap_cmp(raw)
    assert (cmp.body, cmp.protection) == (body, protection)
    assert cmp.cert_req_messages in raw  # the bytes as sent: the POP signature covers them
    [request] = crmf.parse(cmp.cert_req_messages)
    expected = serialization.load_pem_public_key((VECTORS / "cmp_openssl_p256.pub.pem").read_bytes())
    assert request.public_key == expected
    assert request.pop == "signature"
    assert request.subject is not None
    assert request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn


def test_a_whole_pki_message_given_to_parse_says_it_is_cmp() -> None:
    """It used to say `certReqMessages[1]: expected a SEQUENCE, got tag 0xa0`."""
    with pytest.raises(errors.BadRequestError) as info:
        crmf.parse((VECTORS / "cmp_openssl_ir_p256.der").read_bytes())
    assert "CMP PKIMessage" in info.value.message
    assert "body ir" in info.value.message
    assert "0xa0" not in info.value.message


def test_p10cr_says_use_csr() -> None:
    with pytest.raises(errors.UnsupportedError) as info:
        crmf.unwrap_cmp((VECTORS / "cmp_openssl_p10cr.der").read_bytes())
    assert "p10cr" in info.value.message
    assert "--csr" in info.value.message


def test_genm_is_not_a_certificate_request() -> None:
    with pytest.raises(errors.BadRequestError, match="genm, not a certificate request"):
        crmf.unwrap_cmp((VECTORS / "cmp_openssl_genm.der").read_bytes())


@pytest.mark.parametrize("body", ["ir", "cr", "kur"])
def test_pyasn1_built_pki_message_round_trips(body: str) -> None:
    inner = crmf.build_signed(5, SUBJECT, KEY)
    cmp = crmf.unwrap_cmp(_pki_message(body, inner))
    assert (cmp.body, cmp.protection, cmp.cert_req_messages) == (body, None, inner)
    [request] = crmf.parse(cmp.cert_req_messages)
    assert request.cert_req_id == 5


def test_ccr_is_unsupported() -> None:
    with pytest.raises(errors.UnsupportedError, match="cross-certification"):
        crmf.unwrap_cmp(_pki_message("ccr", crmf.build_signed(5, SUBJECT, KEY)))


def test_bare_cert_req_messages_are_not_cmp() -> None:
    for der in (crmf.build_signed(5, SUBJECT, KEY), (VECTORS / "crmf_openssl_p256.der").read_bytes()):
        assert not crmf.looks_like_cmp(der)
        with pytest.raises(errors.BadRequestError, match="not a CMP PKIMessage"):
            crmf.unwrap_cmp(der)


@pytest.mark.openssl
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_cmp_reqout_offline(tmp_path: Path) -> None:
    """`openssl cmp -use_mock_srv` (no network) writes the ir it sends with -reqout."""
    key = tmp_path / "k.pem"
    key.write_bytes(
        KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ca = tmp_path / "ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-key", str(key), "-subj", "/CN=mockca", "-days", "1", "-out", str(ca)],
        check=True,
        capture_output=True,
    )
    reqout = tmp_path / "ir.der"
    subprocess.run(
        [
            *("openssl", "cmp", "-cmd", "ir", "-use_mock_srv", "-srv_ref", "srv", "-srv_secret", "pass:test"),
            *("-rsp_cert", str(ca), "-recipient", "/CN=mockca", "-ref", "cli", "-secret", "pass:test"),
            *("-newkey", str(key), "-subject", "/CN=dev-live", "-certout", str(tmp_path / "o.pem")),
            *("-reqout", str(reqout)),
        ],
        capture_output=True,
        check=False,  # the mock server's answer is irrelevant; the request is what we read
    )
    cmp = crmf.unwrap_cmp(reqout.read_bytes())
    [request] = crmf.parse(cmp.cert_req_messages)
    assert request.public_key == KEY.public_key()
    assert cmp.protection == "password-based MAC"


_FORBIDDEN = ("ParseError", "kind:", "pyasn1", "Traceback", "PyAsn1")
_IR = (VECTORS / "cmp_openssl_ir_p256.der").read_bytes()


def _clean(exc: errors.IotdlmError) -> None:
    assert isinstance(exc, errors.RejectedError)
    assert not any(word in exc.message for word in _FORBIDDEN), exc.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_unwrap_arbitrary_bytes_gives_only_clear_refusals(data: bytes) -> None:
    try:
        crmf.unwrap_cmp(data)
    except errors.IotdlmError as exc:
        _clean(exc)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_IR) - 1), st.integers(0, 255), st.sampled_from(["flip", "cut", "insert"]))
def test_mutated_cmp_message_gives_only_clear_refusals(pos: int, byte: int, how: str) -> None:
    data = bytearray(_IR)
    if how == "flip":
        data[pos] = byte
    elif how == "cut":
        del data[pos:]
    else:
        data.insert(pos, byte)
    with contextlib.suppress(errors.IotdlmError):
        try:
            crmf.parse(crmf.unwrap_cmp(bytes(data)).cert_req_messages)
        except errors.IotdlmError as exc:
            _clean(exc)
            raise
