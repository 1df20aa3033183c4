"""The CWTs of the trust transfer (seed 003, Listing 2; Fig. 4): the registered claims every one
carries, the TransferMessage (SP2 -> SP1) and its per-device copy (SP1 -> device), the confirmation
(SP2 -> SP1). The claim keys and COSE ``typ`` values are tabled in :mod:`iotdlm.transfer.messages`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from iotdlm.errors import BadRequestError, RejectedError, ReplayError, UntrustedError
from iotdlm.transfer import cose
from iotdlm.transfer.messages.primitives import (
    AUD,
    CTI,
    DEFAULT_SKEW,
    ENROLLED,
    EXP,
    IAT,
    ISS,
    MAX_ANCHORS,
    MAX_CONFIRMATION_BYTES,
    MAX_CWT_BYTES,
    MAX_DEVICES,
    NBF,
    STANDARD_CLAIMS,
    TRANSFER,
    TRANSFER_REF,
    TRANSFER_REF_BYTES,
    TYP_CONFIRMATION,
    TYP_DEVICE_TRANSFER,
    TYP_TRANSFER_MESSAGE,
    epoch,
    hash32,
    numeric_date,
    tag_time,
    text_value,
    time_value,
    uri_value,
)
from iotdlm.transfer.trust import cert_der, check_pinned, parse_certificates, public_key

_TRANSFER = frozenset({TRANSFER, TRANSFER_REF})
_CONFIRMATION = frozenset({TRANSFER_REF, ENROLLED})


@dataclass(frozen=True)
class CwtHeader:
    """The registered claims every transfer CWT carries."""

    #: None: no iss claim (a device's copy: the device names its signer by x5t, not by iss)
    issuer: str | None
    audience: str
    cti: bytes
    issued_at: dt.datetime
    not_before: dt.datetime
    expires: dt.datetime

    def to_claims(self) -> dict[int, Any]:
        out: dict[int, Any] = {} if self.issuer is None else {ISS: self.issuer}
        return out | {
            AUD: self.audience,
            CTI: self.cti,
            IAT: epoch(self.issued_at),
            NBF: epoch(self.not_before),
            EXP: epoch(self.expires),
        }

    @classmethod
    def from_claims(cls, c: Mapping[int, Any]) -> CwtHeader:
        for key, name in ((AUD, "aud"), (CTI, "cti"), (IAT, "iat"), (NBF, "nbf"), (EXP, "exp")):
            if key not in c:
                raise BadRequestError(f"the CWT has no {name} claim", field=name)
        cti = c[CTI]
        if not isinstance(cti, bytes) or not 16 <= len(cti) <= 64:
            raise BadRequestError("cti must be 16 to 64 random bytes", field="cti")
        header = cls(
            issuer=text_value(c[ISS], "iss") if ISS in c else None,
            audience=text_value(c[AUD], "aud"),
            cti=cti,
            issued_at=numeric_date(c[IAT], "iat"),
            not_before=numeric_date(c[NBF], "nbf"),
            expires=numeric_date(c[EXP], "exp"),
        )
        if header.expires <= header.not_before:
            raise BadRequestError("exp is not after nbf", field="exp")
        return header

    def check_time(self, now: dt.datetime, skew: dt.timedelta = DEFAULT_SKEW) -> None:
        """FR2 (freshness): refuse a CWT that is expired, not yet valid or issued in the future."""
        if now - skew > self.expires:
            raise ReplayError(f"the message expired at {self.expires.isoformat()}", field="exp")
        if now + skew < self.not_before:
            raise ReplayError(f"the message is not valid before {self.not_before.isoformat()}", field="nbf")
        if now + skew < self.issued_at:
            raise ReplayError(f"the message is issued in the future ({self.issued_at.isoformat()})", field="iat")


@dataclass(frozen=True)
class TransferClaims:
    """The paper's TransferMessage fields (Listing 2), plus the trust-anchor extension: the SHA-256
    of each root certificate (DER) that authenticates SP2's endpoints -- a reference the device
    resolves among the certificates it holds or fetches from ``/cacerts`` at enrollURI."""

    reset_not_before: dt.datetime
    reset_not_after: dt.datetime
    ra_uri: str | None
    update_uri: str
    update_first: bool
    enroll_uri: str
    fallback_uri: str
    trust_anchors: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.reset_not_after <= self.reset_not_before:
            raise ValueError("ResetTimeNotAfter must be after ResetTimeNotBefore")
        if self.update_first and not self.update_uri:
            raise ValueError("update-first needs an update URI")
        if len(self.trust_anchors) > MAX_ANCHORS:
            raise ValueError(f"at most {MAX_ANCHORS} trust anchors")
        if any(len(h) != 32 for h in self.trust_anchors):
            raise ValueError("a trust anchor is named by the 32-byte SHA-256 of its certificate")

    def to_obj(self) -> list[Any]:
        """Listing 2's group as an array (the updateURI group flattened into it, as CDDL does)."""
        out: list[Any] = [
            tag_time(self.reset_not_before),
            tag_time(self.reset_not_after),
            self.ra_uri.encode() if self.ra_uri else None,
            self.update_uri.encode(),
            self.update_first,
            self.enroll_uri.encode(),
            self.fallback_uri.encode(),
        ]
        if self.trust_anchors:
            out.append([[cose.SHA256_ALG, h] for h in self.trust_anchors])
        return out

    def to_claims(self) -> dict[int, Any]:
        return {TRANSFER: self.to_obj()}

    @classmethod
    def from_claims(cls, c: Mapping[int, Any], *, fallback_optional: bool = False) -> TransferClaims:
        """``fallback_optional``: SP2's TransferMessage may leave fallbackURI empty (SP1 sets its
        own in every device's copy, VII-D); a device's copy may not."""
        if TRANSFER not in c:
            raise BadRequestError("the message has no TransferMessage claim (Listing 2)", field="TransferMessage")
        obj = c[TRANSFER]
        if not isinstance(obj, list) or len(obj) not in (7, 8):
            raise BadRequestError(
                "the TransferMessage claim must be [ResetTimeNotBefore, ResetTimeNotAfter, raURI, updateURI, "
                "update-first, enrollURI, fallbackURI, ? trustAnchors]",
                field="TransferMessage",
            )
        nb, na, ra, update, first, enroll, fallback = obj[:7]
        if not isinstance(first, bool):
            raise BadRequestError("updateURI's flag must be a bool", field="updateURI")
        anchors = _anchor_refs(obj[7]) if len(obj) == 8 else ()
        try:
            return cls(
                reset_not_before=time_value(nb, "ResetTimeNotBefore"),
                reset_not_after=time_value(na, "ResetTimeNotAfter"),
                ra_uri=None if ra is None else uri_value(ra, "raURI"),
                update_uri=uri_value(update, "updateURI", empty_ok=True),
                update_first=first,
                enroll_uri=uri_value(enroll, "enrollURI"),
                fallback_uri=uri_value(fallback, "fallbackURI", empty_ok=fallback_optional),
                trust_anchors=anchors,
            )
        except ValueError as exc:
            raise BadRequestError(f"the TransferMessage is inconsistent: {exc}") from exc


