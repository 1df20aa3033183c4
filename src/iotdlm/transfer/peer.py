"""Provider to provider over HTTPS (issue 13; docs/adr/0011): the signed fetch request with which
SP2 asks SP1's cm for the UpdateInfoList, and the bus messages cm relays to the transfer handlers.
PURE: bytes and a time in, a decision out.

The fetch request is a COSE_Sign1 (typ :data:`TYP_FETCH`) signed with SP2's agreed transfer key,
its protected header naming that certificate by thumbprint (x5t), its payload a CBOR map::

    { 1 (iss): SP2's provider id, 3 (aud): SP1's provider id, 6 (iat): epoch seconds,
      7 (cti): 16 random bytes, -70001 (transfer): the transfer id,
      ? -70002 (offset): the first byte asked for, when not 0 (docs/adr/0019) }

SP1 accepts it only from the certificate it pinned for this transfer at export, for this very
transfer, within :data:`FETCH_WINDOW` of its clock, and once (the cti is a replay nonce). The
TransferMessage and the confirmation need no such wrapper: they are signed CWTs of SP2 already,
with their own cti, checked by :mod:`iotdlm.transfer.sp1`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from cryptography import x509

from iotdlm.errors import BadRequestError, UntrustedError
from iotdlm.transfer import cose
from iotdlm.transfer.messages import epoch, from_epoch
from iotdlm.transfer.trust import cert_der, check_pinned, public_key

TYP_FETCH = "application/iotdlm-transfer-fetch+cose"
#: the HTTP header carrying the fetch request (base64url, no padding)
FETCH_HEADER = "Iotdlm-Transfer-Request"
#: a fetch request is good this long either side of SP1's clock
FETCH_WINDOW = dt.timedelta(minutes=2)
MAX_FETCH_BYTES = 1024
#: a transfer id: the first 16 bytes of its transferRef in hex
TID_RE = re.compile(r"[0-9a-f]{32}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
CLAIM_ISS, CLAIM_AUD, CLAIM_IAT, CLAIM_CTI, CLAIM_TRANSFER, CLAIM_OFFSET = 1, 3, 6, 7, -70001, -70002
_CLAIMS = frozenset({CLAIM_ISS, CLAIM_AUD, CLAIM_IAT, CLAIM_CTI, CLAIM_TRANSFER})
#: the largest byte offset a fetch request may name (the UpdateInfoList's own limit is 96 MiB)
MAX_OFFSET = 2**40


def check_tid(text: str) -> str:
    """A transfer id from a URL path, or BadRequestError in the operator's words."""
    if not TID_RE.fullmatch(text):
        raise BadRequestError("a transfer id is 32 lower-case hex digits", field="transfer")
    return text


@dataclass(frozen=True)
class FetchRequest:
    issuer: str
    audience: str
    issued_at: dt.datetime
    cti: bytes
    transfer_id: str
    #: the first byte of the UpdateInfoList asked for (docs/adr/0019: it travels in parts)
    offset: int = 0


def sign_fetch(
    transfer_id: str,
    *,
    issuer: str,
    audience: str,
    now: dt.datetime,
    signer: cose.CoseSigner,
    entropy: Callable[[int], bytes] = secrets.token_bytes,
    offset: int = 0,
) -> str:
    """SP2's fetch request for ``transfer_id`` from byte ``offset`` on, as the value of
    :data:`FETCH_HEADER`."""
    if not 0 <= offset < MAX_OFFSET:
        raise ValueError(f"offset {offset} out of range")
    claims: dict[int, object] = {
        CLAIM_ISS: issuer,
        CLAIM_AUD: audience,
        CLAIM_IAT: epoch(now),
        CLAIM_CTI: entropy(16),
        CLAIM_TRANSFER: check_tid(transfer_id),
    }
    if offset:
        claims[CLAIM_OFFSET] = offset
    payload = cose.dumps(claims)
    token = signer.sign(payload, typ=TYP_FETCH)
    return base64.urlsafe_b64encode(token).rstrip(b"=").decode()


def _decode_header(value: str) -> bytes:
    if len(value) > MAX_FETCH_BYTES * 2:
        raise BadRequestError(f"the {FETCH_HEADER} header is too long", field=FETCH_HEADER)
    if not _B64URL.fullmatch(value):
        raise BadRequestError(f"the {FETCH_HEADER} header is not base64url", field=FETCH_HEADER)
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise BadRequestError(f"the {FETCH_HEADER} header is not base64url", field=FETCH_HEADER) from None


