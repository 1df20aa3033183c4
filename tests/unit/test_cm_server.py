"""cm's handlers over a fake km (no NATS, plain HTTP on loopback): the error boundary, caching
headers, /cacerts refresh and fallback, /csrattrs. The TLS paths run in tests/integration/test_cm.py."""

from __future__ import annotations

import base64
import datetime as dt
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.clock import FixedClock
from iotdlm.cm import est
from iotdlm.cm.cacerts import CaCerts
from iotdlm.cm.config import Limits
from iotdlm.cm.http_cache import MAX_AGE_CAP, crl_cache_headers, freshness_headers, ocsp_cache_headers, parse_crl_path
from iotdlm.cm.server import ClientCertificateRequiredError, CmApp, RequestTimeoutError, status_for
from iotdlm.errors import (
    BadRequestError,
    BadSignatureError,
    ConflictError,
    InternalError,
    IotdlmError,
    ModeError,
    NotAuthorizedError,
    NotFoundError,
    PermissionDeniedError,
    ReplayError,
    TooLargeError,
    UnavailableError,
    UnsupportedError,
    UntrustedError,
)
from iotdlm.pki import crl as pki_crl
from iotdlm.pki import ocsp as pki_ocsp
from iotdlm.pki.ca import PublicUrls
from iotdlm.pki.chain import der
from iotdlm.pki.keys import Algorithm
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.wire import audit as wire_audit
from iotdlm.wire import km as msg
from tests.helpers import NOW, make_pki

PKI = make_pki()
URLS = PublicUrls("http://127.0.0.1:8080", crl_partitions=4)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (est.UnsupportedMediaTypeError("x"), 415),
        (TooLargeError("x"), 413),
        (RequestTimeoutError("x"), 408),
        (ClientCertificateRequiredError("x"), 401),
        (UntrustedError("x"), 403),
        (NotAuthorizedError("x"), 403),
        (NotFoundError("x"), 404),
        (ConflictError("x"), 409),
        (BadRequestError("x"), 400),
        (BadSignatureError("x"), 400),
        (UnsupportedError("x"), 400),
        (ModeError("x"), 503),
        (UnavailableError("x"), 503),
        (ReplayError("x"), 502),
        (PermissionDeniedError("x"), 502),
        (InternalError("x"), 502),
        (IotdlmError("x"), 500),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_status_for(exc: IotdlmError, status: int) -> None:
    assert status_for(exc) == status


# --- a fake km -----------------------------------------------------------------------------------
@dataclass
class FakeKm:
    ocsp_answer: bytes = b""
    crl_answer: bytes = b""
    error: BaseException | None = None
    chain_calls: int = 0
    chain_error: IotdlmError | None = None
    seen: list[tuple[str, int, bool]] = field(default_factory=list)
    audit_answer: bytes = b""

    async def audit_checkpoint(self) -> bytes:
        return self.audit_answer

    async def audit_consistency(self, first: int, second: int) -> wire_audit.ConsistencyProof:
        self.seen.append(("consistency", first, second == first))
        if second > 15:
            raise BadRequestError(f"second={second} is beyond the newest signed tree head (15 records)")
        return wire_audit.ConsistencyProof(first=first, second=second, proof=["d" * 64])

    async def est(self, operation: str, client_certificate: bytes, csr: bytes) -> msg.EstResponse:
        raise AssertionError("no enrollment without TLS")

    async def ocsp(self, request_der: bytes) -> bytes:
        if self.error is not None:
            raise self.error
        return self.ocsp_answer

    async def crl(self, issuer: str, partition: int, *, delta: bool = False) -> bytes:
        self.seen.append((issuer, partition, delta))
        if self.error is not None:
            raise self.error
        return self.crl_answer

    async def chain(self) -> msg.ChainResponse:
        self.chain_calls += 1
        if self.chain_error is not None:
            raise self.chain_error
        return msg.ChainResponse(
            root=der(PKI.root), chains={n: [der(ca.certificate), der(PKI.root)] for n, ca in PKI.cas.items()}
        )


