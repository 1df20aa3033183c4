"""SP1, the provider that hands a fleet over (seed 003 VII-C/D, Fig. 4), as a PURE state machine.

``(state, bytes, now) -> (new state, effects)``; the shell (:mod:`iotdlm.transfer.shell`) loads
and saves :class:`Sp1Transfer`, audits :class:`Refused`, revokes, signs and delivers.

1. :func:`export` -- the UpdateInfoList of the devices to hand over, signed with SP1's agreed
   transfer identity, for SP2 only (audience); its SHA-256 (transferRef) names the transfer.
2. :func:`on_transfer_message` -- SP2's TransferMessage: signed by SP2's agreed (pinned)
   certificate, for SP1, answering this transfer's UpdateInfoList, fresh (times) and never seen
   (cti). Refusals are effects (the shell audits them), never silent.
3. :func:`device_messages` -- "copies the fields, except the fallback URI which is set to the SP1
   update server, into individual messages for each target IoT device" (VII-D): one CWT per device,
   ``aud`` = device id, a new ``cti`` each, the reset window narrowed to the device's agreed
   update window, signed by SP1 with its certificate chain (the device checks it up to its
   truststore).
4. :func:`on_confirmation` -- SP2 confirms enrollments; SP1 then has CA1 revoke the devices' old
   operational certificates (IX-A FR1: the device must not keep a usable SP1 credential).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509

from iotdlm.errors import ConflictError, RejectedError, ReplayError, UntrustedError
from iotdlm.pki.keys import PrivateKey
from iotdlm.transfer import cose
from iotdlm.transfer.messages import (
    TRANSFER_REF_BYTES,
    CwtHeader,
    DeviceUpdateInfo,
    TransferMessage,
    UpdateInfoExport,
    VersionInfo,
    epoch,
    from_epoch,
    open_confirmation,
    open_transfer_message,
    rejected_summary,
    sha256,
    sign_device_message,
    sign_update_info,
    transfer_id,
)
from iotdlm.transfer.trust import cert_der, parse_certificates

Entropy = Callable[[int], bytes]


@dataclass(frozen=True)
class ExportDevice:
    """One device SP1 hands over: its factory certificate and what SP1 agreed with SP2."""

    device_id: str
    factory_certificate: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    version: VersionInfo
    ra_reference: bytes | None = None


@dataclass(frozen=True)
class Sp1Transfer:
    transfer_id: str
    transfer_ref: bytes
    provider_id: str
    peer_id: str
    #: SP2's agreed transfer certificate (DER), pinned
    peer_certificate: bytes
    created_at: dt.datetime
    accepted: TransferMessage | None = None
    accepted_token: bytes | None = None
    #: ctis of SP2's messages already taken (TransferMessage, confirmations), with their exp
    seen: tuple[tuple[str, int], ...] = ()

    @property
    def peer(self) -> x509.Certificate:
        return parse_certificates([self.peer_certificate], what="pinned SP2 certificate")[0]

    def to_json(self) -> str:
        return json.dumps(
            {
                "transfer_id": self.transfer_id,
                "transfer_ref": self.transfer_ref.hex(),
                "provider_id": self.provider_id,
                "peer_id": self.peer_id,
                "peer_certificate": base64.b64encode(self.peer_certificate).decode(),
                "created_at": epoch(self.created_at),
                "accepted_token": base64.b64encode(self.accepted_token).decode() if self.accepted_token else None,
                "seen": [list(s) for s in self.seen],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Sp1Transfer:
        o: dict[str, Any] = json.loads(text)
        token = base64.b64decode(o["accepted_token"]) if o.get("accepted_token") else None
        t = cls(
            transfer_id=o["transfer_id"],
            transfer_ref=bytes.fromhex(o["transfer_ref"]),
            provider_id=o["provider_id"],
            peer_id=o["peer_id"],
            peer_certificate=base64.b64decode(o["peer_certificate"]),
            created_at=from_epoch(o["created_at"]),
            accepted_token=token,
            seen=tuple((str(c), int(e)) for c, e in o["seen"]),
        )
        if token is not None:
            # decoded again without the time checks: it was verified when it was accepted
            msg = cose.parse_sign1(token, what="TransferMessage", max_bytes=len(token))
            t = replace(t, accepted=TransferMessage.from_payload(msg.payload, what="TransferMessage"))
        return t


# --- effects ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refused:
    """A message from SP2 was refused: the shell audits it (kind ``refused``) and reports it."""

    what: str
    error: RejectedError

    @property
    def reason(self) -> dict[str, str]:
        return rejected_summary(self.error)


@dataclass(frozen=True)
class Accepted:
    message: TransferMessage


@dataclass(frozen=True)
class SetStatus:
    device_ids: tuple[str, ...]
    status: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RevokeOld:
    """Have CA1 revoke the old operational certificates of these devices (reason affiliationChanged)."""

    device_ids: tuple[str, ...]


Effect = Refused | Accepted | SetStatus | RevokeOld


# --- 1: export ----------------------------------------------------------------------------------------
def export(
    devices: Sequence[ExportDevice],
    *,
    provider_id: str,
    peer_id: str,
    peer_certificate: x509.Certificate,
    now: dt.datetime,
    key: PrivateKey,
    certificate: x509.Certificate,
) -> tuple[Sp1Transfer, bytes]:
    """The signed UpdateInfoList for SP2 and the new transfer's state. Only the agreed fields go
    out (FR4): factory certificates (public), update windows, version info, RA references."""
    if not devices:
        raise ValueError("export at least one device")
    ids = [d.device_id for d in devices]
    if len(set(ids)) != len(ids):
        raise ValueError("a device appears twice in the export")
    certs = parse_certificates([d.factory_certificate for d in devices], what="factory certificate")
    entries = tuple(
        DeviceUpdateInfo(
            factory_tbs=c.tbs_certificate_bytes,
            not_before=d.not_before,
            not_after=d.not_after,
            version=d.version,
            ra_reference=d.ra_reference,
        )
        for d, c in zip(devices, certs, strict=True)
    )
    payload = UpdateInfoExport(
        entries=entries,
        factory_certificates=tuple(d.factory_certificate for d in devices),
        audience=peer_id,
        issued_at=now,
    )
    token = sign_update_info(payload, key, certificate)
    ref = sha256(token)
    state = Sp1Transfer(
        transfer_id=transfer_id(ref),
        transfer_ref=ref,
        provider_id=provider_id,
        peer_id=peer_id,
        peer_certificate=cert_der(peer_certificate),
        created_at=now,
    )
    return state, token


# --- 2: SP2's TransferMessage ----------------------------------------------------------------------------
def _seen(t: Sp1Transfer, cti: bytes) -> bool:
    return any(c == cti.hex() for c, _e in t.seen)


def on_transfer_message(t: Sp1Transfer, token: bytes, now: dt.datetime) -> tuple[Sp1Transfer, list[Effect]]:
    try:
        tm = open_transfer_message(token, pinned=t.peer, audience=t.provider_id, now=now)
        if tm.transfer_ref != t.transfer_ref[:TRANSFER_REF_BYTES]:
            raise UntrustedError(
                "the TransferMessage answers another UpdateInfoList (transferRef)", field="transferRef"
            )
        if tm.header.issuer != t.peer_id:
            raise UntrustedError(f"the TransferMessage is issued by {tm.header.issuer!r}, not {t.peer_id!r}")
        if _seen(t, tm.header.cti):
            raise ReplayError("this TransferMessage was received before (cti seen)", field="cti")
    except RejectedError as exc:
        return t, [Refused("TransferMessage", exc)]
    new = replace(
        t,
        accepted=tm,
        accepted_token=bytes(token),
        seen=(*t.seen, (tm.header.cti.hex(), epoch(tm.header.expires))),
    )
    return new, [Accepted(tm)]


# --- 3: one CWT per device ------------------------------------------------------------------------------
def device_messages(
    t: Sp1Transfer,
    windows: Mapping[str, tuple[dt.datetime, dt.datetime]],
    now: dt.datetime,
    *,
    signer: cose.CoseSigner,
    fallback_uri: str,
    entropy: Entropy = secrets.token_bytes,
) -> tuple[dict[str, bytes], dict[str, str]]:
    """(device id -> signed CWT, device id -> why none was made). ``windows``: each device's
    agreed update window (from the UpdateInfoList); its reset window is SP2's, narrowed to it."""
    if t.accepted is None:
        raise ConflictError("no TransferMessage from the new provider has been accepted for this transfer yet")
    tm = t.accepted
    out: dict[str, bytes] = {}
    skipped: dict[str, str] = {}
    for device_id, (nb, na) in windows.items():
        start = max(nb, tm.claims.reset_not_before)
        end = min(na, tm.claims.reset_not_after)
        if end <= start:
            skipped[device_id] = "the device's update window and the reset window do not overlap"
            continue
        if end <= now:
            skipped[device_id] = "the reset window has closed"
            continue
        claims = replace(tm.claims, fallback_uri=fallback_uri, reset_not_before=start, reset_not_after=end)
        header = CwtHeader(
            issuer=None,  # the device names its signer by x5t (or x5chain), not by iss
            audience=device_id,
            cti=entropy(16),
            issued_at=now,
            not_before=now,
            expires=end,
        )
        out[device_id] = sign_device_message(TransferMessage(header, t.transfer_ref, claims), signer)
    return out, skipped


