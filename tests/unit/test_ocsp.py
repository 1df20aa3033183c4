"""OCSP responder side: request parsing (hostile input too), responses, GET form, openssl agrees."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotdlm.clock import SystemClock
from iotdlm.errors import BadRequestError, IotdlmError, TooLargeError
from iotdlm.pki.ca import IssuingCA, PublicUrls, ca_name
from iotdlm.pki.keys import Algorithm, KeySigner, PrivateKey, generate_key, verify_bytes
from iotdlm.pki.ocsp import (
    MAX_OCSP_REQUEST_BYTES,
    CertStatus,
    OcspQuery,
    Responder,
    build_response,
    decode_get_path,
    error_response,
    parse_request,
)
from iotdlm.pki.profiles import DEFAULT_PROFILES
from tests.helpers import ORG, Pki, make_pki, pem
from tests.tools import attime, ocsp_window

HASHES = {
    "sha1": hashes.SHA1(),  # noqa: S303 -- OCSP CertIDs use SHA-1
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


@dataclass
class Env:
    now: dt.datetime
    pki: Pki
    ca: IssuingCA
    responder: Responder
    responder_key: PrivateKey
    leaf: x509.Certificate
    leaf_key: PrivateKey


def _make_env(alg: Algorithm = Algorithm.P256) -> Env:
    # openssl ocsp checks thisUpdate/nextUpdate against the real clock: build everything at "now"
    now = SystemClock().now().replace(microsecond=0)
    pki = make_pki(alg, now=now)
    ca = pki.cas["operational"]
    rkey = generate_key(alg)
    rcert = ca.issue(
        DEFAULT_PROFILES["ocsp"],
        rkey.public_key(),
        ca_name("Test VA", ORG),
        now=now,
        serial=x509.random_serial_number(),
    )
    lkey = generate_key(alg)
    leaf = ca.issue(
        DEFAULT_PROFILES["operational"],
        lkey.public_key(),
        ca_name("device 1", ORG),
        now=now,
        serial=x509.random_serial_number(),
        urls=PublicUrls("http://va.example"),
    )
    return Env(now, pki, ca, Responder(ca, rcert, KeySigner(rkey)), rkey, leaf, lkey)


@pytest.fixture(scope="module")
def env() -> Env:
    return _make_env()


def _request(env: Env, alg: str = "sha1", nonce: bytes | None = None, cert: x509.Certificate | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert or env.leaf, env.ca.certificate, HASHES[alg])
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _respond(env: Env, q: OcspQuery, status: CertStatus, *, include_nonce: bool = True) -> ocsp.OCSPResponse:
    der = build_response(
        env.responder,
        q,
        status,
        this_update=env.now,
        next_update=env.now + dt.timedelta(hours=4),
        include_nonce=include_nonce,
    )
    return ocsp.load_der_ocsp_response(der)


# --- a small DER writer, only to craft requests cryptography's builder refuses to make ----------


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def _alg(oid_hex: str) -> bytes:
    return _tlv(0x30, _tlv(0x06, bytes.fromhex(oid_hex)) + b"\x05\x00")


SHA1_ALG = _alg("2b0e03021a")
DES_CBC_ALG = _alg("2b0e030207")  # 1.3.14.3.2.7: not a hash


def _certid(alg: bytes, name_hash: bytes, key_hash: bytes, serial: int) -> bytes:
    return _tlv(0x30, alg + _tlv(0x04, name_hash) + _tlv(0x04, key_hash) + _der_int(serial))


def _raw_request(*certids: bytes, extensions: list[bytes] | None = None) -> bytes:
    request_list = _tlv(0x30, b"".join(_tlv(0x30, cid) for cid in certids))
    exts = b"" if extensions is None else _tlv(0xA2, _tlv(0x30, b"".join(extensions)))
    return _tlv(0x30, _tlv(0x30, request_list + exts))


NONCE_OID = "2b0601050507300102"  # id-pkix-ocsp-nonce
ACCEPTABLE_RESPONSES_OID = "2b0601050507300104"
BASIC_OID = "2b0601050507300101"


def _ext(oid_hex: str, value: bytes, *, critical: bool = False) -> bytes:
    return _tlv(0x30, _tlv(0x06, bytes.fromhex(oid_hex)) + (b"\x01\x01\xff" if critical else b"") + _tlv(0x04, value))


def _ca_hashes(env: Env) -> tuple[bytes, bytes]:
    q = parse_request(_request(env))
    return q.issuer_name_hash, q.issuer_key_hash


def test_der_writer_matches_cryptography(env: Env) -> None:
    name_hash, key_hash = _ca_hashes(env)
    assert _raw_request(_certid(SHA1_ALG, name_hash, key_hash, env.leaf.serial_number)) == _request(env)


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["sha1", "sha256", "sha384", "sha512"])
@pytest.mark.parametrize(
    "nonce", [None, b"\x01", b"n" * 16, b"N" * 32, b"x" * 128], ids=["none", "1", "16", "32", "128"]
)
def test_parse_request(env: Env, alg: str, nonce: bytes | None) -> None:
    q = parse_request(_request(env, alg, nonce))
    assert q.serial == env.leaf.serial_number
    assert q.hash_algorithm == alg
    assert q.nonce == nonce
    h = HASHES[alg]
    assert len(q.issuer_key_hash) == len(q.issuer_name_hash) == h.digest_size
    assert q.issuer_name_hash == hashlib.new(alg, env.ca.certificate.subject.public_bytes()).digest()
    assert env.responder.matches(q)


def test_matches_only_this_ca(env: Env) -> None:
    other = env.pki.cas["factory"]
    foreign = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        hashlib.sha1(other.certificate.subject.public_bytes()).digest(),  # noqa: S324 -- the CertID hash
        _ca_hashes(env)[1],
        5,
        hashes.SHA1(),  # noqa: S303
    )
    q_name = parse_request(foreign.build().public_bytes(serialization.Encoding.DER))
    assert not env.responder.matches(q_name)
    q = parse_request(_request(env))
    assert not env.responder.matches(dataclasses.replace(q, issuer_key_hash=bytes(20)))
    assert not env.responder.matches(dataclasses.replace(q, hash_algorithm="md5"))
    # a responder for another CA of the same root does not match
    fkey = generate_key(Algorithm.P256)
    fcert = other.issue(
        dataclasses.replace(DEFAULT_PROFILES["ocsp"], issuer="factory"),
        fkey.public_key(),
        ca_name("Factory VA", ORG),
        now=env.now,
        serial=x509.random_serial_number(),
    )
    assert not Responder(other, fcert, KeySigner(fkey)).matches(q)


def _nonce_request(env: Env, nonce: bytes) -> bytes:
    return _request(env, "sha1", nonce)


HOSTILE: list[tuple[str, object, type[IotdlmError], str]] = [
    ("empty", b"", BadRequestError, "empty"),
    ("garbage", b"garbage", BadRequestError, "OCSP request: not DER: looks like text"),
    ("empty-seq", b"\x30\x00", BadRequestError, "OCSP request: not an OCSP request: well-formed DER"),
    ("truncated", b"\x30\x82\x01\x00\x30\x03", BadRequestError, "OCSP request: truncated"),
    ("oversize", b"\x30" * (MAX_OCSP_REQUEST_BYTES + 1), TooLargeError, "exceeds"),
    ("not-bytes", "MEUwQzBBMD8wPTAJBgUrDgMCGgUABBQ", BadRequestError, "bytes"),
]


@pytest.mark.parametrize(("name", "data", "exc", "match"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_parse_request_rejects(name: str, data: object, exc: type[IotdlmError], match: str) -> None:
    with pytest.raises(exc, match=match):
        parse_request(data)  # type: ignore[arg-type]


def test_parse_request_rejects_crafted(env: Env) -> None:
    name_hash, key_hash = _ca_hashes(env)
    serial = env.leaf.serial_number
    cases: list[tuple[bytes, str]] = [
        (
            _raw_request(_certid(SHA1_ALG, name_hash, key_hash, serial), _certid(SHA1_ALG, name_hash, key_hash, 7)),
            "exactly one",
        ),
        (_raw_request(), "exactly one"),  # no CertID at all
        (_raw_request(_certid(DES_CBC_ALG, name_hash, key_hash, serial)), "hash algorithm"),
        (_raw_request(_certid(SHA1_ALG, name_hash[:19], key_hash, serial)), "not sha1 digests"),
        (_raw_request(_certid(SHA1_ALG, name_hash, key_hash + b"\x00", serial)), "not sha1 digests"),
        (_raw_request(_certid(SHA1_ALG, name_hash, key_hash, -5)), "negative"),
        (_nonce_request(env, b""), "nonce of 0 bytes"),
        (_nonce_request(env, b"z" * 129), "nonce of 129 bytes"),
    ]
    for der, match in cases:
        with pytest.raises(BadRequestError, match=match):
            parse_request(der)


def test_crafted_request_extensions(env: Env) -> None:
    name_hash, key_hash = _ca_hashes(env)
    cid = _certid(SHA1_ALG, name_hash, key_hash, 5)
    nonce = _ext(NONCE_OID, _tlv(0x04, b"\x11" * 16))
    assert parse_request(_raw_request(cid, extensions=[nonce])).nonce == b"\x11" * 16
    with pytest.raises(BadRequestError, match=r"1\.3\.6\.1\.5\.5\.7\.48\.1\.2 appears twice"):
        parse_request(_raw_request(cid, extensions=[nonce, nonce]))
    accept_basic = _ext(ACCEPTABLE_RESPONSES_OID, _tlv(0x30, _tlv(0x06, bytes.fromhex(BASIC_OID))))
    assert parse_request(_raw_request(cid, extensions=[accept_basic, nonce])).nonce == b"\x11" * 16
    with pytest.raises(BadRequestError, match="critical"):
        parse_request(_raw_request(cid, extensions=[_ext(ACCEPTABLE_RESPONSES_OID, b"\x30\x00", critical=True)]))
    # an empty requestExtensions (not DER: SIZE (1..MAX)) is let through by cryptography; harmless
    assert parse_request(_raw_request(cid, extensions=[])).nonce is None


_EXT_OIDS = [NONCE_OID, ACCEPTABLE_RESPONSES_OID, "2b0601050507300107", "2b0601050507300108", "550403"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    exts=st.lists(
        st.tuples(
            st.sampled_from(_EXT_OIDS),
            st.booleans(),
            st.one_of(
                st.binary(max_size=40),
                st.binary(max_size=140).map(lambda b: _tlv(0x04, b)),
                st.lists(st.sampled_from([BASIC_OID, NONCE_OID, "2a"]), max_size=3).map(
                    lambda oids: _tlv(0x30, b"".join(_tlv(0x06, bytes.fromhex(o)) for o in oids))
                ),
            ),
        ),
        max_size=4,
    ),
    serial=st.integers(min_value=-(1 << 200), max_value=1 << 200),
)
def test_parse_request_structured_fuzz(env: Env, exts: list[tuple[str, bool, bytes]], serial: int) -> None:
    name_hash, key_hash = _ca_hashes(env)
    der = _raw_request(
        _certid(SHA1_ALG, name_hash, key_hash, serial),
        extensions=[_ext(oid, value, critical=crit) for oid, crit, value in exts] or None,
    )
    q = _only_ours(parse_request, der)
    if isinstance(q, OcspQuery):
        assert env.responder.matches(q)
        resp = _respond(env, q, CertStatus("good"))
        assert resp.serial_number == serial
        if q.nonce is not None:
            assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == q.nonce


def test_request_extensions(env: Env) -> None:
    odd = x509.ObjectIdentifier("1.3.6.1.4.1.55555.99")
    base = ocsp.OCSPRequestBuilder().add_certificate(env.leaf, env.ca.certificate, hashes.SHA1())  # noqa: S303
    ignorable = base.add_extension(x509.UnrecognizedExtension(odd, b"\x05\x00"), critical=False).build()
    assert parse_request(ignorable.public_bytes(serialization.Encoding.DER)).nonce is None
    critical = base.add_extension(x509.UnrecognizedExtension(odd, b"\x05\x00"), critical=True).build()
    with pytest.raises(BadRequestError, match="critical"):
        parse_request(critical.public_bytes(serialization.Encoding.DER))
    critical_nonce = base.add_extension(x509.OCSPNonce(b"q" * 16), critical=True).build()
    assert parse_request(critical_nonce.public_bytes(serialization.Encoding.DER)).nonce == b"q" * 16


# --- responses --------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["sha1", "sha256"])
@pytest.mark.parametrize(
    ("status", "cert_status", "reason"),
    [
        (CertStatus("good"), ocsp.OCSPCertStatus.GOOD, None),
        (CertStatus("unknown"), ocsp.OCSPCertStatus.UNKNOWN, None),
        (
            CertStatus("revoked", dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "keyCompromise"),
            ocsp.OCSPCertStatus.REVOKED,
            x509.ReasonFlags.key_compromise,
        ),
        (
            CertStatus("revoked", dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "certificate_hold"),
            ocsp.OCSPCertStatus.REVOKED,
            x509.ReasonFlags.certificate_hold,
        ),
        (
            CertStatus("revoked", dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), None),
            ocsp.OCSPCertStatus.REVOKED,
            None,
        ),
        (
            CertStatus("revoked", dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "unspecified"),
            ocsp.OCSPCertStatus.REVOKED,
            None,
        ),
    ],
    ids=["good", "unknown", "revoked-keyCompromise", "revoked-hold", "revoked-no-reason", "revoked-unspecified"],
)
def test_build_response(
    env: Env, alg: str, status: CertStatus, cert_status: ocsp.OCSPCertStatus, reason: x509.ReasonFlags | None
) -> None:
    q = parse_request(_request(env, alg, b"r" * 32))
    resp = _respond(env, q, status)
    assert resp.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.certificate_status is cert_status
    # exactly the CertID asked
    assert resp.serial_number == q.serial
    assert resp.hash_algorithm.name == alg
    assert resp.issuer_key_hash == q.issuer_key_hash
    assert resp.issuer_name_hash == q.issuer_name_hash
    assert len(list(resp.responses)) == 1
    assert resp.this_update_utc == env.now
    assert resp.next_update_utc == env.now + dt.timedelta(hours=4)
    if cert_status is ocsp.OCSPCertStatus.REVOKED:
        assert resp.revocation_time_utc == status.revoked_at
    else:
        assert resp.revocation_time_utc is None
    assert resp.revocation_reason is reason
    # responder id by key hash, delegated certificate included, signed by it
    assert resp.responder_name is None
    ski = env.responder.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert resp.responder_key_hash == ski.digest
    assert resp.certificates == [env.responder.certificate]
    verify_bytes(env.responder_key.public_key(), resp.signature, resp.tbs_response_bytes)
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"r" * 32


@pytest.mark.parametrize(
    ("nonce", "include", "echoed"),
    [(b"n" * 16, True, True), (b"n" * 16, False, False), (None, True, False), (None, False, False)],
)
def test_nonce_echo(env: Env, nonce: bytes | None, include: bool, echoed: bool) -> None:
    q = parse_request(_request(env, "sha256", nonce))
    resp = _respond(env, q, CertStatus("good"), include_nonce=include)
    found = [e.value.nonce for e in resp.extensions if isinstance(e.value, x509.OCSPNonce)]
    assert found == ([nonce] if echoed else [])


@pytest.mark.parametrize(
    ("status", "match"),
    [
        (CertStatus("revoked"), "revoked_at"),
        (CertStatus("good", reason="keyCompromise"), "no revocation"),
        (CertStatus("unknown", revoked_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)), "no revocation"),
        (CertStatus("revoked", dt.datetime(2026, 1, 1), None), "timezone-aware"),
        (CertStatus("revoked", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "removeFromCRL"), "removeFromCRL"),
        (CertStatus("suspended"), "unknown certificate status"),  # type: ignore[arg-type]
    ],
)
def test_build_response_caller_mistakes(env: Env, status: CertStatus, match: str) -> None:
    q = parse_request(_request(env))
    with pytest.raises(ValueError, match=match):
        _respond(env, q, status)


def test_build_response_refuses_other_ca_and_bad_times(env: Env) -> None:
    q = parse_request(_request(env))
    with pytest.raises(ValueError, match="unauthorized"):
        _respond(env, dataclasses.replace(q, issuer_key_hash=bytes(20)), CertStatus("good"))
    with pytest.raises(ValueError, match="after"):
        build_response(
            env.responder, q, CertStatus("good"), this_update=env.now, next_update=env.now, include_nonce=False
        )
    with pytest.raises(ValueError, match="timezone-aware"):
        build_response(
            env.responder,
            q,
            CertStatus("good"),
            this_update=env.now.replace(tzinfo=None),
            next_update=env.now + dt.timedelta(hours=1),
            include_nonce=False,
        )


def test_unknown_reason_is_bad_request(env: Env) -> None:
    q = parse_request(_request(env))
    with pytest.raises(BadRequestError, match="valid reasons"):
        _respond(env, q, CertStatus("revoked", env.now, "lost"))


def test_responder_checks_its_configuration(env: Env) -> None:
    ocsp_profile = DEFAULT_PROFILES["ocsp"]
    wrong_key = generate_key(Algorithm.P256)
    with pytest.raises(ValueError, match="key"):
        Responder(env.ca, env.responder.certificate, KeySigner(wrong_key))
    # an operational (TLS client) certificate is no OCSP signer
    with pytest.raises(ValueError, match="OCSPSigning"):
        Responder(env.ca, env.leaf, KeySigner(env.leaf_key))
    # a responder certificate of another CA
    factory = env.pki.cas["factory"]
    fkey = generate_key(Algorithm.P256)
    fcert = factory.issue(
        dataclasses.replace(ocsp_profile, issuer="factory"),
        fkey.public_key(),
        ca_name("Factory VA", ORG),
        now=env.now,
        serial=x509.random_serial_number(),
    )
    with pytest.raises(ValueError, match="not issued by"):
        Responder(env.ca, fcert, KeySigner(fkey))


def test_ca_can_answer_itself(env: Env) -> None:
    responder = Responder(env.ca, env.ca.certificate, env.ca.signer)
    q = parse_request(_request(env))
    resp = ocsp.load_der_ocsp_response(
        build_response(
            responder,
            q,
            CertStatus("good"),
            this_update=env.now,
            next_update=env.now + dt.timedelta(hours=1),
            include_nonce=True,
        )
    )
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert resp.certificates == [env.ca.certificate]


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("malformed_request", ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
        ("internal_error", ocsp.OCSPResponseStatus.INTERNAL_ERROR),
        ("try_later", ocsp.OCSPResponseStatus.TRY_LATER),
        ("unauthorized", ocsp.OCSPResponseStatus.UNAUTHORIZED),
    ],
)
def test_error_response(kind: str, status: ocsp.OCSPResponseStatus) -> None:
    der = error_response(kind)  # type: ignore[arg-type]
    resp = ocsp.load_der_ocsp_response(der)
    assert resp.response_status is status
    assert len(der) == 5  # OCSPResponse { responseStatus } and nothing else


def test_error_response_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown OCSP error kind"):
        error_response("successful")  # type: ignore[arg-type]


# --- GET form ---------------------------------------------------------------------------------


def _awkward_request(env: Env) -> tuple[bytes, str]:
    """A request whose base64 holds '+', '/' and '=' (found by trying nonces)."""
    for i in range(10_000):
        der = _request(env, "sha1", i.to_bytes(16, "big"))
        b64 = base64.b64encode(der).decode()
        if "+" in b64 and "/" in b64 and b64.endswith("="):
            return der, b64
    raise AssertionError("no awkward request found")


def test_decode_get_path_forms(env: Env) -> None:
    der, b64 = _awkward_request(env)
    forms = {
        "fully-escaped": urllib.parse.quote(b64, safe=""),
        "lowercase-escapes": urllib.parse.quote(b64, safe="")
        .replace("%2F", "%2f")
        .replace("%2B", "%2b")
        .replace("%3D", "%3d"),
        "literal": b64,
        "slash-literal": urllib.parse.quote(b64, safe="/"),
        "unpadded": urllib.parse.quote(b64.rstrip("="), safe=""),
        "plus-as-space": b64.replace("+", " "),
        "leading-slash": "/" + urllib.parse.quote(b64, safe=""),
    }
    for name, path in forms.items():
        assert decode_get_path(path) == der, name
        assert parse_request(decode_get_path(path)).nonce is not None, name


@pytest.mark.parametrize(
    ("path", "exc"),
    [
        ("", BadRequestError),
        ("/", BadRequestError),
        ("%", BadRequestError),
        ("%ZZ", BadRequestError),
        ("%C3%A9", BadRequestError),
        ("é", BadRequestError),
        ("MEUw!", BadRequestError),
        ("M", BadRequestError),
        ("MEUwQzBB=MD8w", BadRequestError),
        ("MEUw%00", BadRequestError),
        ("MEUw-_", BadRequestError),  # base64url is not the RFC 6960 form
        ("A" * 40_000, TooLargeError),
        ("A" * 12_000, TooLargeError),  # decodes to more than MAX_OCSP_REQUEST_BYTES
    ],
    ids=lambda v: v[:12] if isinstance(v, str) else v.__name__,
)
def test_decode_get_path_rejects(path: str, exc: type[IotdlmError]) -> None:
    with pytest.raises(exc):
        decode_get_path(path)


def test_decode_get_path_then_parse_garbage() -> None:
    # valid base64 of garbage: decode_get_path returns bytes, parse_request refuses them
    with pytest.raises(BadRequestError):
        parse_request(decode_get_path("AAAA"))


# --- hypothesis -------------------------------------------------------------------------------


def _only_ours(fn: object, *args: object) -> object:
    try:
        return fn(*args)  # type: ignore[operator]
    except IotdlmError:
        return None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_parse_request_arbitrary_bytes(data: bytes) -> None:
    _only_ours(parse_request, data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_parse_request_mutated(env: Env, data: st.DataObject) -> None:
    der = bytearray(
        _request(env, data.draw(st.sampled_from(["sha1", "sha256"])), data.draw(st.sampled_from([None, b"m" * 16])))
    )
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(der) - 1)) if der else 0
        if op == "flip" and der:
            der[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and der:
            der[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del der[pos:]
        elif op == "insert":
            der[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and der:
            del der[pos]
    q = _only_ours(parse_request, bytes(der))
    if isinstance(q, OcspQuery) and env.responder.matches(q):
        # whatever parsed and is ours can be answered
        resp = _respond(env, q, CertStatus("unknown"))
        assert resp.serial_number == q.serial


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300) | st.text(alphabet="ABCDEFGHIJKLMabcdef0123456789+/=% ", max_size=300))
def test_decode_get_path_arbitrary_text(path: str) -> None:
    _only_ours(decode_get_path, path)


# --- timing -----------------------------------------------------------------------------------


def test_timing_sign_on_demand(env: Env) -> None:
    q = parse_request(_request(env, "sha1", b"t" * 16))
    n = 300
    start = time.perf_counter()
    for _ in range(n):
        der = build_response(
            env.responder,
            q,
            CertStatus("good"),
            this_update=env.now,
            next_update=env.now + dt.timedelta(hours=1),
            include_nonce=True,
        )
    elapsed = time.perf_counter() - start
    print(f"\nbuild_response (P-256, sign on demand): {n / elapsed:.0f} responses/s, {len(der)} bytes each")
    assert ocsp.load_der_ocsp_response(der).certificate_status is ocsp.OCSPCertStatus.GOOD


# --- openssl ----------------------------------------------------------------------------------

openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False, timeout=30)


@dataclass
class Files:
    dir: Path
    ca: Path
    chain: Path
    leaf: Path
    leaf_key: Path
    leaf2: Path


def _files(env: Env, d: Path) -> Files:
    f = Files(d, d / "ca.pem", d / "chain.pem", d / "leaf.pem", d / "leaf.key", d / "leaf2.pem")
    f.ca.write_bytes(pem(env.ca.certificate))
    f.chain.write_bytes(pem(env.ca.certificate) + pem(env.pki.root))
    f.leaf.write_bytes(pem(env.leaf))
    f.leaf2.write_bytes(pem(env.responder.certificate))  # any second certificate of this CA
    f.leaf_key.write_bytes(
        env.leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return f


@pytest.fixture(scope="module")
def files(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Files:
    return _files(env, tmp_path_factory.mktemp("ocsp"))


def _openssl_request(f: Files, name: str, *extra: str) -> Path:
    out = f.dir / name
    res = _run("ocsp", "-issuer", f.ca, *extra, "-cert", f.leaf, "-reqout", out)
    assert res.returncode == 0, res.stderr
    return out


def _check_nonce_and_signature(f: Files, req: Path, resp: Path) -> subprocess.CompletedProcess[str]:
    """-reqin and -respin without -cert: openssl checks the response's nonce against req's and
    verifies the signature (responder certificate up to -CAfile, delegated by the CertID's CA).
    With -cert, openssl builds a new request with a fresh nonce instead and reports a mismatch."""
    return _run("ocsp", "-reqin", req, "-respin", resp, "-CAfile", f.chain, "-resp_text", *attime(), *ocsp_window())


def _status_for_leaf(f: Files, resp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """openssl computes the leaf's CertID itself and looks it up in the response."""
    return _run(
        "ocsp", "-issuer", f.ca, *extra, "-cert", f.leaf, "-no_nonce", "-respin", resp, "-CAfile", f.chain,
        *attime(), *ocsp_window(),
    )  # fmt: skip


def _write_response(env: Env, f: Files, q: OcspQuery, status: CertStatus, name: str, *, nonce: bool = True) -> Path:
    out = f.dir / name
    out.write_bytes(
        build_response(
            env.responder,
            q,
            status,
            this_update=env.now,
            next_update=env.now + dt.timedelta(hours=1),
            include_nonce=nonce,
        )
    )
    return out


@pytest.mark.openssl
@openssl
@pytest.mark.parametrize("digest", ["sha1", "sha256"])
@pytest.mark.parametrize(
    ("status", "expect"),
    [
        (CertStatus("good"), ["leaf.pem: good"]),
        (
            CertStatus("revoked", dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC), "keyCompromise"),
            ["leaf.pem: revoked", "Reason: keyCompromise"],
        ),
        (CertStatus("unknown"), ["leaf.pem: unknown"]),
    ],
    ids=["good", "revoked", "unknown"],
)
def test_openssl_round_trip(env: Env, files: Files, digest: str, status: CertStatus, expect: list[str]) -> None:
    req = _openssl_request(files, f"req-{digest}.der", f"-{digest}")  # openssl adds a nonce by default
    q = parse_request(req.read_bytes())
    assert q.hash_algorithm == digest
    assert q.nonce is not None
    assert q.serial == env.leaf.serial_number
    assert env.responder.matches(q)
    resp = _write_response(env, files, q, status, f"resp-{digest}-{status.status}.der")

    checked = _check_nonce_and_signature(files, req, resp)
    assert checked.returncode == 0, checked.stderr
    assert "Response verify OK" in checked.stderr
    assert "WARNING: no nonce in response" not in checked.stderr
    assert "Nonce Verify error" not in checked.stderr
    assert f"Cert Status: {status.status}" in checked.stdout

    shown = _status_for_leaf(files, resp, f"-{digest}")
    assert shown.returncode == 0, shown.stderr
    assert "Response verify OK" in shown.stderr
    for line in expect:
        assert line in shown.stdout