def _anchor_refs(obj: Any) -> tuple[bytes, ...]:
    """trustAnchors = [1*8 COSE_CertHash], each [-16 (SHA-256), 32-byte hash]."""
    if not isinstance(obj, list) or not 1 <= len(obj) <= MAX_ANCHORS:
        raise BadRequestError(f"trustAnchors must list 1 to {MAX_ANCHORS} certificate hashes", field="trustAnchors")
    out: list[bytes] = []
    for item in obj:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and item[0] == cose.SHA256_ALG):
            raise BadRequestError("each trust anchor must be [-16 (SHA-256), 32-byte hash]", field="trustAnchors")
        out.append(hash32(item[1], "trustAnchors"))
    return tuple(out)


def _claims(payload: bytes, *, what: str, allowed: frozenset[int], max_bytes: int = MAX_CWT_BYTES) -> dict[int, Any]:
    obj = cose.loads(payload, what=f"{what} claims", max_bytes=max_bytes)
    if not isinstance(obj, dict) or not all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
        raise BadRequestError(f"the {what} claims must be a map with integer keys")
    unknown = sorted(set(obj) - allowed - STANDARD_CLAIMS)
    if unknown:
        raise BadRequestError(f"the {what} carries claims that are not agreed: {unknown}")
    return dict(obj)


