"""cm's CoAP door: enrollment for constrained devices over CoAP, EDHOC and OSCORE (issue 17, ADR 0029).

Beside the HTTPS door, off unless configured (``[coap]`` / ``coap_port``), on UDP. aiocoap serves
it: its OSCORE site wrapper answers EDHOC at ``/.well-known/edhoc`` (lakers underneath, cipher
suite 2, cm the responder) and unprotects OSCORE requests; what the resources below see is the
device's EDHOC-authenticated credential (:class:`EdhocPeer`).

Resources (payloads: :mod:`iotdlm.wire.coap_est`):

==================================  ============  ================================================
``/.well-known/core``               plain         the link format (RFC 6690)
``/.well-known/est/crts``           plain, OSCORE the CA certificates (certs-only DER, or C509 bag)
``/.well-known/est/pn``             OSCORE only   a proof nonce from km for the certificate sent
``/.well-known/est/sen``, ``sren``  OSCORE only   simpleenroll, simplereenroll relayed to km
``/transfer/tm``                    OSCORE only   the device's per-device transfer message (CWT)
``/transfer/...``                   OSCORE only   the other transfer routes (:mod:`.coap_transfer`)
==================================  ============  ================================================

Certificates may come as DER or C509 and answers go out in what the device's Accept asks (C509
for a constrained device, ADR 0029): cm decodes C509 to DER at this boundary, km sees DER. The
certificate a device sends to ``pn`` is remembered for its EDHOC key (bounded, like the sessions),
so its ``sen``/``sren`` may leave it out (the compact form) instead of sending it a second time.

What cm vouches for, and what it cannot do: the certificate a device sends must hold the key that
ran EDHOC (cm checks; like the TLS client certificate over HTTPS), and km checks everything else
as it does for EST over HTTPS -- the certificate (registered factory certificate or current
operational one), the RA rules, and the device's own signature over km's nonce, the operation and
the CSR's key (ADR 0008). cm relays the signature; it cannot make one, so a stolen cm cannot mint.

Errors are CoAP codes with a one-line diagnostic payload ``code: message`` (RFC 7252 5.5.2):
4.00 bad input, 4.01 no OSCORE, 4.03 refused, 4.13 too large, 4.15 wrong Content-Format, 5.03
(Max-Age: retry after) when km or the operation mode does not allow it now.
"""

from __future__ import annotations

import base64
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiocoap
import aiocoap.resource as resource
from aiocoap import credentials, edhoc, oscore_sitewrapper
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.client.transfer_device import TransferDeviceClient
from iotdlm.clock import Clock, SystemClock
from iotdlm.cm.cacerts import CaCerts
from iotdlm.cm.config import CoapConfig
from iotdlm.cm.server import CM_MODES, ENROLL_MODES, KmRelay, ModeCheck, status_for
from iotdlm.errors import (
    BadRequestError,
    IotdlmError,
    RejectedError,
    UnsupportedError,
    UntrustedError,
)
from iotdlm.pki.csr import MAX_CSR_BYTES, load_csr
from iotdlm.wire import coap_est as wire
from iotdlm.wire import coap_transfer as wire_transfer_coap
from iotdlm.wire import transfer_device as wire_transfer

log = logging.getLogger(__name__)

#: the CoAP resources' EST operation names (RFC 9148's short names)
OPERATIONS = {"sen": "simpleenroll", "sren": "simplereenroll"}
_COAP_CODES = {
    400: aiocoap.BAD_REQUEST,
    401: aiocoap.UNAUTHORIZED,
    403: aiocoap.FORBIDDEN,
    404: aiocoap.NOT_FOUND,
    408: aiocoap.REQUEST_ENTITY_INCOMPLETE,
    409: aiocoap.CONFLICT,
    413: aiocoap.REQUEST_ENTITY_TOO_LARGE,
    415: aiocoap.UNSUPPORTED_CONTENT_FORMAT,
    429: aiocoap.TOO_MANY_REQUESTS,
    502: aiocoap.BAD_GATEWAY,
    503: aiocoap.SERVICE_UNAVAILABLE,
}
#: diagnostic payloads stay short (they travel in one datagram)
_MAX_DIAGNOSTIC = 200


