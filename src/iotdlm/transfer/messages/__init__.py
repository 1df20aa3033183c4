"""The trust-transfer messages (seed 003, section VII; Listings 1 and 2; Fig. 4), pure codecs.

Every decoder takes untrusted bytes and either returns a checked, immutable object or raises an
:class:`iotdlm.errors.RejectedError` subclass; nothing else escapes (hypothesis-tested). Signatures
are verified over the bytes received before the payload is decoded.

UpdateInfoList (SP1 -> SP2), CDDL; a JWS (RFC 7515, compact, ``alg`` ES256 for P-256 keys,
``typ`` ``iotdlm-update-info+cbor``, ``x5c`` = SP1's transfer certificate, the identity agreed in
the contract and pinned by SP2) whose payload is the CBOR array ``UpdateInfoExport``::

    UpdateInfoExport = [
        UpdateInfoList,            ; Listing 1, as the paper gives it
        factoryCertificates: x5bag, ; RFC 9360 COSE_X509: the full DER certificates, the i-th being
                                    ; the certificate whose TBSCertificate is the i-th entry's
        audience: tstr,            ; SP2's provider id (the export is for SP2 only)
        issuedAt: #6.1(int),
    ]
    UpdateInfoList = [* DeviceUpdateInfo]
    DeviceUpdateInfo = [
        factoryCertificate: bstr,      ; DER TBSCertificate (the paper's TBSCertificate)
        updateTimeNotBefore: #6.1(int),
        updateTimeNotAfter: #6.1(int),
        versionInfo: [suit-manifest-seq-number: uint, suit-reference-uri: tstr],
        ? raReference: bstr .size 32,  ; only when remote attestation is agreed (VII-C: "SP1 needs to
                                       ; share the information needed for a verifier"): SHA-256 of
                                       ; the firmware image the device must be running
    ]

Why both the TBSCertificate and the x5bag: the paper's DeviceUpdateInfo names the factory
certificate by its TBSCertificate, and the paper also has the factory certificates *shared* so the
new CA can authenticate the devices (VI-B: x5bag). A TBSCertificate alone cannot be verified (the
issuer's signature is outside it), so the full certificates travel alongside in an x5bag, and the
decoder checks that each entry's TBSCertificate is exactly the TBS of the certificate at the same
index. SP2 forwards that x5bag unchanged to CA2.

CWTs (COSE_Sign1, RFC 8392 / RFC 9052, signed with ``cwt``). Standard claims: iss 1, aud 3,
exp 4, nbf 5, iat 6, cti 7 (16 random bytes). The paper's fields use private claim keys (RFC 8392
9.1: below -65536 is private use):

=========  ========================  =================================================
key        claim                     value
=========  ========================  =================================================
-70001     ResetTimeNotBefore        #6.1(int)
-70002     ResetTimeNotAfter         #6.1(int)
-70003     raURI                     bstr (UTF-8 URI) / null
-70004     updateURI                 [bstr (UTF-8 URI, may be empty), bool update-first]
-70005     enrollURI                 bstr (UTF-8 URI: CA2's EST base, the CA-URI)
-70006     fallbackURI               bstr (UTF-8 URI)
-70007     trustAnchors              x5bag (extension: roots that authenticate SP2's endpoints,
                                     installed before the reset and not rolled back by it, VII-D)
-70008     transferRef               bstr .size 32: SHA-256 of the UpdateInfoList JWS answered
-70009     enrolled                  [* [device-id: tstr, certificate-sha256: bstr .size 32]]
=========  ========================  =================================================

- TransferMessage (SP2 -> SP1): iss, aud (SP1's provider id), exp, nbf, iat, cti, -70001..-70008.
  COSE ``typ`` (label 16) ``application/iotdlm-transfer-message+cwt``; ``x5t`` (label 34) names
  SP2's pinned transfer certificate.
- Device transfer message (SP1 -> one device): the same claims, copied, with ``aud`` = the device
  id, a new ``cti``, fallbackURI = SP1's update server; ``typ``
  ``application/iotdlm-device-transfer+cwt``; ``x5chain`` (label 33) = SP1's transfer certificate and
  its issuing CA, which the device checks up to a root of its truststore.
- Confirmation (SP2 -> SP1): iss, aud, exp, nbf, iat, cti, -70008, -70009; ``typ``
  ``application/iotdlm-transfer-confirmation+cwt``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import msgspec
from cryptography import x509
from joserfc import jws
from joserfc.errors import BadSignatureError as JoseBadSignature
from joserfc.errors import JoseError

from iotdlm.errors import (
    BadRequestError,
    BadSignatureError,
    RejectedError,
    ReplayError,
    TooLargeError,
    UntrustedError,
)
from iotdlm.pki.keys import PrivateKey, algorithm_of
from iotdlm.transfer import cose
from iotdlm.transfer.trust import (
    cert_der,
    check_pinned,
    factory_device_id,
    parse_certificates,
    public_key,
)
from iotdlm.wire.envelope import JWS_ALG, jose_key

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
RESET_NOT_BEFORE = -70001
RESET_NOT_AFTER = -70002
RA_URI = -70003
UPDATE_URI = -70004
ENROLL_URI = -70005
FALLBACK_URI = -70006
TRUST_ANCHORS = -70007
TRANSFER_REF = -70008
ENROLLED = -70009

TYP_TRANSFER_MESSAGE = "application/iotdlm-transfer-message+cwt"
TYP_DEVICE_TRANSFER = "application/iotdlm-device-transfer+cwt"
TYP_CONFIRMATION = "application/iotdlm-transfer-confirmation+cwt"
JWS_TYP = "iotdlm-update-info+cbor"

_STANDARD = frozenset({ISS, AUD, EXP, NBF, IAT, CTI})
_TRANSFER = frozenset(
    {RESET_NOT_BEFORE, RESET_NOT_AFTER, RA_URI, UPDATE_URI, ENROLL_URI, FALLBACK_URI, TRUST_ANCHORS, TRANSFER_REF}
)
_CONFIRMATION = frozenset({TRANSFER_REF, ENROLLED})


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


def _time(v: Any, what: str) -> dt.datetime:
    """A #6.1 time (cbor2 decodes it into an aware datetime) or a plain integer NumericDate."""
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            raise BadRequestError(f"{what} is not an epoch time", field=what)
        return v.astimezone(dt.UTC).replace(microsecond=0)
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_EPOCH:
        return from_epoch(v)
    raise BadRequestError(f"{what} must be an epoch time in seconds", field=what)