def _transfer_ref(c: Mapping[int, Any]) -> bytes:
    if TRANSFER_REF not in c:
        raise BadRequestError("the message has no transferRef claim", field="transferRef")
    ref = c[TRANSFER_REF]
    if not isinstance(ref, bytes) or len(ref) != TRANSFER_REF_BYTES:
        raise BadRequestError(f"transferRef must be the {TRANSFER_REF_BYTES}-byte transfer id", field="transferRef")
    return ref


def _wire_ref(ref: bytes) -> bytes:
    """A transfer's SHA-256 (32 bytes) or its id (16): the id, as messages carry it."""
    if len(ref) not in (TRANSFER_REF_BYTES, 32):
        raise ValueError("transferRef is the SHA-256 of the UpdateInfoList JWS or its first 16 bytes")
    return bytes(ref[:TRANSFER_REF_BYTES])


def _parse(token: bytes, *, what: str, typ: int) -> cose.Sign1:
    limit = MAX_CONFIRMATION_BYTES if typ == TYP_CONFIRMATION else MAX_CWT_BYTES
    msg = cose.parse_sign1(token, what=what, max_bytes=limit)
    if msg.typ != typ:
        raise BadRequestError(f"the {what} has COSE typ {msg.typ!r}, not {typ!r}", field="typ")
    return msg


def _verified_payload(token: bytes, *, what: str, typ: int, pinned: x509.Certificate, now: dt.datetime) -> bytes:
    """The payload of a CWT from SP2, once its typ, its x5t (the agreed, pinned certificate) and
    its signature are checked; nothing of the payload is trusted before."""
    msg = _parse(token, what=what, typ=typ)
    if not msg.names(cert_der(pinned)):
        raise UntrustedError(f"the {what} does not name the agreed certificate of the new provider (x5t)")
    check_pinned(cert_der(pinned), pinned, now=now, what=f"the {what}")
    cose.verify_sign1(msg, public_key(pinned), what=f"the {what}")
    return msg.payload


def _check_audience_and_time(
    header: CwtHeader, *, what: str, audience: str, now: dt.datetime, skew: dt.timedelta
) -> None:
    if header.audience != audience:
        raise UntrustedError(f"the {what} is for {header.audience!r}, not {audience!r}", field="aud")
    header.check_time(now, skew)


@dataclass(frozen=True)
class TransferMessage:
    """SP2's TransferMessage (Listing 2) as a CWT, or one device's copy of it made by SP1."""

    header: CwtHeader
    #: the transfer id (16 bytes; a 32-byte transferRef given is cut to it)
    transfer_ref: bytes
    claims: TransferClaims

    def __post_init__(self) -> None:
        object.__setattr__(self, "transfer_ref", _wire_ref(self.transfer_ref))

    def payload(self) -> bytes:
        return cose.dumps({**self.header.to_claims(), TRANSFER_REF: self.transfer_ref, **self.claims.to_claims()})

    @classmethod
    def from_payload(cls, payload: bytes, *, what: str, fallback_optional: bool = False) -> TransferMessage:
        c = _claims(payload, what=what, allowed=_TRANSFER)
        claims = TransferClaims.from_claims(c, fallback_optional=fallback_optional)
        return cls(header=CwtHeader.from_claims(c), transfer_ref=_transfer_ref(c), claims=claims)


def sign_transfer_message(tm: TransferMessage, signer: cose.CoseSigner) -> bytes:
    return signer.sign(tm.payload(), typ=TYP_TRANSFER_MESSAGE)


def open_transfer_message(
    token: bytes, *, pinned: x509.Certificate, audience: str, now: dt.datetime, skew: dt.timedelta = DEFAULT_SKEW
) -> TransferMessage:
    """SP1's check of SP2's TransferMessage: the agreed (pinned) SP2 certificate, signature, typ,
    claims, audience (SP1) and time. The cti is the caller's to check against those seen."""
    payload = _verified_payload(token, what="TransferMessage", typ=TYP_TRANSFER_MESSAGE, pinned=pinned, now=now)
    tm = TransferMessage.from_payload(payload, what="TransferMessage", fallback_optional=True)
    _check_audience_and_time(tm.header, what="TransferMessage", audience=audience, now=now, skew=skew)
    return tm


def sign_device_message(tm: TransferMessage, signer: cose.CoseSigner) -> bytes:
    return signer.sign(tm.payload(), typ=TYP_DEVICE_TRANSFER)


