"""The device's EST client against hostile or odd servers (a fake EST server over real TLS on
loopback), its error mapping, and its response parsers (Hypothesis)."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.clock import SystemClock
from iotdlm.cm import est
from iotdlm.cm.tls import server_tls_context
from iotdlm.device import est_client
from iotdlm.device.est_client import EstClient, EstUnavailableError
from iotdlm.errors import (
    BadRequestError,
    ConflictError,
    InternalError,
    NotAuthorizedError,
    NotFoundError,
    TooLargeError,
    UntrustedError,
)
from iotdlm.pki import cms_envelope, est_proof
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.keys import Algorithm, PrivateKey, generate_key, private_key_to_pem
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_subject, device_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES
from tests.helpers import make_csr, make_pki

REAL_NOW = SystemClock().now()
PKI = make_pki(now=REAL_NOW)  # real TLS checks validity against the real clock
SERVER = PKI.tls_server("cm", now=REAL_NOW)
ROOT_PEM = certs_to_pem([PKI.root])
KEY = generate_key(Algorithm.P256)
LEAF = PKI.cas["operational"].issue(
    DEFAULT_PROFILES["operational"],
    KEY.public_key(),
    device_subject("dev-1", "T", "x"),
    now=REAL_NOW,
    serial=1,
    uris=[device_uri("dev-1", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FAKE_NONCE = "n" * est_proof.NONCE_CHARS


@dataclass
class Fake:
    url: str
    handlers: dict[str, Handler]


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    handlers: dict[str, Handler] = {
        "iotdlm-nonce": _reply(b'{"nonce": "%s"}' % FAKE_NONCE.encode(), "application/json")
    }

    async def dispatch(request: web.Request) -> web.StreamResponse:
        return await handlers[request.match_info["op"]](request)

    app = web.Application()
    app.router.add_route("*", "/.well-known/est/{op}", dispatch)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    ctx = server_tls_context(
        certificate_chain=[SERVER.cert, PKI.cas["service"].certificate],
        key_pem=private_key_to_pem(SERVER.key, None),
        client_cas=[PKI.root, PKI.cas["operational"].certificate],
    )
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        yield Fake(f"https://127.0.0.1:{site.port}", handlers)
    finally:
        await runner.cleanup()


def _client(fake: Fake, **kwargs: object) -> EstClient:
    return EstClient(
        fake.url,
        trust_anchor_pem=ROOT_PEM,
        client_cert_pem=certs_to_pem([LEAF]),
        client_key_pem=private_key_to_pem(KEY, None),
        **kwargs,  # type: ignore[arg-type]
    )


def _reply(body: bytes, ctype: str = est.CERTS_ONLY, status: int = 200, **headers: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, headers={"Content-Type": ctype, **headers})

    return handler


@pytest.mark.real_clock
async def test_enroll_sends_base64_pkcs10_and_checks_the_answer(fake: Fake) -> None:
    seen: dict[str, object] = {}

    async def enroll(request: web.Request) -> web.Response:
        seen["type"] = request.headers["Content-Type"]
        seen["csr"] = base64.b64decode(await request.read())
        peer = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)  # type: ignore[union-attr]
        seen["peer"] = peer
        seen["proof"] = request.headers.get(est_proof.HEADER)
        return web.Response(
            body=est.encode_base64_body(est.certs_only([PKI.root, LEAF])), headers={"Content-Type": est.CERTS_ONLY}
        )

    fake.handlers["simplereenroll"] = enroll
    csr = make_csr(KEY, "dev-1")
    async with _client(fake) as c:
        cert = await c.simplereenroll(csr)
    assert cert == LEAF  # the one for the requested key, whatever else the answer carries
    assert seen["type"] == "application/pkcs10"
    assert seen["csr"] == csr
    assert seen["peer"] == LEAF.public_bytes(serialization.Encoding.DER)
    # ADR 0008: the client certificate's key signed the nonce, the operation and the CSR's key
    assert isinstance(seen["proof"], str)
    proof = est_proof.parse(seen["proof"])
    assert proof.nonce == FAKE_NONCE
    est_proof.verify(proof, KEY.public_key(), "simplereenroll", KEY.public_key())


@pytest.mark.real_clock
@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"other": 1}', b'{"nonce": 5}', b'{"nonce": "short"}', b"[]"],
)
async def test_a_bad_nonce_answer_is_named(fake: Fake, body: bytes) -> None:
    fake.handlers["iotdlm-nonce"] = _reply(body, "application/json")
    async with _client(fake) as c:
        with pytest.raises(BadRequestError, match="iotdlm-nonce"):
            await c.simpleenroll(make_csr(KEY, "dev-1"))


@pytest.mark.parametrize(
    ("handler", "error", "match"),
    [
        (_reply(b"not base64 !!"), BadRequestError, "not base64"),
        (_reply(base64.b64encode(b"garbage")), BadRequestError, "certs-only"),
        (_reply(est.encode_base64_body(est.certs_only([PKI.root]))), BadRequestError, "requested key"),
        (_reply(b"x", ctype="text/html"), BadRequestError, "text/html"),
        (_reply(b"", ctype=est.CERTS_ONLY), BadRequestError, "empty"),
        (_reply(b"A" * (300 * 1024)), TooLargeError, "exceeds"),
        (_reply(b"bad csr\n", "text/plain", 400), BadRequestError, "bad csr"),
        (_reply(b"who are you\n", "text/plain", 401), UntrustedError, "who are you"),
        (_reply(b"no\n", "text/plain", 403), NotAuthorizedError, "no"),
        (_reply(b"", "text/plain", 404), NotFoundError, "HTTP 404"),
        (_reply(b"retired\n", "text/plain", 409), ConflictError, "retired"),
        (_reply(b"", "text/plain", 418), InternalError, "418"),
    ],
)
@pytest.mark.real_clock
async def test_enroll_refuses_bad_answers(fake: Fake, handler: Handler, error: type[Exception], match: str) -> None:
    fake.handlers["simpleenroll"] = handler
    async with _client(fake) as c:
        with pytest.raises(error, match=match):
            await c.simpleenroll(make_csr(KEY, "dev-1"))


@pytest.mark.real_clock
@pytest.mark.parametrize("status", [202, 503])
async def test_retry_later(fake: Fake, status: int) -> None:
    fake.handlers["simpleenroll"] = _reply(b"later\n", "text/plain", status, **{"Retry-After": "42"})
    async with _client(fake) as c:
        with pytest.raises(EstUnavailableError) as info:
            await c.simpleenroll(make_csr(KEY, "dev-1"))
    assert info.value.retry_after == 42


async def test_server_not_trusted_is_untrusted(fake: Fake) -> None:
    other = certs_to_pem([make_pki(now=REAL_NOW).root])
    async with EstClient(fake.url, trust_anchor_pem=other) as c:
        with pytest.raises(UntrustedError, match="not trusted"):
            await c.cacerts()


async def test_nobody_listening_is_unavailable(tmp_path: Path) -> None:
    from iotdlm.bus.server import free_port

    async with EstClient(f"https://127.0.0.1:{free_port()}", trust_anchor_pem=ROOT_PEM, timeout=5) as c:
        with pytest.raises(EstUnavailableError):
            await c.cacerts()


@pytest.mark.real_clock
async def test_serverkeygen_checks_the_pair(fake: Fake) -> None:
    key = generate_key(Algorithm.P256)
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ctype, body = est.serverkeygen_multipart(pkcs8, est.certs_only([LEAF]), encrypted=False)
    fake.handlers["serverkeygen"] = _reply(body, ctype)
    async with _client(fake) as c:
        with pytest.raises(BadRequestError, match="not for the key"):
            await c.serverkeygen(make_csr(KEY, "dev-1"))
    good = KEY.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ctype, body = est.serverkeygen_multipart(good, est.certs_only([LEAF]), encrypted=False)
    fake.handlers["serverkeygen"] = _reply(body, ctype)
    async with _client(fake) as c:
        got_key, cert = await c.serverkeygen(make_csr(KEY, "dev-1"))
    assert cert == LEAF
    assert got_key.public_key() == KEY.public_key()
    fake.handlers["serverkeygen"] = _reply(est.encode_base64_body(est.certs_only([LEAF])))
    async with _client(fake) as c:
        with pytest.raises(BadRequestError, match="multipart"):
            await c.serverkeygen(make_csr(KEY, "dev-1"))


def _pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.real_clock
async def test_serverkeygen_decrypts_the_key_with_the_client_certificates_key(fake: Fake) -> None:
    """ADR 0009: the key part is application/pkcs7-mime; smime-type=server-generated-key, a CMS
    EnvelopedData to the client certificate's key; the client decrypts it and checks the pair."""
    new = generate_key(Algorithm.P256)
    cert = PKI.cas["operational"].issue(
        DEFAULT_PROFILES["operational"], new.public_key(), device_subject("dev-1", "T", "x"), now=REAL_NOW, serial=2
    )
    certs = est.certs_only([cert])
    envelope = cms_envelope.encrypt_key(_pkcs8(new), LEAF)
    ctype, body = est.serverkeygen_multipart(envelope, certs, encrypted=True)
    fake.handlers["serverkeygen"] = _reply(body, ctype)
    async with _client(fake) as c:
        got_key, got_cert = await c.serverkeygen(make_csr(KEY, "dev-1"))
    assert got_cert == cert
    assert _pkcs8(got_key) == _pkcs8(new)

    # encrypted to another device's key: a clear refusal, not a traceback
    other = PKI.cas["operational"].issue(
        DEFAULT_PROFILES["operational"], generate_key(Algorithm.P256).public_key(),
        device_subject("dev-2", "T", "x"), now=REAL_NOW, serial=3,
    )  # fmt: skip
    ctype, body = est.serverkeygen_multipart(cms_envelope.encrypt_key(_pkcs8(new), other), certs, encrypted=True)
    fake.handlers["serverkeygen"] = _reply(body, ctype)
    async with _client(fake) as c:
        with pytest.raises(BadRequestError, match="not encrypted to this device's key"):
            await c.serverkeygen(make_csr(KEY, "dev-1"))

    # altered on the way (AES-CBC does not authenticate): refused, never taken as the device's key
    flipped = envelope[:-20] + bytes([envelope[-20] ^ 1]) + envelope[-19:]
    ctype, body = est.serverkeygen_multipart(flipped, certs, encrypted=True)
    fake.handlers["serverkeygen"] = _reply(body, ctype)
    async with _client(fake) as c:
        with pytest.raises(BadRequestError):
            await c.serverkeygen(make_csr(KEY, "dev-1"))


