"""pm's Provisioner: provisioning blank devices of one device type (paper 4.1.1, 4.2, Algorithm 1, Figs 3-5).

One :class:`Provisioner` per dtype, built with its seams: a :class:`~iotdlm.client.km.KmClient`
signing as ``pm-<dtype>``, an :class:`~iotdlm.client.sm.SmClient`, the :class:`Flasher` plug-in of
the dtype, the :class:`~iotdlm.store.Store`, a :class:`~iotdlm.clock.Clock`, the bus (events, cm's
ping) and the :class:`Anchors` it trusts -- pk_sm (from the deployment, never from sm's answers),
the repository's pinned TUF root (pk_repo), the sm-pm key and the deployment's root CA.

A run (:meth:`Provisioner.provision_batch`), in order:

1. **Preflight** (defence in depth): a raised alarm halts pm until an operator clears it
   (:mod:`iotdlm.pm.alarm`); pm refuses while cm -- the door to the outside -- answers its ping;
   with a :class:`ModeGuard`, the operation mode (Table 1) decides which steps may run (below).
   Then the plan: what to do for each device (:mod:`iotdlm.pm.plan`).
2. **Algorithm 1** (Scenario 1, Fig. 3; :mod:`iotdlm.pm.algorithm1`), once per run: load sw,
   meta.enc and sig_sm from sm; copy the image into pm's own staging file FIRST and verify that
   copy -- the bytes verified are the bytes flashed; decrypt meta with the sm-pm key; verify
   sig_sm with pk_sm, then the repository's metadata with pk_repo, then the image's hash and
   length. Any failure HALTS pm: an alarm is persisted (meta key ``pm.alarm.<dtype>``) together
   with its audit record (kind ``alarm``, naming the failed check: meta_enc, sig_sm, meta_repo or
   image), published on ``iotdlm.v1.events.pm.alarm``, and :class:`HaltedError` raised. Nothing
   is flashed.
3. The truststore: root and issuing CA certificates from km's chain, whose root must be the
   deployment's own (:mod:`iotdlm.pm.certificates`).
4. Per chunk of ``batch_size`` devices:
   a. what each device hands over for its certificates: a CSR made on the device (Scenario 2a,
      Fig. 4) or, for a device that cannot make one, its public key, from which pm builds a CRMF
      request with ``raVerified`` (Scenario 2b, Fig. 5);
   b. ONE signed batch request to km per certificate profile (seed 003 VI-B: factory and/or
      operational, as the deployment's policy says); each certificate is checked before it is
      flashed (names the device, certifies the device's key, chains to the root);
   c. per device (worker threads): flash the staged software, the truststore, the config (device
      id, dtype, enroll URI = CA-URI, update URI), the certificates -- a device whose certificates
      could not be issued is not touched at all;
   d. verify by reading back from the device: the truststore is the one flashed and holds the
      deployment's root, each certificate is the one flashed, chains through that truststore to the
      root (RFC 5280 path validation) and certifies the key the device holds, and the image's
      SHA-256 is the verified one (c and d: :mod:`iotdlm.pm.flashing`);
   e. one store transaction records the chunk (:class:`~iotdlm.store.ProvisioningRecord`,
      :mod:`iotdlm.pm.provisioning_records`).

Steps are recorded per device (``software``, ``truststore``, ``config``, ``certificate:<profile>``,
``verify``); a device that failed or stopped half way resumes from the first step not done. A
complete device is provisioned again only when forced. A single device's failure never stops the
batch; a HALT stops everything.

Operation modes (Table 1): in provisioning-software pm flashes software and config (km is off);
in provisioning-certificate the truststore and the certificates (sm is off); ``verify`` runs once
every other step is done, in either. Without a published mode (no supervisor) and
``require_mode=False``, every step runs in one go -- still only while cm is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from types import TracebackType

from iotdlm import errors
from iotdlm.bus import Bus
from iotdlm.bus import subjects as s
from iotdlm.client.km import KmClient
from iotdlm.client.sm import SmClient
from iotdlm.clock import Clock
from iotdlm.modes.guard import ModeGuard, cm_running
from iotdlm.modes.table import modes_where
from iotdlm.pm.alarm import PmAlarm, halted_error
from iotdlm.pm.algorithm1 import StagedSoftware, load_software
from iotdlm.pm.certificates import Certificates
from iotdlm.pm.flasher import DeviceOnBench, Flasher
from iotdlm.pm.flashing import Flashing
from iotdlm.pm.plan import Job, allowed_steps, choose, chunks, plan_jobs
from iotdlm.pm.provisioning_records import chunk_records, device_result
from iotdlm.pm.settings import (
    STEP_SOFTWARE,
    STEP_TRUSTSTORE,
    Anchors,
    PmSettings,
    Progress,
    ProgressCallback,
    check_operator,
)
from iotdlm.pm.storage import PmStore
from iotdlm.pm.workers import Workers
from iotdlm.wire import pm as m
from iotdlm.wire import software as sw

log = logging.getLogger(__name__)


def provisioned_subject() -> str:
    return s.events("pm", "provisioned")


class Provisioner:
    """Provisions blank devices of one dtype (module docstring). Use as an async context manager,
    or call :meth:`close` (it owns the worker threads)."""

    def __init__(
        self,
        settings: PmSettings,
        *,
        km: KmClient,
        sm: SmClient,
        flasher: Flasher,
        store: PmStore,
        clock: Clock,
        bus: Bus,
        anchors: Anchors,
        guard: ModeGuard | None = None,
        require_mode: bool = False,
    ) -> None:
        if flasher.dtype != settings.dtype:
            raise ValueError(f"the flasher is for {flasher.dtype}, this pm provisions {settings.dtype}")
        if require_mode and guard is None:
            raise ValueError("require_mode needs a ModeGuard")
        self.settings = settings
        self.dtype = settings.dtype
        self.km = km
        self.sm = sm
        self.flasher = flasher
        self.store = store
        self.clock = clock
        self.bus = bus
        self.anchors = anchors
        self.guard = guard
        self.require_mode = require_mode
        self._lock = asyncio.Lock()
        self.workers = Workers(settings.concurrency, f"pm-{self.dtype}")
        self._alarm = PmAlarm(self.dtype, store=store, bus=bus, clock=clock, workers=self.workers)
        self.certificates = Certificates(
            settings, km=km, flasher=flasher, anchors=anchors, clock=clock, workers=self.workers
        )
        self.flashing = Flashing(settings, flasher=flasher, anchors=anchors, clock=clock, workers=self.workers)

    # --- life cycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Provisioner:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.workers.close()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # --- alarm -------------------------------------------------------------------------------------
    async def alarm(self) -> m.Alarm | None:
        """The active alarm, or None. An alarm this process could not record keeps it halted."""
        return await self._alarm.active()

    async def clear_alarm(self, operator: str) -> m.Alarm:
        """Clear the alarm (audited): :func:`~iotdlm.pm.alarm.clear_alarm` on this pm's store."""
        return await self._alarm.clear(operator)

    # --- preflight -----------------------------------------------------------------------------------
    async def preflight(self) -> str | None:
        """Refuse to work when halted (HaltedError), while cm runs or outside pm's modes (ModeError).
        Returns the operation mode the run is held to (None: none published, every step allowed)."""
        alarm = await self.alarm()
        if alarm is not None:
            raise halted_error(alarm)
        mode: str | None = None
        if self.guard is not None and (self.require_mode or self.guard.mode is not None):
            mode = self.guard.require(modes_where("pm"), "provisioning")
        if await cm_running(self.bus, timeout=self.settings.cm_ping_timeout):
            raise errors.ModeError(
                f"pm-{self.dtype} refuses to provision while cm runs: with cm on, the system is reachable from "
                "outside (paper 5.2.1). Switch to a provisioning mode first: `iotdlm mode set provisioning-software` "
                "(flash software) or `iotdlm mode set provisioning-certificate` (certificates)",
                field="mode",
            )
        return mode

    # --- the bench -----------------------------------------------------------------------------------
    async def discover(self) -> list[DeviceOnBench]:
        """The devices of this dtype the flasher sees on the bench."""
        found = await self.workers.run(self.flasher.discover)
        return [d for d in found if d.dtype == self.dtype]

    # --- a run ---------------------------------------------------------------------------------------
    async def provision(self, device: str, operator: str, *, force: bool = False) -> m.DeviceResult:
        """Provision one device (a flasher reference or a device id). Raises ConflictError if it is
        already provisioned and not forced; returns its result otherwise (failed or not)."""
        report = await self.provision_batch([device], operator, force=force)
        (result,) = report.devices
        if result.status == m.REFUSED:
            raise errors.ConflictError(result.message or "already provisioned", device_id=result.device_id)
        return result

    async def provision_batch(
        self,
        devices: Sequence[str] | None,
        operator: str,
        *,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> m.ProvisionReport:
        """Provision ``devices`` (flasher references or device ids; None: every device discovered
        that is not complete yet). Single-device failures are listed in the report; a HALT raises
        :class:`HaltedError`; refusals of the whole run (cm running, wrong mode) raise ModeError."""
        operator = check_operator(operator)
        async with self._lock:
            started = self.clock.now()
            mode = await self.preflight()
            results, jobs = await self._plan(devices, operator, force, allowed_steps(self.settings, mode), started)
            timings: dict[str, float] = defaultdict(float)
            if progress is not None:
                progress(Progress(total=len(jobs), done=0, phase="planned"))
            software: StagedSoftware | None = None
            try:
                if any(STEP_SOFTWARE in j.todo for j in jobs):
                    t0 = time.perf_counter()
                    software = await load_software(
                        self.settings,
                        sm=self.sm,
                        anchors=self.anchors,
                        workers=self.workers,
                        alarm=self._alarm,
                        operator=operator,
                    )
                    timings["algorithm1"] += time.perf_counter() - t0
                results += await self._work(jobs, software, timings, progress)
            finally:
                if software is not None:
                    with contextlib.suppress(OSError):
                        software.path.unlink()
            report = self._report(operator, mode, started, results, jobs, software, timings)
            await self._announce(report)
            return report

    async def _plan(
        self, devices: Sequence[str] | None, operator: str, force: bool, allowed: set[str], now: dt.datetime
    ) -> tuple[list[m.DeviceResult], list[Job]]:
        """The plan (:mod:`iotdlm.pm.plan`) from the bench and the devices' provisioning records."""
        bench = await self.discover()
        results, chosen = choose(self.dtype, bench, devices)
        records = await self.workers.run(self.store.get_provisionings, [d.device_id for d in chosen])
        more, jobs = plan_jobs(
            self.settings,
            chosen,
            records,
            operator=operator,
            force=force,
            named=devices is not None,
            allowed=allowed,
            now=now,
        )
        return results + more, jobs

    async def _work(
        self,
        jobs: Sequence[Job],
        software: StagedSoftware | None,
        timings: dict[str, float],
        progress: ProgressCallback | None,
    ) -> list[m.DeviceResult]:
        """The truststore, then per chunk: recorded in progress, certificates, flashing and
        read-back, the outcome recorded. The results of the devices worked on."""
        chain = None
        if any(STEP_TRUSTSTORE in j.todo or j.wants_certificates() for j in jobs):
            chain = await self.certificates.chain()
        results: list[m.DeviceResult] = []
        total = len(jobs)
        for chunk in chunks(jobs, self.settings.batch_size):
            await self._save(chunk, final=False, timings=timings)
            if progress is not None:
                progress(Progress(total=total, done=len(results), phase="certificates"))
            await self.certificates.request(chunk, chain, timings)
            async for job in self.flashing.flash(chunk, software, chain):
                results.append(device_result(self.settings, job))
                if progress is not None:
                    progress(Progress(total=total, done=len(results), phase="flashing", device=results[-1]))
            await self._save(chunk, final=True, timings=timings)
        return results

    async def _save(self, chunk: Sequence[Job], *, final: bool, timings: dict[str, float]) -> None:
        """One store transaction for a chunk: marked in-progress before, the outcome after."""
        records = chunk_records(self.settings, chunk, self.clock.now(), final=final)
        t0 = time.perf_counter()
        await self.workers.run(self.store.save_provisioning, records)
        timings["store"] += time.perf_counter() - t0

    def _report(
        self,
        operator: str,
        mode: str | None,
        started: dt.datetime,
        results: list[m.DeviceResult],
        jobs: Sequence[Job],
        software: StagedSoftware | None,
        timings: dict[str, float],
    ) -> m.ProvisionReport:
        for job in jobs:
            for k, v in job.timings.items():
                timings[k] += v
        return m.ProvisionReport(
            dtype=self.dtype,
            operator=operator,
            started_at=sw.iso(started),
            finished_at=sw.iso(self.clock.now()),
            devices=sorted(results, key=lambda d: d.device_id),
            release_counter=software.release_counter if software is not None else None,
            image_sha256=software.sha256 if software is not None else None,
            mode=mode,
            timings={k: round(v, 6) for k, v in sorted(timings.items())},
        )

    async def _announce(self, report: m.ProvisionReport) -> None:
        """The batch event on ``iotdlm.v1.events.pm.provisioned``, and the log line."""
        event = m.BatchEvent(
            dtype=self.dtype,
            operator=report.operator,
            complete=report.count(m.COMPLETE),
            failed=report.count(m.FAILED),
            in_progress=report.count(m.IN_PROGRESS),
            refused=report.count(m.REFUSED),
            release_counter=report.release_counter,
        )
        try:
            await self.bus.publish(provisioned_subject(), m.encode(event))
        except errors.IotdlmError as exc:
            log.warning("pm-%s: cannot publish the provisioning event: %s", self.dtype, exc)
        log.info(
            "pm-%s: %d complete, %d failed, %d in progress, %d refused (operator %s)",
            self.dtype,
            report.count(m.COMPLETE),
            report.count(m.FAILED),
            report.count(m.IN_PROGRESS),
            report.count(m.REFUSED),
            report.operator,
        )

    # --- status --------------------------------------------------------------------------------------
    async def status(self) -> m.StatusReply:
        alarm = await self._alarm.last()
        counts = await self.workers.run(lambda: self.store.count_provisioning(dtype=self.dtype))
        return m.StatusReply(
            dtype=self.dtype,
            halted=alarm is not None and alarm.active,
            busy=self.busy,
            records=counts,
            alarm=alarm,
            mode=self.guard.mode if self.guard is not None else None,
        )