class OscoreRequiredError(UntrustedError):
    """An enrollment resource was asked without OSCORE from an EDHOC session (4.01)."""

    code = "oscore_required"


class WrongContentFormatError(UnsupportedError):
    """The request's Content-Format is not the one the resource takes (4.15)."""

    code = "unsupported_content_format"


class NotAcceptableError(UnsupportedError):
    """The request's Accept names a format the resource cannot answer in (4.06)."""

    code = "not_acceptable"


@dataclass(frozen=True)
class EdhocPeer:
    """The claim aiocoap attaches to an OSCORE request: the device's EDHOC-authenticated credential."""

    public_key: ec.EllipticCurvePublicKey
    subject: str


class DoorCredentials(credentials.CredentialsMap):  # type: ignore[misc]  # aiocoap ships no types
    """aiocoap's server credentials, with cm's policy: any device may run EDHOC with its credential
    sent by value (a CCS with a P-256 key: who it is is decided by the certificate it then sends,
    bound to that key); cm answers EDHOC only while the operation mode lets devices enroll; at
    most ``max_sessions`` EDHOC sessions are kept (the oldest dropped), so neither memory nor
    aiocoap's 48 one-byte connection identifiers run out."""

    def __init__(self, identity: edhoc.EdhocCredentials, admit: Callable[[], bool], max_sessions: int) -> None:
        super().__init__()
        self._identity = identity
        self._admit = admit
        self._max_sessions = max_sessions
        self._sessions: deque[str] = deque()

    def get(self, key: Any, default: Any = None) -> Any:
        # aiocoap looks cm's own EDHOC identity up as "<origin>/*": one identity, whatever the origin
        if isinstance(key, str) and key.endswith("/*"):
            return self._identity if self._admit() else None
        return super().get(key, default)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if isinstance(key, str) and key.startswith(":"):  # aiocoap's name for a new EDHOC session
            self._sessions.append(key)
            while len(self._sessions) > self._max_sessions:
                self.pop(self._sessions.popleft(), None)

    def find_edhoc_by_id_cred_peer(self, id_cred_peer: bytes) -> tuple[bytes, list[EdhocPeer]]:
        try:
            ccs = wire.parse_id_cred_by_value(id_cred_peer)
        except RejectedError as exc:
            log.info("coap: EDHOC refused: %s", exc)
            raise KeyError(exc.code) from exc
        subject = ccs.get(2)
        peer = EdhocPeer(wire.ccs_public_key(ccs), subject if isinstance(subject, str) else "")
        return wire.ccs_bytes(ccs), [peer]


def responder_ccs(key: ec.EllipticCurvePrivateKey, subject: str) -> dict[int, Any]:
    """cm's EDHOC credential (what devices pin): a CCS of ``key``, kid 0x01."""
    return wire.ccs_for(key.public_key(), subject, b"\x01")


def coap_error(exc: IotdlmError, retry_after: int) -> aiocoap.Message:
    """The CoAP answer to a refusal: the code for its kind, ``code: message`` as diagnostic payload."""
    if isinstance(exc, OscoreRequiredError):
        code = aiocoap.UNAUTHORIZED
    elif isinstance(exc, WrongContentFormatError):
        code = aiocoap.UNSUPPORTED_CONTENT_FORMAT
    elif isinstance(exc, NotAcceptableError):
        code = aiocoap.NOT_ACCEPTABLE
    else:
        code = _COAP_CODES.get(status_for(exc), aiocoap.INTERNAL_SERVER_ERROR)
    text = f"{exc.code}: {exc.message}".encode("utf-8", "replace")[:_MAX_DIAGNOSTIC]
    out = aiocoap.Message(code=code, payload=text, content_format=wire.TEXT_PLAIN)
    if code == aiocoap.SERVICE_UNAVAILABLE:
        out.opt.max_age = retry_after
    return out


Handler = Callable[[aiocoap.Message], Awaitable[aiocoap.Message]]


class TransferMessages(Protocol):
    """What the ``/transfer/tm`` resource needs (:class:`iotdlm.client.transfer_device.TransferDeviceClient`)."""

    async def message(self, client_certificate: bytes, device: str = "") -> wire_transfer.MessageResponse: ...