@pytest.mark.real_clock
async def test_csrattrs_empty_and_garbage(fake: Fake) -> None:
    fake.handlers["csrattrs"] = _reply(b"", "application/csrattrs", 204)
    async with _client(fake) as c:
        assert await c.csrattrs() == []
    fake.handlers["csrattrs"] = _reply(base64.b64encode(b"\x04\x01x"), "application/csrattrs")
    async with _client(fake) as c:
        with pytest.raises(BadRequestError, match="CsrAttrs"):
            await c.csrattrs()


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="https"):
        EstClient("http://x", trust_anchor_pem=ROOT_PEM)
    with pytest.raises(ValueError, match="both"):
        EstClient("https://x", trust_anchor_pem=ROOT_PEM, client_cert_pem=certs_to_pem([LEAF]))
    with pytest.raises(ValueError, match="PEM"):
        EstClient("https://x", trust_anchor_pem=b"nonsense")
    other = private_key_to_pem(generate_key(Algorithm.P256), None)
    with pytest.raises(ValueError, match="do not match"):
        EstClient("https://x", trust_anchor_pem=ROOT_PEM, client_cert_pem=certs_to_pem([LEAF]), client_key_pem=other)


# --- parsers (pure) ------------------------------------------------------------------------------
@given(key=st.binary(min_size=1, max_size=200), cert=st.binary(min_size=1, max_size=200))
def test_multipart_reads_what_cm_writes(key: bytes, cert: bytes) -> None:
    for encrypted, (key_type, smime) in (
        (True, ("application/pkcs7-mime", "server-generated-key")),
        (False, ("application/pkcs8", None)),
    ):
        ctype, body = est.serverkeygen_multipart(key, cert, encrypted=encrypted)
        parts = est_client._multipart(ctype, body)
        assert [p[:2] for p in parts] == [(key_type, smime), ("application/pkcs7-mime", "certs-only")]
        assert est_client._b64(parts[0][2], "k") == key
        assert est_client._b64(parts[1][2], "c") == cert


