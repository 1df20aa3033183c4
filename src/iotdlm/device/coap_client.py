"""A constrained device's enrollment client: CoAP, EDHOC and OSCORE (issue 17, ADR 0029).

The device runs EDHOC (lakers, cipher suite 2, method 3: static DH keys) as the initiator with the
key of its current certificate (the factory certificate to enroll, the operational one to re-enroll),
its credential sent by value as a CCS of that key; it authenticates cm by the CCS it was given
(pinned, as the EST client is given its trust anchors). The EDHOC session's OSCORE context then
protects every request: km's proof nonce (``pn``), ``sen`` and ``sren``. Message 3 rides in the
first OSCORE request (RFC 9668's combined request), so an enrollment costs three round trips:
EDHOC message 1/2, then the nonce (with message 3), then the enrollment.

With ``c509`` (a constrained device keeping C509 certificates, ADR 0029) the device sends its
certificate as C509 to ``pn`` only, sends the compact ``sen``/``sren`` (no certificate: cm bound the
one ``pn`` got to this EDHOC key), and asks (Accept) for the issued certificate in C509 and for
``crts`` as a COSE_C509 bag; it checks what it gets after decoding it to DER, as any certificate.

One client per credential: after an enrollment the device re-enrolls with a new client holding the
certificate it just got and its key (cm sees a new EDHOC session for the new key).
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import aiocoap
import cbor2
import lakers
from aiocoap import edhoc, oscore
from aiocoap.optiontypes import BlockOption
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.errors import (
    BadRequestError,
    IotdlmError,
    NotFoundError,
    RejectedError,
    UnavailableError,
    UntrustedError,
    from_wire,
)
from iotdlm.pki import est_proof
from iotdlm.pki.keys import check_public_key
from iotdlm.wire import coap_est as wire
from iotdlm.wire import coap_transfer as wire_transfer

log = logging.getLogger(__name__)

_EDHOC_PATH = "/.well-known/edhoc"
#: Block1 size exponent for OSCORE requests: 2**(5+4) = 512 bytes per block
_BLOCK_SZX = 5
_BLOCK_BYTES = 2 ** (_BLOCK_SZX + 4)
# aiocoap deprecates passing the block size this way (its replacement, the remote's
# maximum_block_size_exp, is fixed per address class), but it is the one per-request knob it has
warnings.filterwarnings("ignore", message="Setting a block1 option", category=DeprecationWarning)
_EST_PATH = "/" + "/".join(wire.WELL_KNOWN)


class CoapUnavailableError(UnavailableError):
    """cm answered 5.03 (km away, or the operation mode does not let devices enroll now)."""

    code = "coap_unavailable"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int | None = None,
        field: str | None = None,
        device_id: str | None = None,
    ) -> None:
        super().__init__(message, field=field, device_id=device_id)
        self.retry_after = retry_after


class CoapEstClient:
    """``async with CoapEstClient(uri, responder_credential=..., key=..., certificate=...) as c:``"""

    def __init__(
        self,
        base_uri: str,
        *,
        responder_credential: bytes,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        timeout: float = 30.0,
        c509: bool = False,
    ) -> None:
        """``responder_credential``: cm's EDHOC credential (its CCS, deterministic CBOR), pinned;
        ``key`` and ``certificate``: the device's current credential (P-256); ``c509``: certificates
        in C509 on the wire and the compact enrollment request."""
        if not base_uri.startswith("coap://"):
            raise ValueError("enrollment over CoAP: base_uri must start with coap://")
        if not wire.same_key(key.public_key(), certificate.public_key()):
            raise ValueError("the key is not the certificate's")
        wire.ccs_public_key(cbor2.loads(responder_credential))  # a CCS with a P-256 key, or BadRequestError
        self.base_uri = base_uri.rstrip("/")
        self.timeout = timeout
        self._cred_r = responder_credential
        self._key = key
        self._cert_der = certificate.public_bytes(serialization.Encoding.DER)
        self.c509 = c509
        self._cert_fmt = wire.C509_CERT if c509 else wire.PKIX_CERT
        self._cert_wire = wire.encode_certificate(self._cert_der, self._cert_fmt)
        # no subject in the CCS: the certificate (sent inside OSCORE) names the device, the kid names
        # the certificate; every byte of message_3 counts on a constrained link
        self._cred_i = wire.ccs_bytes(wire.ccs_for(key.public_key(), "", wire.certificate_kid(self._cert_der)))
        self._context: aiocoap.Context | None = None
        self._oscore: edhoc.EdhocInitiatorContext | None = None

    async def __aenter__(self) -> CoapEstClient:
        self._context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        ctx, self._context = self._context, None
        self._oscore = None
        if ctx is not None:
            await ctx.shutdown()

    # --- operations -------------------------------------------------------------------------------
    async def crts(self) -> list[x509.Certificate]:
        """The CA certificates (check them against what the device already trusts)."""
        fmt = wire.C509_BAG if self.c509 else wire.CERTS_ONLY
        return _crts(await self._request(aiocoap.GET, "crts", expect=fmt, accept=fmt if self.c509 else None), fmt)

    async def cacerts(self) -> list[x509.Certificate]:
        """EST's /cacerts by its CoAP name (``crts``): what the device runner asks after enrolling
        to learn of a rotated CA (ADR 0026), as over HTTPS."""
        return await self.crts()

    async def nonce(self) -> str:
        """km's proof nonce for this certificate (ADR 0008), over OSCORE."""
        await self._session()
        out = await self._request(aiocoap.POST, "pn", self._cert_wire, self._cert_fmt, expect=wire.TEXT_PLAIN)
        try:
            text = out.decode("ascii")
        except UnicodeDecodeError as exc:
            raise BadRequestError("the pn answer is not a nonce km issues") from exc
        if len(text) != est_proof.NONCE_CHARS:
            raise BadRequestError("the pn answer is not a nonce km issues")
        return text

    async def transfer_message(self) -> bytes:
        """Seed 003 VII-D over CoAP: this device's per-device transfer message (a CWT the transfer
        agent checks), from its current provider's cm."""
        await self._session()
        uri = f"{self.base_uri}/{'/'.join(wire.TRANSFER_MESSAGE)}"
        return await self._request(aiocoap.POST, "tm", self._cert_wire, self._cert_fmt, expect=wire.CWT, uri=uri)

    async def transfer(self, uri: str, body: bytes = b"", *, expect: int) -> bytes:
        """A transfer route at ``uri`` (:mod:`iotdlm.cm.coap_transfer`): ``body`` with this
        certificate, over OSCORE; the answer's payload (Content-Format ``expect``)."""
        await self._session()
        payload = wire_transfer.encode_request(self._cert_der, self._cert_fmt, body)
        what = uri.rsplit("/", 1)[-1]
        return await self._request(aiocoap.POST, what, payload, wire_transfer.CBOR, expect=expect, uri=uri)

    async def simpleenroll(self, csr_der: bytes) -> x509.Certificate:
        """Initial enrollment with the factory credential (``sen``)."""
        return await self._enroll("sen", "simpleenroll", csr_der)

    async def simplereenroll(self, csr_der: bytes) -> x509.Certificate:
        """Re-enrollment with the operational credential (``sren``)."""
        return await self._enroll("sren", "simplereenroll", csr_der)

    async def _enroll(self, resource: str, operation: str, csr_der: bytes) -> x509.Certificate:
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError as exc:
            raise BadRequestError("the CSR is not a DER PKCS#10 request") from exc
        nonce = await self.nonce()
        proof = est_proof.make(self._key, operation, nonce, check_public_key(csr.public_key()))
        if self.c509:  # pn got the certificate in this session: not a second time
            payload = wire.encode_enroll_compact(csr_der, proof)
        else:
            payload = wire.encode_enroll(csr_der, self._cert_der, proof)
        fmt = self._cert_fmt
        accept = fmt if self.c509 else None
        out = await self._request(aiocoap.POST, resource, payload, wire.MULTIPART_CORE, expect=fmt, accept=accept)
        what = f"the {resource} answer"
        cert = wire.load_certificate(wire.decode_certificate(out, fmt, what), what)
        if _spki(cert.public_key()) != _spki(csr.public_key()):
            raise BadRequestError(f"the {resource} answer is not a certificate for the requested key")
        return cert

    # --- EDHOC ------------------------------------------------------------------------------------
    async def _session(self) -> None:
        """Run EDHOC (message 1 and 2; message 3 goes with the next request) once per client."""
        if self._oscore is not None:
            return
        ctx = self._ctx()
        initiator = lakers.EdhocInitiator()
        c_i = bytes([secrets.randbelow(24)])  # a one-byte connection identifier (CBOR 0..23)
        message_1 = initiator.prepare_message_1(c_i, None)
        request = aiocoap.Message(
            code=aiocoap.POST, uri=self.base_uri + _EDHOC_PATH, payload=cbor2.dumps(True) + message_1
        )
        answer = await _send(ctx, request)
        if answer.code != aiocoap.CHANGED:
            raise _error_for(answer, "EDHOC")
        try:
            c_r, _id_cred_r, ead_2 = initiator.parse_message_2(answer.payload)
            if any(e.is_critical() for e in ead_2):
                raise UntrustedError("cm's EDHOC message 2 carries a critical EAD item this device does not know")
            d = self._key.private_numbers().private_value.to_bytes(32, "big")
            initiator.verify_message_2(d, self._cred_i, self._cred_r)
        except IotdlmError:
            raise
        except Exception as exc:  # lakers raises plain exceptions with its own error names
            raise UntrustedError(
                "cm's EDHOC message 2 does not verify under the credential this device pins for cm"
            ) from exc
        secctx = edhoc.EdhocInitiatorContext(initiator, c_i, c_r, edhoc.OwnCredStyle.ByValue, log)
        secctx.complete_without_message_4()
        ctx.client_credentials[self.base_uri + "/*"] = secctx
        self._oscore = secctx

    def _ctx(self) -> aiocoap.Context:
        if self._context is None:
            raise RuntimeError("use the client inside 'async with'")
        return self._context

    async def _request(
        self,
        code: aiocoap.Code,
        resource: str,
        payload: bytes = b"",
        fmt: int | None = None,
        *,
        expect: int,
        uri: str | None = None,
        accept: int | None = None,
    ) -> bytes:
        """``resource`` below /.well-known/est, or at ``uri``."""
        target = uri or f"{self.base_uri}{_EST_PATH}/{resource}"
        request = aiocoap.Message(code=code, uri=target, payload=payload)
        if fmt is not None:
            request.opt.content_format = fmt
        if accept is not None:
            request.opt.accept = accept
        if len(payload) > _BLOCK_BYTES:
            # inner blocks of 512 bytes: each protected block (with EDHOC message 3 on the first)
            # still fits one datagram; aiocoap's 1024 would need outer blockwise, which its OSCORE
            # server side does not reassemble
            request.opt.block1 = BlockOption.BlockwiseTuple(0, False, _BLOCK_SZX)
        answer = await _send(self._ctx(), request)
        if not answer.code.is_successful():
            raise _error_for(answer, resource)
        got = answer.opt.content_format
        if got is None or int(got) != expect:
            raise BadRequestError(f"the {resource} answer has Content-Format {got}, not {expect}")
        return bytes(answer.payload)


