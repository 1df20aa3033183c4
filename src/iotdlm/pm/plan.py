"""pm's plan of a run: what to do for each device, from what the bench, the records and the
operation mode say. Pure: no I/O (paper 4.1.1, 4.2; the operation modes of Table 1).

1. :func:`choose` -- the devices of the run: every device of the dtype on the bench, or those the
   operator names (by flasher reference or device id). A device named but not on the bench, a
   device id that is on the bench twice, or an unusable device id fails at step ``discover``.
2. :func:`plan_jobs` -- per chosen device, from its provisioning record: a complete device is
   refused when named (skipped when not) unless forced; a device that failed or stopped half way
   resumes from the first step not done; :func:`allowed_steps` says which steps the operation mode
   lets run (``verify`` only once every other step is done). Each device becomes a :class:`Job`.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography import x509

from iotdlm import errors
from iotdlm.modes.table import DEVICE_CERTIFICATE_MODES, FLASH_MODES
from iotdlm.pki.keys import PublicKey
from iotdlm.pki.names import check_id
from iotdlm.pm.flasher import DeviceOnBench
from iotdlm.pm.settings import (
    CERTIFICATE_STEP_PREFIX,
    STEP_CONFIG,
    STEP_DISCOVER,
    STEP_SOFTWARE,
    STEP_TRUSTSTORE,
    STEP_VERIFY,
    PmSettings,
    certificate_step,
)
from iotdlm.store import ProvisioningRecord
from iotdlm.store import records as rec
from iotdlm.wire import pm as m

_T = TypeVar("_T")


@dataclass
class Job:
    """One device in this run (mutable work state)."""

    device: DeviceOnBench
    operator: str
    started_at: dt.datetime
    attempts: int
    todo: list[str]
    pending: list[str]
    done: list[str]
    certificates: dict[str, str]
    release_counter: int | None
    image_sha256: str | None
    forced_over: dict[str, str] = field(default_factory=dict)
    failed_step: str | None = None
    code: str | None = None
    message: str | None = None
    request: str | None = None
    csr: bytes | None = None
    crmf: bytes | None = None
    public_key: PublicKey | None = None
    issued: dict[str, x509.Certificate] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def device_id(self) -> str:
        return self.device.device_id

    @property
    def ok(self) -> bool:
        return self.failed_step is None

    def fail(self, step: str, exc: BaseException) -> None:
        if isinstance(exc, errors.IotdlmError):
            self.code, self.message = exc.code, exc.message
        else:
            self.code, self.message = "internal", f"{type(exc).__name__}: {exc}"
        self.failed_step = step
        self.message = (self.message or "")[: rec.MESSAGE_LEN]

    def fail_with(self, step: str, code: str, message: str) -> None:
        self.failed_step, self.code, self.message = step, code, message[: rec.MESSAGE_LEN]

    def wants_certificates(self) -> bool:
        return any(step.startswith(CERTIFICATE_STEP_PREFIX) for step in self.todo)


def chunks(items: Sequence[_T], size: int) -> Iterable[Sequence[_T]]:
    """``items`` in slices of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def allowed_steps(settings: PmSettings, mode: str | None) -> set[str]:
    """The steps the operation mode lets pm run (Table 1); every step without a mode."""
    every = set(settings.steps)
    if mode is None:
        return every
    allowed = {STEP_VERIFY}
    if mode in FLASH_MODES:
        allowed |= {STEP_SOFTWARE, STEP_CONFIG}
    if mode in DEVICE_CERTIFICATE_MODES:
        allowed |= {STEP_TRUSTSTORE, *(certificate_step(p) for p in settings.profiles)}
    return allowed & every


def _not_found(dtype: str, wanted: str) -> m.DeviceResult:
    return m.DeviceResult(
        device_id=wanted,
        status=m.FAILED,
        failed_step=STEP_DISCOVER,
        code=errors.NotFoundError.code,
        message=f"no {dtype} device {wanted!r} on the bench (by reference or device id)",
    )


def _named(
    dtype: str, bench: Sequence[DeviceOnBench], by_id: Mapping[str, list[DeviceOnBench]], devices: Sequence[str]
) -> tuple[list[m.DeviceResult], list[DeviceOnBench]]:
    """The devices the operator names, by flasher reference (or its last part) or by device id."""
    by_ref: dict[str, DeviceOnBench] = {}
    for d in bench:
        by_ref[d.ref] = d
        by_ref.setdefault(Path(d.ref).name, d)
    results: list[m.DeviceResult] = []
    chosen: list[DeviceOnBench] = []
    seen: set[str] = set()
    for wanted in devices:
        hit = by_ref.get(wanted) or (by_id[wanted][0] if len(by_id.get(wanted, [])) == 1 else None)
        if hit is None:
            results.append(_not_found(dtype, wanted))
            continue
        if hit.ref not in seen:
            seen.add(hit.ref)
            chosen.append(hit)
    return results, chosen


