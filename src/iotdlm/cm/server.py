"""cm's front door: EST (RFC 7030) over HTTPS, OCSP (RFC 6960 A.1, RFC 5019) and CRLs over HTTP(S).

cm decides nothing about certificates. Its handlers are thin (decode -> relay -> encode): it takes
the TLS client certificate and the request off the wire, bounds and decodes them, hands them to km
over NATS (:class:`KmRelay`, which :class:`iotdlm.client.km.KmClient` implements, signing as cm),
and encodes km's answer. km checks the client certificate itself (issued by our factory or
operational CA, valid, registered, not revoked) and its RA decides.

HTTP status of a refusal (one line of ``text/plain``; never a traceback):

=====================================================  =====================================
no TLS client certificate on an enrollment endpoint    401, ``WWW-Authenticate: Certificate``
client certificate refused by km (untrusted, revoked,  403
unregistered, wrong kind) or policy refused
malformed request (base64, CSR, path)                  400
body too large                                         413 (the connection is closed)
body too slow                                          408 (the connection is closed)
wrong Content-Type                                     415
no such CRL / resource                                 404
device decommissioned and the like                     409
a device reporting more often than its limit           429 with ``Retry-After``
km unavailable, or the operation mode forbids it       503 with ``Retry-After``
cm <-> km relay failed (km internal error, replay,     502
NATS permission)
an HTTP/0.9 request line (no version), or a version   505, in HTTP/1.1 (the connection is
other than 1.0 and 1.1                                 closed)
=====================================================  =====================================

Why 401 for a missing certificate: RFC 7030 3.2.3 and 3.3.2 have the server authenticate the client
by its TLS certificate; a client that presented none is not authenticated (401), one whose
certificate is refused is authenticated but not authorized (403). RFC 9110 requires a
``WWW-Authenticate`` header on a 401; there is no registered scheme for TLS client certificates, so
we name one (``Certificate``) that tells a person what to do and that no HTTP client will try to
answer with a password.

Defence in depth (Table 1): given a mode check (:class:`iotdlm.modes.guard.ModeGuard`), cm serves
only in the modes where it runs (software-management, certificate-management) and relays
enrollment only in certificate-management; anything else is a ModeError (503). km checks again.

OCSP has one rule for GET and POST: every request that reaches the OCSP route (``POST /ocsp``,
``GET /ocsp/{base64}``) is answered with an OCSPResponse (``application/ocsp-response``) and HTTP
200; what went wrong is in the OCSP ``responseStatus`` (RFC 6960 4.2.1), never in a text body:

=====================================================  =====================================
wrong or missing Content-Type (POST), body not base64  ``malformedRequest``
(GET) or not DER, body or path too large (the
connection is closed), body too slow (closed)
km answered                                            km's answer (km itself answers
                                                       ``malformedRequest``, ``unauthorized``,
                                                       ``internalError`` where it applies)
km unavailable or silent, or the operation mode        ``tryLater``, with ``Retry-After``
forbids it
a relay failure, anything unexpected in cm             ``internalError`` (logged)
=====================================================  =====================================

Why 200 for an unsuccessful OCSPResponse: RFC 6960 (A.1) and RFC 5019 (5) carry OCSP errors in
the OCSPResponse itself, and OCSP clients read the body only of a 200: OpenSSL's HTTP client
(``openssl ocsp``, ``OCSP_sendreq``) reports any other status as a transport failure without
reading the body, so a 400/500/503 would hide the very status we mean to send. ``Retry-After``
on a ``tryLater`` is advice (RFC 9110 10.2.3 allows it on any response). Only what never reaches
the route -- a request line over the size limit, an unknown path or method -- gets the HTTP
refusals of the table above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence, Set
from typing import Protocol

from aiohttp import HttpVersion10, HttpVersion11, web
from cryptography import x509

from iotdlm.clock import Clock
from iotdlm.cm import est, health_routes
from iotdlm.cm.cacerts import CaCerts
from iotdlm.cm.config import Limits
from iotdlm.cm.http_cache import crl_cache_headers, etag, ocsp_cache_headers, parse_crl_path
from iotdlm.cm.ocsp_cache import OcspCache
from iotdlm.cm.transfer_peer import PeerRelay, PeerRoutes
from iotdlm.errors import (
    BadRequestError,
    ConflictError,
    InternalError,
    IotdlmError,
    ModeError,
    NotAuthorizedError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    RejectedError,
    ReplayError,
    TooLargeError,
    UnavailableError,
    UntrustedError,
)
from iotdlm.observe import ModuleMetrics, Observer
from iotdlm.pki import est_proof
from iotdlm.pki.csr import MAX_CSR_BYTES, load_csr
from iotdlm.pki.ocsp import ErrorKind, decode_get_path, error_response
from iotdlm.wire import audit as wire_audit
from iotdlm.wire import km as msg

log = logging.getLogger(__name__)

OCSP_REQUEST = "application/ocsp-request"
OCSP_RESPONSE = "application/ocsp-response"
PKIX_CRL = "application/pkix-crl"
PKIX_CERT = "application/pkix-cert"

#: the HTTP versions cm speaks; anything else (an HTTP/0.9 request line included) gets 505
HTTP_VERSIONS = frozenset({HttpVersion10, HttpVersion11})

#: the EST operations cm relays to km (RFC 7030 4.2, 4.4)
ENROLL_OPERATIONS = ("simpleenroll", "simplereenroll", "serverkeygen")
#: GET: a proof nonce from km (ADR 0008), below /.well-known/est
NONCE_PATH = "iotdlm-nonce"
MAX_PROOF_CHARS = 1024


#: Table 1: the modes in which cm runs; those in which devices enroll through it (km checks too);
#: those in which sm reaches the repository through it
CM_MODES = frozenset({"software-management", "certificate-management"})
ENROLL_MODES = frozenset({"certificate-management"})
EGRESS_MODES = frozenset({"software-management"})


class ModeCheck(Protocol):
    """What cm needs of :class:`iotdlm.modes.guard.ModeGuard`: refuse what the mode forbids."""

    def require(self, allowed_modes: Set[str], what: str) -> str: ...


class KmRelay(Protocol):
    """What cm needs from km (:class:`iotdlm.client.km.KmClient` as the cm identity)."""

    async def est(
        self, operation: str, client_certificate: bytes, csr: bytes, *, proof: str | None = None
    ) -> msg.EstResponse: ...

    async def est_nonce(self, client_certificate: bytes) -> msg.EstNonceResponse: ...

    async def ocsp(self, request_der: bytes) -> bytes: ...

    async def crl(self, issuer: str, partition: int, *, delta: bool = False) -> bytes: ...

    async def chain(self) -> msg.ChainResponse: ...

    async def audit_checkpoint(self) -> bytes: ...

    async def audit_consistency(self, first: int, second: int) -> wire_audit.ConsistencyProof: ...


#: response header naming what an enrollment request asked for that the certificate does not carry
DROPPED_HEADER = "Iotdlm-Dropped"


def dropped_header(items: Sequence[str]) -> str:
    """One header value: the items joined by ``; ``, each percent-encoded where it is not plain
    printable ASCII or would break the list (the CSR's values are the requester's, not ours)."""
    return "; ".join(urllib.parse.quote(item, safe=" !\"#$&'()*+,-./:<=>?@[]^_`{|}~") for item in items)


# --- errors that only exist at the HTTP edge ------------------------------------------------------
class ClientCertificateRequiredError(UntrustedError):
    """An enrollment endpoint was called without a TLS client certificate (401)."""

    code = "client_certificate_required"


class RequestTimeoutError(BadRequestError):
    """The request body did not arrive in time (408)."""

    code = "request_timeout"


class HttpsRequiredError(NotAuthorizedError):
    """EST asked over plain HTTP (403)."""

    code = "https_required"


def status_for(exc: IotdlmError) -> int:
    """The HTTP status of an iotdlm error at cm's edge (see the module doc)."""
    table: tuple[tuple[type[IotdlmError], int], ...] = (
        (est.UnsupportedMediaTypeError, 415),
        (TooLargeError, 413),
        (RequestTimeoutError, 408),
        (ClientCertificateRequiredError, 401),
        (NotFoundError, 404),
        (ConflictError, 409),
        (ModeError, 503),
        (ReplayError, 502),
        (PermissionDeniedError, 502),
        (UntrustedError, 403),
        (NotAuthorizedError, 403),
        (RejectedError, 400),
        (RateLimitedError, 429),
        (UnavailableError, 503),
        (InternalError, 502),
    )
    for cls, status in table:
        if isinstance(exc, cls):
            return status
    return 500