# --- 4: SP2's confirmation ---------------------------------------------------------------------------------
def on_confirmation(
    t: Sp1Transfer, token: bytes, now: dt.datetime, *, devices: Sequence[str] | frozenset[str]
) -> tuple[Sp1Transfer, list[Effect]]:
    """``devices``: the devices of this transfer. Confirmed ones are marked enrolled and their old
    operational certificates revoked."""
    known = frozenset(devices)
    try:
        conf = open_confirmation(token, pinned=t.peer, audience=t.provider_id, now=now)
        if conf.transfer_ref != t.transfer_ref[:TRANSFER_REF_BYTES]:
            raise UntrustedError("the confirmation is for another transfer (transferRef)", field="transferRef")
        if conf.header.issuer != t.peer_id:
            raise UntrustedError(f"the confirmation is issued by {conf.header.issuer!r}, not {t.peer_id!r}")
        if _seen(t, conf.header.cti):
            raise ReplayError("this confirmation was received before (cti seen)", field="cti")
        strangers = sorted(e.device_id for e in conf.enrolled if e.device_id not in known)
        if strangers:
            raise UntrustedError(f"the confirmation names devices that are not part of this transfer: {strangers[:5]}")
    except RejectedError as exc:
        return t, [Refused("confirmation", exc)]
    new = replace(t, seen=(*t.seen, (conf.header.cti.hex(), epoch(conf.header.expires))))
    ids = tuple(e.device_id for e in conf.enrolled)
    hashes = {e.device_id: e.certificate_sha256.hex() for e in conf.enrolled}
    return new, [SetStatus(ids, "enrolled", {"confirmed": hashes}), RevokeOld(ids)]


__all__ = [
    "Accepted",
    "Effect",
    "ExportDevice",
    "Refused",
    "RevokeOld",
    "SetStatus",
    "Sp1Transfer",
    "device_messages",
    "export",
    "on_confirmation",
    "on_transfer_message",
]