class _Route(resource.Resource):  # type: ignore[misc]  # aiocoap ships no types
    """One resource: GET or POST answered by ``handler``, refusals as :func:`coap_error`."""

    def __init__(self, handler: Handler, method: str, retry_after: int, content_format: int | None) -> None:
        super().__init__()
        self._handler = handler
        self._retry_after = retry_after
        if content_format is not None:
            self.ct = content_format  # advertised in /.well-known/core
        setattr(self, f"render_{method}", self._render)

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        # aiocoap assembles Block1 requests without a bound: refuse a block past our largest request
        block1, size1 = request.opt.block1, request.opt.size1
        if (size1 is not None and size1 > wire.MAX_ENROLL_BYTES) or (
            block1 is not None and block1.start + block1.size > wire.MAX_ENROLL_BYTES
        ):
            raise aiocoap.error.RequestEntityTooLarge(f"requests here are at most {wire.MAX_ENROLL_BYTES} bytes")
        return True

    async def _render(self, request: aiocoap.Message) -> aiocoap.Message:
        try:
            return await self._handler(request)
        except IotdlmError as exc:
            log.info("coap: %s refused from %s: %s", "/".join(request.opt.uri_path), request.remote, exc)
            return coap_error(exc, self._retry_after)


class CoapDoor:
    """The CoAP listener. ``await start()``, read :attr:`port`, ``await stop()``."""

    def __init__(
        self,
        config: CoapConfig,
        *,
        km: KmRelay,
        cacerts: CaCerts,
        key: ec.EllipticCurvePrivateKey,
        mode: ModeCheck | None = None,
        subject: str = "cm",
        retry_after: int = 30,
        transfer: TransferMessages | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``transfer``: km's device-facing transfer handlers (SP1's per-device messages, and with a
        :class:`TransferDeviceClient` the other transfer routes: :mod:`iotdlm.cm.coap_transfer`);
        None: no ``/transfer/...`` resources. ``clock``: the refusal reports' rate limit's."""
        self.clock = clock or SystemClock()
        self.config = config
        self.transfer = transfer
        self.km = km
        self.cacerts = cacerts
        self.mode = mode
        self._retry_after = retry_after
        #: cm's EDHOC credential (a CCS); devices pin :attr:`credential_bytes`
        self.credential = responder_ccs(key, subject)
        d = key.private_numbers().private_value.to_bytes(32, "big")
        identity = edhoc.EdhocCredentials(
            suite=2,
            method=3,  # lakers: static DH keys on both sides (the only method it implements)
            own_cred_style="by-key-id",
            own_cred={wire.KCCS: self.credential},
            private_key={1: 2, -1: 1, -4: d},
        )
        self.credentials = DoorCredentials(identity, self._edhoc_admitted, config.max_sessions)
        self._context: aiocoap.Context | None = None
        #: the certificate (DER) each EDHOC key last sent to ``pn``, for compact ``sen``/``sren``
        self._bound: OrderedDict[bytes, bytes] = OrderedDict()
        self._max_bound = max(config.max_sessions, 1)

    @property
    def credential_bytes(self) -> bytes:
        """cm's CCS in deterministic CBOR: what a device is given to pin (CRED_R)."""
        return wire.ccs_bytes(self.credential)

    def site(self) -> oscore_sitewrapper.OscoreSiteWrapper:
        root = resource.Site()
        root.add_resource([".well-known", "core"], resource.WKCResource(root.get_resources_as_linkheader))
        ra = self._retry_after
        root.add_resource([*wire.WELL_KNOWN, "crts"], _Route(self.crts, "get", ra, wire.CERTS_ONLY))
        root.add_resource([*wire.WELL_KNOWN, "pn"], _Route(self.nonce, "post", ra, wire.TEXT_PLAIN))
        for name, operation in OPERATIONS.items():
            root.add_resource([*wire.WELL_KNOWN, name], _Route(self._enroll_for(operation), "post", ra, wire.PKIX_CERT))
        if self.transfer is not None:
            root.add_resource(list(wire.TRANSFER_MESSAGE), _Route(self.transfer_message, "post", ra, wire.CWT))
        if isinstance(self.transfer, TransferDeviceClient):
            from iotdlm.cm.coap_transfer import CoapTransferRoutes

            routes = CoapTransferRoutes(self.transfer, self._require, self.clock)
            routes.add(root, lambda handler: _Route(handler, "post", ra, wire_transfer_coap.CBOR))
        return oscore_sitewrapper.OscoreSiteWrapper(root, self.credentials)

    async def start(self) -> None:
        self._context = await aiocoap.Context.create_server_context(
            self.site(), bind=(self.config.host, self.config.port), transports=["udp6"]
        )
        log.info("coap: listening on udp %s:%d (EDHOC + OSCORE enrollment)", self.config.host, self.port)

    @property
    def port(self) -> int:
        if self._context is None:
            raise RuntimeError("the CoAP door is not started")
        port: int = self._context.request_interfaces[0].token_interface.message_interface._local_port()
        return port

    async def stop(self) -> None:
        ctx, self._context = self._context, None
        if ctx is not None:
            await ctx.shutdown()

    # --- handlers -------------------------------------------------------------------------------
    def _require(self, modes: Set[str], what: str) -> None:
        if self.mode is not None:
            self.mode.require(modes, what)

    def _edhoc_admitted(self) -> bool:
        try:
            self._require(ENROLL_MODES, "EDHOC for enrollment")
        except IotdlmError as exc:
            log.info("coap: EDHOC refused: %s", exc)
            return False
        return True

    async def crts(self, request: aiocoap.Message) -> aiocoap.Message:
        """The CA certificates (no protection needed)."""
        self._require(CM_MODES, "serving CA certificates over CoAP")
        fmt = _accepted(request, (wire.CERTS_ONLY, wire.C509_BAG), wire.CERTS_ONLY)
        der = base64.b64decode(await self.cacerts.body())
        if fmt == wire.C509_BAG:
            der = wire.encode_crts(wire.decode_crts(der, wire.CERTS_ONLY), fmt)
        return aiocoap.Message(code=aiocoap.CONTENT, payload=der, content_format=fmt)

    async def nonce(self, request: aiocoap.Message) -> aiocoap.Message:
        """ADR 0008 over CoAP: km's nonce for the certificate whose key ran EDHOC."""
        peer = _peer(request)
        self._require(ENROLL_MODES, "relaying an EST proof nonce over CoAP")
        cert_der = _certificate_of(request)
        _bind(peer, cert_der)
        self._remember(peer, cert_der)
        out = await self.km.est_nonce(cert_der)
        return aiocoap.Message(code=aiocoap.CONTENT, payload=out.nonce.encode("ascii"), content_format=wire.TEXT_PLAIN)

    async def transfer_message(self, request: aiocoap.Message) -> aiocoap.Message:
        """Seed 003 VII-D over CoAP: the device's per-device transfer message (a CWT), for the
        certificate whose key ran EDHOC (km decides, as for ``GET /transfer/message``)."""
        peer = _peer(request)
        self._require(ENROLL_MODES, "fetching a transfer message over CoAP")
        cert_der = _certificate_of(request)
        _bind(peer, cert_der)
        assert self.transfer is not None  # the resource exists only with it
        out = await self.transfer.message(cert_der, "")
        return aiocoap.Message(code=aiocoap.CONTENT, payload=out.message, content_format=wire.CWT)

    def _enroll_for(self, operation: str) -> Handler:
        async def handler(request: aiocoap.Message) -> aiocoap.Message:
            return await self.enroll(request, operation)

        return handler

    async def enroll(self, request: aiocoap.Message, operation: str) -> aiocoap.Message:
        """simpleenroll / simplereenroll: relayed to km exactly as over HTTPS."""
        peer = _peer(request)
        self._require(ENROLL_MODES, f"relaying EST {operation} over CoAP")
        _require_format(request, wire.MULTIPART_CORE)
        fmt = _accepted(request, wire.CERT_FORMATS, wire.PKIX_CERT)
        parsed = wire.decode_enroll_request(bytes(request.payload))
        cert_der = parsed.certificate if parsed.certificate is not None else self._bound.get(_spki(peer))
        if cert_der is None:
            raise BadRequestError(
                "this enrollment request carries no certificate and none was sent to pn with this EDHOC key: "
                "ask pn first in the same session, or send the certificate"
            )
        _bind(peer, cert_der)
        load_csr(parsed.csr, max_bytes=MAX_CSR_BYTES)  # a PKCS#10 request at all? km checks the rest
        out = await self.km.est(operation, cert_der, parsed.csr, proof=parsed.proof)
        log.info(
            "coap %s: km issued %s serial %s to device %s",
            operation,
            out.certificate.profile,
            out.certificate.serial,
            out.certificate.device_id,
        )
        payload = wire.encode_certificate(out.certificate.certificate, fmt)
        return aiocoap.Message(code=aiocoap.CHANGED, payload=payload, content_format=fmt)

    def _remember(self, peer: EdhocPeer, cert_der: bytes) -> None:
        key = _spki(peer)
        self._bound[key] = cert_der
        self._bound.move_to_end(key)
        while len(self._bound) > self._max_bound:
            self._bound.popitem(last=False)