@pytest.mark.openssl
@openssl
def test_openssl_notices_nonce_problems(env: Env, files: Files) -> None:
    req = _openssl_request(files, "req-nonce.der")
    q = parse_request(req.read_bytes())
    assert q.nonce is not None
    without = _write_response(env, files, q, CertStatus("good"), "resp-no-nonce.der", nonce=False)
    res = _check_nonce_and_signature(files, req, without)
    assert "WARNING: no nonce in response" in res.stderr
    other = dataclasses.replace(q, nonce=bytes(b ^ 0xFF for b in q.nonce))
    wrong = _write_response(env, files, other, CertStatus("good"), "resp-wrong-nonce.der")
    res = _check_nonce_and_signature(files, req, wrong)
    assert "Nonce Verify error" in res.stderr
    assert res.returncode != 0


@pytest.mark.openssl
@openssl
def test_openssl_notices_wrong_certid_and_wrong_trust(env: Env, files: Files, tmp_path: Path) -> None:
    q = parse_request(_openssl_request(files, "req-certid.der").read_bytes())
    resp = _write_response(env, files, q, CertStatus("good"), "resp-certid.der")
    # openssl asking with a SHA-256 CertID finds no answer in a response to a SHA-1 one
    assert "No Status found" in _status_for_leaf(files, resp, "-sha256").stdout
    # a different trust anchor: the responder certificate does not verify
    other = make_pki()
    anchor = tmp_path / "other-root.pem"
    anchor.write_bytes(pem(other.root))
    res = _run("ocsp", "-issuer", files.ca, "-cert", files.leaf, "-no_nonce", "-respin", resp, "-CAfile", anchor)
    assert "Response Verify Failure" in res.stderr