@dataclass(frozen=True)
class OpenedDeviceMessage:
    message: TransferMessage
    signer: x509.Certificate
    chain: tuple[x509.Certificate, ...]


def peek_device_message(
    token: bytes, held: Sequence[x509.Certificate] = ()
) -> tuple[cose.Sign1, list[x509.Certificate]]:
    """Bounded parse of a device transfer message and its signer (nothing verified yet): the
    certificate of ``held`` (the device's truststore) its x5t names, or else its x5chain."""
    msg = _parse(token, what="transfer message", typ=TYP_DEVICE_TRANSFER)
    chain = parse_certificates(msg.x5chain(), what="x5chain certificate")
    if chain:
        return msg, chain
    if msg.x5t() is None:
        raise BadRequestError("the transfer message names no signer (no x5t, no x5chain)", field="x5t")
    signer = next((c for c in held if msg.names(cert_der(c))), None)
    if signer is None:
        raise UntrustedError(
            "the transfer message is signed by a certificate this device does not hold (x5t names none of "
            "its truststore)",
            field="x5t",
        )
    return msg, [signer]


# --- confirmation (SP2 -> SP1) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Enrolled:
    device_id: str
    certificate_sha256: bytes


@dataclass(frozen=True)
class Confirmation:
    header: CwtHeader
    #: the transfer id (16 bytes; a 32-byte transferRef given is cut to it)
    transfer_ref: bytes
    enrolled: tuple[Enrolled, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "transfer_ref", _wire_ref(self.transfer_ref))

    def payload(self) -> bytes:
        return cose.dumps(
            {
                **self.header.to_claims(),
                TRANSFER_REF: self.transfer_ref,
                ENROLLED: [[e.device_id, e.certificate_sha256] for e in self.enrolled],
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> Confirmation:
        c = _claims(payload, what="confirmation", allowed=_CONFIRMATION, max_bytes=MAX_CONFIRMATION_BYTES)
        items = c.get(ENROLLED)
        if not isinstance(items, list) or not items or len(items) > MAX_DEVICES:
            raise BadRequestError(f"enrolled must list 1 to {MAX_DEVICES} devices", field="enrolled")
        enrolled: list[Enrolled] = []
        seen: set[str] = set()
        for item in items:
            if not isinstance(item, list) or len(item) != 2:
                raise BadRequestError("each enrolled device is [device-id, certificate-sha256]", field="enrolled")
            device_id = text_value(item[0], "device id")
            if device_id in seen:
                raise BadRequestError(f"device {device_id} is confirmed twice", device_id=device_id)
            seen.add(device_id)
            enrolled.append(Enrolled(device_id, hash32(item[1], "certificate-sha256")))
        return cls(header=CwtHeader.from_claims(c), transfer_ref=_transfer_ref(c), enrolled=tuple(enrolled))


def sign_confirmation(confirmation: Confirmation, signer: cose.CoseSigner) -> bytes:
    return signer.sign(confirmation.payload(), typ=TYP_CONFIRMATION)


def open_confirmation(
    token: bytes, *, pinned: x509.Certificate, audience: str, now: dt.datetime, skew: dt.timedelta = DEFAULT_SKEW
) -> Confirmation:
    payload = _verified_payload(token, what="confirmation", typ=TYP_CONFIRMATION, pinned=pinned, now=now)
    conf = Confirmation.from_payload(payload)
    _check_audience_and_time(conf.header, what="confirmation", audience=audience, now=now, skew=skew)
    return conf


def peek_transfer_ref(token: bytes, *, typ: int) -> bytes:
    """The transferRef a TransferMessage or confirmation claims, NOT verified: which transfer's
    state (and pinned peer) to verify it with."""
    what = "TransferMessage" if typ == TYP_TRANSFER_MESSAGE else "message"
    msg = _parse(token, what=what, typ=typ)
    obj = cose.loads(msg.payload, what=f"{what} claims", max_bytes=len(msg.payload))
    if not isinstance(obj, dict):
        raise BadRequestError(f"the {what} claims must be a map")
    return _transfer_ref(obj)


def rejected_summary(exc: RejectedError) -> dict[str, str]:
    """What goes into an audit record or a device log about a refused message."""
    out = {"code": exc.code, "message": exc.message[:500]}
    if exc.field:
        out["field"] = exc.field
    return out
