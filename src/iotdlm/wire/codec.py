"""JSON on the bus: one encoder, and one decoder for untrusted bytes that turns every problem
(too big, not JSON, not the schema) into a :class:`~iotdlm.errors.BadRequestError` in words. The
message modules of :mod:`iotdlm.wire` (km, sm, pm, modes) build on it."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from iotdlm.errors import BadRequestError

_T = TypeVar("_T")
_encoder = msgspec.json.Encoder()


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)


def decode(data: bytes, cls: type[_T], *, what: str, max_size: int | None = None) -> _T:
    """Decode untrusted JSON into ``cls``; ``what`` names it in the error ("request",
    "ModeRecord"); over ``max_size`` bytes it is refused before it is parsed."""
    if max_size is not None and len(data) > max_size:
        raise BadRequestError(f"{what} of {len(data)} bytes exceeds {max_size}")
    try:
        return msgspec.json.decode(data, type=cls)
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"{what} is not valid: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"{what} is not valid JSON: {exc}") from exc
