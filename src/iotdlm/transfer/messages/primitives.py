"""The building blocks of the trust-transfer messages (seed 003, section VII): limits, CWT claim
keys, COSE ``typ`` values, and the checked decoders of times, texts, URIs, hashes and x5bags that
the UpdateInfoList, the TransferMessage and the confirmation share. Pure; each decoder raises
:class:`iotdlm.errors.BadRequestError` naming the field."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from typing import Any

import cbor2
from cryptography import x509

from iotdlm.errors import BadRequestError
from iotdlm.transfer import cose
from iotdlm.transfer.trust import parse_certificates

# --- limits -----------------------------------------------------------------------------------------
MAX_UPDATE_INFO_BYTES = 96 * 1024 * 1024
MAX_DEVICES = 100_000
MAX_X5BAG_BYTES = 64 * 1024 * 1024
MAX_CWT_BYTES = 32 * 1024
#: a confirmation lists up to MAX_DEVICES devices (about 45 bytes each)
MAX_CONFIRMATION_BYTES = 8 * 1024 * 1024
MAX_URI = 2048
MAX_ANCHORS = 8
MAX_ID = 255
#: accepted clock difference between the signer and the receiver
DEFAULT_SKEW = dt.timedelta(minutes=5)

# --- claim keys ---------------------------------------------------------------------------------------
ISS, AUD, EXP, NBF, IAT, CTI = 1, 3, 4, 5, 6, 7
#: the paper's TransferMessage (Listing 2) as ONE private claim: the group as an array
TRANSFER = -70001
TRANSFER_REF = -70008
#: transferRef on the wire: the transfer id, the first 16 bytes of the SHA-256 of the UpdateInfoList
#: JWS (a name, not a commitment: every message that carries it is signed)
TRANSFER_REF_BYTES = 16
ENROLLED = -70009

#: COSE typ (RFC 9596) as a CoAP Content-Format from the experimental range (RFC 7252 12.3:
#: 65000-65535), 3 bytes on the wire instead of a 40-byte media type
TYP_TRANSFER_MESSAGE = 65301
TYP_DEVICE_TRANSFER = 65302
TYP_CONFIRMATION = 65303
JWS_TYP = "iotdlm-update-info+cbor"

STANDARD_CLAIMS = frozenset({ISS, AUD, EXP, NBF, IAT, CTI})


# --- primitives -----------------------------------------------------------------------------------------
def epoch(t: dt.datetime) -> int:
    if t.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return int(t.timestamp())


def from_epoch(v: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(v, dt.UTC)


def tag_time(t: dt.datetime) -> cbor2.CBORTag:
    """CDDL ``time`` = #6.1(int): epoch seconds."""
    return cbor2.CBORTag(1, epoch(t))


_MAX_EPOCH = 2**40


def time_value(v: Any, what: str) -> dt.datetime:
    """A #6.1 time (cbor2 decodes it into an aware datetime) or a plain integer NumericDate."""
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            raise BadRequestError(f"{what} is not an epoch time", field=what)
        return v.astimezone(dt.UTC).replace(microsecond=0)
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_EPOCH:
        return from_epoch(v)
    raise BadRequestError(f"{what} must be an epoch time in seconds", field=what)


def numeric_date(v: Any, what: str) -> dt.datetime:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_EPOCH:
        return from_epoch(v)
    raise BadRequestError(f"{what} must be a NumericDate (integer seconds)", field=what)


def text_value(v: Any, what: str, *, max_len: int = MAX_ID) -> str:
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise BadRequestError(f"{what} must be a text string of 1 to {max_len} characters", field=what)
    return v


def uri_value(v: Any, what: str, *, empty_ok: bool = False) -> str:
    if not isinstance(v, bytes) or len(v) > MAX_URI:
        raise BadRequestError(f"{what} must be a byte string (UTF-8 URI) of at most {MAX_URI} bytes", field=what)
    try:
        text = v.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"{what} is not UTF-8", field=what) from exc
    if not text and empty_ok:
        return text
    check_uri(text, what)
    return text


def check_uri(text: str, what: str) -> str:
    if not text.startswith(("https://", "http://", "coaps://", "coap://")) or any(c.isspace() for c in text):
        raise BadRequestError(f"{what} {text[:80]!r} is not an https/http/coaps/coap URI", field=what)
    if len(text.encode()) > MAX_URI:
        raise BadRequestError(f"{what} is longer than {MAX_URI} bytes", field=what)
    return text


def hash32(v: Any, what: str) -> bytes:
    if not isinstance(v, bytes) or len(v) != 32:
        raise BadRequestError(f"{what} must be a 32-byte SHA-256 hash", field=what)
    return v


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- x5bag (RFC 9360) ---------------------------------------------------------------------------------------
def x5bag_obj(ders: Sequence[bytes]) -> bytes | list[bytes]:
    """COSE_X509 = bstr / [2* bstr]: one certificate is a bare bstr."""
    if not ders:
        raise ValueError("an x5bag holds at least one certificate")
    return bytes(ders[0]) if len(ders) == 1 else [bytes(d) for d in ders]


def encode_x5bag(ders: Sequence[bytes]) -> bytes:
    return cose.dumps(x5bag_obj(ders))


def x5bag_from_obj(obj: Any, *, what: str = "x5bag", max_certs: int = MAX_DEVICES) -> tuple[bytes, ...]:
    if isinstance(obj, bytes) and obj:
        return (obj,)
    if isinstance(obj, list) and obj and len(obj) <= max_certs and all(isinstance(d, bytes) and d for d in obj):
        return tuple(obj)
    raise BadRequestError(f"{what} must be a certificate (bstr) or an array of 1 to {max_certs} certificates")


def decode_x5bag(
    data: bytes, *, max_bytes: int = MAX_X5BAG_BYTES, max_certs: int = MAX_DEVICES
) -> tuple[x509.Certificate, ...]:
    """An x5bag received (a CA registering factory certificates): parsed certificates, in order."""
    obj = cose.loads(data, what="x5bag", max_bytes=max_bytes, max_depth=2)
    return tuple(parse_certificates(x5bag_from_obj(obj, max_certs=max_certs), what="x5bag certificate"))
