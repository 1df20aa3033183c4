"""One root error, with a wire code on every class.

- :class:`RejectedError` -- untrusted input failed a check or a policy. Not retryable as is.
- :class:`UnavailableError` -- the bus, the database or the network did not answer. Retryable.
- Programming misuse raises the built-in ``ValueError`` / ``RuntimeError`` instead.

Every error carries a stable ``code`` (what goes on the wire: NATS error headers, HTTP bodies,
CLI exit messages), a human ``message`` that says what is wrong, and optional data (``field``,
``device_id``). :func:`from_wire` rebuilds the right class on the requesting side, so a km refusal
raises the same class in pm as it did in km.
"""

from __future__ import annotations

from typing import Any, ClassVar


class IotdlmError(Exception):
    """Root of every iotdlm error."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str, *, field: str | None = None, device_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.device_id = device_id

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.device_id is not None:
            out["device_id"] = self.device_id
        return out

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class RejectedError(IotdlmError):
    """Untrusted input failed a check or a policy."""

    code = "rejected"


class BadRequestError(RejectedError):
    """Malformed input: bad DER/PEM/JSON/CBOR, missing fields, wrong types."""

    code = "bad_request"


class TooLargeError(BadRequestError):
    """Input exceeds a configured size limit."""

    code = "too_large"


class UnsupportedError(RejectedError):
    """Well-formed but not supported here (algorithm, profile, version)."""

    code = "unsupported"


class BadSignatureError(RejectedError):
    """A signature or a proof of possession did not verify."""

    code = "bad_signature"


class UntrustedError(RejectedError):
    """A certificate does not chain to the expected anchor, or is expired/revoked/wrong role."""

    code = "untrusted"


class RevokedSignerError(UntrustedError):
    """The certificate that signed a message (km's reply, the mode record) is on its CA's CRL."""

    code = "revoked_signer"


class ReplayError(RejectedError):
    """A nonce was seen before, or a timestamp is outside the accepted window."""

    code = "replay"


class NotAuthorizedError(RejectedError):
    """The requester is authenticated but policy does not allow this request."""

    code = "not_authorized"


class NotFoundError(RejectedError):
    """The thing asked for does not exist."""

    code = "not_found"


class ConflictError(RejectedError):
    """The request conflicts with the current state (already revoked, already provisioned...)."""

    code = "conflict"


class ModeError(RejectedError):
    """The current operation mode (Table 1) forbids this request."""

    code = "wrong_mode"


class PermissionDeniedError(RejectedError):
    """The bus refused the operation: the module's NATS user may not publish or subscribe there."""

    code = "permission_denied"


class UnavailableError(IotdlmError):
    """A dependency (bus, database, network, peer service) did not answer. Retryable."""

    code = "unavailable"


class RateLimitedError(UnavailableError):
    """A client asked more often than its limit allows; retryable after a while (HTTP 429)."""

    code = "rate_limited"


class InternalError(IotdlmError):
    """A peer failed in a way it did not expect. Details are in that peer's log, not on the wire."""

    code = "internal"


def _all_subclasses(cls: type[IotdlmError]) -> list[type[IotdlmError]]:
    out: list[type[IotdlmError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def from_wire(data: dict[str, Any]) -> IotdlmError:
    """Rebuild an error received from a peer. Unknown codes become :class:`InternalError`."""
    code = str(data.get("code", "internal"))
    message = str(data.get("message", "no message"))
    by_code = {cls.code: cls for cls in _all_subclasses(IotdlmError)}
    cls = by_code.get(code, InternalError)
    field = data.get("field")
    device_id = data.get("device_id")
    err = cls(
        message,
        field=str(field) if field is not None else None,
        device_id=str(device_id) if device_id is not None else None,
    )
    return err
