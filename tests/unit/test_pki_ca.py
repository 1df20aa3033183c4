"""The CA hierarchy and issued certificates: RFC 5280 shape, and openssl agrees."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError
from iotdlm.pki import names
from iotdlm.pki.ca import PublicUrls
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_id_of, device_subject, device_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES
from tests.helpers import NOW, ORG, make_pki, pem

ALGS = list(Algorithm)


@pytest.fixture(scope="module", params=ALGS, ids=[a.value for a in ALGS])
def pki_and_alg(request: pytest.FixtureRequest) -> tuple[object, Algorithm]:
    return make_pki(request.param), request.param


def _issue(pki, profile: str, device_id: str = "dev-001", alg: Algorithm = Algorithm.P256) -> x509.Certificate:
    p = DEFAULT_PROFILES[profile]
    key = generate_key(alg)
    return pki.cas[p.issuer].issue(
        p,
        key.public_key(),
        device_subject(device_id, ORG, "boardA"),
        now=NOW,
        serial=x509.random_serial_number(),
        uris=[device_uri(device_id, enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
        urls=PublicUrls("http://127.0.0.1:8080"),
    )


def test_ca_certificates_have_rfc5280_ca_extensions(pki_and_alg) -> None:
    pki, _ = pki_and_alg
    for cert in [pki.root, *(c.certificate for c in pki.cas.values())]:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert bc.critical
        assert bc.value.ca
        assert ku.critical
        assert ku.value.key_cert_sign
        assert ku.value.crl_sign
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert cert.serial_number > 0
    for ca in pki.cas.values():
        aki = ca.certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        root_ski = pki.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == root_ski.digest
        assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


@pytest.mark.parametrize("profile", ["factory", "operational", "ocsp"])
def test_end_entity_shape(pki_and_alg, profile: str) -> None:
    pki, alg = pki_and_alg
    cert = _issue(pki, profile, alg=alg)
    p = DEFAULT_PROFILES[profile]
    assert cert.issuer == pki.cas[p.issuer].certificate.subject
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).critical
    ski = pki.cas[p.issuer].certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert 64 <= cert.serial_number.bit_length() <= 159
    assert device_id_of(cert) == "dev-001"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == list(p.eku)
    if p.with_revocation_pointers:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        assert aia[0].access_location.value == "http://127.0.0.1:8080/ocsp"
        cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        part = cert.serial_number % 64
        assert cdp[0].full_name[0].value == f"http://127.0.0.1:8080/crl/{p.issuer}/{part}.crl"
    else:
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    if profile == "ocsp":
        cert.extensions.get_extension_for_class(x509.OCSPNoCheck)
        assert ExtendedKeyUsageOID.OCSP_SIGNING in eku


def test_validity_capped_at_issuer() -> None:
    pki = make_pki()
    cert = _issue(pki, "factory")  # 20-year profile under a ~8-year CA
    assert cert.not_valid_after_utc == pki.cas["factory"].certificate.not_valid_after_utc
    op = _issue(pki, "operational")
    assert op.not_valid_after_utc - NOW == dt.timedelta(days=90)


def test_generalized_time_after_2049() -> None:
    """RFC 5280 4.1.2.5: dates in 2050 or later are GeneralizedTime; openssl must still parse them."""
    pki = make_pki(now=dt.datetime(2045, 1, 1, tzinfo=dt.UTC))
    assert pki.root.not_valid_after_utc.year >= 2050
    der = pki.root.public_bytes(serialization.Encoding.DER)
    assert b"\x18\x0f" in der  # GeneralizedTime tag + 15-byte length
    assert b"\x17\x0d" in der  # notBefore (2044) stays UTCTime


@pytest.mark.openssl
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
@pytest.mark.parametrize("profile", ["factory", "operational"])
def test_openssl_verify_accepts_chain(tmp_path: Path, pki_and_alg, profile: str) -> None:
    pki, alg = pki_and_alg
    cert = _issue(pki, profile, alg=alg)
    issuer = pki.cas[DEFAULT_PROFILES[profile].issuer]
    (tmp_path / "root.pem").write_bytes(pem(pki.root))
    (tmp_path / "untrusted.pem").write_bytes(pem(issuer.certificate))
    (tmp_path / "leaf.pem").write_bytes(pem(cert))
    attime = str(int(NOW.timestamp()) + 3600)
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            attime,
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "untrusted.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("OK")


@pytest.mark.openssl
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_verify_rejects_wrong_chain(tmp_path: Path) -> None:
    """The check above can fail: a certificate from another hierarchy does not verify."""
    pki, other = make_pki(), make_pki()
    cert = _issue(other, "operational")
    (tmp_path / "root.pem").write_bytes(pem(pki.root))
    (tmp_path / "untrusted.pem").write_bytes(pem(pki.cas["operational"].certificate))
    (tmp_path / "leaf.pem").write_bytes(pem(cert))
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            str(int(NOW.timestamp()) + 3600),
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "untrusted.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0


# --- names: one place builds and parses them ------------------------------------------------------
_ID = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_PEN = st.integers(min_value=1, max_value=2**32 - 1)
#: RFC 9039 (section 3): devurn = "urn:dev:" body componentpart; orgbody = "org:" posnumber "-"
#: identifier *(":" identifier); identifier = 1*(ALPHA / DIGIT / "." / "-")
_RFC9039_ORG = re.compile(r"\Aurn:dev:org:[1-9][0-9]*-[A-Za-z0-9.-]+(:[A-Za-z0-9.-]+)*\Z")


@given(device_id=_ID, pen=_PEN)
def test_device_urn_round_trips_and_follows_rfc9039(device_id: str, pen: int) -> None:
    uri = names.device_uri(device_id, enterprise_number=pen)
    assert _RFC9039_ORG.match(uri), uri
    assert names.parse_device_uri(uri) == device_id
    assert names.parse_module_uri(uri) is None


@given(module=_ID, dtype=st.none() | _ID, pen=_PEN)
def test_module_urn_round_trips_and_follows_rfc9039(module: str, dtype: str | None, pen: int) -> None:
    uri = names.module_uri(module, dtype, enterprise_number=pen)
    assert _RFC9039_ORG.match(uri), uri
    assert names.parse_module_uri(uri) == (module, dtype)
    assert names.parse_device_uri(uri) is None


@given(a=_ID, b=_ID)
def test_distinct_ids_get_distinct_urns(a: str, b: str) -> None:
    if a != b:
        assert names.device_uri(a, enterprise_number=1) != names.device_uri(b, enterprise_number=1)


@given(text=st.text(max_size=120) | st.from_regex(r"\Aurn:dev:org:[0-9]{1,12}-[A-Za-z0-9.:_x-]{0,40}\Z"))
def test_urn_parsers_take_anything(text: str) -> None:
    """Never raise; whatever they accept is a valid id that builds back to the same URN."""
    found = names.parse_device_uri(text)
    if found is not None:
        names.check_id(found)
    mod = names.parse_module_uri(text)
    if mod is not None:
        names.check_id(mod[0], "module")
    m = re.match(r"(?i)\Aurn:dev:org:([1-9][0-9]*)-", text)
    if m and found is not None and text.startswith("urn:dev:org:"):
        assert names.device_uri(found, enterprise_number=int(m.group(1))) == text


def test_urn_examples() -> None:
    assert names.device_uri("dev-1", enterprise_number=32473) == "urn:dev:org:32473-dev-1"
    assert names.device_uri("a_b", enterprise_number=32473) == "urn:dev:org:32473-x--615f62"
    assert names.device_uri("x--1", enterprise_number=32473) == "urn:dev:org:32473-x--782d2d31"
    assert names.module_uri("pm", "polarfire-soc", enterprise_number=7) == "urn:dev:org:7-module:pm:polarfire-soc"
    assert names.parse_device_uri("URN:DEV:ORG:32473-dev-1") == "dev-1"  # RFC 8141: NID is case-insensitive
    assert names.parse_device_uri("urn:dev:org:32473-x--615F62") is None  # not the canonical spelling
    assert names.parse_device_uri("urn:dev:org:32473-dev-1_sensor") is None  # a component, not a device
    assert names.parse_device_uri("urn:dev:org:032473-dev-1") is None  # posnumber has no leading zero
    assert names.parse_device_uri("urn:dev:org:5000000000-dev-1") is None  # not a PEN
    assert names.parse_device_uri("urn:iotdlm:device:dev-1") == "dev-1"  # issued before RFC 9039 names
    assert names.parse_module_uri("urn:iotdlm:module:pm:dtype:boardA") == ("pm", "boardA")


@given(data=st.binary(max_size=80))
def test_hardware_module_name_parser_takes_anything(data: bytes) -> None:
    try:
        hw, serial = names.parse_hardware_module_name(data)
    except BadRequestError:
        return
    assert names.hardware_module_name(hw, serial).value == data


def test_hardware_module_name_round_trip_and_rfc4108_der() -> None:
    hw = names.hw_type(32473, "boardA")
    other = names.hardware_module_name(hw, b"dev-1")
    assert other.type_id.dotted_string == "1.3.6.1.5.5.7.8.4"
    # SEQUENCE { OBJECT IDENTIFIER, OCTET STRING "dev-1" }
    assert other.value[0] == 0x30
    assert other.value.endswith(b"\x04\x05dev-1")
    assert names.parse_hardware_module_name(other.value) == (hw, b"dev-1")
    assert names.hw_type(32473, "boardA") != names.hw_type(32473, "boardB")
    assert names.hw_type(32473, None).dotted_string == "1.3.6.1.4.1.32473.2.0"


@given(
    serial=st.binary(max_size=70_000),
    arc=st.integers(min_value=0, max_value=2**64),
    pen=st.integers(min_value=1, max_value=2**32 - 1),
)
@settings(max_examples=300)
def test_hardware_module_name_is_pyasn1s_rfc4108_encoding_byte_for_byte(serial: bytes, arc: int, pen: int) -> None:
    """Issue 15 composes the two DER headers itself: the bytes must be what pyasn1's DER encoder
    makes of rfc4108.HardwareModuleName, for short and long (1-3 octet) lengths alike."""
    from cryptography.x509 import ObjectIdentifier
    from pyasn1.codec.der import encoder
    from pyasn1.type import univ
    from pyasn1_modules import rfc4108

    hw = ObjectIdentifier(f"1.3.6.1.4.1.{pen}.2.{arc}")
    value = rfc4108.HardwareModuleName()
    value["hwType"] = univ.ObjectIdentifier(hw.dotted_string)
    value["hwSerialNum"] = univ.OctetString(serial)
    assert names.hardware_module_name(hw, serial).value == encoder.encode(value)


@pytest.mark.parametrize("bad", [0, -1, 2**32, True, "1"])
def test_enterprise_number_is_checked(bad: object) -> None:
    with pytest.raises(BadRequestError, match="enterprise number"):
        names.check_enterprise_number(bad)


def test_device_subject_serial_number_only_when_printable() -> None:
    """X.520 serialNumber is a PrintableString, which has no '_' (an id with one keeps its CN)."""
    plain = names.device_subject("dev-1", ORG, "boardA")
    assert [a.value for a in plain.get_attributes_for_oid(NameOID.SERIAL_NUMBER)] == ["dev-1"]
    under = names.device_subject("dev_1", ORG, "boardA")
    assert under.get_attributes_for_oid(NameOID.SERIAL_NUMBER) == []
    assert [a.value for a in under.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["dev_1"]
    x509.Name.from_rfc4514_string(under.rfc4514_string())  # and it encodes


def test_public_urls() -> None:
    urls = PublicUrls("http://cm.example.test:8080/")
    assert urls.root_crl() == "http://cm.example.test:8080/crl/root/0.crl"
    assert urls.ca_issuers("operational") == "http://cm.example.test:8080/ca/operational.crt"