def _numeric_date(v: Any, what: str) -> dt.datetime:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_EPOCH:
        return from_epoch(v)
    raise BadRequestError(f"{what} must be a NumericDate (integer seconds)", field=what)


def _text(v: Any, what: str, *, max_len: int = MAX_ID) -> str:
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise BadRequestError(f"{what} must be a text string of 1 to {max_len} characters", field=what)
    return v


def _uri(v: Any, what: str, *, empty_ok: bool = False) -> str:
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


def _hash32(v: Any, what: str) -> bytes:
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


# --- UpdateInfoList (Listing 1) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionInfo:
    """versionInfo: (suit-manifest-seq-number, suit-reference-uri)."""

    seq: int
    uri: str

    def __post_init__(self) -> None:
        if not isinstance(self.seq, int) or isinstance(self.seq, bool) or not 0 <= self.seq < 2**63:
            raise ValueError("suit-manifest-seq-number must be an unsigned 63-bit integer")
        if not isinstance(self.uri, str) or len(self.uri) > MAX_URI:
            raise ValueError("suit-reference-uri must be a text string of at most 2048 characters")


@dataclass(frozen=True)
class DeviceUpdateInfo:
    factory_tbs: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    version: VersionInfo
    ra_reference: bytes | None = None

    def to_obj(self) -> list[Any]:
        out: list[Any] = [
            self.factory_tbs,
            tag_time(self.not_before),
            tag_time(self.not_after),
            [self.version.seq, self.version.uri],
        ]
        if self.ra_reference is not None:
            out.append(self.ra_reference)
        return out

    def to_bytes(self) -> bytes:
        return cose.dumps(self.to_obj())

    @classmethod
    def from_obj(cls, obj: Any, index: int) -> DeviceUpdateInfo:
        what = f"DeviceUpdateInfo #{index}"
        if not isinstance(obj, list) or len(obj) not in (4, 5):
            raise BadRequestError(f"{what} must be an array of 4 (or 5, with raReference) items")
        tbs, nb, na, version = obj[:4]
        if not isinstance(tbs, bytes) or not tbs:
            raise BadRequestError(f"{what}: factoryCertificate must be the DER TBSCertificate (bstr)")
        not_before = _time(nb, "updateTimeNotBefore")
        not_after = _time(na, "updateTimeNotAfter")
        if not_after <= not_before:
            raise BadRequestError(f"{what}: updateTimeNotAfter is not after updateTimeNotBefore")
        if (
            not isinstance(version, list)
            or len(version) != 2
            or not isinstance(version[0], int)
            or isinstance(version[0], bool)
            or not 0 <= version[0] < 2**63
            or not isinstance(version[1], str)
            or len(version[1]) > MAX_URI
        ):
            raise BadRequestError(f"{what}: versionInfo must be [suit-manifest-seq-number, suit-reference-uri]")
        ref = _hash32(obj[4], "raReference") if len(obj) == 5 else None
        return cls(tbs, not_before, not_after, VersionInfo(version[0], version[1]), ref)


