"""SP2, the provider that takes a fleet over (seed 003 VII-C/D, Fig. 4), as a PURE state machine.

1. :func:`on_update_info` -- SP1's UpdateInfoList: signed by SP1's agreed (pinned) certificate,
   for SP2, fresh; every DeviceUpdateInfo matches its factory certificate. Effects: register the
   x5bag with CA2 (:class:`Register`) and track the devices.
2. :func:`transfer_message` -- the TransferMessage (Listing 2) as a CWT for SP1, signed by SP2's
   agreed transfer identity (x5t names it), with CA2's enrollment URI from the registration.
3. :func:`confirmation` -- once CA2 has enrolled devices, the confirmation SP1 acts on (revoking
   the old operational certificates at CA1).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509

from iotdlm.errors import ConflictError
from iotdlm.transfer import cose
from iotdlm.transfer.messages import (
    Confirmation,
    CwtHeader,
    Enrolled,
    SharedDevice,
    TransferClaims,
    TransferMessage,
    VerifiedExport,
    encode_x5bag,
    epoch,
    from_epoch,
    open_update_info,
    sign_confirmation,
    sign_transfer_message,
)
from iotdlm.transfer.trust import cert_der

Entropy = Callable[[int], bytes]
DEFAULT_CONFIRMATION_LIFETIME = dt.timedelta(days=1)


@dataclass(frozen=True)
class Sp2Transfer:
    transfer_id: str
    transfer_ref: bytes
    provider_id: str
    peer_id: str
    #: SP1's agreed transfer certificate (DER), pinned
    peer_certificate: bytes
    created_at: dt.datetime
    enroll_uri: str | None = None
    transfer_message: bytes | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "transfer_id": self.transfer_id,
                "transfer_ref": self.transfer_ref.hex(),
                "provider_id": self.provider_id,
                "peer_id": self.peer_id,
                "peer_certificate": base64.b64encode(self.peer_certificate).decode(),
                "created_at": epoch(self.created_at),
                "enroll_uri": self.enroll_uri,
                "transfer_message": base64.b64encode(self.transfer_message).decode() if self.transfer_message else None,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Sp2Transfer:
        o: dict[str, Any] = json.loads(text)
        return cls(
            transfer_id=o["transfer_id"],
            transfer_ref=bytes.fromhex(o["transfer_ref"]),
            provider_id=o["provider_id"],
            peer_id=o["peer_id"],
            peer_certificate=base64.b64decode(o["peer_certificate"]),
            created_at=from_epoch(o["created_at"]),
            enroll_uri=o.get("enroll_uri"),
            transfer_message=base64.b64decode(o["transfer_message"]) if o.get("transfer_message") else None,
        )


@dataclass(frozen=True)
class Register:
    """Register these factory certificates with CA2 (x5bag, RFC 9360) and get the CA-URI back."""

    x5bag: bytes
    batch: str
    windows: Mapping[str, tuple[dt.datetime, dt.datetime]]


@dataclass(frozen=True)
class Track:
    """Start tracking these devices (status pending), with what the verifier needs of each."""

    devices: tuple[SharedDevice, ...]


Effect = Register | Track


def on_update_info(
    token: bytes,
    now: dt.datetime,
    *,
    pinned: x509.Certificate,
    provider_id: str,
    peer_id: str,
    max_age: dt.timedelta = dt.timedelta(days=30),
) -> tuple[Sp2Transfer, VerifiedExport, list[Effect]]:
    """Raises a RejectedError subclass if the UpdateInfoList is not acceptable."""
    verified = open_update_info(token, pinned=pinned, audience=provider_id, now=now, max_age=max_age)
    state = Sp2Transfer(
        transfer_id=verified.transfer_id,
        transfer_ref=verified.transfer_ref,
        provider_id=provider_id,
        peer_id=peer_id,
        peer_certificate=cert_der(pinned),
        created_at=now,
    )
    windows = {d.device_id: (d.info.not_before, d.info.not_after) for d in verified.devices}
    bag = encode_x5bag(verified.export.factory_certificates)
    return state, verified, [Register(bag, verified.transfer_id, windows), Track(verified.devices)]


def registered(state: Sp2Transfer, enroll_uri: str) -> Sp2Transfer:
    return replace(state, enroll_uri=enroll_uri)


def transfer_message(
    state: Sp2Transfer,
    now: dt.datetime,
    *,
    claims: TransferClaims,
    signer: cose.CoseSigner,
    entropy: Entropy = secrets.token_bytes,
) -> tuple[Sp2Transfer, bytes]:
    """The TransferMessage for SP1. ``claims.enroll_uri`` should be the CA-URI of the registration."""
    if claims.reset_not_after <= now:
        raise ConflictError("the reset window is already over")
    header = CwtHeader(
        issuer=state.provider_id,
        audience=state.peer_id,
        cti=entropy(16),
        issued_at=now,
        not_before=now,
        expires=claims.reset_not_after,
    )
    token = sign_transfer_message(TransferMessage(header, state.transfer_ref, claims), signer)
    return replace(state, transfer_message=token), token


def confirmation(
    state: Sp2Transfer,
    enrolled: Sequence[Enrolled],
    now: dt.datetime,
    *,
    signer: cose.CoseSigner,
    lifetime: dt.timedelta = DEFAULT_CONFIRMATION_LIFETIME,
    entropy: Entropy = secrets.token_bytes,
) -> bytes:
    if not enrolled:
        raise ConflictError("no device has enrolled with CA2 yet: nothing to confirm")
    header = CwtHeader(
        issuer=state.provider_id,
        audience=state.peer_id,
        cti=entropy(16),
        issued_at=now,
        not_before=now,
        expires=now + lifetime,
    )
    return sign_confirmation(Confirmation(header, state.transfer_ref, tuple(enrolled)), signer)


__all__ = [
    "Effect",
    "Register",
    "Sp2Transfer",
    "Track",
    "confirmation",
    "on_update_info",
    "registered",
    "transfer_message",
]