@dataclass
class Env:
    km: FakeKm
    clock: FixedClock
    app: CmApp
    http: TestClient[web.Request, web.Application]


async def _env(*, seed: bool = True, csrattrs: bytes | None = None) -> tuple[Env, TestServer]:
    km = FakeKm()
    clock = FixedClock(NOW)
    cacerts = CaCerts([PKI.root] if seed else [], fetch=km.chain, clock=clock, ttl=60)
    app = CmApp(
        km,
        clock=clock,
        limits=Limits(retry_after=9),
        cacerts=cacerts,
        csrattrs=est.csrattrs_der(None) if csrattrs is None else csrattrs,
    )
    server = TestServer(app.https_app(), host="127.0.0.1")
    client: TestClient[web.Request, web.Application] = TestClient(server)
    await client.start_server()
    return Env(km, clock, app, client), server


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e, _server = await _env()
    try:
        yield e
    finally:
        await e.http.close()


def _ocsp_request(*, nonce: bool = False) -> bytes:
    ca = PKI.cas["operational"]
    leaf = ca.issue(
        DEFAULT_PROFILES["operational"],
        ca.certificate.public_key(),  # type: ignore[arg-type]
        x509.Name([]),
        now=NOW,
        serial=1234,
    )
    b = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca.certificate, hashes.SHA256())
    if nonce:
        b = b.add_extension(x509.OCSPNonce(b"n" * 16), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def _ocsp_response(*, nonce: bool = False) -> bytes:
    ca = PKI.cas["operational"]
    responder = pki_ocsp.Responder(ca=ca, certificate=ca.certificate, signer=ca.signer)
    return pki_ocsp.build_response(
        responder,
        pki_ocsp.parse_request(_ocsp_request(nonce=nonce)),
        pki_ocsp.CertStatus("good"),
        this_update=NOW,
        next_update=NOW + dt.timedelta(hours=1),
        include_nonce=nonce,
    )


def _ocsp_get_path() -> str:
    return base64.b64encode(_ocsp_request()).decode().replace("/", "%2F")


# --- OCSP ----------------------------------------------------------------------------------------
async def test_ocsp_get_caches_until_next_update(env: Env) -> None:
    env.km.ocsp_answer = _ocsp_response()
    env.clock.advance(dt.timedelta(minutes=10))
    resp = await env.http.get(f"/ocsp/{_ocsp_get_path()}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/ocsp-response"
    assert resp.headers["Cache-Control"] == "max-age=3000, public, no-transform, must-revalidate"
    assert resp.headers["Server"] == "iotdlm-cm"
    assert "Last-Modified" in resp.headers
    assert "Expires" in resp.headers
    assert await resp.read() == env.km.ocsp_answer
    again = await env.http.get(f"/ocsp/{_ocsp_get_path()}", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304
    # POST answers are not for caches
    post = await env.http.post("/ocsp", data=b"\x30\x00", headers={"Content-Type": "application/ocsp-request"})
    assert post.headers["Cache-Control"] == "no-cache"


async def test_ocsp_nonce_and_error_answers_are_not_cached(env: Env) -> None:
    env.km.ocsp_answer = _ocsp_response(nonce=True)
    resp = await env.http.get(f"/ocsp/{_ocsp_get_path()}")
    assert resp.headers["Cache-Control"] == "no-cache"
    env.km.ocsp_answer = pki_ocsp.error_response("unauthorized")
    resp = await env.http.get(f"/ocsp/{_ocsp_get_path()}")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-cache"


@pytest.mark.parametrize(
    ("error", "ocsp_status"),
    [
        (UnavailableError("km away"), ocsp.OCSPResponseStatus.TRY_LATER),
        (ModeError("not now"), ocsp.OCSPResponseStatus.TRY_LATER),
        (TimeoutError(), ocsp.OCSPResponseStatus.TRY_LATER),
        (InternalError("boom"), ocsp.OCSPResponseStatus.INTERNAL_ERROR),
        (ReplayError("again"), ocsp.OCSPResponseStatus.INTERNAL_ERROR),
        (PermissionDeniedError("nats says no"), ocsp.OCSPResponseStatus.INTERNAL_ERROR),
        (RuntimeError("a bug in the relay"), ocsp.OCSPResponseStatus.INTERNAL_ERROR),
        (ValueError("km's answer does not parse"), ocsp.OCSPResponseStatus.INTERNAL_ERROR),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v.name,
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_ocsp_relay_failures_are_ocsp_answers_never_500(
    env: Env, error: BaseException, ocsp_status: ocsp.OCSPResponseStatus, method: str
) -> None:
    """One rule for GET and POST: HTTP 200 and the OCSP status (see cm.server's module doc)."""
    env.km.error = error
    if method == "GET":
        resp = await env.http.get(f"/ocsp/{_ocsp_get_path()}")
    else:
        resp = await env.http.post("/ocsp", data=_ocsp_request(), headers={"Content-Type": "application/ocsp-request"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/ocsp-response"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert ocsp.load_der_ocsp_response(await resp.read()).response_status is ocsp_status
    if ocsp_status is ocsp.OCSPResponseStatus.TRY_LATER:
        assert resp.headers["Retry-After"] == "9"
    else:
        assert "Retry-After" not in resp.headers


def _post(body: bytes, content_type: str | None = "application/ocsp-request") -> tuple[str, str, dict[str, str], bytes]:
    return ("POST", "/ocsp", {"Content-Type": content_type} if content_type is not None else {}, body)


@pytest.mark.parametrize(
    ("method", "path", "headers", "body"),
    [
        ("GET", "/ocsp/@@@", {}, b""),
        ("GET", "/ocsp/%00%01", {}, b""),
        _post(b"x", "text/plain"),
        _post(b"x", None),
        _post(b"x", "application/ocsp-requests"),
        _post(b"0" * 9000),  # larger than max_ocsp_request_bytes
    ],
    ids=["get-not-base64", "get-control-chars", "post-text-plain", "post-no-type", "post-near-type",
         "post-too-large"],
)  # fmt: skip
async def test_ocsp_malformed_requests_get_malformed_request_200(
    env: Env, method: str, path: str, headers: dict[str, str], body: bytes
) -> None:
    """What used to be 400 (GET), 414 (GET), 415 text/plain (POST) and 413 text/plain (POST) is now
    one answer: an OCSPResponse malformedRequest with HTTP 200; km is not asked."""
    resp = await env.http.request(method, path, headers=headers, data=body or None)
    assert resp.status == 200, await resp.read()
    assert resp.headers["Content-Type"] == "application/ocsp-response"
    answer = ocsp.load_der_ocsp_response(await resp.read())
    assert answer.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


# "." and "..", even percent-encoded, are dot segments: every client removes them (RFC 3986 5.2.4),
# so the request would be for /ocsp/ or /, not for a path below /ocsp/
@given(st.text(max_size=300).filter(lambda p: p not in (".", "..")))
async def test_ocsp_get_answers_any_path_with_an_ocsp_response(path: str) -> None:
    """Whatever text follows /ocsp/: an OCSPResponse (km's, or malformedRequest), never a text refusal."""
    from urllib.parse import quote

    e, _server = await _env()
    e.km.ocsp_answer = pki_ocsp.error_response("unauthorized")
    try:
        resp = await e.http.get("/ocsp/" + quote(path, safe="") if path else "/ocsp/A")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/ocsp-response"
        ocsp.load_der_ocsp_response(await resp.read())
    finally:
        await e.http.close()


async def test_ocsp_get_path_too_long_is_refused(env: Env) -> None:
    resp = await env.http.get("/ocsp/" + "A" * 9000)  # beyond the request line limit: never reaches the route
    assert 400 <= resp.status < 500
    assert "Traceback" not in await resp.text()


# --- CRLs ----------------------------------------------------------------------------------------
def _crl() -> bytes:
    crl = pki_crl.build_crl(
        PKI.cas["operational"],
        [],
        number=1,
        this_update=NOW,
        next_update=NOW + dt.timedelta(days=1),
        partition=2,
        urls=URLS,
    )
    return crl.public_bytes(serialization.Encoding.DER)


async def test_crl_paths_and_headers(env: Env) -> None:
    env.km.crl_answer = _crl()
    resp = await env.http.get("/crl/operational/2.crl")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/pkix-crl"
    assert resp.headers["Cache-Control"].startswith("max-age=86400,")
    resp = await env.http.get("/crl/operational/2.delta")
    assert resp.status == 200
    assert env.km.seen == [("operational", 2, False), ("operational", 2, True)]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotFoundError("no such partition"), 404),
        (BadRequestError("bad partition"), 404),
        (UnavailableError("km away"), 503),
        (ModeError("cm only"), 503),
        (PermissionDeniedError("nats says no"), 502),
        (RuntimeError("a bug in km"), 500),
    ],
)
async def test_crl_errors_are_one_line_and_logged(
    env: Env, error: BaseException, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    env.km.error = error
    with caplog.at_level(logging.INFO, logger="iotdlm.cm.server"):
        resp = await env.http.get("/crl/operational/1.crl")
    text = await resp.text()
    assert resp.status == status
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert text.count("\n") == 1
    assert "Traceback" not in text
    assert "RuntimeError" not in text
    if status == 500:
        assert text == "internal error\n"
    if status == 503:
        assert resp.headers["Retry-After"] == "9"
    assert caplog.records, "every refusal is logged"


# --- /cacerts and /csrattrs ----------------------------------------------------------------------
async def test_cacerts_refreshes_from_km_and_keeps_the_last_known_set(env: Env) -> None:
    resp = await env.http.get("/.well-known/est/cacerts")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/pkcs7-mime; smime-type=certs-only"
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(await resp.read()))
    assert set(certs) == {PKI.root, *(ca.certificate for ca in PKI.cas.values())}
    assert env.km.chain_calls == 1
    await env.http.get("/.well-known/est/cacerts")
    assert env.km.chain_calls == 1  # within the ttl: not asked again
    env.clock.advance(dt.timedelta(seconds=61))
    env.km.chain_error = UnavailableError("km is off")
    resp = await env.http.get("/.well-known/est/cacerts")
    assert resp.status == 200
    assert env.km.chain_calls == 2
    assert set(pkcs7.load_der_pkcs7_certificates(base64.b64decode(await resp.read()))) == set(certs)


async def test_cacerts_without_seed_and_without_km_is_503() -> None:
    e, _server = await _env(seed=False)
    try:
        e.km.chain_error = UnavailableError("km is off")
        resp = await e.http.get("/.well-known/est/cacerts")
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "9"
    finally:
        await e.http.close()


async def test_csrattrs() -> None:
    e, _server = await _env(csrattrs=est.csrattrs_der(Algorithm.P256))
    try:
        resp = await e.http.get("/.well-known/est/csrattrs")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/csrattrs"
        assert base64.b64decode(await resp.read()) == est.csrattrs_der(Algorithm.P256)
    finally:
        await e.http.close()
    e, _server = await _env()  # nothing asked for: 204
    try:
        resp = await e.http.get("/.well-known/est/csrattrs")
        assert resp.status == 204
    finally:
        await e.http.close()


async def test_enrollment_without_a_client_certificate_is_401(env: Env) -> None:
    resp = await env.http.post(
        "/.well-known/est/simpleenroll", data=b"AAAA", headers={"Content-Type": "application/pkcs10"}
    )
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Certificate")


async def test_http_app_refuses_est(env: Env) -> None:
    server = TestServer(env.app.http_app(), host="127.0.0.1")
    client: TestClient[web.Request, web.Application] = TestClient(server)
    await client.start_server()
    try:
        for method, path in [("GET", "cacerts"), ("POST", "simpleenroll"), ("GET", "x/y")]:
            resp = await client.request(method, f"/.well-known/est/{path}")
            assert resp.status == 403
    finally:
        await client.close()


# --- the VA helpers (pure) -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("issuer", "name", "expected"),
    [
        ("operational", "0.crl", ("operational", 0, False)),
        ("factory", "63.delta", ("factory", 63, True)),
        ("operational", "4095.crl", ("operational", 4095, False)),
    ],
)
def test_parse_crl_path(issuer: str, name: str, expected: tuple[str, int, bool]) -> None:
    assert parse_crl_path(issuer, name) == expected


@pytest.mark.parametrize(
    ("issuer", "name"),
    [
        ("operational", "01.crl"),
        ("operational", "-1.crl"),
        ("operational", "1.pem"),
        ("operational", "1.crl.crl"),
        ("operational", "123456.crl"),
        ("Operational", "1.crl"),
        ("..", "1.crl"),
        ("operational", ""),
    ],
)
def test_parse_crl_path_refuses(issuer: str, name: str) -> None:
    with pytest.raises(NotFoundError):
        parse_crl_path(issuer, name)


@given(st.text(max_size=40), st.text(max_size=40))
def test_parse_crl_path_takes_any_text(issuer: str, name: str) -> None:
    try:
        out = parse_crl_path(issuer, name)
    except NotFoundError:
        return
    assert out[1] >= 0


def test_freshness_headers_bounds() -> None:
    past = freshness_headers(b"x", this_update=NOW, next_update=NOW - dt.timedelta(hours=1), now=NOW)
    assert past["Cache-Control"].startswith("max-age=0,")
    far = freshness_headers(b"x", this_update=NOW, next_update=NOW + dt.timedelta(days=365), now=NOW)
    assert far["Cache-Control"].startswith(f"max-age={MAX_AGE_CAP},")
    none = freshness_headers(b"x", this_update=None, next_update=None, now=NOW)
    assert none["Cache-Control"] == "no-cache"


@given(st.binary(max_size=200))
def test_cache_header_helpers_take_any_bytes(data: bytes) -> None:
    assert "Cache-Control" in ocsp_cache_headers(data, NOW)
    assert "Cache-Control" in crl_cache_headers(data, NOW)


def test_ca_certs_from_chain_dedups_and_ends_with_the_root() -> None:
    chain = msg.ChainResponse(
        root=der(PKI.root), chains={n: [der(ca.certificate), der(PKI.root)] for n, ca in PKI.cas.items()}
    )
    certs = CaCerts.from_chain(chain)
    assert certs[-1] == PKI.root
    assert len(certs) == 4
    assert all(isinstance(c, x509.Certificate) for c in certs)


def test_every_error_class_has_its_own_wire_code() -> None:
    """cm's and the EST client's error classes must not shadow another class in from_wire."""
    import iotdlm.cm.coap
    import iotdlm.cm.server
    import iotdlm.device.coap_client
    import iotdlm.device.est_client
    from iotdlm.errors import _all_subclasses, from_wire

    classes = _all_subclasses(IotdlmError)
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)
    for cls in classes:
        assert type(from_wire(cls("m", field="f").to_wire())) is cls
    assert iotdlm.cm.server.ClientCertificateRequiredError.code == "client_certificate_required"


async def test_ocsp_get_takes_unescaped_slashes_and_pluses(env: Env) -> None:
    """RFC 5019 clients do not all escape '/', '+' and '=': the raw path is decoded as sent."""
    env.km.ocsp_answer = _ocsp_response()
    seen: list[bytes] = []

    async def ocsp(request_der: bytes) -> bytes:
        seen.append(request_der)
        return env.km.ocsp_answer

    env.km.ocsp = ocsp  # type: ignore[method-assign]
    for i in range(40):  # until a request's base64 holds both '/' and '+'
        der = _ocsp_request() if i == 0 else _ocsp_request_with_serial(1000 + i)
        text = base64.b64encode(der).decode()
        if "/" in text and "+" in text:
            break
    else:
        pytest.fail("no request among 40 whose base64 holds both '/' and '+'")
    resp = await env.http.get("/ocsp/" + text)
    assert resp.status == 200
    assert seen == [der]


def _ocsp_request_with_serial(serial: int) -> bytes:
    ca = PKI.cas["operational"]
    leaf = ca.issue(
        DEFAULT_PROFILES["operational"],
        ca.certificate.public_key(),  # type: ignore[arg-type]
        x509.Name([]),
        now=NOW,
        serial=serial,
    )
    return (
        ocsp.OCSPRequestBuilder()
        .add_certificate(leaf, ca.certificate, hashes.SHA1())  # noqa: S303 -- RFC 5019 CertID
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def test_cm_mode_sets_follow_table_1() -> None:
    from iotdlm.cm.server import CM_MODES, EGRESS_MODES, ENROLL_MODES
    from iotdlm.modes.table import modes_where

    assert {str(m) for m in modes_where("cm")} == CM_MODES
    assert {str(m) for m in modes_where("cm") & modes_where("km")} == ENROLL_MODES
    assert {str(m) for m in modes_where("cm") & modes_where("sm")} == EGRESS_MODES


async def test_a_mode_check_refuses_with_503(env: Env) -> None:
    from iotdlm.errors import ModeError

    class Provisioning:
        def require(self, allowed_modes: object, what: str) -> str:
            raise ModeError(f"cm refuses {what} in mode provisioning-certificate")

    env.app.mode = Provisioning()
    resp = await env.http.get("/.well-known/est/cacerts")
    assert resp.status == 503
    assert "provisioning-certificate" in await resp.text()
    resp = await env.http.get(f"/ocsp/{_ocsp_get_path()}")
    assert resp.status == 200  # OCSP: the status is in the OCSPResponse
    assert ocsp.load_der_ocsp_response(await resp.read()).response_status is ocsp.OCSPResponseStatus.TRY_LATER


# --- CA certificates at the AIA caIssuers URLs, the root's CRL -------------------------------------
@pytest.mark.parametrize("app", ["https", "http"])
async def test_ca_certificates_by_name_on_both_listeners(app: str) -> None:
    """``/ca/{name}.crt``: the DER certificate (application/pkix-cert) of each CA, from the chain
    cm already fetches for /cacerts; an unknown name is 404."""
    km = FakeKm()
    cacerts = CaCerts({"root": PKI.root}, fetch=km.chain, clock=FixedClock(NOW), ttl=60)
    cm = CmApp(km, clock=FixedClock(NOW), limits=Limits(), cacerts=cacerts, csrattrs=b"")
    async with TestClient(TestServer(cm.https_app() if app == "https" else cm.http_app())) as http:
        for name in ("root", "factory", "operational", "service"):
            resp = await http.get(f"/ca/{name}.crt")
            assert resp.status == 200, name
            assert resp.headers["Content-Type"] == "application/pkix-cert"
            assert resp.headers["Cache-Control"] == "max-age=60, public, no-transform"
            expected = PKI.root if name == "root" else PKI.cas[name].certificate
            assert x509.load_der_x509_certificate(await resp.read()) == expected
            again = await http.get(f"/ca/{name}.crt", headers={"If-None-Match": resp.headers["ETag"]})
            assert again.status == 304
        assert km.chain_calls == 1  # one fetch serves /cacerts and every name until the ttl
        for bad in ("/ca/nobody.crt", "/ca/root.pem", "/ca/ROOT.crt", "/ca/.crt", "/ca/root.crt.crt", "/ca/%00.crt"):
            resp = await http.get(bad)
            assert resp.status == 404, bad
            assert resp.headers["Content-Type"].startswith("text/plain")


async def test_ca_certificates_from_the_seed_while_km_is_away() -> None:
    km = FakeKm(chain_error=UnavailableError("km away"))
    cacerts = CaCerts(
        {"service": PKI.cas["service"].certificate, "root": PKI.root}, fetch=km.chain, clock=FixedClock(NOW)
    )
    cm = CmApp(km, clock=FixedClock(NOW), limits=Limits(), cacerts=cacerts, csrattrs=b"")
    async with TestClient(TestServer(cm.http_app())) as http:
        resp = await http.get("/ca/service.crt")
        assert resp.status == 200
        assert await resp.read() == der(PKI.cas["service"].certificate)
        assert (await http.get("/ca/factory.crt")).status == 404
    # no seed, no km: 503 (not known yet), not 404
    empty = CmApp(
        km,
        clock=FixedClock(NOW),
        limits=Limits(),
        cacerts=CaCerts([], fetch=km.chain, clock=FixedClock(NOW)),
        csrattrs=b"",
    )
    async with TestClient(TestServer(empty.http_app())) as http:
        resp = await http.get("/ca/root.crt")
        assert resp.status == 503


@pytest.mark.parametrize("app", ["https", "http"])
async def test_the_root_crl_is_relayed(app: str) -> None:
    """``/crl/root/0.crl``: km answers for issuer "root" (the root's CRL, partition 0)."""
    km = FakeKm(crl_answer=_crl())
    cm = CmApp(
        km, clock=FixedClock(NOW), limits=Limits(), cacerts=CaCerts([], fetch=None, clock=FixedClock(NOW)), csrattrs=b""
    )
    async with TestClient(TestServer(cm.https_app() if app == "https" else cm.http_app())) as http:
        resp = await http.get("/crl/root/0.crl")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/pkix-crl"
    assert km.seen == [("root", 0, False)]


# --- the audit log's newest signed tree head ----------------------------------------------------------
_TREE_HEAD = (
    b'{"size":15,"hash":"' + b"a" * 64 + b'","root":"' + b"b" * 64
    + b'","at":"2026-11-21T12:00:00Z","signer":"' + b"c" * 64 + b'","signature":"3044"}'
)  # fmt: skip


async def test_audit_checkpoint_relays_kms_tree_head(env: Env) -> None:
    env.km.audit_answer = _TREE_HEAD
    resp = await env.http.get("/audit/checkpoint")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["Cache-Control"] == "no-cache"
    got = await resp.json()
    assert got["size"] == 15
    assert got["root"] == "b" * 64
    assert (await env.http.post("/audit/checkpoint", data=b"{}")).status == 405  # read-only


async def test_a_malformed_tree_head_from_km_is_not_relayed(env: Env) -> None:
    env.km.audit_answer = _TREE_HEAD.replace(b'"size":15', b'"size":"15"')
    resp = await env.http.get("/audit/checkpoint")
    assert resp.status == 503
    text = await resp.text()
    assert "km's tree head is not a signed tree head" in text
    assert "Traceback" not in text


async def test_audit_consistency_relays_kms_proof(env: Env) -> None:
    resp = await env.http.get("/audit/consistency?first=5&second=15")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert await resp.json() == {"first": 5, "second": 15, "proof": ["d" * 64]}
    assert env.km.seen == [("consistency", 5, False)]
    assert (await env.http.post("/audit/consistency?first=5&second=15", data=b"{}")).status == 405  # read-only


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("", "the query needs first="),
        ("first=5", "the query needs second="),
        ("first=0&second=3", "first must be a record count from 1, not 0"),
        ("first=6&second=5", "second must be at least first (6), not 5"),
        ("first=-1&second=5", "first must be a decimal number of records"),
        ("first=1.5&second=5", "first must be a decimal number of records"),
        ("first=%D9%A1&second=5", "first must be a decimal number of records"),  # an Arabic-Indic one
        ("first=1&first=2&second=3", "the query must be first=M&second=N"),
        ("first=1&size=3", "unknown query parameter 'size'"),
        ("first=1&second=99999999999999999999", "second must be a decimal number of records"),
        ("first=1&second=16", "beyond the newest signed tree head (15 records)"),  # km's check
    ],
)
async def test_audit_consistency_refuses_a_bad_query_with_400(env: Env, query: str, words: str) -> None:
    resp = await env.http.get(f"/audit/consistency?{query}")
    assert resp.status == 400
    text = await resp.text()
    assert words in text
    assert "Traceback" not in text