@pytest.mark.openssl
@openssl
def test_openssl_requests_we_refuse_or_take(env: Env, files: Files) -> None:
    multi = files.dir / "multi.der"
    res = _run("ocsp", "-issuer", files.ca, "-cert", files.leaf, "-cert", files.leaf2, "-reqout", multi)
    assert res.returncode == 0, res.stderr
    with pytest.raises(BadRequestError, match="exactly one"):
        parse_request(multi.read_bytes())
    md5 = _openssl_request(files, "md5.der", "-md5")
    with pytest.raises(BadRequestError, match="hash algorithm"):
        parse_request(md5.read_bytes())
    # a signed request: the signature is ignored (RFC 5019 2.1.2), the CertID read
    signed = _openssl_request(files, "signed.der", "-signer", str(files.leaf), "-signkey", str(files.leaf_key))
    q = parse_request(signed.read_bytes())
    assert q.serial == env.leaf.serial_number
    assert "Signature Algorithm" in _run("ocsp", "-reqin", signed, "-req_text").stdout  # it is signed


@pytest.mark.openssl
@openssl
@pytest.mark.parametrize("alg", [Algorithm.ED25519, Algorithm.P384, Algorithm.RSA3072], ids=lambda a: a.value)
def test_openssl_other_algorithms(alg: Algorithm, tmp_path: Path) -> None:
    env = _make_env(alg)
    f = _files(env, tmp_path)
    req = _openssl_request(f, "req.der")
    q = parse_request(req.read_bytes())
    resp = _write_response(env, f, q, CertStatus("revoked", env.now, "superseded"), "resp.der")
    checked = _check_nonce_and_signature(f, req, resp)
    assert checked.returncode == 0, checked.stderr
    assert "Response verify OK" in checked.stderr
    assert "Nonce Verify error" not in checked.stderr
    assert "WARNING" not in checked.stderr
    shown = _status_for_leaf(f, resp)
    assert "leaf.pem: revoked" in shown.stdout
    assert "Reason: superseded" in shown.stdout