def _peer(request: aiocoap.Message) -> EdhocPeer:
    claims = getattr(request.remote, "authenticated_claims", None) or ()
    for claim in claims:
        if isinstance(claim, EdhocPeer):
            return claim
    raise OscoreRequiredError(
        "enrollment over CoAP needs OSCORE from an EDHOC session with your certificate's key: run EDHOC first"
    )


def _require_format(request: aiocoap.Message, expected: int) -> None:
    got = request.opt.content_format
    if got is None or int(got) != expected:
        raise WrongContentFormatError(f"Content-Format must be {expected}, not {got}", field="content-format")


def _spki(peer: EdhocPeer) -> bytes:
    return peer.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _certificate_of(request: aiocoap.Message) -> bytes:
    """The certificate a request carries (DER or C509, by its Content-Format), as DER."""
    got = request.opt.content_format
    if got is None or int(got) not in wire.CERT_FORMATS:
        raise WrongContentFormatError(
            f"Content-Format must be {wire.PKIX_CERT} (DER) or {wire.C509_CERT} (C509), not {got}",
            field="content-format",
        )
    if not request.payload:
        raise BadRequestError("send the certificate your EDHOC key belongs to")
    return wire.decode_certificate(bytes(request.payload), int(got), "the certificate sent")


def _accepted(request: aiocoap.Message, offered: tuple[int, ...], default: int) -> int:
    """The format to answer in: the request's Accept if offered here, ``default`` without one."""
    accept = request.opt.accept
    if accept is None:
        return default
    if int(accept) not in offered:
        raise NotAcceptableError(
            f"cannot answer in Content-Format {accept}: ask for one of {', '.join(map(str, offered))}",
            field="accept",
        )
    return int(accept)