def encode_update_info_list(entries: Sequence[DeviceUpdateInfo]) -> bytes:
    """UpdateInfoList = [* DeviceUpdateInfo] (Listing 1), on its own."""
    return cose.dumps([e.to_obj() for e in entries])


@dataclass(frozen=True)
class UpdateInfoExport:
    """What SP1 signs and shares with SP2: the UpdateInfoList and the factory certificates."""

    entries: tuple[DeviceUpdateInfo, ...]
    factory_certificates: tuple[bytes, ...]
    audience: str
    issued_at: dt.datetime

    def __post_init__(self) -> None:
        if len(self.entries) != len(self.factory_certificates):
            raise ValueError("one factory certificate per DeviceUpdateInfo, in the same order")
        if not self.entries:
            raise ValueError("an UpdateInfoList names at least one device")

    def payload(self) -> bytes:
        return cose.dumps(
            [
                [e.to_obj() for e in self.entries],
                x5bag_obj(self.factory_certificates),
                self.audience,
                tag_time(self.issued_at),
            ]
        )


@dataclass(frozen=True)
class SharedDevice:
    """One device of a verified UpdateInfoList."""

    device_id: str
    certificate: x509.Certificate
    certificate_der: bytes
    info: DeviceUpdateInfo

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.certificate_der).hexdigest()


@dataclass(frozen=True)
class VerifiedExport:
    export: UpdateInfoExport
    devices: tuple[SharedDevice, ...]
    #: SHA-256 of the JWS as received: names this transfer in every later message
    transfer_ref: bytes
    signer: x509.Certificate

    @property
    def transfer_id(self) -> str:
        return transfer_id(self.transfer_ref)


def transfer_id(transfer_ref: bytes) -> str:
    """The short name of a transfer (CLI, store): the first 16 bytes of its transferRef, in hex."""
    return transfer_ref[:16].hex()


_REGISTRIES: dict[str, jws.JWSRegistry] = {}


def _registry(alg: str) -> jws.JWSRegistry:
    reg = _REGISTRIES.get(alg)
    if reg is None:
        reg = jws.JWSRegistry(algorithms=[alg])
        reg.max_header_length = 16 * 1024  # x5c
        reg.max_payload_length = MAX_UPDATE_INFO_BYTES
        _REGISTRIES[alg] = reg
    return reg


def sign_update_info(export: UpdateInfoExport, key: PrivateKey, certificate: x509.Certificate) -> bytes:
    """The JWS SP1 sends to SP2 (compact serialisation, x5c = SP1's agreed transfer certificate)."""
    alg = JWS_ALG[algorithm_of(key)]
    header = {"alg": alg, "typ": JWS_TYP, "x5c": [base64.b64encode(cert_der(certificate)).decode()]}
    token = jws.serialize_compact(header, export.payload(), jose_key(key), registry=_registry(alg))
    return token.encode("ascii")