def parse_fetch(value: str) -> tuple[cose.Sign1, FetchRequest]:
    """The fetch request in a header value, parsed but NOT verified (bounded; hostile input ok)."""
    msg = cose.parse_sign1(_decode_header(value), what="the fetch request", max_bytes=MAX_FETCH_BYTES)
    if msg.typ != TYP_FETCH:
        raise BadRequestError(f"the fetch request has COSE typ {msg.typ!r}, not {TYP_FETCH!r}", field="typ")
    claims = cose.loads(msg.payload, what="the fetch request's claims", max_bytes=MAX_FETCH_BYTES)
    if not isinstance(claims, dict) or set(claims) - {CLAIM_OFFSET} != _CLAIMS:
        raise BadRequestError(
            "the fetch request's claims must be exactly iss, aud, iat, cti, the transfer id and an optional offset"
        )
    iss, aud, iat, cti, tid = (claims[k] for k in (CLAIM_ISS, CLAIM_AUD, CLAIM_IAT, CLAIM_CTI, CLAIM_TRANSFER))
    offset = claims.get(CLAIM_OFFSET, 0)
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < MAX_OFFSET:
        raise BadRequestError("the fetch request's offset must be a byte offset", field="offset")
    if not (isinstance(iss, str) and isinstance(aud, str) and isinstance(tid, str)):
        raise BadRequestError("the fetch request's iss, aud and transfer id must be text")
    if not isinstance(iat, int) or isinstance(iat, bool) or not 0 <= iat < 2**40:
        raise BadRequestError("the fetch request's iat must be epoch seconds", field="iat")
    if not isinstance(cti, bytes) or not 8 <= len(cti) <= 64:
        raise BadRequestError("the fetch request's cti must be 8 to 64 bytes", field="cti")
    return msg, FetchRequest(iss, aud, from_epoch(iat), bytes(cti), check_tid(tid), offset)


def verify_fetch(
    value: str,
    *,
    transfer_id: str,
    provider_id: str,
    peer_id: str,
    pinned: x509.Certificate,
    now: dt.datetime,
) -> FetchRequest:
    """Verification raises: the request must be signed by the pinned certificate of the SP2 named
    in the export (x5t, signature, validity), for this provider and this transfer, fresh. The
    caller spends its cti (replay)."""
    msg, req = parse_fetch(value)
    if not msg.names(cert_der(pinned)):
        raise UntrustedError("the fetch request is not signed with the certificate agreed for this transfer (x5t)")
    check_pinned(cert_der(pinned), pinned, now=now, what="the fetch request")
    cose.verify_sign1(msg, public_key(pinned), what="the fetch request")
    if req.transfer_id != transfer_id:
        raise UntrustedError(f"the fetch request is for transfer {req.transfer_id}, not {transfer_id}")
    if req.issuer != peer_id:
        raise UntrustedError(f"the fetch request is issued by {req.issuer!r}, not {peer_id!r}", field="iss")
    if req.audience != provider_id:
        raise UntrustedError(f"the fetch request is for {req.audience!r}, not {provider_id!r}", field="aud")
    if abs(now - req.issued_at) > FETCH_WINDOW:
        raise UntrustedError(
            f"the fetch request was made at {req.issued_at.isoformat()}, more than "
            f"{int(FETCH_WINDOW.total_seconds())} s from {now.isoformat()}",
            field="iat",
        )
    return req


# --- what cm relays over the bus (cm -> the transfer handlers where the store is) -----------------------
class PeerRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    transfer_id: str
    #: the fetch request header (update-info) or the signed CWT (transfer-message, confirmation)
    body: bytes
    #: update-info: the first byte asked for (the HTTP Range; the signed fetch request must name it)
    offset: int = 0


class PeerReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    transfer_id: str
    #: update-info: the UpdateInfoList (JWS); otherwise empty
    body: bytes = b""
    #: what SP1 did, in words (devices revoked, messages made)
    summary: str = ""
    #: update-info: where ``body`` starts in the UpdateInfoList, and the UpdateInfoList's size
    offset: int = 0
    total: int = 0


def encode(obj: PeerRequest | PeerReply) -> bytes:
    return msgspec.json.encode(obj)


def decode_request(data: bytes) -> PeerRequest:
    try:
        req = msgspec.json.decode(data, type=PeerRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequestError(f"malformed transfer relay request: {exc}") from None
    check_tid(req.transfer_id)
    if not 0 <= req.offset < MAX_OFFSET:
        raise BadRequestError("malformed transfer relay request: offset out of range", field="offset")
    return req


def decode_reply(data: bytes) -> PeerReply:
    try:
        return msgspec.json.decode(data, type=PeerReply)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequestError(f"malformed transfer relay reply: {exc}") from None


__all__ = [
    "FETCH_HEADER",
    "FETCH_WINDOW",
    "MAX_OFFSET",
    "TYP_FETCH",
    "FetchRequest",
    "PeerReply",
    "PeerRequest",
    "check_tid",
    "decode_reply",
    "decode_request",
    "encode",
    "parse_fetch",
    "sign_fetch",
    "verify_fetch",
]
