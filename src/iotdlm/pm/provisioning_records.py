"""pm's own records: one provisioning record per device, and the result a report lists for it.

A device's record (:class:`~iotdlm.store.ProvisioningRecord`, in the shared store) says which
steps are done (``software``, ``truststore``, ``config``, ``certificate:<profile>``, ``verify``),
which release and certificates the device holds, who ran the line and where it failed. One store
transaction records a chunk: marked in-progress before its work, the outcome after
(:func:`chunk_records`). A device that failed or stopped half way resumes from the first step not
done (:mod:`iotdlm.pm.plan`). Pure: building records and results, no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from iotdlm.pm.plan import Job
from iotdlm.pm.settings import PmSettings
from iotdlm.store import ProvisioningRecord
from iotdlm.store import records as rec
from iotdlm.wire import pm as m


def status_of(settings: PmSettings, job: Job) -> str:
    """The record status of a job: failed, complete (every step done) or in progress."""
    if not job.ok:
        return rec.PROVISIONING_FAILED
    if all(st in job.done for st in settings.steps):
        return rec.PROVISIONING_COMPLETE
    return rec.PROVISIONING_IN_PROGRESS


def provisioning_record(settings: PmSettings, job: Job, now: dt.datetime) -> ProvisioningRecord:
    """The record of a job as it stands ``now``."""
    status = status_of(settings, job)
    message = job.message
    if status == rec.PROVISIONING_COMPLETE and job.forced_over:
        old = ", ".join(f"{p} {sn}" for p, sn in sorted(job.forced_over.items()))
        message = (
            f"provisioned again (forced); the certificates of the earlier provisioning ({old}) stay valid "
            "at km until revoked (`iotdlm ca revoke`)"
        )
    return ProvisioningRecord(
        device_id=job.device_id,
        dtype=settings.dtype,
        status=status,
        operator=job.operator,
        started_at=job.started_at,
        updated_at=now,
        ref=job.device.ref[: rec.REF_LEN],
        steps_done=tuple(job.done),
        release_counter=job.release_counter,
        image_sha256=job.image_sha256,
        certificates=tuple(sorted(job.certificates.items())),
        failed_step=job.failed_step,
        message=message,
        attempts=job.attempts,
        completed_at=now if status == rec.PROVISIONING_COMPLETE else None,
    )


def chunk_records(
    settings: PmSettings, chunk: Sequence[Job], now: dt.datetime, *, final: bool
) -> list[ProvisioningRecord]:
    """The records one store transaction writes for a chunk: before its work (``final`` False:
    each device in progress, those with nothing to do left out), or its outcome after."""
    records = []
    for job in chunk:
        r = provisioning_record(settings, job, now)
        if not final and r.status == rec.PROVISIONING_COMPLETE:  # nothing to do in this run
            continue
        records.append(r)
    return records


def device_result(settings: PmSettings, job: Job) -> m.DeviceResult:
    """What the report says of a job's device."""
    status = status_of(settings, job)
    return m.DeviceResult(
        device_id=job.device_id,
        ref=job.device.ref,
        status={
            rec.PROVISIONING_COMPLETE: m.COMPLETE,
            rec.PROVISIONING_FAILED: m.FAILED,
            rec.PROVISIONING_IN_PROGRESS: m.IN_PROGRESS,
        }[status],
        steps_done=list(job.done),
        steps_pending=[st for st in settings.steps if st not in job.done] if status != "complete" else [],
        failed_step=job.failed_step,
        code=job.code,
        message=job.message,
        certificates=dict(sorted(job.certificates.items())),
        request=job.request,
    )
