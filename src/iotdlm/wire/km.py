"""Messages of km's NATS API (the paper's createCertificate, over JSON).

Binary fields (DER) are ``bytes``: msgspec carries them as base64 strings in JSON.
Every message is a frozen struct; :func:`decode` validates on the way in and turns any schema
problem into a BadRequestError that names what is wrong.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from iotdlm.errors import BadRequestError, TooLargeError
from iotdlm.wire import codec
from iotdlm.wire.codec import encode as encode

#: operation names inside signed envelopes (bound by the signature) and the audience
OP_ISSUE = "km.issue"
OP_ISSUE_BATCH = "km.issue_batch"
OP_RENEW = "km.renew"
OP_REVOKE = "km.revoke"
OP_EST = "km.est"
OP_EST_NONCE = "km.est_nonce"
AUDIENCE = "km"

#: most items one batch request may carry (a provisioning line sends many at once)
MAX_BATCH = 1000


class IssueItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One certificate request: exactly one of ``csr`` (PKCS#10 DER) or ``crmf`` (CertReqMessages DER)."""

    device_id: str
    profile: str
    csr: bytes | None = None
    crmf: bytes | None = None


class BatchIssueRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    items: list[IssueItem]


class RenewRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A device re-keys its own operational certificate: a CSR for the new key (signed by it)."""

    csr: bytes


class RevokeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Revoke one certificate (``serial``), or every certificate of ``device_id``; with
    ``decommission`` the device is also retired (End-of-Life) and km refuses it from then on.
    With ``ca`` (and nothing else to revoke), the certificate of that issuing CA (on the root's
    CRL). ``reason`` may not be removeFromCRL or certificateHold."""

    serial: str | None = None  # hex
    issuer: str | None = None
    device_id: str | None = None
    reason: str | None = None  # RFC 5280 name, e.g. keyCompromise
    decommission: bool = False
    ca: str | None = None  # an issuing CA's name: factory, operational or service


class EstRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """cm relays an EST operation: the TLS client certificate the device presented, and its CSR
    (for serverkeygen the CSR only names the device; km makes the key)."""

    operation: str  # simpleenroll | simplereenroll | serverkeygen
    client_certificate: bytes  # DER
    csr: bytes
    #: the device's proof of its current key (the Iotdlm-Est-Proof header, ADR 0008), or None
    proof: str | None = None


class EstNonceRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """cm asks km for a proof nonce for the device that presented ``client_certificate``."""

    client_certificate: bytes  # DER


class EstNonceResponse(msgspec.Struct, frozen=True):
    nonce: str
    expires: str  # ISO 8601


class CrlRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    issuer: str
    partition: int
    delta: bool = False


class GetRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    serial: str  # hex
    issuer: str | None = None
    #: makes the request unique, so km's signed reply is bound to it alone (ADR 0006)
    nonce: str | None = None


class IssuedCertificate(msgspec.Struct, frozen=True, omit_defaults=True):
    serial: str  # lowercase hex
    issuer: str
    profile: str
    device_id: str | None
    not_after: str  # ISO 8601
    certificate: bytes  # DER
    #: what the request asked for and the certificate does not carry (the CA issues from its profile):
    #: "subject L=Plant 4", "subjectAltName DNS:dev.example.com", "extension keyUsage (...)", "template
    #: validity"... Empty is left out of the JSON, so peers that predate the field read replies as before.
    dropped: tuple[str, ...] = ()


class EstResponse(msgspec.Struct, frozen=True):
    certificate: IssuedCertificate
    #: serverkeygen with est_serverkeygen = "cleartext" only: the PKCS#8 DER key, which cm sees
    private_key: bytes | None = None
    #: serverkeygen (est_serverkeygen = "encrypted"): a CMS EnvelopedData (DER) holding the key,
    #: encrypted to the key of the certificate the device presented (RFC 7030 4.4.2, ADR 0009)
    encrypted_key: bytes | None = None


class ErrorInfo(msgspec.Struct, frozen=True):
    code: str
    message: str
    field: str | None = None


class ItemResult(msgspec.Struct, frozen=True):
    device_id: str
    certificate: IssuedCertificate | None = None
    error: ErrorInfo | None = None


class BatchIssueResponse(msgspec.Struct, frozen=True):
    results: list[ItemResult]


class ChainResponse(msgspec.Struct, frozen=True):
    """Each issuing CA's chain, leaf CA first, root last (DER)."""

    root: bytes
    chains: dict[str, list[bytes]]
    #: issuing CAs rotated out and past their overlap (ADR 0026): still served by name
    #: (``/ca/{name}.crt``, for the certificates they issued) but no longer in EST ``/cacerts``
    not_in_cacerts: list[str] = []


class FactoryCasResponse(msgspec.Struct, frozen=True):
    """The external factory CA certificates registered for a trust transfer (DER)."""

    certificates: list[bytes]


class CertificateInfo(msgspec.Struct, frozen=True):
    serial: str
    issuer: str
    subject: str
    device_id: str | None
    profile: str
    status: str
    not_before: str
    not_after: str
    certificate: bytes
    revoked_at: str | None = None
    revocation_reason: str | None = None


class RevokeResponse(msgspec.Struct, frozen=True):
    revoked: list[CertificateInfo]


_T = TypeVar("_T")


def decode(data: bytes, cls: type[_T], *, what: str = "request") -> _T:
    return codec.decode(data, cls, what=what)


def check_batch(req: BatchIssueRequest, max_items: int = MAX_BATCH) -> None:
    if not req.items:
        raise BadRequestError("batch request has no items", field="items")
    if len(req.items) > max_items:
        raise TooLargeError(f"batch of {len(req.items)} items exceeds the limit of {max_items}", field="items")
