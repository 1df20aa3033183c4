"""C509 (iotdlm.c509): the draft's Appendix A vectors, every certificate kind we issue round-trips
byte for byte, Hypothesis over names / serials / validity, refusals, and hostile input to the
decoder (a RejectedError with a code, never a traceback)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from iotdlm.c509 import C509_REENCODED, decode_c509, decode_c509_bag, encode_c509, encode_c509_bag
from iotdlm.clock import SystemClock
from iotdlm.errors import BadRequestError, RejectedError, UnsupportedError
from iotdlm.pki.keys import Algorithm
from tests.c509_kinds import issued_kinds

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
KEY = ec.generate_private_key(ec.SECP256R1())


def _hex(name: str) -> bytes:
    return bytes.fromhex("".join((VECTORS / name).read_text().split()))


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _self_signed(
    name: x509.Name,
    *,
    serial: int = 1,
    not_before: dt.datetime = dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
    not_after: dt.datetime = dt.datetime(2031, 1, 1, tzinfo=dt.UTC),
    extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
) -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return _der(builder.sign(KEY, hashes.SHA256()))


# --- the draft's Appendix A ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stem", "der_size", "c509_size"),
    [("c509_rfc7925", 316, 141), ("c509_8021ar", 577, 276)],
    ids=["A.1 RFC 7925", "A.2 IEEE 802.1AR"],
)
def test_appendix_a_vectors_both_ways(stem: str, der_size: int, c509_size: int) -> None:
    der, c509 = _hex(f"{stem}.der.hex"), _hex(f"{stem}.c509.hex")
    assert (len(der), len(c509)) == (der_size, c509_size)
    assert encode_c509(der) == c509
    assert decode_c509(c509) == der


def test_rfc7925_example_is_140_bytes_without_the_array_head() -> None:
    """The draft's 141 B are the 0x8B array head and the 140 B of its elements (the 140 B that
    the CBOR Sequence form of earlier revisions gave)."""
    c509 = _hex("c509_rfc7925.c509.hex")
    assert c509[0] == 0x80 | 11
    assert len(c509[1:]) == 140
    assert cbor2.loads(c509)[0] == C509_REENCODED == 3


# --- every certificate kind we issue ---------------------------------------------------------------------
@pytest.mark.parametrize("alg", [Algorithm.P256, Algorithm.P384, Algorithm.ED25519])
def test_every_kind_we_issue_round_trips_and_still_verifies(alg: Algorithm) -> None:
    kinds = issued_kinds(alg, now=SystemClock().now())
    assert set(kinds) >= {"root", "factory CA", "operational CA", "service CA", "factory", "operational", "ocsp"}
    for kind, cert in kinds.items():
        der = _der(cert)
        c509 = encode_c509(der)
        assert len(c509) < len(der) * 0.7, kind
        back = decode_c509(c509)
        assert back == der, kind
        issuer = kinds["root"] if kind.endswith("CA") else kinds[f"{_issuer_of(kind)} CA"]
        x509.load_der_x509_certificate(back).verify_directly_issued_by(issuer if kind != "root" else cert)


def _issuer_of(kind: str) -> str:
    return {"factory": "factory", "operational": "operational", "ocsp": "operational"}.get(kind, "service")


def test_rsa_kinds_round_trip() -> None:
    kinds = issued_kinds(Algorithm.RSA3072, now=SystemClock().now())
    for kind in ("root", "factory", "ocsp"):
        der = _der(kinds[kind])
        c509 = encode_c509(der)
        assert decode_c509(c509) == der
        assert isinstance(cbor2.loads(c509)[8], bytes), "exponent 65537: the modulus alone"


def test_factory_certificate_uses_the_specific_encodings() -> None:
    fields = cbor2.loads(encode_c509(_der(issued_kinds(Algorithm.P256, now=SystemClock().now())["factory"])))
    exts = fields[9]
    ids = [e for e in exts[::2]]
    assert ids == [-4, -2, 8, 1, 7, 6, 3, 9, 5, 29], "every extension of the profile has its C509 int form"
    san = exts[exts.index(3) + 1]
    assert (san[0], san[2]) == (6, -1), "the device URN and the hardwareModuleName (-1)"
    assert (fields[7], fields[8][0] in (0xFE, 0xFD)) == (1, True), "P-256, point-compressed"


# --- Hypothesis: names, serials, validity ----------------------------------------------------------------
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=16)
_PRINTABLE = st.text(st.sampled_from("ABCxyz0189 '()+,-./:=?"), min_size=1, max_size=20)
_HEXISH = st.text(st.sampled_from("0123456789abcdefABCDEF-"), min_size=1, max_size=23)
_TIMES = st.datetimes(dt.datetime(1970, 1, 1), dt.datetime(9999, 12, 31, 23, 59, 59), timezones=st.just(dt.UTC))


@st.composite
def _names(draw: st.DrawFn) -> x509.Name:
    attrs = []
    for oid, values in draw(
        st.lists(
            st.sampled_from(
                [
                    (NameOID.COMMON_NAME, _TEXT | _HEXISH),
                    (NameOID.ORGANIZATION_NAME, _TEXT),
                    (NameOID.ORGANIZATIONAL_UNIT_NAME, _TEXT | _HEXISH),
                    (NameOID.SERIAL_NUMBER, _PRINTABLE),
                    (NameOID.COUNTRY_NAME, st.sampled_from(["SE", "DE", "US"])),
                    (NameOID.DOMAIN_COMPONENT, st.sampled_from(["example", "com"])),
                    (ObjectIdentifier("1.3.6.1.4.1.32473.9"), _TEXT),
                ]
            ),
            max_size=5,
        )
    ):
        attrs.append(x509.NameAttribute(oid, draw(values)))
    return x509.Name(attrs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=_names(), issuer=_names(), serial=st.integers(1, 2**159 - 1), times=st.lists(_TIMES, min_size=2, max_size=2)
)
def test_round_trip_over_names_serials_and_validity(
    name: x509.Name, issuer: x509.Name, serial: int, times: list[dt.datetime]
) -> None:
    not_before, not_after = sorted(t.replace(microsecond=0) for t in times)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    der = _der(builder.sign(KEY, hashes.SHA256()))
    assert decode_c509(encode_c509(der)) == der


def test_no_expiry_is_null_and_mac_addresses_are_tag_48() -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "00-11-22-33-44-55-66-77")])
    der = _self_signed(name, not_after=dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
    fields = cbor2.loads(encode_c509(der))
    assert (fields[5], fields[3]) == (None, None), "99991231235959Z and a self-signed issuer are null"
    assert fields[6] == cbor2.CBORTag(48, bytes.fromhex("0011223344556677"))
    assert decode_c509(cbor2.dumps(fields)) == der


def test_unknown_extensions_travel_as_oid_and_bytes_critical_or_not() -> None:
    oid = ObjectIdentifier("1.3.6.1.4.1.32473.7.1")
    exts = (
        (x509.UnrecognizedExtension(oid, b"\x04\x02hi"), False),
        (x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.32473.7.2"), b"\x05\x00"), True),
        (
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        [x509.UniformResourceIdentifier("http://a/c")],
                        None,
                        frozenset({x509.ReasonFlags.key_compromise}),
                        None,
                    )
                ]
            ),
            False,
        ),
    )
    der = _self_signed(x509.Name([]), extensions=exts)
    fields = cbor2.loads(encode_c509(der))
    assert (fields[9][1], fields[9][3]) == (b"\x04\x02hi", [b"\x05\x00"])
    assert isinstance(fields[9][4], bytes), "CRL DP with reasons: no specific form here, so OID + bytes"
    assert decode_c509(cbor2.dumps(fields)) == der


# --- refusals ------------------------------------------------------------------------------------------
def test_refuses_a_multi_valued_rdn() -> None:
    rdn = x509.RelativeDistinguishedName(
        [x509.NameAttribute(NameOID.COMMON_NAME, "a"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "b")]
    )
    with pytest.raises(UnsupportedError, match="more than one attribute") as info:
        encode_c509(_self_signed(x509.Name([rdn])))
    assert info.value.code == "unsupported"


def test_refuses_what_is_not_a_der_certificate() -> None:
    with pytest.raises(BadRequestError, match=r"not a valid DER X\.509 certificate"):
        encode_c509(b"-----BEGIN CERTIFICATE-----")
    bad_key_usage = x509.UnrecognizedExtension(x509.ExtensionOID.KEY_USAGE, b"\x05\x00")
    with pytest.raises(BadRequestError, match=r"not a valid DER X\.509 certificate"):
        encode_c509(_self_signed(x509.Name([]), extensions=((bad_key_usage, True),)))


def test_refuses_natively_signed_type_2() -> None:
    fields = cbor2.loads(_hex("c509_rfc7925.c509.hex"))
    fields[0] = 2
    with pytest.raises(UnsupportedError, match="type 2 is not supported"):
        decode_c509(cbor2.dumps(fields))


@pytest.mark.parametrize(
    ("index", "value", "phrase"),
    [
        (1, 5, "certificateSerialNumber"),
        (2, 999, "not in the C509 registry"),
        (4, -1, "non-negative integer"),
        (5, 2**70, "beyond the year 9999"),
        (6, None, "subject"),
        (8, b"\xfe" + b"\xff" * 32, "not a point on its curve"),
        (9, [1], "pairs"),
        (9, [99, b""], "extension 99"),
        (10, "sig", "issuerSignatureValue"),
    ],
)
def test_decoder_says_what_is_wrong(index: int, value: object, phrase: str) -> None:
    fields = cbor2.loads(_hex("c509_rfc7925.c509.hex"))
    fields[index] = value
    with pytest.raises(BadRequestError, match=phrase) as info:
        decode_c509(cbor2.dumps(fields))
    assert info.value.code == "bad_request"


# --- Hypothesis: hostile input to the decoder -------------------------------------------------------------
_CBOR = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.binary(max_size=40) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=6) | st.builds(cbor2.CBORTag, st.sampled_from([48, 1, 2, 99]), children)
    ),
    max_leaves=20,
)


#: what cryptography says of a well-formed certificate with odd values (an empty CN, serial 0)
_ODD_VALUES = pytest.mark.filterwarnings("ignore:Attribute's length", "ignore:Parsed a serial number")


@_ODD_VALUES
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_decoder_never_raises_anything_but_a_rejection_on_random_bytes(data: bytes) -> None:
    _decode_or_reject(data)


@_ODD_VALUES
@settings(max_examples=400, deadline=None)
@given(index=st.integers(0, 10), item=_CBOR)
# CI found it: a tag as the key algorithm was looked up in a dict, and hashing a cbor2 tag may raise
# RuntimeError ("contains a reference to itself") once cbor2's recursion guard is left set
@example(index=7, item=cbor2.CBORTag(99, ["", None]))
def test_decoder_never_raises_anything_but_a_rejection_on_mutated_fields(index: int, item: object) -> None:
    fields = cbor2.loads(_hex("c509_8021ar.c509.hex"))
    fields[index] = item
    _decode_or_reject(cbor2.dumps(fields))


@_ODD_VALUES
@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 275), byte=st.integers(0, 255))
def test_decoder_survives_every_single_byte_corruption(pos: int, byte: int) -> None:
    data = bytearray(_hex("c509_8021ar.c509.hex"))
    data[pos] = byte
    _decode_or_reject(bytes(data))


def _decode_or_reject(data: bytes) -> None:
    """Either valid DER comes out, or a RejectedError with a code and a plain message."""
    refusal: RejectedError | None = None
    try:
        x509.load_der_x509_certificate(decode_c509(data))
    except RejectedError as exc:
        refusal = exc
    _check_refusal(refusal)


def _check_refusal(refusal: RejectedError | None) -> None:
    if refusal is not None:
        assert refusal.code in ("bad_request", "unsupported", "too_large")
        assert refusal.message
        assert "Traceback" not in refusal.message
        assert "ParseError" not in refusal.message


# --- truststores: COSE_C509 --------------------------------------------------------------------------------
def test_truststore_bag_one_and_many() -> None:
    kinds = issued_kinds(Algorithm.P256, now=SystemClock().now())
    ders = [_der(kinds[k]) for k in ("root", "factory CA", "operational CA")]
    assert decode_c509_bag(encode_c509_bag(ders)) == ders
    single = encode_c509_bag(ders[:1])
    assert isinstance(cbor2.loads(single), bytes), "one certificate: a single C509CertData"
    assert decode_c509_bag(single) == ders[:1]


@_ODD_VALUES
@settings(max_examples=200, deadline=None)
@given(item=_CBOR)
def test_truststore_bag_rejects_hostile_input(item: object) -> None:
    refusal: RejectedError | None = None
    try:
        decode_c509_bag(cbor2.dumps(item))
    except RejectedError as exc:
        refusal = exc
    _check_refusal(refusal)


# --- Hypothesis: extensions of every shape our codec has a specific form for ---------------------------
_URIS = st.sampled_from(["http://ca.example/c", "https://127.0.0.1:8443/ocsp", "urn:dev:org:32473-d1"])
_GENERAL_NAMES = st.one_of(
    st.builds(x509.DNSName, st.sampled_from(["localhost", "a.example", "*.b.example"])),
    st.builds(x509.RFC822Name, st.sampled_from(["ops@example.com"])),
    st.builds(x509.UniformResourceIdentifier, _URIS),
    st.builds(x509.IPAddress, st.ip_addresses()),
    st.builds(x509.RegisteredID, st.just(ObjectIdentifier("1.3.6.1.4.1.32473.5"))),
    st.builds(x509.DirectoryName, _names()),
    # hardwareModuleName (hwType 1.2.3.4, hwSerialNum de ad be ef), and another other name (a UTF8String)
    st.just(x509.OtherName(ObjectIdentifier("1.3.6.1.5.5.7.8.4"), bytes.fromhex("300b06032a03040404deadbeef"))),
    st.just(x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.32473.8"), bytes.fromhex("0c0178"))),
)
_KEY_USAGE = st.builds(
    lambda b: x509.KeyUsage(*b[:7], encipher_only=b[4] and b[7], decipher_only=b[4] and b[8]),
    st.lists(st.booleans(), min_size=9, max_size=9).filter(lambda b: any(b[:7])),
)
_EXTENSIONS = st.one_of(
    st.builds(x509.SubjectAlternativeName, st.lists(_GENERAL_NAMES, min_size=1, max_size=4)),
    st.builds(x509.BasicConstraints, st.just(True), st.none() | st.integers(0, 300)),
    st.just(x509.BasicConstraints(ca=False, path_length=None)),
    _KEY_USAGE,
    st.builds(
        x509.ExtendedKeyUsage,
        st.lists(
            st.sampled_from(
                [
                    ObjectIdentifier("1.3.6.1.5.5.7.3.2"),
                    ObjectIdentifier("1.3.6.1.5.5.7.3.9"),
                    ObjectIdentifier("1.3.6.1.4.1.32473.6"),
                ]
            ),
            min_size=1,
            max_size=3,
            unique=True,
        ),
    ),
    st.builds(
        x509.CertificatePolicies,
        st.lists(
            st.builds(
                x509.PolicyInformation,
                st.sampled_from([ObjectIdentifier("2.5.29.32.0"), ObjectIdentifier("1.3.6.1.4.1.32473.1.1")]),
                st.none() | st.just(["https://cps.example/"]),
            ),
            min_size=1,
            max_size=2,
        ),
    ),
    st.builds(
        x509.AuthorityInformationAccess,
        st.lists(
            st.builds(
                x509.AccessDescription,
                st.sampled_from(
                    [x509.AuthorityInformationAccessOID.OCSP, x509.AuthorityInformationAccessOID.CA_ISSUERS]
                ),
                st.builds(x509.UniformResourceIdentifier, _URIS),
            ),
            min_size=1,
            max_size=2,
        ),
    ),
    st.builds(
        x509.CRLDistributionPoints,
        st.lists(
            st.builds(
                lambda uris: x509.DistributionPoint(
                    [x509.UniformResourceIdentifier(u) for u in uris], None, None, None
                ),
                st.lists(_URIS, min_size=1, max_size=2),
            ),
            min_size=1,
            max_size=2,
        ),
    ),
    st.builds(lambda k: x509.AuthorityKeyIdentifier(k, None, None), st.binary(min_size=1, max_size=32)),
    st.builds(x509.SubjectKeyIdentifier, st.binary(min_size=1, max_size=32)),
    st.just(x509.OCSPNoCheck()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exts=st.lists(st.tuples(_EXTENSIONS, st.booleans()), max_size=6, unique_by=lambda e: e[0].oid))
def test_round_trip_over_extensions(exts: list[tuple[x509.ExtensionType, bool]]) -> None:
    der = _self_signed(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]), extensions=tuple(exts))
    fields = cbor2.loads(encode_c509(der))
    assert decode_c509(encode_c509(der)) == der
    ids = fields[9][::2] if isinstance(fields[9], list) else [fields[9]]
    assert all(not isinstance(i, bytes) for i in ids), "each of these has a specific C509 form"