def _unusable_id(d: DeviceOnBench) -> m.DeviceResult | None:
    try:
        check_id(d.device_id)
    except errors.BadRequestError as exc:
        return m.DeviceResult(
            device_id=d.device_id[:255],
            ref=d.ref,
            status=m.FAILED,
            failed_step=STEP_DISCOVER,
            code=exc.code,
            message=f"the flasher read an unusable device id: {exc.message}",
        )
    return None


def choose(
    dtype: str, bench: Sequence[DeviceOnBench], devices: Sequence[str] | None
) -> tuple[list[m.DeviceResult], list[DeviceOnBench]]:
    """The devices of the run (``devices`` None: every device on the bench) and the results of
    those that fail at ``discover``."""
    by_id: dict[str, list[DeviceOnBench]] = defaultdict(list)
    for d in bench:
        by_id[d.device_id].append(d)
    results: list[m.DeviceResult] = []
    if devices is None:
        chosen = list(bench)
    else:
        results, chosen = _named(dtype, bench, by_id, devices)
    # a device id twice on the bench: neither is provisioned (which one would the records mean?)
    twice = {d.device_id for d in chosen if len(by_id[d.device_id]) > 1}
    for dev_id in sorted(twice):
        refs = ", ".join(d.ref for d in by_id[dev_id])
        results.append(
            m.DeviceResult(
                device_id=dev_id,
                status=m.FAILED,
                failed_step=STEP_DISCOVER,
                code=errors.ConflictError.code,
                message=f"device id {dev_id} is on the bench twice ({refs}); take one off",
            )
        )
    valid: list[DeviceOnBench] = []
    for d in chosen:
        if d.device_id in twice:
            continue
        unusable = _unusable_id(d)
        if unusable is not None:
            results.append(unusable)
            continue
        valid.append(d)
    return results, valid


def _refusal(
    dtype: str, d: DeviceOnBench, old: ProvisioningRecord | None, *, force: bool, named: bool
) -> m.DeviceResult | None:
    """Why the record of ``d`` keeps it out of the run (another dtype's device; complete and not
    forced: refused when named, skipped when not), or None."""
    if old is not None and old.dtype != dtype:
        return m.DeviceResult(
            device_id=d.device_id,
            ref=d.ref,
            status=m.REFUSED,
            code=errors.ConflictError.code,
            message=f"device {d.device_id} was provisioned as dtype {old.dtype}, not {dtype}",
        )
    if old is not None and old.status == rec.PROVISIONING_COMPLETE and not force:
        return m.DeviceResult(
            device_id=d.device_id,
            ref=d.ref,
            status=m.REFUSED if named else m.SKIPPED,
            steps_done=list(old.steps_done),
            certificates=old.certificate_serials,
            code=errors.ConflictError.code if named else None,
            message=(
                f"device {d.device_id} is already provisioned (complete at "
                f"{old.completed_at.isoformat() if old.completed_at else '?'} by {old.operator}); "
                "give --force to provision it again"
                if named
                else None
            ),
        )
    return None


def _job(
    settings: PmSettings,
    d: DeviceOnBench,
    old: ProvisioningRecord | None,
    *,
    operator: str,
    force: bool,
    allowed: set[str],
    now: dt.datetime,
) -> Job:
    """The work of one device: from scratch (new or forced), else from the first step not done."""
    steps = settings.steps
    if old is None or force:
        done: list[str] = []
        certificates: dict[str, str] = {}
        release_counter, image_sha256 = None, None
        started_at = now
    else:  # resume from the first step not done
        done = [st for st in old.steps_done if st in steps]
        certificates = {p: sn for p, sn in old.certificates if p in settings.profiles}
        release_counter, image_sha256 = old.release_counter, old.image_sha256
        started_at = old.started_at
    remaining = [st for st in steps if st not in done]
    others_allowed = all(st in allowed for st in remaining if st != STEP_VERIFY)
    todo = [st for st in remaining if st in allowed and (st != STEP_VERIFY or others_allowed)]
    return Job(
        device=d,
        operator=operator,
        started_at=started_at,
        attempts=old.attempts + 1 if old is not None else 1,
        todo=todo,
        pending=[st for st in remaining if st not in todo],
        done=done,
        certificates=certificates,
        release_counter=release_counter,
        image_sha256=image_sha256,
        forced_over=old.certificate_serials if (old is not None and force) else {},
    )


def plan_jobs(
    settings: PmSettings,
    chosen: Sequence[DeviceOnBench],
    records: Mapping[str, ProvisioningRecord],
    *,
    operator: str,
    force: bool,
    named: bool,
    allowed: set[str],
    now: dt.datetime,
) -> tuple[list[m.DeviceResult], list[Job]]:
    """The chosen devices, given their provisioning records: the refused or skipped ones, and the
    work of the others. ``named``: the operator named the devices (a complete one is refused)."""
    results: list[m.DeviceResult] = []
    jobs: list[Job] = []
    for d in chosen:
        old = records.get(d.device_id)
        refusal = _refusal(settings.dtype, d, old, force=force, named=named)
        if refusal is not None:
            results.append(refusal)
            continue
        jobs.append(_job(settings, d, old, operator=operator, force=force, allowed=allowed, now=now))
    return results, jobs
