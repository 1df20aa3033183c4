"""The signed request envelope: every request that creates or revokes a certificate is signed by
the module (or device) that sends it -- the paper's "km and pm sign messages between them".

Format: a JWS in compact serialisation (RFC 7515, via joserfc). The protected header carries
``alg`` and ``x5c`` (the signer's certificate, RFC 7515 4.1.6), so km can check *who* signed before
it checks *what* was signed. The payload is JSON::

    {"op": "<operation>", "aud": "<receiving module>", "iat": <unix seconds>,
     "nonce": "<random, base64url>", "body": {...operation fields...}}

``op`` and ``aud`` bind the signature to one operation at one receiver, ``iat`` + ``nonce`` let
the receiver refuse replays (a time window plus a store of nonces seen within it).

Verification order (house style: verify the bytes received, then decode):
  1. :func:`peek_signer` -- bounded parse of the header, returns the x5c certificate (untrusted);
  2. the caller checks that certificate (chain, role, status);
  3. :func:`verify` -- checks the JWS signature with that certificate's key, then decodes the
     payload and checks op, aud and the time window. The nonce store is the caller's.

Replies (ADR 0006): km answers every sealed request -- result or error -- with a JWS of the same
form signed by km's own service certificate (:meth:`Sealer.seal_reply`); its payload is::

    {"re": "<bus subject answered>", "req": "<base64url SHA-256 of the request bytes>",
     "iat": <unix seconds>, "error": false|true, "body": {...result, or the error's wire form...}}

``re`` + ``req`` bind the reply to the one request it answers (the request carries a fresh nonce,
so its digest is fresh too); :func:`verify_reply` checks them and the time window.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey

from iotdlm.errors import BadRequestError, BadSignatureError, ReplayError, TooLargeError, UnsupportedError
from iotdlm.pki.keys import Algorithm, PrivateKey, PublicKey, algorithm_of

MAX_ENVELOPE_BYTES = 4 * 1024 * 1024
#: accepted clock skew between sender and receiver, both directions
DEFAULT_WINDOW = dt.timedelta(minutes=5)

JWS_ALG: dict[Algorithm, str] = {
    Algorithm.P256: "ES256",
    Algorithm.P384: "ES384",
    Algorithm.ED25519: "Ed25519",
    Algorithm.RSA3072: "RS256",
}
ALLOWED_ALGS = sorted(JWS_ALG.values())

JoseKey = ECKey | OKPKey | RSAKey


def _registry(alg: str) -> jws.JWSRegistry:
    """A joserfc registry for one algorithm, sized for our envelopes (x5c makes headers large)."""
    reg = _REGISTRIES.get(alg)
    if reg is None:
        reg = jws.JWSRegistry(algorithms=[alg])
        reg.max_header_length = 16 * 1024
        reg.max_payload_length = MAX_ENVELOPE_BYTES
        _REGISTRIES[alg] = reg
    return reg


_REGISTRIES: dict[str, jws.JWSRegistry] = {}


def jose_key(key: PrivateKey | PublicKey) -> JoseKey:
    """joserfc key object for a cryptography key (cache it: import is not free)."""
    alg = algorithm_of(key)
    if alg is Algorithm.ED25519:
        return OKPKey.import_key(key)  # type: ignore[arg-type]
    if alg is Algorithm.RSA3072:
        return RSAKey.import_key(key)  # type: ignore[arg-type]
    return ECKey.import_key(key)  # type: ignore[arg-type]


class _Payload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    op: str
    aud: str
    iat: float
    nonce: str
    body: msgspec.Raw


_T = TypeVar("_T")

_payload_decoder = msgspec.json.Decoder(_Payload)
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Envelope:
    op: str
    aud: str
    iat: dt.datetime
    nonce: str
    body: bytes  # raw JSON of the operation fields, decode with the operation's schema
    signer: x509.Certificate


class Sealer:
    """Signs envelopes as one principal (a module or a device)."""

    def __init__(self, key: PrivateKey, certificate: x509.Certificate) -> None:
        self._alg = JWS_ALG[algorithm_of(key)]
        self._key = jose_key(key)
        self._x5c = base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()
        self.certificate = certificate

    def seal(self, op: str, body: Any, *, aud: str, now: dt.datetime, nonce: str | None = None) -> bytes:
        payload = _encoder.encode(
            {
                "op": op,
                "aud": aud,
                "iat": now.timestamp(),
                "nonce": nonce if nonce is not None else secrets.token_urlsafe(18),
                "body": body,
            }
        )
        token = jws.serialize_compact(
            {"alg": self._alg, "x5c": [self._x5c]}, payload, self._key, registry=_registry(self._alg)
        )
        return token.encode("ascii")

    def seal_reply(self, subject: str, request: bytes, body: bytes, *, error: bool, now: dt.datetime) -> bytes:
        """A reply to ``request`` (received on ``subject``); ``body`` is JSON (the result, or the
        error's wire form when ``error``)."""
        payload = _encoder.encode(
            {
                "re": subject,
                "req": request_digest(request),
                "iat": now.timestamp(),
                "error": error,
                "body": msgspec.Raw(body),
            }
        )
        token = jws.serialize_compact(
            {"alg": self._alg, "x5c": [self._x5c]}, payload, self._key, registry=_registry(self._alg)
        )
        return token.encode("ascii")


def request_digest(request: bytes) -> str:
    """base64url (no padding) SHA-256 of a request's bytes: what a reply echoes to bind itself."""
    return base64.urlsafe_b64encode(hashlib.sha256(request).digest()).rstrip(b"=").decode("ascii")


class _ReplyPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    re: str
    req: str
    iat: float
    error: bool
    body: msgspec.Raw


_reply_decoder = msgspec.json.Decoder(_ReplyPayload)


@dataclass(frozen=True)
class Reply:
    error: bool
    body: bytes  # raw JSON: the result, or the error's wire form (errors.from_wire)


def _within_window(iat_seconds: float, now: dt.datetime, window: dt.timedelta, *, what: str) -> dt.datetime:
    """The ``iat`` of a signed request or reply as a time, refused unless within ``window`` of ``now``."""
    try:
        iat = dt.datetime.fromtimestamp(iat_seconds, dt.UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise BadRequestError(f"{what} iat is not a valid time", field="iat") from exc
    if abs(now - iat) > window:
        raise ReplayError(
            f"{what} time {iat.isoformat()} is outside the accepted window of {window} around {now.isoformat()}",
            field="iat",
        )
    return iat


def _verified_payload(token: str | bytes, key: Any, alg: str, decoder: msgspec.json.Decoder[_T], *, what: str) -> _T:
    """The decoded payload of a compact JWS whose signature ``key`` verifies (``what`` words the errors)."""
    try:
        obj = jws.deserialize_compact(token, key, registry=_registry(alg))
    except JoseError as exc:
        raise BadSignatureError(f"{what} signature does not verify: {exc.description or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"{what} JWS is not valid: {exc}") from exc
    try:
        return decoder.decode(obj.payload)
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"{what} payload is not valid: {exc}") from exc


def verify_reply(
    token: bytes,
    signer_key: JoseKey,
    *,
    alg: str,
    subject: str,
    request: bytes,
    now: dt.datetime,
    window: dt.timedelta = DEFAULT_WINDOW,
) -> Reply:
    """Check a reply's JWS signature with the (already trusted) signer key, then that it answers
    ``request`` on ``subject`` and was made within ``window`` of ``now``.

    Raises :class:`BadSignatureError`, :class:`BadRequestError` or :class:`ReplayError`; the caller
    words them for its user.
    """
    payload = _verified_payload(token, signer_key, alg, _reply_decoder, what="the reply's")
    if payload.re != subject:
        raise BadRequestError(f"it answers {payload.re!r}, not {subject!r}", field="re")
    if not secrets.compare_digest(payload.req, request_digest(request)):
        raise BadRequestError("it answers another request (the request digest differs)", field="req")
    _within_window(payload.iat, now, window, what="the reply")
    return Reply(error=payload.error, body=bytes(payload.body))


def _b64url(part: bytes) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError("envelope is not valid base64url") from exc


class _Header(msgspec.Struct, frozen=True):
    alg: str
    x5c: list[str]


_header_decoder = msgspec.json.Decoder(_Header)


def peek_signer(token: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> tuple[str, bytes]:
    """(alg, DER of the x5c leaf) from the protected header, WITHOUT verifying anything yet."""
    if len(token) > max_bytes:
        raise TooLargeError(f"signed message of {len(token)} bytes exceeds the limit of {max_bytes}")
    parts = token.split(b".")
    if len(parts) != 3:
        raise BadRequestError("request is not a JWS in compact serialisation (expected 3 dot-separated parts)")
    try:
        header = _header_decoder.decode(_b64url(parts[0]))
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"JWS protected header is not valid: {exc}") from exc
    if header.alg not in ALLOWED_ALGS:
        raise UnsupportedError(f"JWS algorithm {header.alg!r} is not accepted; use one of {ALLOWED_ALGS}")
    if not header.x5c:
        raise BadRequestError("JWS header has an empty x5c: the signer's certificate is required")
    try:
        leaf = base64.b64decode(header.x5c[0], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError("JWS x5c is not valid base64") from exc
    return header.alg, leaf


def verify(
    token: bytes,
    signer: x509.Certificate,
    signer_key: JoseKey,
    *,
    alg: str,
    op: str | Sequence[str],
    aud: str,
    now: dt.datetime,
    window: dt.timedelta = DEFAULT_WINDOW,
) -> Envelope:
    """Check the JWS signature with the (already trusted) signer key, then op, aud and time window."""
    payload = _verified_payload(token, signer_key, alg, _payload_decoder, what="request")
    ops = (op,) if isinstance(op, str) else tuple(op)
    if payload.op not in ops:
        raise BadRequestError(f"request is for operation {payload.op!r}, expected {' or '.join(ops)}", field="op")
    if payload.aud != aud:
        raise BadRequestError(f"request is addressed to {payload.aud!r}, not {aud!r}", field="aud")
    iat = _within_window(payload.iat, now, window, what="request")
    if not (8 <= len(payload.nonce) <= 128):
        raise BadRequestError("request nonce must be 8 to 128 characters", field="nonce")
    return Envelope(
        op=payload.op, aud=payload.aud, iat=iat, nonce=payload.nonce, body=bytes(payload.body), signer=signer
    )
