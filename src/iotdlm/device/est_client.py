"""A device's EST client (RFC 7030, with RFC 8951's clarifications): what a device in the field runs
to enroll with its factory certificate, re-enroll with its operational one, refresh its CA
certificates, and (for devices that cannot make keys) have the server generate its key.

Seed 003 VI-C: "Upon startup the IoT device contacts the CA1 to do initial enrollment for an
operational certificate. The device authenticates itself through the factory certificate";
VI-D: "Before the operational certificate expires the device will do re-enrollment".

TLS: cm's server certificate is verified against ``trust_anchor_pem`` (the truststore provisioned
into the device) and the host name of ``base_url``; the client certificate is presented on every
connection. Errors are iotdlm's: 400/413/415 -> BadRequestError (TooLargeError), 401 and TLS
refusals -> UntrustedError, 403 -> NotAuthorizedError, 404 -> NotFoundError, 409 -> ConflictError,
202/408/5xx and network failures -> UnavailableError (``retry_after`` set when the server said).
Responses are checked: the media type, the base64, the CMS, and that the issued certificate is for
the key the device asked for (or the key the server sent).
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1_modules import rfc7030

from iotdlm.errors import (
    BadRequestError,
    ConflictError,
    InternalError,
    IotdlmError,
    NotAuthorizedError,
    NotFoundError,
    RejectedError,
    TooLargeError,
    UnavailableError,
    UntrustedError,
)
from iotdlm.pki import cms_envelope, est_proof
from iotdlm.pki.der import describe_der_problem
from iotdlm.pki.keys import PrivateKey, check_public_key, load_private_key_pem

WELL_KNOWN = "/.well-known/est"
#: largest response body the client reads (a certs-only CMS is a few KiB)
MAX_RESPONSE_BYTES = 256 * 1024
_WHITESPACE = b" \t\r\n\x0b\x0c"

DevicePrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class EstUnavailableError(UnavailableError):
    """The EST server did not answer now; ``retry_after`` seconds if it said when to come back.
    (Its own code: :func:`iotdlm.errors.from_wire` maps each code to one class.)"""

    code = "est_retry_later"

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


@dataclass(frozen=True)
class CsrAttribute:
    """One entry of the server's CsrAttrs (RFC 7030 4.5.2): a bare OID (``values`` None), or an
    attribute with its values (DER of each)."""

    oid: str
    values: tuple[bytes, ...] | None = None


class EstClient:
    """``async with EstClient(url, trust_anchor_pem=..., client_cert_pem=..., client_key_pem=...) as c:``"""

    def __init__(
        self,
        base_url: str,
        *,
        trust_anchor_pem: bytes,
        client_cert_pem: bytes | None = None,
        client_key_pem: bytes | None = None,
        timeout: float = 30.0,
        label: str | None = None,
        connections: int = 4,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """``session``: the caller's HTTPS session (its connector carries this very TLS client
        context: anchors and client certificate), kept open across calls and closed by the
        caller; without it the client builds its own context and session."""
        if not base_url.startswith("https://"):
            raise ValueError("EST runs over HTTPS: base_url must start with https://")
        if (client_cert_pem is None) != (client_key_pem is None):
            raise ValueError("give both client_cert_pem and client_key_pem, or neither")
        self.base_url = base_url.rstrip("/")
        self.label = label
        self.timeout = timeout
        self._anchor_pem = trust_anchor_pem
        self._ssl = _client_context(trust_anchor_pem, client_cert_pem, client_key_pem) if session is None else None
        self._has_client_cert = client_cert_pem is not None
        #: the current credential's key: signs the proof km asks for (ADR 0008)
        self._proof_key: PrivateKey | None = (
            load_private_key_pem(client_key_pem, None) if client_key_pem is not None else None
        )
        self._connections = connections
        self._session: aiohttp.ClientSession | None = session
        self._borrowed = session is not None

    # --- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> EstClient:
        self._ensure_session()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._borrowed:
            return  # the caller's session: the caller closes it
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self._ssl is None:  # a borrowed session is never replaced (nor its TLS checks)
                raise RuntimeError("the session this EST client was given is gone")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=self._connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                trust_env=False,  # no proxies from the environment: the device talks to its CA-URI
            )
        return self._session

    def _url(self, operation: str) -> str:
        label = f"/{self.label}" if self.label else ""
        return f"{self.base_url}{WELL_KNOWN}{label}/{operation}"

    # --- operations -----------------------------------------------------------------------------
    async def cacerts(self) -> list[x509.Certificate]:
        """RFC 7030 4.1: the current CA certificates (no client certificate needed)."""
        ctype, body = await self._request("GET", "cacerts")
        _expect_type(ctype, "application/pkcs7-mime")
        return _certs_only(body, "cacerts")

    async def csrattrs(self) -> list[CsrAttribute]:
        """RFC 7030 4.5: what the server wants in a CSR (empty when it wants nothing in particular)."""
        ctype, body = await self._request("GET", "csrattrs", allow_empty=True)
        if not body.strip(_WHITESPACE):
            return []
        _expect_type(ctype, "application/csrattrs")
        der = _b64(body, "csrattrs")
        try:
            attrs, rest = der_decoder.decode(der, asn1Spec=rfc7030.CsrAttrs())
        except PyAsn1Error as exc:
            raise BadRequestError(
                f"the csrattrs response is not a CsrAttrs: {describe_der_problem(der, 'CsrAttrs')}"
            ) from exc
        if rest:
            raise BadRequestError("the csrattrs response has trailing data")
        out: list[CsrAttribute] = []
        for item in attrs:
            if item.getName() == "oid":
                out.append(CsrAttribute(str(item["oid"])))
            else:
                a = item["attribute"]
                out.append(CsrAttribute(str(a["attrType"]), tuple(bytes(v) for v in a["attrValues"])))
        return out

    async def nonce(self) -> str:
        """A fresh proof nonce from km, for this client certificate (ADR 0008)."""
        ctype, body = await self._request("GET", "iotdlm-nonce")
        _expect_type(ctype, "application/json")
        try:
            value = json.loads(body)["nonce"]
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRequestError("the iotdlm-nonce response is not JSON with a nonce") from exc
        if not isinstance(value, str) or len(value) != est_proof.NONCE_CHARS:
            raise BadRequestError("the iotdlm-nonce response's nonce is not one km issues")
        return value

    async def _proof_header(self, operation: str, csr: x509.CertificateSigningRequest) -> dict[str, str]:
        """The Iotdlm-Est-Proof header: the client certificate's key signs a fresh nonce, the
        operation and the CSR's public key (none without a client key)."""
        if self._proof_key is None:
            return {}
        nonce = await self.nonce()
        return {est_proof.HEADER: est_proof.make(self._proof_key, operation, nonce, check_public_key(csr.public_key()))}

    async def simpleenroll(self, csr_der: bytes) -> x509.Certificate:
        """RFC 7030 4.2.1: initial enrollment, authenticated by the factory certificate."""
        return await self._enroll("simpleenroll", csr_der)

    async def simplereenroll(self, csr_der: bytes) -> x509.Certificate:
        """RFC 7030 4.2.2: re-enrollment, authenticated by the current operational certificate."""
        return await self._enroll("simplereenroll", csr_der)

    async def serverkeygen(self, csr_der: bytes) -> tuple[DevicePrivateKey, x509.Certificate]:
        """RFC 7030 4.4: the server makes the key pair (for devices that cannot). The CSR names the
        device; its key only signs the request. The key comes back encrypted to the key of the
        client certificate (``application/pkcs7-mime; smime-type=server-generated-key``, ADR 0009),
        which this client decrypts, or, where the operator chose so, as ``application/pkcs8``."""
        proof = await self._proof_header("serverkeygen", _load_csr(csr_der))
        ctype, body = await self._request("POST", "serverkeygen", csr_der, headers=proof)
        if _media(ctype) != "multipart/mixed":
            raise BadRequestError(f"the serverkeygen response is {_media(ctype) or 'untyped'}, not multipart/mixed")
        key: DevicePrivateKey | None = None
        cert: x509.Certificate | None = None
        for part_type, smime_type, part_body in _multipart(ctype, body):
            if part_type == "application/pkcs8":
                key = _private_key(_b64(part_body, "serverkeygen key"))
            elif part_type == "application/pkcs7-mime" and smime_type == "server-generated-key":
                key = _private_key(self._decrypt_key(_b64(part_body, "serverkeygen key")))
            elif part_type == "application/pkcs7-mime":
                certs = _certs_only(part_body, "serverkeygen certificate")
                cert = certs[0]
        if key is None or cert is None:
            raise BadRequestError("the serverkeygen response lacks the key or the certificate part")
        if _spki(cert.public_key()) != _spki(key.public_key()):
            # also what catches an encrypted key altered on the way (AES-CBC does not authenticate)
            raise BadRequestError("the serverkeygen certificate is not for the key sent with it")
        return key, cert

    def _decrypt_key(self, envelope: bytes) -> bytes:
        """The PKCS#8 key inside the server's EnvelopedData, with the client certificate's key."""
        if self._proof_key is None:
            raise BadRequestError(
                "the serverkeygen key is encrypted to a client certificate's key, and this client has none"
            )
        return cms_envelope.decrypt_key(envelope, self._proof_key)

    async def _enroll(self, operation: str, csr_der: bytes) -> x509.Certificate:
        csr = _load_csr(csr_der)
        proof = await self._proof_header(operation, csr)
        ctype, body = await self._request("POST", operation, csr_der, headers=proof)
        _expect_type(ctype, "application/pkcs7-mime")
        certs = _certs_only(body, operation)
        wanted = _spki(csr.public_key())
        for cert in certs:
            if _spki(cert.public_key()) == wanted:
                return cert
        raise BadRequestError(f"the {operation} response holds no certificate for the requested key")

    async def _answers_anonymously(self) -> bool:
        """Whether the server answers /cacerts on a connection without a client certificate."""
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=_client_context(self._anchor_pem, None, None), limit=1),
                    timeout=aiohttp.ClientTimeout(total=min(self.timeout, 10.0)),
                    trust_env=False,
                ) as session,
                session.get(self._url("cacerts")) as resp,
            ):
                return resp.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False

    # --- HTTP -------------------------------------------------------------------------------------
    async def _request(
        self,
        method: str,
        operation: str,
        csr_der: bytes | None = None,
        *,
        allow_empty: bool = False,
        headers: dict[str, str] | None = None,
    ) -> tuple[str, bytes]:
        session = self._ensure_session()
        headers = {"Accept": "*/*", **(headers or {})}
        data: bytes | None = None
        if csr_der is not None:
            headers["Content-Type"] = "application/pkcs10"
            headers["Content-Transfer-Encoding"] = "base64"
            data = base64.encodebytes(csr_der)
        url = self._url(operation)
        try:
            try:
                status, ctype, body, retry_after = await _exchange(session, method, url, data, headers)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                if _tls_alert(exc) or isinstance(exc, aiohttp.ClientConnectorError):
                    raise
                # RFC 9112 9.3.1: the server may close an idle keep-alive connection just as our
                # request goes out on it (cm closes them after Limits.idle_timeout). The request was
                # never answered: send it once more (a new connection when the pool has no other);
                # a server refusing our certificate closes that one too, and is told apart below.
                status, ctype, body, retry_after = await _exchange(session, method, url, data, headers)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise UntrustedError(f"the EST server's certificate is not trusted: {exc.certificate_error}") from exc
        except aiohttp.ClientSSLError as exc:
            raise UntrustedError(f"TLS with the EST server failed: {exc}") from exc
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            # TLS 1.3: a server refusing our certificate sends its alert after the handshake and
            # closes; the alert is often lost to the reset. Tell that apart from an unreachable
            # server by asking again without a certificate.
            if _tls_alert(exc) or (self._has_client_cert and await self._answers_anonymously()):
                raise UntrustedError(
                    f"the EST server closed the TLS session: it refused the client certificate "
                    f"(expired, revoked at the TLS layer, or not from a CA it trusts) ({exc})"
                ) from exc
            raise EstUnavailableError(f"cannot reach the EST server: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EstUnavailableError(f"cannot reach the EST server: {exc or type(exc).__name__}") from exc
        if status == 200 or (status == 204 and allow_empty):
            if not body and not allow_empty:
                raise BadRequestError(f"the {operation} response is empty")
            return ctype, body
        raise _error_for(status, operation, body, retry_after)


# --- RFC 7030 4.1.1: the bootstrap ----------------------------------------------------------------
#: largest /cacerts body the bootstrap fetch reads
MAX_CACERTS_BYTES = 256 * 1024


async def bootstrap_cacerts(enroll_uri: str, *, seconds: float = 30.0) -> list[x509.Certificate]:
    """GET {enrollURI}/cacerts with the server NOT authenticated (RFC 7030 4.1.1, bootstrap
    distribution of CA certificates): what comes back is checked by the caller against the
    trust-anchor hashes of the signed transfer message, nothing else is taken."""
    base = enroll_uri if enroll_uri.endswith(WELL_KNOWN) else enroll_uri.rstrip("/") + WELL_KNOWN
    # bootstrap: the signed SHA-256 of each anchor authenticates it, so no CA store is loaded (the
    # system bundle cost ~23 ms per device, to be switched off at once)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds), trust_env=False) as session,
            session.get(f"{base}/cacerts", ssl=ctx) as resp,
        ):
            if resp.status != 200:
                raise UnavailableError(f"{base}/cacerts answered HTTP {resp.status}")
            # read() returns what has arrived so far, not the whole body: read until EOF or over the limit
            body = b""
            while len(body) <= MAX_CACERTS_BYTES:
                chunk = await resp.content.read(MAX_CACERTS_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise UnavailableError(f"cannot fetch {base}/cacerts: {exc}") from exc
    if len(body) > MAX_CACERTS_BYTES:
        raise RejectedError(f"{base}/cacerts is larger than {MAX_CACERTS_BYTES} bytes")
    try:
        return list(pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(body.split()), validate=True)))
    except (binascii.Error, ValueError) as exc:
        raise RejectedError(f"{base}/cacerts is not a base64 certs-only CMS: {exc}") from exc


