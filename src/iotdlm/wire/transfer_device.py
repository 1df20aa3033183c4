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
OPERATIONS = (OP_MESSAGE, OP_FALLBACK, OP_CHALLENGE, OP_EVIDENCE, OP_UPDATE, OP_UPDATED)

#: longest fallback reason kept (a device's words, shown to SP1's operator)
MAX_REASON = 500
#: longest transfer id (hex SHA-256)
MAX_TRANSFER_ID = 64
MAX_DEVICE_ID = 255


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
    "OP_UPDATE",
    "OP_UPDATED",
    "ChallengeRequest",
    "ChallengeResponse",
    "Done",
    "EvidenceRequest",
    "FallbackRequest",
    "MessageRequest",
    "MessageResponse",
    "UpdateRequest",
    "UpdateResponse",
    "UpdatedRequest",
    "Verdict",
    "decode",
    "encode",
]