class _JwsHeader(msgspec.Struct, frozen=True):
    alg: str
    x5c: list[str]
    typ: str | None = None


_jws_header = msgspec.json.Decoder(_JwsHeader)


def _b64url(part: bytes, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"{what} is not base64url") from exc


def open_update_info(
    token: bytes,
    *,
    pinned: x509.Certificate,
    audience: str,
    now: dt.datetime,
    max_age: dt.timedelta = dt.timedelta(days=30),
) -> VerifiedExport:
    """SP2's check of an UpdateInfoList export: signed by SP1's agreed (pinned) certificate, for
    ``audience`` (SP2), not older than ``max_age``; each DeviceUpdateInfo's TBSCertificate is that of
    the factory certificate at the same index; device ids unique."""
    if not isinstance(token, bytes):
        raise BadRequestError("the UpdateInfoList must be bytes")
    if len(token) > MAX_UPDATE_INFO_BYTES:
        raise TooLargeError(f"UpdateInfoList of {len(token)} bytes exceeds {MAX_UPDATE_INFO_BYTES}")
    parts = token.split(b".")
    if len(parts) != 3:
        raise BadRequestError("the UpdateInfoList is not a JWS in compact serialisation")
    try:
        header = _jws_header.decode(_b64url(parts[0], "JWS header"))
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the UpdateInfoList's JWS header is not valid: {exc}") from exc
    expected_alg = JWS_ALG[algorithm_of(public_key(pinned))]
    if header.alg != expected_alg:
        raise BadSignatureError(f"the UpdateInfoList is signed with {header.alg}, the agreed key uses {expected_alg}")
    if header.typ != JWS_TYP:
        raise BadRequestError(f"the JWS typ is {header.typ!r}, not {JWS_TYP!r}")
    if len(header.x5c) != 1:
        raise BadRequestError("the UpdateInfoList's x5c must hold exactly the signer's certificate")
    try:
        leaf = base64.b64decode(header.x5c[0], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError("the UpdateInfoList's x5c is not base64") from exc
    check_pinned(leaf, pinned, now=now, what="the UpdateInfoList")
    try:
        obj = jws.deserialize_compact(token, jose_key(public_key(pinned)), registry=_registry(expected_alg))
    except JoseBadSignature as exc:
        raise BadSignatureError("the UpdateInfoList's signature does not verify") from exc
    except JoseError as exc:
        raise BadRequestError(f"the UpdateInfoList is not a valid JWS: {exc.description or exc}") from exc
    except Exception as exc:  # joserfc raises ValueError, UnicodeDecodeError, binascii.Error on garbage
        raise BadRequestError(f"the UpdateInfoList is not a valid JWS: {exc}") from exc
    export = _decode_export(obj.payload)
    if export.audience != audience:
        raise UntrustedError(f"the UpdateInfoList is for {export.audience!r}, not for {audience!r}")
    if export.issued_at > now + DEFAULT_SKEW:
        raise ReplayError("the UpdateInfoList is issued in the future", field="issuedAt")
    if now - export.issued_at > max_age:
        raise ReplayError(f"the UpdateInfoList was issued {export.issued_at.isoformat()}: older than {max_age}")
    devices = _shared_devices(export)
    return VerifiedExport(export=export, devices=devices, transfer_ref=sha256(token), signer=pinned)


def _decode_export(payload: bytes) -> UpdateInfoExport:
    obj = cose.loads(payload, what="UpdateInfoList payload", max_bytes=MAX_UPDATE_INFO_BYTES)
    if not isinstance(obj, list) or len(obj) != 4:
        raise BadRequestError("the UpdateInfoList payload must be [UpdateInfoList, x5bag, audience, issuedAt]")
    uil, bag, aud, iat = obj
    if not isinstance(uil, list) or not uil or len(uil) > MAX_DEVICES:
        raise BadRequestError(f"the UpdateInfoList must name 1 to {MAX_DEVICES} devices")
    entries = tuple(DeviceUpdateInfo.from_obj(e, i) for i, e in enumerate(uil))
    ders = x5bag_from_obj(bag, what="factoryCertificates")
    if len(ders) != len(entries):
        raise BadRequestError(f"{len(entries)} DeviceUpdateInfo entries but {len(ders)} factory certificates")
    return UpdateInfoExport(
        entries=entries,
        factory_certificates=ders,
        audience=_text(aud, "audience"),
        issued_at=_time(iat, "issuedAt"),
    )


def _shared_devices(export: UpdateInfoExport) -> tuple[SharedDevice, ...]:
    certs = parse_certificates(export.factory_certificates, what="factory certificate")
    out: list[SharedDevice] = []
    seen: set[str] = set()
    for i, (entry, cert, der) in enumerate(zip(export.entries, certs, export.factory_certificates, strict=True)):
        try:
            tbs = cert.tbs_certificate_bytes
        except ValueError as exc:
            raise BadRequestError(f"factory certificate #{i} is malformed: a field of it is not valid DER") from exc
        if tbs != entry.factory_tbs:
            raise BadRequestError(f"DeviceUpdateInfo #{i}: its TBSCertificate is not the factory certificate #{i}")
        device_id = factory_device_id(cert)
        if device_id in seen:
            raise BadRequestError(f"device {device_id} appears twice in the UpdateInfoList", device_id=device_id)
        seen.add(device_id)
        out.append(SharedDevice(device_id=device_id, certificate=cert, certificate_der=der, info=entry))
    return tuple(out)


# --- CWTs -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CwtHeader:
    """The registered claims every transfer CWT carries."""

    issuer: str
    audience: str
    cti: bytes
    issued_at: dt.datetime
    not_before: dt.datetime
    expires: dt.datetime

    def to_claims(self) -> dict[int, Any]:
        return {
            ISS: self.issuer,
            AUD: self.audience,
            CTI: self.cti,
            IAT: epoch(self.issued_at),
            NBF: epoch(self.not_before),
            EXP: epoch(self.expires),
        }

    @classmethod
    def from_claims(cls, c: Mapping[int, Any]) -> CwtHeader:
        for key, name in ((ISS, "iss"), (AUD, "aud"), (CTI, "cti"), (IAT, "iat"), (NBF, "nbf"), (EXP, "exp")):
            if key not in c:
                raise BadRequestError(f"the CWT has no {name} claim", field=name)
        cti = c[CTI]
        if not isinstance(cti, bytes) or not 16 <= len(cti) <= 64:
            raise BadRequestError("cti must be 16 to 64 random bytes", field="cti")
        header = cls(
            issuer=_text(c[ISS], "iss"),
            audience=_text(c[AUD], "aud"),
            cti=cti,
            issued_at=_numeric_date(c[IAT], "iat"),
            not_before=_numeric_date(c[NBF], "nbf"),
            expires=_numeric_date(c[EXP], "exp"),
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
    """The paper's TransferMessage fields (Listing 2), plus the trust-anchor extension."""

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

    def to_claims(self) -> dict[int, Any]:
        out: dict[int, Any] = {
            RESET_NOT_BEFORE: tag_time(self.reset_not_before),
            RESET_NOT_AFTER: tag_time(self.reset_not_after),
            RA_URI: self.ra_uri.encode() if self.ra_uri else None,
            UPDATE_URI: [self.update_uri.encode(), self.update_first],
            ENROLL_URI: self.enroll_uri.encode(),
            FALLBACK_URI: self.fallback_uri.encode(),
        }
        if self.trust_anchors:
            out[TRUST_ANCHORS] = x5bag_obj(self.trust_anchors)
        return out

    @classmethod
    def from_claims(cls, c: Mapping[int, Any]) -> TransferClaims:
        for key, name in (
            (RESET_NOT_BEFORE, "ResetTimeNotBefore"),
            (RESET_NOT_AFTER, "ResetTimeNotAfter"),
            (RA_URI, "raURI"),
            (UPDATE_URI, "updateURI"),
            (ENROLL_URI, "enrollURI"),
            (FALLBACK_URI, "fallbackURI"),
        ):
            if key not in c:
                raise BadRequestError(f"the TransferMessage has no {name} claim", field=name)
        update = c[UPDATE_URI]
        if not isinstance(update, list) or len(update) != 2 or not isinstance(update[1], bool):
            raise BadRequestError("updateURI must be [bstr, bool]", field="updateURI")
        anchors: tuple[bytes, ...] = ()
        if TRUST_ANCHORS in c:
            anchors = x5bag_from_obj(c[TRUST_ANCHORS], what="trustAnchors", max_certs=MAX_ANCHORS)
            parse_certificates(anchors, what="trust anchor")
        ra = c[RA_URI]
        try:
            return cls(
                reset_not_before=_time(c[RESET_NOT_BEFORE], "ResetTimeNotBefore"),
                reset_not_after=_time(c[RESET_NOT_AFTER], "ResetTimeNotAfter"),
                ra_uri=None if ra is None else _uri(ra, "raURI"),
                update_uri=_uri(update[0], "updateURI", empty_ok=True),
                update_first=update[1],
                enroll_uri=_uri(c[ENROLL_URI], "enrollURI"),
                fallback_uri=_uri(c[FALLBACK_URI], "fallbackURI"),
                trust_anchors=anchors,
            )
        except ValueError as exc:
            raise BadRequestError(f"the TransferMessage is inconsistent: {exc}") from exc


def _claims(payload: bytes, *, what: str, allowed: frozenset[int], max_bytes: int = MAX_CWT_BYTES) -> dict[int, Any]:
    obj = cose.loads(payload, what=f"{what} claims", max_bytes=max_bytes)
    if not isinstance(obj, dict) or not all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
        raise BadRequestError(f"the {what} claims must be a map with integer keys")
    unknown = sorted(set(obj) - allowed - _STANDARD)
    if unknown:
        raise BadRequestError(f"the {what} carries claims that are not agreed: {unknown}")
    return dict(obj)


def _transfer_ref(c: Mapping[int, Any]) -> bytes:
    if TRANSFER_REF not in c:
        raise BadRequestError("the message has no transferRef claim", field="transferRef")
    return _hash32(c[TRANSFER_REF], "transferRef")


def _parse(token: bytes, *, what: str, typ: str) -> cose.Sign1:
    limit = MAX_CONFIRMATION_BYTES if typ == TYP_CONFIRMATION else MAX_CWT_BYTES
    msg = cose.parse_sign1(token, what=what, max_bytes=limit)
    if msg.typ != typ:
        raise BadRequestError(f"the {what} has COSE typ {msg.typ!r}, not {typ!r}", field="typ")
    return msg


@dataclass(frozen=True)
class TransferMessage:
    """SP2's TransferMessage (Listing 2) as a CWT, or one device's copy of it made by SP1."""

    header: CwtHeader
    transfer_ref: bytes
    claims: TransferClaims

    def payload(self) -> bytes:
        return cose.dumps({**self.header.to_claims(), TRANSFER_REF: self.transfer_ref, **self.claims.to_claims()})

    @classmethod
    def from_payload(cls, payload: bytes, *, what: str) -> TransferMessage:
        c = _claims(payload, what=what, allowed=_TRANSFER)
        return cls(header=CwtHeader.from_claims(c), transfer_ref=_transfer_ref(c), claims=TransferClaims.from_claims(c))


def sign_transfer_message(tm: TransferMessage, signer: cose.CoseSigner) -> bytes:
    return signer.sign(tm.payload(), typ=TYP_TRANSFER_MESSAGE)


def open_transfer_message(
    token: bytes, *, pinned: x509.Certificate, audience: str, now: dt.datetime, skew: dt.timedelta = DEFAULT_SKEW
) -> TransferMessage:
    """SP1's check of SP2's TransferMessage: the agreed (pinned) SP2 certificate, signature, typ,
    claims, audience (SP1) and time. The cti is the caller's to check against those seen."""
    msg = _parse(token, what="TransferMessage", typ=TYP_TRANSFER_MESSAGE)
    if msg.x5t() != cose.thumbprint(cert_der(pinned)):
        raise UntrustedError("the TransferMessage does not name the agreed certificate of the new provider (x5t)")
    check_pinned(cert_der(pinned), pinned, now=now, what="the TransferMessage")
    cose.verify_sign1(msg, public_key(pinned), what="the TransferMessage")
    tm = TransferMessage.from_payload(msg.payload, what="TransferMessage")
    if tm.header.audience != audience:
        raise UntrustedError(f"the TransferMessage is for {tm.header.audience!r}, not {audience!r}", field="aud")
    tm.header.check_time(now, skew)
    return tm


def sign_device_message(tm: TransferMessage, signer: cose.CoseSigner) -> bytes:
    return signer.sign(tm.payload(), typ=TYP_DEVICE_TRANSFER)


@dataclass(frozen=True)
class OpenedDeviceMessage:
    message: TransferMessage
    signer: x509.Certificate
    chain: tuple[x509.Certificate, ...]


def peek_device_message(token: bytes) -> tuple[cose.Sign1, list[x509.Certificate]]:
    """Bounded parse of a device transfer message and its x5chain (nothing verified yet)."""
    msg = _parse(token, what="transfer message", typ=TYP_DEVICE_TRANSFER)
    chain = parse_certificates(msg.x5chain(), what="x5chain certificate")
    if not chain:
        raise BadRequestError("the transfer message carries no x5chain: the device cannot tell who signed it")
    return msg, chain


# --- confirmation (SP2 -> SP1) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Enrolled:
    device_id: str
    certificate_sha256: bytes


@dataclass(frozen=True)
class Confirmation:
    header: CwtHeader
    transfer_ref: bytes
    enrolled: tuple[Enrolled, ...] = field(default=())

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
            device_id = _text(item[0], "device id")
            if device_id in seen:
                raise BadRequestError(f"device {device_id} is confirmed twice", device_id=device_id)
            seen.add(device_id)
            enrolled.append(Enrolled(device_id, _hash32(item[1], "certificate-sha256")))
        return cls(header=CwtHeader.from_claims(c), transfer_ref=_transfer_ref(c), enrolled=tuple(enrolled))


def sign_confirmation(confirmation: Confirmation, signer: cose.CoseSigner) -> bytes:
    return signer.sign(confirmation.payload(), typ=TYP_CONFIRMATION)


def open_confirmation(
    token: bytes, *, pinned: x509.Certificate, audience: str, now: dt.datetime, skew: dt.timedelta = DEFAULT_SKEW
) -> Confirmation:
    msg = _parse(token, what="confirmation", typ=TYP_CONFIRMATION)
    if msg.x5t() != cose.thumbprint(cert_der(pinned)):
        raise UntrustedError("the confirmation does not name the agreed certificate of the new provider (x5t)")
    check_pinned(cert_der(pinned), pinned, now=now, what="the confirmation")
    cose.verify_sign1(msg, public_key(pinned), what="the confirmation")
    conf = Confirmation.from_payload(msg.payload)
    if conf.header.audience != audience:
        raise UntrustedError(f"the confirmation is for {conf.header.audience!r}, not {audience!r}", field="aud")
    conf.header.check_time(now, skew)
    return conf


def peek_transfer_ref(token: bytes, *, typ: str) -> bytes:
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


__all__ = [
    "CTI",
    "ENROLLED",
    "ENROLL_URI",
    "FALLBACK_URI",
    "RA_URI",
    "RESET_NOT_AFTER",
    "RESET_NOT_BEFORE",
    "TRANSFER_REF",
    "TRUST_ANCHORS",
    "UPDATE_URI",
    "Confirmation",
    "CwtHeader",
    "DeviceUpdateInfo",
    "Enrolled",
    "OpenedDeviceMessage",
    "SharedDevice",
    "TransferClaims",
    "TransferMessage",
    "UpdateInfoExport",
    "VerifiedExport",
    "VersionInfo",
    "decode_x5bag",
    "encode_update_info_list",
    "encode_x5bag",
    "open_confirmation",
    "open_transfer_message",
    "open_update_info",
    "peek_transfer_ref",
    "sign_confirmation",
    "sign_device_message",
    "sign_transfer_message",
    "sign_update_info",
    "transfer_id",
]