# --- helpers (pure) -------------------------------------------------------------------------------
def _load_csr(csr_der: bytes) -> x509.CertificateSigningRequest:
    try:
        return x509.load_der_x509_csr(csr_der)
    except ValueError as exc:
        raise ValueError(f"csr_der is not a DER PKCS#10 request: {exc}") from exc


def _client_context(anchor_pem: bytes, cert_pem: bytes | None, key_pem: bytes | None) -> ssl.SSLContext:
    if cert_pem is None or key_pem is None:
        return _client_context_files(anchor_pem, None)
    # ssl loads a client certificate and key from files only: a private folder, gone at once
    with tempfile.TemporaryDirectory(prefix="iotdlm-est-") as d:
        cert_path, key_path = Path(d) / "cert.pem", Path(d) / "key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        return _client_context_files(anchor_pem, (cert_path, key_path))


def _client_context_files(anchor_pem: bytes, identity: tuple[Path, Path] | None) -> ssl.SSLContext:
    """A TLS client context: the server checked against ``anchor_pem`` (and its host name), the
    client certificate and key loaded from the ``identity`` files (certificate, key) when given."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=anchor_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"trust_anchor_pem is not a PEM certificate bundle: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if identity is not None:
        try:
            ctx.load_cert_chain(str(identity[0]), str(identity[1]))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"the client certificate and key do not load or do not match: {exc}") from exc
    return ctx


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        raise TooLargeError(f"EST response of {resp.content_length} bytes exceeds {MAX_RESPONSE_BYTES}")
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(16 * 1024):
        buf += chunk
        if len(buf) > MAX_RESPONSE_BYTES:
            raise TooLargeError(f"EST response exceeds {MAX_RESPONSE_BYTES} bytes")
    return bytes(buf)


def _retry_after(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


async def _exchange(
    session: aiohttp.ClientSession, method: str, url: str, data: bytes | None, headers: dict[str, str]
) -> tuple[int, str, bytes, int | None]:
    """One request: (status, Content-Type, body, Retry-After)."""
    async with session.request(method, url, data=data, headers=headers) as resp:
        body = await _read_limited(resp)
        return resp.status, resp.headers.get("Content-Type", ""), body, _retry_after(resp.headers.get("Retry-After"))


def _tls_alert(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError) or "alert" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__ or getattr(seen, "os_error", None)
    return False


def _error_for(status: int, operation: str, body: bytes, retry_after: int | None) -> IotdlmError:
    text = " ".join(body[:400].decode("utf-8", "replace").split()) or f"HTTP {status}"
    message = f"{operation}: {text}"
    if status == 202:
        return EstUnavailableError(
            f"{operation}: the request is pending approval; retry later", retry_after=retry_after
        )
    if status == 413:
        return TooLargeError(message)
    if status in (400, 411, 414, 415, 431):
        return BadRequestError(message)
    if status == 401:
        return UntrustedError(message)
    if status == 403:
        return NotAuthorizedError(message)
    if status == 404:
        return NotFoundError(message)
    if status == 409:
        return ConflictError(message)
    if status in (408, 429, 502, 503, 504):
        return EstUnavailableError(message, retry_after=retry_after)
    return InternalError(f"{operation}: HTTP {status}: {text}")


def _media(ctype: str) -> str:
    return ctype.split(";", 1)[0].strip().lower()


def _param(ctype: str, wanted: str) -> str | None:
    """A Content-Type parameter's value, lowercased, unquoted (None when absent)."""
    for param in ctype.split(";")[1:]:
        name, sep, value = param.partition("=")
        if sep and name.strip().lower() == wanted:
            return value.strip().strip('"').lower()
    return None