def _bind(peer: EdhocPeer, cert_der: bytes) -> None:
    """The certificate must hold the key that ran EDHOC (cm vouches for no more than that)."""
    if not cert_der:
        raise BadRequestError("send the certificate your EDHOC key belongs to")
    cert = wire.load_certificate(cert_der, "the certificate sent")
    if not wire.same_key(peer.public_key, cert.public_key()):
        raise UntrustedError(
            "the certificate sent is not for the key that ran EDHOC: send the certificate of your EDHOC credential",
            field="certificate",
        )


#: where cm keeps its EDHOC key when cm.toml names none
DEFAULT_KEY_FILE = "coap-edhoc-key.pem"
#: where cm writes its EDHOC credential (the CCS devices pin), beside the key
CREDENTIAL_FILE = "coap-edhoc-cred.cbor"


def load_or_make_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """cm's EDHOC key from ``path`` (PEM, P-256, unencrypted), made there (mode 0600) if absent."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        log.info("coap: made a new EDHOC key in %s", path)
        return key
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise BadRequestError(f"{path}: not an unencrypted PEM private key", field="coap_edhoc_key") from exc
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(loaded.curve, ec.SECP256R1):
        raise UnsupportedError(f"{path}: the EDHOC key must be P-256 (cipher suite 2)", field="coap_edhoc_key")
    return loaded


__all__ = [
    "CREDENTIAL_FILE",
    "DEFAULT_KEY_FILE",
    "CoapDoor",
    "DoorCredentials",
    "EdhocPeer",
    "NotAcceptableError",
    "OscoreRequiredError",
    "coap_error",
    "load_or_make_key",
    "responder_ccs",
]