async def _server_header(request: web.BaseRequest, response: web.StreamResponse) -> None:
    response.headers["Server"] = "iotdlm-cm"  # not the framework and its version


class _Refused(Exception):
    """A refusal whose response is already built (OCSP refusals keep the OCSP wire format)."""

    def __init__(self, response: web.Response, reason: str) -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason


def text_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """A one-line ``text/plain`` answer (control characters and line breaks flattened)."""
    line = " ".join(message.split())[:300]
    return web.Response(status=status, text=line + "\n", content_type="text/plain", headers=headers)


def peer_certificate(request: web.BaseRequest) -> bytes | None:
    """DER of the TLS client certificate of the connection, or None (no TLS, or none presented)."""
    transport = request.transport
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert(binary_form=True)
    return bytes(cert) if cert else None


def _describe_peer(request: web.BaseRequest) -> str:
    return str(request.remote or "?")


class CmApp:
    """The request handlers; :meth:`https_app` and :meth:`http_app` build the aiohttp applications."""

    def __init__(
        self,
        km: KmRelay,
        *,
        clock: Clock,
        limits: Limits,
        cacerts: CaCerts,
        csrattrs: bytes,
        mode: ModeCheck | None = None,
    ) -> None:
        self.km = km
        #: None: no mode check (unit tests); CmService.from_deployment gives a ModeGuard
        self.mode = mode
        self.clock = clock
        self.limits = limits
        self.cacerts_source = cacerts
        self._csrattrs_body = est.encode_base64_body(csrattrs) if csrattrs not in (b"", est.EMPTY_CSRATTRS) else b""
        self._retry = {"Retry-After": str(limits.retry_after)}
        #: open connections (id of aiohttp's handler): when opened, and those that delivered a request
        self._opened: dict[int, tuple[float, str]] = {}
        self._served: set[int] = set()
        self._watching = False
        #: the trust transfer's provider-to-provider routes relay through it (None: not served)
        self.peer: PeerRelay | None = None
        #: request counters and the readiness behind /ready (docs/adr/0018); None: not kept
        self.metrics: ModuleMetrics | None = None
        self.observer: Observer | None = None
        #: km's pre-signed OCSP answers kept until their nextUpdate; only where revocation events
        #: reach it (CmService subscribes when it has a bus): None, every request goes to km
        self.ocsp_cache: OcspCache | None = None

    # --- applications -------------------------------------------------------------------------
    def https_app(self) -> web.Application:
        """EST, OCSP and CRLs (the HTTPS listener)."""
        mws = [*health_routes.middlewares(self), self._errors]
        app = web.Application(middlewares=mws, client_max_size=self.limits.max_body_bytes)
        health_routes.add(app, self)
        base = est.WELL_KNOWN
        app.router.add_get(f"{base}/cacerts", self.cacerts)
        app.router.add_get(f"{base}/csrattrs", self.csrattrs)
        for op in ENROLL_OPERATIONS:
            app.router.add_post(f"{base}/{op}", self._enroll_handler(op))
        app.router.add_get(f"{base}/{NONCE_PATH}", self.proof_nonce)
        if self.peer is not None:
            PeerRoutes(
                self.peer, require=self._require, read_body=self._read_body,
                max_body=self.limits.max_transfer_body_bytes,
            ).add(app)  # fmt: skip
        self._add_va_routes(app)
        from iotdlm.cm import transfer_routes  # issue 13: the device-facing transfer routes

        transfer_routes.add(app, self)
        app.on_response_prepare.append(_server_header)
        return app

    def http_app(self) -> web.Application:
        """OCSP and CRLs only (the optional plain-HTTP listener); EST paths answer 403."""
        mws = [*health_routes.middlewares(self), self._errors]
        app = web.Application(middlewares=mws, client_max_size=self.limits.max_body_bytes)
        self._add_va_routes(app)
        app.router.add_route("*", est.WELL_KNOWN + "/{tail:.*}", self._https_only)
        app.on_response_prepare.append(_server_header)
        return app

    def _add_va_routes(self, app: web.Application) -> None:
        app.router.add_post("/ocsp", self.ocsp_post)
        app.router.add_post("/ocsp/", self.ocsp_post)
        app.router.add_get("/ocsp/{request:[\\s\\S]+}", self.ocsp_get)  # any text, line breaks too
        app.router.add_get("/crl/{issuer}/{name}", self.crl)
        app.router.add_get("/ca/{name}.crt", self.ca_certificate)
        app.router.add_get("/audit/checkpoint", self.audit_checkpoint)
        app.router.add_get("/audit/consistency", self.audit_consistency)

    def runner(self, app: web.Application) -> web.AppRunner:
        """An ``AppRunner`` for ``app`` that applies :class:`Limits` to every connection: the
        keep-alive timeout also closes a connection that has not sent a complete request head in
        time (aiohttp arms it when the connection opens and after each response, and data
        arriving does not re-arm it), which is the slowloris guard."""
        lim = self.limits
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=5.0,
            keepalive_timeout=lim.idle_timeout,
            lingering_time=lim.lingering_time,
            max_line_size=lim.max_line_size,
            max_field_size=lim.max_field_size,
            max_headers=lim.max_headers,
        )
        return runner

    def watch(self, server: web.Server) -> None:
        """Log every connection that closes without having sent one complete request: after
        ``idle_timeout`` that is the slowloris guard cutting it off (a refusal: WARNING).

        aiohttp offers no hook for this; its ``Server`` calls ``connection_made`` /
        ``connection_lost`` for each connection, which we wrap (bookkeeping only: it never
        raises into aiohttp)."""
        self._watching = True
        made, lost = server.connection_made, server.connection_lost
        idle = self.limits.idle_timeout
        opened = self._opened

        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
            with contextlib.suppress(Exception):
                peer = transport.get_extra_info("peername")
                opened[id(handler)] = (asyncio.get_running_loop().time(), str(peer[0]) if peer else "?")
            made(handler, transport)

        def connection_lost(handler: web.RequestHandler, exc: BaseException | None = None) -> None:
            try:
                self._note_lost(handler, opened.pop(id(handler), None), idle)
            except Exception:  # pragma: no cover - logging must not break serving
                log.debug("connection bookkeeping failed", exc_info=True)
            finally:
                lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _note_lost(self, handler: web.RequestHandler, opened: tuple[float, str] | None, idle: float) -> None:
        if id(handler) in self._served:
            self._served.discard(id(handler))
            return
        opened_at, who = opened if opened is not None else (asyncio.get_running_loop().time(), "?")
        age = asyncio.get_running_loop().time() - opened_at
        if age >= idle * 0.9:
            log.warning("cut off a connection from %s: no complete request within %g s (slow client)", who, idle)
        else:
            log.info("a connection from %s closed without a complete request", who)

    # --- the error boundary -------------------------------------------------------------------
    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self._watching:
            self._served.add(id(request.protocol))
        if request.version not in HTTP_VERSIONS:
            return self._refuse_version(request)
        try:
            return await handler(request)
        except _Refused as r:
            self._log_refusal(request, r.response.status, "ocsp", r.reason)
            return r.response
        except web.HTTPException as exc:  # the router's 404/405, aiohttp's own 413
            if exc.status < 400:
                raise
            self._log_refusal(request, exc.status, "http", exc.reason)
            resp = text_response(exc.status, f"{exc.status} {exc.reason}")
            if exc.status == 405 and "Allow" in exc.headers:
                resp.headers["Allow"] = exc.headers["Allow"]
            if exc.status == 413:
                resp.force_close()
            return resp
        except IotdlmError as exc:
            status = status_for(exc)
            self._log_refusal(request, status, exc.code, exc.message)
            if self.metrics is not None:
                self.metrics.refused(exc.code)
            headers: dict[str, str] = {}
            if status == 401:
                headers["WWW-Authenticate"] = 'Certificate realm="est"'
            if status in (429, 503):
                headers.update(self._retry)
            resp = text_response(status, exc.message if status != 500 else "internal error", headers)
            if status in (408, 413):
                resp.force_close()
            return resp
        except ConnectionError as exc:
            log.info(
                "%s %s from %s: the client went away (%s)", request.method, request.path, _describe_peer(request), exc
            )
            resp = text_response(400, "connection lost")
            resp.force_close()
            return resp
        except Exception:
            log.exception("%s %s from %s failed", request.method, request.path, _describe_peer(request))
            return text_response(500, "internal error")

    def _refuse_version(self, request: web.BaseRequest) -> web.Response:
        """505 for an HTTP/0.9 request line (no version: aiohttp's parser calls it 0.9 and would
        answer ``HTTP/0.9 200``) or a version other than 1.x, answered in HTTP/1.1 and closed."""
        version = f"{request.version.major}.{request.version.minor}"
        self._log_refusal(request, 505, "http_version", f"HTTP/{version} request line")
        # aiohttp writes the status line in the request's version (``request.version``, a reified
        # property cached in ``_cache``) and has no public way to say otherwise
        request._cache["version"] = HttpVersion11
        resp = text_response(505, "HTTP/1.0 or HTTP/1.1 required")
        resp.force_close()
        return resp

    def _log_refusal(self, request: web.BaseRequest, status: int, code: str, message: str) -> None:
        log.warning(
            "refused %s %s from %s: %d %s: %s",
            request.method,
            request.path[:200],
            _describe_peer(request),
            status,
            code,
            " ".join(message.split())[:300],
        )

    async def _read_body(self, request: web.BaseRequest, limit: int) -> bytes:
        """The request body, at most ``limit`` bytes (413) arriving within ``body_timeout`` (408)."""
        length = request.content_length
        if length is not None and length > limit:
            raise TooLargeError(f"request body of {length} bytes exceeds the limit of {limit}")
        buf = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                while True:
                    chunk = await request.content.readany()
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > limit:
                        raise TooLargeError(f"request body exceeds the limit of {limit} bytes")
        except TimeoutError:
            raise RequestTimeoutError(
                f"the request body did not arrive within {self.limits.body_timeout:g} s"
            ) from None
        return bytes(buf)

    def _require(self, modes: Set[str], what: str) -> None:
        if self.mode is not None:
            self.mode.require(modes, what)

    # --- EST ------------------------------------------------------------------------------------
    async def cacerts(self, request: web.Request) -> web.Response:
        """RFC 7030 4.1: the current CA certificates; no client authentication needed."""
        self._require(CM_MODES, "serving CA certificates")
        body = await self.cacerts_source.body()
        return web.Response(body=body, headers={"Content-Type": est.CERTS_ONLY, "Content-Transfer-Encoding": "base64"})

    async def csrattrs(self, request: web.Request) -> web.Response:
        """RFC 7030 4.5: what the server wants in a CSR: the deployment's key and signature algorithm,
        or 204 No Content when configured to ask for nothing (RFC 7030 4.5.2)."""
        self._require(CM_MODES, "serving CSR attributes")
        if not self._csrattrs_body:
            return web.Response(status=204)
        return web.Response(
            body=self._csrattrs_body, headers={"Content-Type": est.CSRATTRS, "Content-Transfer-Encoding": "base64"}
        )

    async def proof_nonce(self, request: web.Request) -> web.Response:
        """ADR 0008: a nonce km issued for the device's proof of its current key (km sees the client
        certificate; the nonce is good for that certificate only, once, for a few minutes)."""
        client_cert = peer_certificate(request)
        if client_cert is None:
            raise ClientCertificateRequiredError(
                "a proof nonce is for the client certificate the device enrolls with: present it"
            )
        self._require(ENROLL_MODES, "relaying an EST proof nonce")
        out = await self.km.est_nonce(client_cert)
        return web.json_response(
            {"nonce": out.nonce, "expires": out.expires, "header": est_proof.HEADER},
            headers={"Cache-Control": "no-store"},
        )

    def _enroll_handler(self, operation: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return await self.enroll(request, operation)

        return handler

    async def enroll(self, request: web.Request, operation: str) -> web.Response:
        """RFC 7030 4.2 (simpleenroll, simplereenroll) and 4.4 (serverkeygen)."""
        client_cert = peer_certificate(request)
        if client_cert is None:
            raise ClientCertificateRequiredError(
                f"{operation} needs a TLS client certificate: the factory certificate to enroll, "
                "the operational certificate to re-enroll"
            )
        self._require(ENROLL_MODES, f"relaying EST {operation}")
        est.require_media_type(request.headers.get("Content-Type"), est.PKCS10)
        body = await self._read_body(request, self.limits.max_body_bytes)
        csr = est.decode_base64_body(body, what="the PKCS#10 request", max_decoded=MAX_CSR_BYTES)
        load_csr(csr)  # a PKCS#10 request at all? (km checks everything else, including the signature)
        proof = request.headers.get(est_proof.HEADER)
        if proof is not None and len(proof) > MAX_PROOF_CHARS:
            raise BadRequestError(f"the {est_proof.HEADER} header is too long", field="proof")
        out = await self.km.est(operation, client_cert, csr, proof=proof)
        cert = x509.load_der_x509_certificate(out.certificate.certificate)
        log.info(
            "%s: km issued %s serial %s to device %s (%s)",
            operation,
            out.certificate.profile,
            out.certificate.serial,
            out.certificate.device_id,
            _describe_peer(request),
        )
        certs = est.certs_only([cert])
        # what the CSR asked for and the profile left out: RFC 7030 has no field for it, so a header
        dropped = {DROPPED_HEADER: dropped_header(out.certificate.dropped)} if out.certificate.dropped else {}
        if operation == "serverkeygen":
            # km encrypted the key to the device (ADR 0009): cm relays ciphertext it cannot read;
            # a clear key only where the operator chose est_serverkeygen = "cleartext"
            if out.encrypted_key is not None:
                ctype, multipart = est.serverkeygen_multipart(out.encrypted_key, certs, encrypted=True)
            elif out.private_key is not None:
                ctype, multipart = est.serverkeygen_multipart(out.private_key, certs, encrypted=False)
            else:
                raise InternalError("km answered serverkeygen without a key")
            return web.Response(body=multipart, headers={"Content-Type": ctype, "Cache-Control": "no-store", **dropped})
        return web.Response(
            body=est.encode_base64_body(certs),
            headers={"Content-Type": est.CERTS_ONLY, "Content-Transfer-Encoding": "base64", **dropped},
        )

    async def _https_only(self, request: web.Request) -> web.Response:
        raise HttpsRequiredError("EST is served over HTTPS only")

    # --- OCSP -----------------------------------------------------------------------------------
    async def ocsp_post(self, request: web.Request) -> web.Response:
        """RFC 6960 A.1.1, POST: the DER request is the body."""
        try:
            est.require_media_type(request.headers.get("Content-Type"), OCSP_REQUEST)
        except est.UnsupportedMediaTypeError as exc:
            raise self._ocsp_refused("malformed_request", exc) from exc
        try:
            body = await self._read_body(request, self.limits.max_ocsp_request_bytes)
        except (TooLargeError, RequestTimeoutError) as exc:
            raise self._ocsp_refused("malformed_request", exc, close=True) from exc
        return await self._ocsp(body, request, get=False)

    async def ocsp_get(self, request: web.Request) -> web.Response:
        """RFC 6960 A.1.1 and RFC 5019 5, GET: the request is the URL-encoded base64 of the DER."""
        raw = request.raw_path.split("?", 1)[0]
        prefix = "/ocsp/"
        tail = raw[len(prefix) :] if raw.startswith(prefix) else request.match_info["request"]
        try:
            der_request = decode_get_path(tail)
        except RejectedError as exc:  # not base64, too long
            raise self._ocsp_refused("malformed_request", exc) from exc
        return await self._ocsp(der_request, request, get=True)

    def _ocsp_error(self, kind: ErrorKind, headers: Mapping[str, str] | None = None) -> web.Response:
        """An unsuccessful OCSPResponse (HTTP 200: see the module doc), never for caches."""
        return web.Response(
            body=error_response(kind),
            headers={"Content-Type": OCSP_RESPONSE, "Cache-Control": "no-cache", **(headers or {})},
        )

    def _ocsp_refused(self, kind: ErrorKind, exc: BaseException, *, close: bool = False) -> _Refused:
        headers = self._retry if kind == "try_later" else None
        resp = self._ocsp_error(kind, headers)
        if close:
            resp.force_close()
        reason = f"{exc.code}: {exc.message}" if isinstance(exc, IotdlmError) else type(exc).__name__
        return _Refused(resp, f"{kind}: {reason}")

    async def _ocsp(self, request_der: bytes, request: web.Request, *, get: bool) -> web.Response:
        cache = self.ocsp_cache
        now = self.clock.now()
        try:
            self._require(CM_MODES, "relaying OCSP")
            answer = cache.get(request_der, now) if cache is not None else None
            if answer is None:
                answer = await self.km.ocsp(request_der)
                now = self.clock.now()
                if cache is not None:
                    cache.put(request_der, answer, now)
        except (UnavailableError, ModeError, TimeoutError) as exc:
            raise self._ocsp_refused("try_later", exc) from exc
        except IotdlmError as exc:
            raise self._ocsp_refused("internal_error", exc) from exc
        except Exception as exc:  # a relay bug must not become an HTTP 500 on the OCSP path
            log.exception("OCSP relay failed for %s", _describe_peer(request))
            raise self._ocsp_refused("internal_error", exc) from exc
        headers = ocsp_cache_headers(answer, now) if get else {"Cache-Control": "no-cache"}
        return self._conditional(request, answer, OCSP_RESPONSE, headers)

    # --- CRLs -----------------------------------------------------------------------------------
    async def crl(self, request: web.Request) -> web.Response:
        issuer, partition, delta = parse_crl_path(request.match_info["issuer"], request.match_info["name"])
        self._require(CM_MODES, "relaying CRLs")
        try:
            crl_der = await self.km.crl(issuer, partition, delta=delta)
        except BadRequestError as exc:
            raise NotFoundError(exc.message) from exc
        return self._conditional(request, crl_der, PKIX_CRL, crl_cache_headers(crl_der, self.clock.now()))

    # --- the audit log's newest signed tree head (read-only, for outside copies) -------------------
    async def audit_checkpoint(self, request: web.Request) -> web.Response:
        """km's newest signed tree head (JSON), checked for form before it is relayed; an outside
        party keeps it and hands it to ``iotdlm audit verify --checkpoint`` (docs/adr/0005)."""
        self._require(CM_MODES, "serving the audit checkpoint")
        raw = await self.km.audit_checkpoint()
        try:
            body = wire_audit.encode_tree_head(wire_audit.decode_tree_head(raw, where="km's tree head"))
        except BadRequestError as exc:
            raise UnavailableError(exc.message) from None
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-cache"})

    async def audit_consistency(self, request: web.Request) -> web.Response:
        """``GET /audit/consistency?first=M&second=N``: km's RFC 9162 2.1.4 proof that the log of
        M records is a prefix of the log of N (JSON, hex hashes), for a witness that kept an older
        tree head (``iotdlm audit witness``). A malformed query is a 400 naming the parameter."""
        self._require(CM_MODES, "serving audit consistency proofs")
        first, second = wire_audit.parse_consistency_query(request.rel_url.raw_query_string)
        proof = await self.km.audit_consistency(first, second)
        body = wire_audit.encode_consistency_proof(proof)
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-cache"})

    # --- CA certificates (AIA caIssuers) ----------------------------------------------------------
    async def ca_certificate(self, request: web.Request) -> web.Response:
        """RFC 5280 4.2.2.1: the DER certificate of CA ``name`` at the caIssuers URL
        ``{public_url}/ca/{name}.crt`` (``application/pkix-cert``), from what /cacerts serves."""
        self._require(CM_MODES, "serving CA certificates")
        body = await self.cacerts_source.certificate(request.match_info["name"])
        headers = {"ETag": etag(body), "Cache-Control": f"max-age={int(self.cacerts_source.ttl)}, public, no-transform"}
        return self._conditional(request, body, PKIX_CERT, headers)

    def _conditional(
        self, request: web.Request, body: bytes, content_type: str, headers: Mapping[str, str]
    ) -> web.Response:
        """200 with ``body``, or 304 when the client already holds it (If-None-Match)."""
        tag = headers.get("ETag")
        if tag is not None and request.method == "GET":
            wanted = {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}
            if tag in wanted or "*" in wanted:
                return web.Response(status=304, headers=dict(headers))
        return web.Response(body=body, headers={"Content-Type": content_type, **headers})