@given(st.binary(max_size=300), st.text(max_size=40))
def test_multipart_parser_takes_any_bytes(body: bytes, boundary: str) -> None:
    with contextlib.suppress(BadRequestError):
        est_client._multipart(f'multipart/mixed; boundary="{boundary}"', body)


@given(st.binary(max_size=200))
def test_response_decoders_take_any_bytes(body: bytes) -> None:
    for fn in (est_client._b64, est_client._certs_only):
        with contextlib.suppress(BadRequestError):
            fn(body, "x")


def _dropping(times: int, seen: list[str]) -> Handler:
    """simpleenroll that closes the connection unanswered ``times`` times (as cm does to an idle
    keep-alive connection just as a request arrives on it), then answers."""
    answer = _reply(est.encode_base64_body(est.certs_only([LEAF])))

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.method)
        if len(seen) <= times:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        return await answer(request)

    return handler


@pytest.mark.real_clock
async def test_a_request_cut_off_once_is_sent_again(fake: Fake) -> None:
    # /cacerts answers without a certificate: before the resend, one cut-off request was taken
    # for a TLS refusal of the client certificate (Untrusted: the device fell back for good)
    fake.handlers["cacerts"] = _reply(est.encode_base64_body(est.certs_only([PKI.root])))
    seen: list[str] = []
    fake.handlers["simplereenroll"] = _dropping(1, seen)
    async with _client(fake) as c:
        assert await c.simplereenroll(make_csr(KEY, "dev-1")) == LEAF
    assert seen == ["POST", "POST"]


@pytest.mark.real_clock
async def test_a_request_cut_off_twice_is_still_a_refusal(fake: Fake) -> None:
    fake.handlers["cacerts"] = _reply(est.encode_base64_body(est.certs_only([PKI.root])))
    seen: list[str] = []
    fake.handlers["simplereenroll"] = _dropping(2, seen)
    async with _client(fake) as c:
        with pytest.raises(UntrustedError, match="refused the client certificate"):
            await c.simplereenroll(make_csr(KEY, "dev-1"))
    assert seen == ["POST", "POST"]
