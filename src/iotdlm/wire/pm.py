"""What pm puts on the wire and in the store's ``meta`` table (JSON, msgspec). Pure.

- :class:`ProvisionRequest` -> :class:`ProvisionReport` -- ``iotdlm.v1.pm.<dtype>.provision``
- :class:`StatusReply` -- ``iotdlm.v1.pm.<dtype>.status`` (the request body is empty)
- :class:`Alarm` -- the value of meta key ``pm.alarm.<dtype>`` (the halt survives restarts) and
  the body of the event ``iotdlm.v1.events.pm.alarm``
- :class:`BatchEvent` -- ``iotdlm.v1.events.pm.provisioned``, one per batch run
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from iotdlm.errors import BadRequestError
from iotdlm.wire import codec
from iotdlm.wire.codec import encode as encode

#: longest request accepted on pm's subjects (a list of device references)
MAX_REQUEST = 1024 * 1024
#: most devices one provisioning request may name
MAX_DEVICES = 100_000

#: the status of one device in a report
COMPLETE = "complete"
FAILED = "failed"
IN_PROGRESS = "in-progress"
#: asked for by name, already complete, not forced: refused (ConflictError), its record unchanged
REFUSED = "refused"
#: found on the bench, already complete, not named: left alone
SKIPPED = "skipped"


class ProvisionRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: flasher references or device ids; ``None``: every device the flasher discovers
    devices: list[str] | None = None
    #: who runs the line (recorded in every provisioning record)
    operator: str = "unknown"
    #: provision again devices whose provisioning is complete (new certificates)
    force: bool = False


class DeviceResult(msgspec.Struct, frozen=True, omit_defaults=True):
    device_id: str
    status: str  # complete | failed | in-progress | refused | skipped
    ref: str | None = None
    steps_done: list[str] = []
    #: the steps still to do when ``in-progress`` (the operation mode allowed only some)
    steps_pending: list[str] = []
    failed_step: str | None = None
    code: str | None = None
    message: str | None = None
    #: profile -> serial (hex) of the certificates the device holds from this provisioning
    certificates: dict[str, str] = {}
    #: how the device asked for its certificates: "csr" (made on the device) or "crmf" (raVerified, by pm)
    request: str | None = None


class ProvisionReport(msgspec.Struct, frozen=True, omit_defaults=True):
    dtype: str
    operator: str
    started_at: str  # ISO 8601 UTC
    finished_at: str
    devices: list[DeviceResult]
    release_counter: int | None = None
    image_sha256: str | None = None
    #: the operation mode the run was held to (None: no mode published, every step allowed)
    mode: str | None = None
    #: seconds spent per phase, summed over the worker threads (so they can exceed the wall time):
    #: algorithm1, device_requests, km, flash_software, flash_other, verify, store
    timings: dict[str, float] = {}

    def count(self, status: str) -> int:
        return sum(1 for d in self.devices if d.status == status)

    @property
    def failures(self) -> list[DeviceResult]:
        """Devices that failed or were refused."""
        return [d for d in self.devices if d.status in (FAILED, REFUSED)]


class Alarm(msgspec.Struct, frozen=True):
    """pm halted: Algorithm 1 failed. ``check`` is what failed: sig_sm, meta_enc, meta_repo or image."""

    dtype: str
    check: str
    code: str
    message: str
    raised_at: str
    raised_by: str
    release_counter: int | None = None
    #: "raised" (pm is halted) or "cleared" (an operator cleared it; kept for the record)
    state: str = "raised"
    cleared_by: str | None = None
    cleared_at: str | None = None

    @property
    def active(self) -> bool:
        return self.state == "raised"


class BatchEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    dtype: str
    operator: str
    complete: int
    failed: int
    in_progress: int
    refused: int
    release_counter: int | None = None


class StatusReply(msgspec.Struct, frozen=True, omit_defaults=True):
    dtype: str
    halted: bool
    #: a provisioning run is under way in this pm
    busy: bool
    #: provisioning records of this dtype per status
    records: dict[str, int] = {}
    alarm: Alarm | None = None
    mode: str | None = None


_M = TypeVar("_M")


def decode(data: bytes, cls: type[_M], *, what: str = "request") -> _M:
    """Decode untrusted JSON; anything malformed or too big is a BadRequestError."""
    out = codec.decode(data, cls, what=what, max_size=MAX_REQUEST)
    devices = getattr(out, "devices", None)
    if isinstance(out, ProvisionRequest) and devices is not None and len(devices) > MAX_DEVICES:
        raise BadRequestError(f"{len(devices)} devices in one request; at most {MAX_DEVICES}", field="devices")
    return out
