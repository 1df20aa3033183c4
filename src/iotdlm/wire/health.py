"""``iotdlm.v1.<module>.health``: what one module process says about itself (JSON). Pure.

The request body is empty. The reply holds no secret: the module, its process, whether it is
ready to work and why not, the mode it reads, its version, uptime, and a few counters.
"""

from __future__ import annotations

import msgspec

from iotdlm.errors import BadRequestError

#: longest accepted health reply (they are a few hundred bytes; anything bigger is hostile)
MAX_HEALTH = 16 * 1024


class Health(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One process's health. Unknown fields are ignored (newer modules)."""

    module: str
    #: ``<module>-<pid>``, the ``instance`` label of its metrics
    instance: str
    pid: int
    #: ready to do its work (readiness); the process answering at all is its liveness
    ready: bool
    #: why not ready ("" when ready), in the operator's words
    reason: str
    #: the operation mode this process reads (None: unknown)
    mode: str | None
    version: str
    uptime_seconds: float
    #: bus requests being answered now (its queue depth)
    in_flight: int = 0
    #: mean time from a bus request's arrival to its answer, since start (None: none yet)
    mean_request_seconds: float | None = None
    #: key counters since start: issued, refused, ocsp, crls, http, requests
    counters: dict[str, float] = {}


def encode(health: Health) -> bytes:
    return msgspec.json.encode(health)


def decode(data: bytes) -> Health:
    """The :class:`Health` in ``data``; :class:`BadRequestError` saying what is wrong otherwise."""
    if len(data) > MAX_HEALTH:
        raise BadRequestError(f"the health reply is {len(data)} bytes, over {MAX_HEALTH}", field="health")
    try:
        return msgspec.json.decode(data, type=Health)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequestError(f"the health reply is not valid: {exc}", field="health") from None
