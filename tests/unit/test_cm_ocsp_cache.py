"""cm's cache of km's OCSP answers (cm/ocsp_cache.py): what it keeps, how long, and what drops it."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.cm.ocsp_cache import OcspCache, cacheable, revoked_serial
from iotdlm.pki import ocsp as pki_ocsp
from iotdlm.pki.profiles import DEFAULT_PROFILES
from tests.helpers import NOW, make_pki

PKI = make_pki()
CA = PKI.cas["operational"]
RESPONDER = pki_ocsp.Responder(ca=CA, certificate=CA.certificate, signer=CA.signer)
HOUR = dt.timedelta(hours=1)
GRACE = dt.timedelta(minutes=20)


def _request(serial: int, *, nonce: bool = False, algorithm: hashes.HashAlgorithm | None = None) -> bytes:
    leaf = CA.issue(
        DEFAULT_PROFILES["operational"],
        CA.certificate.public_key(),  # type: ignore[arg-type]
        x509.Name([]),
        now=NOW,
        serial=serial,
    )
    b = ocsp.OCSPRequestBuilder().add_certificate(leaf, CA.certificate, algorithm or hashes.SHA256())
    if nonce:
        b = b.add_extension(x509.OCSPNonce(b"n" * 16), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def _answer(request: bytes, status: str = "good", *, next_update: dt.timedelta | None = HOUR) -> bytes:
    query = pki_ocsp.parse_request(request)
    cert_status = (
        pki_ocsp.CertStatus("revoked", revoked_at=NOW, reason="keyCompromise")
        if status == "revoked"
        else pki_ocsp.CertStatus(status)  # type: ignore[arg-type]
    )
    return pki_ocsp.build_response(
        RESPONDER,
        query,
        cert_status,
        this_update=NOW,
        next_update=NOW + next_update if next_update is not None else NOW + HOUR,
        include_nonce=query.nonce is not None,
    )


def _cache() -> OcspCache:
    return OcspCache(good_for=GRACE)


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("with a nonce", lambda: _answer(_request(7, nonce=True))),
        ("unknown", lambda: _answer(_request(7), "unknown")),
        ("unauthorized", lambda: pki_ocsp.error_response("unauthorized")),
        ("try later", lambda: pki_ocsp.error_response("try_later")),
        ("not DER", lambda: b"\x30\x03\x0a\x01\x00"),
        ("empty", lambda: b""),
    ],
)
def test_what_is_never_kept(name: str, answer: object) -> None:
    der = answer()  # type: ignore[operator]
    cache = _cache()
    assert cacheable(der) is None, name
    assert cache.put(_request(7), der, NOW) is False
    assert cache.get(_request(7), NOW) is None
    assert len(cache) == 0


def test_a_good_answer_is_kept_until_next_update_or_the_supersession_grace() -> None:
    req = _request(7)
    cache = _cache()
    good = _answer(req)
    assert cache.put(req, good, NOW)
    assert cache.get(req, NOW + GRACE - dt.timedelta(seconds=1)) == good
    assert cache.get(req, NOW + GRACE) is None  # a supersession may have taken effect: ask km
    assert len(cache) == 0
    # a grace longer than the answer's validity: nextUpdate ends it
    long = OcspCache(good_for=3 * HOUR)
    assert long.put(req, _answer(req), NOW)
    assert long.get(req, NOW + HOUR - dt.timedelta(seconds=1)) is not None
    assert long.get(req, NOW + HOUR) is None
    # no grace at all: a good answer is never kept
    assert OcspCache(good_for=dt.timedelta(0)).put(req, _answer(req), NOW) is False


def test_a_revoked_answer_is_kept_until_next_update() -> None:
    req = _request(7)
    cache = _cache()
    assert cache.put(req, _answer(req, "revoked"), NOW)
    assert cache.get(req, NOW + HOUR - dt.timedelta(seconds=1)) is not None
    assert cache.get(req, NOW + HOUR) is None
    assert cache.put(req, _answer(req, "revoked"), NOW + HOUR) is False  # already stale


def test_a_revocation_drops_every_answer_for_the_serial_and_keeps_the_others() -> None:
    cache = _cache()
    sha1 = _request(7, algorithm=hashes.SHA1())  # noqa: S303 -- RFC 5019 CertIDs
    sha256 = _request(7)
    other = _request(8)
    answers = {req: _answer(req) for req in (sha1, sha256, other)}
    for req, answer in answers.items():
        assert cache.put(req, answer, NOW)
    assert cache.revoked(7) == 2
    assert cache.get(sha1, NOW) is None
    assert cache.get(sha256, NOW) is None
    assert cache.get(other, NOW) == answers[other]
    # a km worker that has not heard of it yet answers good: relayed, never kept
    assert cache.put(sha256, _answer(sha256), NOW) is False
    assert cache.get(sha256, NOW) is None
    # the revoked answer is kept
    assert cache.put(sha256, _answer(sha256, "revoked"), NOW)
    assert cache.get(sha256, NOW) is not None
    assert cache.revoked(99) == 0


def test_the_oldest_used_answer_goes_first_when_full() -> None:
    cache = OcspCache(good_for=GRACE, size=2)
    a, b, c = _request(1), _request(2), _request(3)
    cache.put(a, _answer(a), NOW)
    cache.put(b, _answer(b), NOW)
    assert cache.get(a, NOW) is not None  # a used last: b goes
    cache.put(c, _answer(c), NOW)
    assert len(cache) == 2
    assert cache.get(b, NOW) is None
    assert cache.get(a, NOW) is not None
    assert cache.get(c, NOW) is not None
    cache.revoked(1)
    cache.revoked(3)
    assert len(cache) == 0


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one"):
        OcspCache(good_for=GRACE, size=0)
    with pytest.raises(ValueError, match="negative"):
        OcspCache(good_for=dt.timedelta(seconds=-1))


@given(st.binary(max_size=600))
def test_cacheable_takes_any_bytes(data: bytes) -> None:
    assert cacheable(data) is None or isinstance(cacheable(data), tuple)


@given(st.integers(min_value=0, max_value=400))
def test_cacheable_takes_any_truncation_of_a_real_answer(cut: int) -> None:
    der = _answer(_request(7))
    facts = cacheable(der[:cut])
    assert facts is None or der[:cut] == der


@pytest.mark.parametrize(
    ("event", "serial"),
    [
        (b'{"issuer": "operational", "serial": "1f"}', 0x1F),
        (b'{"issuer":"operational","serial":"' + b"a" * 40 + b'"}', int("a" * 40, 16)),
        (b'{"serial": "' + b"a" * 41 + b'"}', None),
        (b'{"serial": ""}', None),
        (b'{"serial": 31}', None),
        (b'{"serial": "xyz"}', None),
        (b'{"serial": "-1f"}', None),
        (b'{"serial": " 1f"}', None),
        (b'{"serial": "0x1f"}', None),
        (b'{"issuer": "operational"}', None),
        (b'["serial"]', None),
        (b'"serial"', None),
        (b"\xff\xfe", None),
        (b"", None),
    ],
)
def test_revocation_events_are_read_or_refused(event: bytes, serial: int | None) -> None:
    assert revoked_serial(event) == serial


@given(
    st.one_of(
        st.binary(max_size=80),
        st.dictionaries(st.sampled_from(["serial", "issuer", "x"]), st.text(max_size=50)).map(
            lambda d: json.dumps(d).encode()
        ),
    )
)
def test_revoked_serial_takes_any_bytes(event: bytes) -> None:
    serial = revoked_serial(event)
    assert serial is None or 0 <= serial < 16**40