def coap_client_for(
    base_uri: str,
    responder_credential: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    *,
    timeout: float = 30.0,
    c509: bool = False,
) -> CoapEstClient:
    """A client for a device credential given as PEM (a certificate and its unencrypted P-256 key)."""
    key = serialization.load_pem_private_key(key_pem, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UntrustedError("enrollment over CoAP needs a P-256 key (EDHOC cipher suite 2)")
    cert = x509.load_pem_x509_certificate(cert_pem)
    return CoapEstClient(
        base_uri, responder_credential=responder_credential, key=key, certificate=cert, timeout=timeout, c509=c509
    )


class CoapMessages:
    """The runner's transfer-message source over CoAP (``/transfer/tm`` at the device's cm, with its
    operational credential): the bytes, or None when nothing waits (4.04)."""

    def __init__(self, credentials: Mapping[str, bytes], *, timeout: float = 30.0, c509: bool = False) -> None:
        self.credentials = dict(credentials)
        self.timeout = timeout
        self.c509 = c509

    async def fetch(self, dev: Any, base_url: str) -> bytes | None:
        cred = self.credentials.get(base_url)
        if cred is None:
            raise UntrustedError(f"this device holds no EDHOC credential for {base_url}")
        cert_pem, key_pem = dev.tls_identity("operational")
        try:
            async with coap_client_for(base_url, cred, cert_pem, key_pem, timeout=self.timeout, c509=self.c509) as c:
                return await c.transfer_message()
        except NotFoundError:
            return None


class CoapEnroller:
    """The trust transfer's re-enrollment with CA2 in constrained form (the transfer agent's
    ``Enroller``): ``simpleenroll`` with the factory credential over CoAP/EDHOC/OSCORE to a
    ``coap://`` enrollURI, whose cm the device authenticates by the EDHOC credential it holds for
    that URI (``credentials``), then the CA certificates (``crts``) inside the same session.

    Not yet carried by the transfer itself: SP2's cm credential reaches the device out of band
    (here: the mapping); a TransferMessage claim for it is future work (ADR 0029)."""

    def __init__(self, credentials: Mapping[str, bytes], *, timeout: float = 30.0, c509: bool = False) -> None:
        self.credentials = dict(credentials)
        self.timeout = timeout
        self.c509 = c509

    def _credential(self, enroll_uri: str) -> bytes:
        cred = self.credentials.get(enroll_uri.rstrip("/"))
        if cred is None:
            raise UntrustedError(f"this device holds no EDHOC credential for {enroll_uri}: it cannot enroll there")
        return cred

    async def enroll(
        self,
        enroll_uri: str,
        *,
        anchors: Sequence[x509.Certificate],
        client_cert_pem: bytes,
        client_key_pem: bytes,
        csr: bytes,
    ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        cred = self._credential(enroll_uri)
        client = coap_client_for(
            enroll_uri, cred, client_cert_pem, client_key_pem, timeout=self.timeout, c509=self.c509
        )
        async with client:
            issued = await client.simpleenroll(csr)
            cacerts = await client.crts()
        return issued, cacerts

    async def cacerts(self, enroll_uri: str) -> list[x509.Certificate]:
        """The CA certificates at ``enroll_uri`` over plain CoAP (not authenticated: the caller
        keeps only those a signed hash names, as with EST's bootstrap)."""
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            uri = enroll_uri.rstrip("/") + _EST_PATH + "/crts"
            answer = await _send(ctx, aiocoap.Message(code=aiocoap.GET, uri=uri))
        finally:
            await ctx.shutdown()
        if not answer.code.is_successful():
            raise _error_for(answer, "crts")
        return _crts(bytes(answer.payload), wire.CERTS_ONLY)


def _crts(payload: bytes, fmt: int) -> list[x509.Certificate]:
    """The certificates of a ``crts`` answer (certs-only, or a COSE_C509 bag decoded to DER)."""
    return [wire.load_certificate(der, "a crts certificate") for der in wire.decode_crts(payload, fmt)]


async def _send(ctx: aiocoap.Context, request: aiocoap.Message) -> aiocoap.Message:
    """cm's answer; an unprotected refusal of an OSCORE request (cm had no context for it: EDHOC
    refused) is returned as the answer; no answer at all is an UnavailableError."""
    try:
        answer: aiocoap.Message = await ctx.request(request).response
    except oscore.NotAProtectedMessage as exc:
        plain = getattr(exc, "plain_message", None)
        if not isinstance(plain, aiocoap.Message):
            raise UntrustedError("cm answered an OSCORE request without protection") from exc
        return plain
    except aiocoap.error.Error as exc:
        raise UnavailableError(f"cm's CoAP door did not answer at {request.get_request_uri()}: {exc}") from exc
    return answer


def _spki(key: object) -> bytes:
    return check_public_key(key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _error_for(answer: aiocoap.Message, what: str) -> IotdlmError:
    """The error a refusal from cm stands for (its diagnostic payload is ``code: message``)."""
    text = bytes(answer.payload[:300]).decode("utf-8", "replace")
    code, sep, message = text.partition(": ")
    shown = message if sep else text or str(answer.code)
    if answer.code == aiocoap.SERVICE_UNAVAILABLE:
        return CoapUnavailableError(f"{what}: {shown}", retry_after=answer.opt.max_age)
    err = from_wire({"code": code, "message": f"{what}: {shown}"}) if sep else None
    if err is None or not isinstance(err, RejectedError):
        return RejectedError(f"{what}: cm answered {answer.code}: {shown}")
    return err


__all__ = ["CoapEnroller", "CoapEstClient", "CoapMessages", "CoapUnavailableError", "coap_client_for"]