def _expect_type(ctype: str, wanted: str) -> None:
    if _media(ctype) != wanted:
        raise BadRequestError(f"the EST response is {_media(ctype) or 'untyped'}, not {wanted}")


def _b64(body: bytes, what: str) -> bytes:
    compact = body.translate(None, _WHITESPACE).rstrip(b"=")
    try:
        der = base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"the {what} response is not base64") from exc
    if not der:
        raise BadRequestError(f"the {what} response is empty")
    return der


def _certs_only(body: bytes, what: str) -> list[x509.Certificate]:
    der = _b64(body, what)
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError as exc:
        raise BadRequestError(
            f"the {what} response is not a certs-only CMS message: {describe_der_problem(der, 'CMS message')}"
        ) from exc
    if not certs:
        raise BadRequestError(f"the {what} response holds no certificate")
    return certs


def _private_key(der: bytes) -> DevicePrivateKey:
    try:
        key = serialization.load_der_private_key(der, None)
    except (ValueError, TypeError) as exc:
        raise BadRequestError(
            f"the serverkeygen key is not an unencrypted PKCS#8 key: {describe_der_problem(der, 'PKCS#8 key')}"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise BadRequestError(f"the serverkeygen key is of an unexpected type {type(key).__name__}")
    return key


def _spki(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        return b""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _multipart(ctype: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """(media type, smime-type parameter, body) of each part of a multipart/mixed body (RFC 2046 5.1)."""
    boundary = None
    for param in ctype.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise BadRequestError("the multipart response names no boundary")
    delimiter = b"--" + boundary.encode("ascii", "replace")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise BadRequestError("the multipart response has no parts")
    out: list[tuple[str, str | None, bytes]] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # the close delimiter
        head, sep, content = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = chunk.lstrip(b"\n").partition(b"\n\n")
        if not sep:
            raise BadRequestError("a multipart part has no header")
        part_type, smime_type = "", None
        for line in head.decode("ascii", "replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                part_type = _media(value)
                smime_type = _param(value, "smime-type")
        out.append((part_type, smime_type, content))
    return out
