"""OCSP responder side for the validation authority (pure: no I/O). RFC 6960, RFC 5019.

- :func:`decode_get_path` turns the GET form (RFC 6960 A.1.1, RFC 5019 5: the URL-encoded base64 of
  the DER request as the last path component) into DER; POST bodies are DER already.
- :func:`parse_request` reads one DER OCSPRequest into an :class:`OcspQuery`. Anything it cannot
  take is a :class:`~iotdlm.errors.BadRequestError` (answer :func:`error_response`
  ``"malformed_request"``); a request naming several certificates is refused too (RFC 5019 2.1.1:
  clients send one, responders may support only one).
- :meth:`Responder.matches` says whether the CertID's issuer hashes are our CA's (otherwise answer
  ``"unauthorized"``, RFC 5019 2.2.3).
- :func:`build_response` signs a BasicOCSPResponse for exactly the CertID asked (same hash
  algorithm, same hashes, same serial), responder id by key hash (RFC 5019 2.2.2), the delegated
  responder certificate included, the nonce echoed when asked to.

Nonces: cryptography exposes the id-pkix-ocsp-nonce value with its inner OCTET STRING removed and
writes it back wrapped the same way, which is the RFC 9654 encoding and what ``openssl ocsp``
sends and checks. RFC 9654 (obsoleting RFC 8954) bounds the nonce to 1..128 octets and has
responders reject other lengths as malformedRequest; so do we. Whether to echo it is the caller's
choice (``include_nonce``): a responder serving pre-signed RFC 5019 responses from a cache cannot.

producedAt is set by cryptography from the system clock when signing; thisUpdate and nextUpdate
are the caller's.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotdlm.errors import BadRequestError, TooLargeError
from iotdlm.pki.ca import IssuingCA
from iotdlm.pki.crl import parse_reason
from iotdlm.pki.der import describe_der_problem
from iotdlm.pki.keys import Signer

MAX_OCSP_REQUEST_BYTES = 8 * 1024
#: RFC 9654 2.1: Nonce ::= OCTET STRING(SIZE(1..128))
MAX_NONCE_BYTES = 128

#: CertID hash algorithms we answer for (RFC 5019 needs SHA-1, RFC 9919 adds SHA-256)
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

ErrorKind = Literal["malformed_request", "internal_error", "try_later", "unauthorized"]
_ERROR_STATUS: dict[str, ocsp.OCSPResponseStatus] = {
    "malformed_request": ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
    "internal_error": ocsp.OCSPResponseStatus.INTERNAL_ERROR,
    "try_later": ocsp.OCSPResponseStatus.TRY_LATER,
    "unauthorized": ocsp.OCSPResponseStatus.UNAUTHORIZED,
}


@dataclass(frozen=True)
class OcspQuery:
    """The one CertID of a request, and its nonce."""

    serial: int
    issuer_key_hash: bytes
    issuer_name_hash: bytes
    hash_algorithm: str  # "sha1", "sha256", "sha384" or "sha512"
    nonce: bytes | None  # the id-pkix-ocsp-nonce value if present


def parse_request(der: bytes) -> OcspQuery:
    """Read a DER OCSPRequest. Garbage, empty, oversize (TooLargeError), several CertIDs, an
    unknown CertID hash, a critical extension other than the nonce, or a bad nonce length all
    raise BadRequestError. Request signatures are ignored (RFC 5019 2.1.2)."""
    if not isinstance(der, bytes | bytearray | memoryview):
        raise BadRequestError("OCSP request must be bytes")
    der = bytes(der)
    if not der:
        raise BadRequestError("empty OCSP request")
    if len(der) > MAX_OCSP_REQUEST_BYTES:
        raise TooLargeError(f"OCSP request of {len(der)} bytes exceeds the limit of {MAX_OCSP_REQUEST_BYTES}")
    try:
        req = ocsp.load_der_ocsp_request(der)
    except NotImplementedError as exc:  # cryptography: "OCSP request contains more than one request" (or none)
        raise BadRequestError(
            "an OCSP request must name exactly one certificate; this responder does not take several (RFC 5019 2.1.1)"
        ) from exc
    except ValueError as exc:
        raise BadRequestError(f"OCSP request: {describe_der_problem(der, 'OCSP request')}") from exc
    try:
        algorithm = req.hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise BadRequestError("the CertID hash algorithm is unknown here: use SHA-1 or SHA-256") from exc
    name = algorithm.name
    if name not in _HASHES:
        raise BadRequestError(f"unsupported CertID hash algorithm {name}; use SHA-1 or SHA-256")
    try:
        serial = req.serial_number
        key_hash = req.issuer_key_hash
        name_hash = req.issuer_name_hash
        extensions = list(req.extensions)
    except x509.DuplicateExtension as exc:
        raise BadRequestError(f"malformed OCSP request: the extension {exc.oid.dotted_string} appears twice") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadRequestError("malformed OCSP request: its CertID or its extensions cannot be read") from exc
    if len(key_hash) != algorithm.digest_size or len(name_hash) != algorithm.digest_size:
        raise BadRequestError(f"CertID hashes are not {name} digests")
    if serial < 0:
        raise BadRequestError("negative certificate serial number in CertID")
    nonce: bytes | None = None
    for ext in extensions:
        if isinstance(ext.value, x509.OCSPNonce):
            nonce = ext.value.nonce
            if not 1 <= len(nonce) <= MAX_NONCE_BYTES:
                raise BadRequestError(f"OCSP nonce of {len(nonce)} bytes; RFC 9654 allows 1 to {MAX_NONCE_BYTES}")
        elif ext.critical:
            raise BadRequestError(f"unsupported critical OCSP request extension {ext.oid.dotted_string}")
    return OcspQuery(
        serial=serial, issuer_key_hash=key_hash, issuer_name_hash=name_hash, hash_algorithm=name, nonce=nonce
    )


#: longest GET path component taken: base64 of MAX_OCSP_REQUEST_BYTES, every character %-escaped
_MAX_GET_CHARS = 3 * 4 * ((MAX_OCSP_REQUEST_BYTES + 2) // 3)
_B64_TEXT = re.compile(r"[A-Za-z0-9+/=]+")
#: the escapes base64 needs (RFC 6960 A.1.1's url-encoding), replaced without the general decoder
_B64_ESCAPES = (("%2F", "/"), ("%2f", "/"), ("%2B", "+"), ("%2b", "+"), ("%3D", "="), ("%3d", "="))


def _unquote_base64(path_component: str) -> str:
    """``urllib.parse.unquote`` (ASCII, strict) of a GET path, the usual case (only %2F, %2B, %3D
    escaped) with plain replacements, an OCSP GET being on every relying party's hot path. Any other
    ``%`` left: the general decoder on the original text, so the result is always unquote's (a
    replacement yields no ``%``, so none can make or break another escape; a property test checks it)."""
    text = path_component
    if "%" in text:
        for escaped, char in _B64_ESCAPES:
            text = text.replace(escaped, char)
    if "%" not in text:
        return text
    try:
        return urllib.parse.unquote(path_component, encoding="ascii", errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequestError("OCSP GET path is not URL-encoded base64") from exc


def decode_get_path(path_component: str) -> bytes:
    """The DER request from the GET form ``{url}/{url-encoding of base64(DER)}`` (RFC 6960 A.1.1).

    ``path_component`` is everything after the responder's own path, still percent-encoded;
    ``%2F``/``%2B``/``%3D`` and literal ``/`` and ``+`` are all taken. A space is read as ``+``
    (a form-decoding proxy turns ``+`` into a space; base64 has no spaces), missing ``=`` padding
    is restored, and leading slashes are dropped (a DER request's base64 starts with ``M``).
    Returns the DER bytes, not yet parsed (:func:`parse_request` does that)."""
    if not isinstance(path_component, str):
        raise BadRequestError("OCSP GET path must be text")
    if len(path_component) > _MAX_GET_CHARS:
        raise TooLargeError(f"OCSP GET path of {len(path_component)} characters is too long")
    text = _unquote_base64(path_component).lstrip("/").replace(" ", "+")
    if not text:
        raise BadRequestError("empty OCSP GET request")
    if _B64_TEXT.fullmatch(text) is None:
        raise BadRequestError("OCSP GET path is not URL-encoded base64")
    text = text.rstrip("=")
    if len(text) % 4 == 1:
        raise BadRequestError("OCSP GET path is not valid base64 (truncated)")
    try:
        der = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError("OCSP GET path is not valid base64") from exc
    if len(der) > MAX_OCSP_REQUEST_BYTES:
        raise TooLargeError(f"OCSP request of {len(der)} bytes exceeds the limit of {MAX_OCSP_REQUEST_BYTES}")
    return der


@dataclass(frozen=True)
class Responder:
    """An OCSP responder for the certificates of ``ca``: a delegated responder certificate issued
    by ``ca`` (the "ocsp" profile: id-kp-OCSPSigning, ocsp-nocheck) and its key, or the CA's own
    certificate and signer. Checked at construction (ValueError if they do not fit)."""

    ca: IssuingCA
    certificate: x509.Certificate
    signer: Signer
    _hashes: dict[str, tuple[bytes, bytes]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.signer.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != self.certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError("the responder signer's key is not the responder certificate's key")
        if self.certificate != self.ca.certificate:
            try:
                self.certificate.verify_directly_issued_by(self.ca.certificate)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise ValueError(f"the responder certificate is not issued by CA {self.ca.name}: {exc}") from exc
            try:
                eku = self.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                eku = x509.ExtendedKeyUsage([])
            if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
                raise ValueError("a delegated responder certificate needs id-kp-OCSPSigning (RFC 6960 4.2.2.2)")
        # The CertID hashes of this CA for every algorithm (RFC 6960 4.1.1): of the DER of its
        # name, and of its public key's BIT STRING, which cryptography computes for us (the key
        # hash depends on the issuer only; the name hash it takes from the certificate's issuer
        # field, so it is not used).
        subject_der = self.ca.certificate.subject.public_bytes()
        computed: dict[str, tuple[bytes, bytes]] = {}
        for name, alg in _HASHES.items():
            req = ocsp.OCSPRequestBuilder().add_certificate(self.ca.certificate, self.ca.certificate, alg()).build()
            computed[name] = (hashlib.new(name, subject_der).digest(), req.issuer_key_hash)
        object.__setattr__(self, "_hashes", computed)

    def matches(self, q: OcspQuery) -> bool:
        """Whether the CertID's issuer name and key hashes are this CA's."""
        ours = self._hashes.get(q.hash_algorithm)
        return ours is not None and ours == (q.issuer_name_hash, q.issuer_key_hash)


@dataclass(frozen=True)
class CertStatus:
    status: Literal["good", "revoked", "unknown"]
    revoked_at: dt.datetime | None = None
    reason: str | None = None  # a crl.REASONS name; "unspecified" is sent as no reason


_CERT_STATUS = {
    "good": ocsp.OCSPCertStatus.GOOD,
    "revoked": ocsp.OCSPCertStatus.REVOKED,
    "unknown": ocsp.OCSPCertStatus.UNKNOWN,
}


def _aware(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value.astimezone(dt.UTC)


def build_response(
    responder: Responder,
    q: OcspQuery,
    status: CertStatus,
    *,
    this_update: dt.datetime,
    next_update: dt.datetime,
    include_nonce: bool,
) -> bytes:
    """A signed, successful OCSPResponse (DER) answering ``q``. The query must be for
    ``responder``'s CA (check :meth:`Responder.matches` first); the caller's mistakes are
    ValueErrors."""
    if not responder.matches(q):
        raise ValueError("the query is not for this responder's CA; answer error_response('unauthorized')")
    this_update = _aware(this_update, "this_update")
    next_update = _aware(next_update, "next_update")
    if next_update <= this_update:
        raise ValueError("next_update must be after this_update")
    cert_status = _CERT_STATUS.get(status.status)
    if cert_status is None:
        raise ValueError(f"unknown certificate status {status.status!r}")
    revoked_at: dt.datetime | None = None
    reason: x509.ReasonFlags | None = None
    if cert_status is ocsp.OCSPCertStatus.REVOKED:
        if status.revoked_at is None:
            raise ValueError("a revoked status needs revoked_at")
        revoked_at = _aware(status.revoked_at, "revoked_at")
        if status.reason is not None:
            reason = parse_reason(status.reason)
            if reason is x509.ReasonFlags.remove_from_crl:
                raise ValueError("removeFromCRL is not a revocation reason for OCSP; the certificate is good")
            if reason is x509.ReasonFlags.unspecified:
                reason = None  # as in CRLs (RFC 5280 5.3.1)
    elif status.revoked_at is not None or status.reason is not None:
        raise ValueError(f"a {status.status} status has no revocation time or reason")

    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=q.issuer_name_hash,
        issuer_key_hash=q.issuer_key_hash,
        serial_number=q.serial,
        algorithm=_HASHES[q.hash_algorithm](),
        cert_status=cert_status,
        this_update=this_update,
        next_update=next_update,
        revocation_time=revoked_at,
        revocation_reason=reason,
    )
    if include_nonce and q.nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(q.nonce), critical=False)
    # a KeySigner signs with its key object; an HSM signer signs the tbsResponseData and assembles
    # the BasicOCSPResponse itself (pki/signed_der.py, ADR 0025)
    response = responder.signer.sign_ocsp(builder, responder.certificate)
    return response.public_bytes(serialization.Encoding.DER)


def error_response(kind: ErrorKind) -> bytes:
    """An unsigned OCSPResponse with only an error status (RFC 6960 4.2.1), DER."""
    der = _ERROR_DER.get(kind)
    if der is None:
        raise ValueError(f"unknown OCSP error kind {kind!r}; one of {', '.join(_ERROR_DER)}")
    return der


_ERROR_DER: dict[str, bytes] = {
    kind: ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)
    for kind, status in _ERROR_STATUS.items()
}
