"""cm <-> km messages of the device-facing trust-transfer routes (seed 003 VII-D), over JSON.

cm takes the TLS client certificate and the request off the wire and relays them, signed as cm
(the signed request envelope), to km's handlers (:mod:`iotdlm.km.transfer_device_handlers`), which
find the device from the certificate and act where the store is. Binary fields travel as base64.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from iotdlm.wire import codec
from iotdlm.wire.codec import encode as encode

#: operation names inside signed envelopes (bound by the signature)
OP_MESSAGE = "km.transfer.message"
OP_FALLBACK = "km.transfer.fallback"
OP_CHALLENGE = "km.transfer.challenge"
OP_EVIDENCE = "km.transfer.evidence"
OP_UPDATE = "km.transfer.update"
OP_UPDATED = "km.transfer.updated"
OP_REFUSAL = "km.transfer.refusal"
OPERATIONS = (OP_MESSAGE, OP_FALLBACK, OP_CHALLENGE, OP_EVIDENCE, OP_UPDATE, OP_UPDATED, OP_REFUSAL)

#: longest fallback reason kept (a device's words, shown to SP1's operator)
MAX_REASON = 500
#: longest transfer id (hex SHA-256)
MAX_TRANSFER_ID = 64
MAX_DEVICE_ID = 255

#: why a device refused a transfer message (a closed list: the device's own words go in the
#: report's ``detail``). The device derives it from the check that failed (:func:`refusal_reason`).
REFUSAL_REASONS = (
    "replayed",  # its cti was seen: the message was received before
    "expired",  # the CWT's exp is past
    "not-yet-valid",  # nbf or iat in the future
    "outside-reset-window",  # now is outside ResetTimeNotBefore..ResetTimeNotAfter
    "altered",  # the signature does not verify over the bytes received
    "wrong-signer",  # not a transfer identity the device's truststore vouches for (or a retired one)
    "wrong-device",  # aud names another device
    "bad-anchors",  # the trust anchors it names are not CA certificates
    "busy",  # a transfer is already running on the device
    "malformed",  # not a transfer message (CBOR, COSE, claims)
    "other",
)
#: longest detail kept from a refusal report
MAX_REFUSAL_DETAIL = 200


def refusal_reason(code: str, field: str | None) -> str:
    """The :data:`REFUSAL_REASONS` entry of a refusal, from its error ``code`` and ``field`` (as
    :func:`iotdlm.transfer.messages.rejected_summary` gives them)."""
    if code == "replay":
        by_field = {"cti": "replayed", "exp": "expired", "nbf": "not-yet-valid", "iat": "not-yet-valid"}
        return by_field.get(field or "", "outside-reset-window" if field == "ResetTimeNotBefore" else "replayed")
    if code == "bad_signature":
        return "altered"
    if code in ("untrusted", "revoked_signer"):
        return {"aud": "wrong-device", "trustAnchors": "bad-anchors"}.get(field or "", "wrong-signer")
    if code == "conflict":
        return "busy"
    if code in ("bad_request", "too_large", "unsupported"):
        return "malformed"
    return "other"


class MessageRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """GET /transfer/message: the device's per-device transfer message; ``device`` is what the
    device asked for (empty: its own), refused when it names another device."""

    client_certificate: bytes
    device: str = ""


class MessageResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    transfer: str
    message: bytes


class FallbackRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """POST /transfer/fallback: the device gave up on the transfer and works under SP1 again."""

    client_certificate: bytes
    transfer: str
    reason: str


class ChallengeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    client_certificate: bytes


class ChallengeResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    transfer: str
    nonce: bytes


class EvidenceRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    client_certificate: bytes
    evidence: bytes


class Verdict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device: str
    ok: bool
    reason: str = ""


class UpdateRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """GET /transfer/update: SP2's image for the device's transfer."""

    client_certificate: bytes


class UpdateResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    transfer: str
    image: bytes
    version: str
    sha256: str


class UpdatedRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """POST /transfer/update/report: the device installed the update."""

    client_certificate: bytes
    transfer: str
    version: str


class RefusalRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """POST /transfer/refusal: the device refused a transfer message (it stays with SP1).
    ``message``: SHA-256 (hex) of the refused bytes, empty when the device did not keep them."""

    client_certificate: bytes
    reason: str
    detail: str
    message: str = ""


class Done(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    transfer: str
    device: str
    status: str


_T = TypeVar("_T")


def decode(data: bytes, cls: type[_T], *, what: str = "request") -> _T:
    return codec.decode(data, cls, what=what)


__all__ = [
    "OPERATIONS",
    "OP_CHALLENGE",
    "OP_EVIDENCE",
    "OP_FALLBACK",
    "OP_MESSAGE",
    "OP_REFUSAL",
    "OP_UPDATE",
    "OP_UPDATED",
    "REFUSAL_REASONS",
    "ChallengeRequest",
    "ChallengeResponse",
    "Done",
    "EvidenceRequest",
    "FallbackRequest",
    "MessageRequest",
    "MessageResponse",
    "RefusalRequest",
    "UpdateRequest",
    "UpdateResponse",
    "UpdatedRequest",
    "Verdict",
    "decode",
    "encode",
    "refusal_reason",
]
