"""UpdateInfoList (SP1 -> SP2; seed 003, Listing 1): the JWS SP1 signs and SP2 checks. The CDDL
and why both the TBSCertificate and the x5bag travel are in :mod:`iotdlm.transfer.messages`."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from cryptography import x509
from joserfc import jws
from joserfc.errors import BadSignatureError as JoseBadSignature
from joserfc.errors import JoseError

from iotdlm.errors import BadRequestError, BadSignatureError, ReplayError, TooLargeError, UntrustedError
from iotdlm.pki.keys import PrivateKey, algorithm_of
from iotdlm.transfer import cose
from iotdlm.transfer.messages.primitives import (
    DEFAULT_SKEW,
    JWS_TYP,
    MAX_DEVICES,
    MAX_UPDATE_INFO_BYTES,
    MAX_URI,
    hash32,
    sha256,
    tag_time,
    text_value,
    time_value,
    x5bag_from_obj,
    x5bag_obj,
)
from iotdlm.transfer.trust import cert_der, check_pinned, factory_device_id, parse_certificates, public_key
from iotdlm.wire.envelope import JWS_ALG, jose_key


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
        not_before = time_value(nb, "updateTimeNotBefore")
        not_after = time_value(na, "updateTimeNotAfter")
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
        ref = hash32(obj[4], "raReference") if len(obj) == 5 else None
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
        audience=text_value(aud, "audience"),
        issued_at=time_value(iat, "issuedAt"),
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
