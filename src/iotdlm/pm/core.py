"""pm's core: provisioning blank devices of one device type (paper 4.1.1, 4.2, Algorithm 1, Figs 3-5).

One :class:`Provisioner` per dtype, built with its seams: a :class:`~iotdlm.client.km.KmClient`
signing as ``pm-<dtype>``, an :class:`~iotdlm.client.sm.SmClient`, the :class:`Flasher` plug-in of
the dtype, the :class:`~iotdlm.store.Store`, a :class:`~iotdlm.clock.Clock`, the bus (events, cm's
ping) and the :class:`Anchors` it trusts -- pk_sm (from the deployment, never from sm's answers),
the repository's pinned TUF root (pk_repo), the sm-pm key and the deployment's root CA.

A run (:meth:`Provisioner.provision_batch`), in order:

1. **Preflight** (defence in depth): a raised alarm halts pm until an operator clears it; pm
   refuses while cm -- the door to the outside -- answers its ping; with a :class:`ModeGuard`, the
   operation mode (Table 1) decides which steps may run (below).
2. **Algorithm 1** (Scenario 1, Fig. 3), once per run: load sw, meta.enc and sig_sm from sm; copy
   the image into pm's own staging file FIRST and verify that copy -- the bytes verified are the
   bytes flashed; decrypt meta with the sm-pm key; verify sig_sm with pk_sm, then the repository's
   metadata with pk_repo, then the image's hash and length. Any failure HALTS pm: an alarm is
   persisted (meta key ``pm.alarm.<dtype>``) together with its audit record (kind ``alarm``,
   naming the failed check: meta_enc, sig_sm, meta_repo or image), published on
   ``iotdlm.v1.events.pm.alarm``, and :class:`HaltedError` raised. Nothing is flashed.
3. The truststore: root and issuing CA certificates from km's chain, whose root must be the
   deployment's own.
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
      SHA-256 is the verified one;
   e. one store transaction records the chunk (:class:`~iotdlm.store.ProvisioningRecord`).

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
import os
import re
import secrets
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from iotdlm import errors, software
from iotdlm.bus import Bus
from iotdlm.bus import subjects as s
from iotdlm.client.km import KmClient
from iotdlm.client.sm import SmClient
from iotdlm.clock import Clock
from iotdlm.modes.guard import ModeGuard, cm_running
from iotdlm.modes.table import DEVICE_CERTIFICATE_MODES, FLASH_MODES, modes_where
from iotdlm.pki import crmf
from iotdlm.pki.chain import der, load_certificate, verify_issued_by
from iotdlm.pki.csr import parse_csr
from iotdlm.pki.keys import PublicKey
from iotdlm.pki.names import check_id, device_id_of, device_subject
from iotdlm.pki.profiles import DEVICE_PROFILES
from iotdlm.pm import messages as m
from iotdlm.pm.flasher import DeviceOnBench, Flasher
from iotdlm.store import AuditEntry, ProvisioningRecord, Store
from iotdlm.store import records as rec
from iotdlm.wire import audit as fmt
from iotdlm.wire import km as kmsg
from iotdlm.wire import software as sw

log = logging.getLogger(__name__)

# --- steps ---------------------------------------------------------------------------------------
STEP_SOFTWARE: Final = "software"
STEP_TRUSTSTORE: Final = "truststore"
STEP_CONFIG: Final = "config"
STEP_VERIFY: Final = "verify"
CERTIFICATE_STEP_PREFIX: Final = "certificate:"
#: where a device that is not on the bench (or cannot be addressed) fails
STEP_DISCOVER: Final = "discover"

#: what Algorithm 1 can find wrong (the ``field`` of its errors); each one halts pm
HALT_CHECKS: Final = ("meta_enc", "sig_sm", "meta_repo", "image")

ALARM_KEY_PREFIX: Final = "pm.alarm."
OPERATOR_RE: Final = re.compile(r"^[^\x00-\x1f\x7f]{1,255}$")


def certificate_step(profile: str) -> str:
    return f"{CERTIFICATE_STEP_PREFIX}{profile}"


def alarm_key(dtype: str) -> str:
    return ALARM_KEY_PREFIX + dtype


def alarm_subject() -> str:
    return s.events("pm", "alarm")


def provisioned_subject() -> str:
    return s.events("pm", "provisioned")


def check_operator(operator: str) -> str:
    """The operator's name as the records and the audit log keep it: 1-255 printable characters."""
    if not isinstance(operator, str) or not OPERATOR_RE.match(operator) or not operator.strip():
        raise errors.BadRequestError(
            "operator must be a name of 1-255 printable characters (who runs the line)", field="operator"
        )
    return operator


class HaltedError(errors.ConflictError):
    """pm is halted by an alarm (Algorithm 1 failed); ``field`` names the failed check.

    A ConflictError (pm's state forbids the request) with its own wire code, ``halted``, so
    :func:`iotdlm.errors.from_wire` rebuilds it as itself wherever this module is imported (and
    never shadows ConflictError)."""

    code = "halted"


# --- settings and trust anchors --------------------------------------------------------------------


@dataclass(frozen=True)
class PmSettings:
    """How pm provisions one dtype. ``profiles`` is the deployment's policy: which device
    certificates to issue (seed 003 VI-B: a factory certificate, an operational one, or both);
    required, never defaulted."""

    dtype: str
    profiles: tuple[str, ...]
    #: O= of the names in the CRMF requests pm builds (km names the certificate from its profile)
    organization: str
    #: the CA-URI flashed into the device config: cm's EST URL (seed 003 VI-B)
    enroll_uri: str
    #: where the device asks for software updates (None: not written to the config)
    update_uri: str | None
    #: pm's own folder for the staged image (created 0700)
    staging_dir: Path
    #: the release to flash (None: the latest sm stores)
    release_counter: int | None = None
    #: devices per chunk: one km request per profile per chunk, one store write per chunk
    batch_size: int = 100
    #: devices flashed at once (worker threads)
    concurrency: int = 8
    #: how long pm waits for cm's answer to the ping before concluding it is off
    cm_ping_timeout: float = 1.0

    def __post_init__(self) -> None:
        check_id(self.dtype, "dtype")
        if not self.profiles:
            raise ValueError("PmSettings.profiles must name at least one certificate profile")
        if len(set(self.profiles)) != len(self.profiles):
            raise ValueError(f"PmSettings.profiles repeats a profile: {self.profiles}")
        unknown = [p for p in self.profiles if p not in DEVICE_PROFILES]
        if unknown:
            raise ValueError(f"PmSettings.profiles: {unknown} are not device profiles ({', '.join(DEVICE_PROFILES)})")
        if not 1 <= self.batch_size <= kmsg.MAX_BATCH:
            raise ValueError(f"PmSettings.batch_size must be 1..{kmsg.MAX_BATCH}")
        if self.concurrency < 1:
            raise ValueError("PmSettings.concurrency must be at least 1")
        if self.release_counter is not None:
            sw.check_release_counter(self.release_counter)
        if self.cm_ping_timeout <= 0:
            raise ValueError("PmSettings.cm_ping_timeout must be positive")

    @property
    def steps(self) -> tuple[str, ...]:
        """Every step of a device, in order."""
        return (
            STEP_SOFTWARE,
            STEP_TRUSTSTORE,
            STEP_CONFIG,
            *(certificate_step(p) for p in self.profiles),
            STEP_VERIFY,
        )


@dataclass(frozen=True)
class Anchors:
    """What pm trusts, none of it taken from the modules it checks."""

    #: sm's public key, from the deployment's modules/sm/cert.pem (never from sm's answers)
    pk_sm: PublicKey
    #: the repository's pinned TUF root (pk_repo), as sm was set up with it; None: sm is not set
    #: up, so pm cannot flash software (it can still provision certificates)
    trusted_root: bytes | None
    #: the key shared by sm and pm only, that encrypts metadata at rest (section 5.2.4); None as above
    meta_key: bytes | None
    #: the deployment's root CA: km's chain must start here, devices' certificates must chain to it
    root_ca: x509.Certificate

    def __post_init__(self) -> None:
        if (self.trusted_root is None) != (self.meta_key is None):
            raise ValueError("trusted_root and meta_key go together (both from sm's setup)")
        if self.meta_key is not None and len(self.meta_key) != software.KEY_BYTES:
            raise ValueError(f"the sm-pm key must be {software.KEY_BYTES} bytes")
        if self.trusted_root is not None:
            software.load_trusted_root(self.trusted_root)


@dataclass(frozen=True)
class Progress:
    """Told to a run's ``progress`` callback: after planning (``device`` None) and per device done."""

    total: int
    done: int
    phase: str
    device: m.DeviceResult | None = None


ProgressCallback = Callable[[Progress], None]


# --- alarm (persisted in the store) ----------------------------------------------------------------


def read_alarm(store: Store, dtype: str) -> m.Alarm | None:
    """The last alarm of ``dtype`` (raised or cleared), or None if there never was one."""
    raw = store.get_meta(alarm_key(dtype))
    if raw is None:
        return None
    try:
        return m.decode(raw.encode(), m.Alarm, what="stored alarm")
    except errors.BadRequestError:
        # an unreadable alarm is still an alarm: stay halted until an operator clears it
        return m.Alarm(
            dtype=dtype,
            check="unknown",
            code="internal",
            message=f"the stored alarm of {dtype} cannot be read: {raw[:200]!r}",
            raised_at="unknown",
            raised_by="unknown",
        )


def _iso(at: dt.datetime) -> str:
    return sw.iso(at)


def clear_alarm(store: Store, dtype: str, operator: str, now: dt.datetime) -> m.Alarm:
    """An operator clears the alarm of ``dtype`` (audited); pm works again. NotFoundError when no
    alarm is raised."""
    operator = check_operator(operator)
    current = read_alarm(store, dtype)
    if current is None or not current.active:
        raise errors.NotFoundError(f"pm-{dtype} has no alarm raised; nothing to clear", field="alarm")
    cleared = m.Alarm(
        dtype=current.dtype,
        check=current.check,
        code=current.code,
        message=current.message,
        raised_at=current.raised_at,
        raised_by=current.raised_by,
        release_counter=current.release_counter,
        state="cleared",
        cleared_by=operator,
        cleared_at=_iso(now),
    )
    entry = AuditEntry(
        at=now,
        kind=fmt.ALARM,
        actor=operator,
        subject=f"pm-{dtype}",
        data={
            "action": "cleared",
            "dtype": dtype,
            "check": current.check,
            "raised_at": current.raised_at,
            "operator": operator,
        },
    )
    store.set_meta_with_audit(alarm_key(dtype), m.encode(cleared).decode(), [entry])
    return cleared


def _halted(alarm: m.Alarm) -> HaltedError:
    return HaltedError(
        f"pm-{alarm.dtype} is halted by an alarm raised at {alarm.raised_at}: Algorithm 1 failed at "
        f"{alarm.check} ({alarm.message}). Nothing is flashed until an operator has investigated sm's "
        f"local repository and runs `iotdlm pm clear-alarm --dtype {alarm.dtype} --operator NAME`",
        field=alarm.check,
    )


# --- what one run works with --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Software:
    """Verified software, staged in pm's own file (the bytes verified are the bytes flashed)."""

    path: Path
    release_counter: int
    sha256: str
    info: dict[str, Any]


@dataclass(frozen=True)
class _Chain:
    root: x509.Certificate
    cas: tuple[x509.Certificate, ...]

    @property
    def truststore(self) -> list[x509.Certificate]:
        return [self.root, *self.cas]


@dataclass
class _Job:
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


_T = TypeVar("_T")


def _chunks(items: Sequence[_T], size: int) -> Iterable[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _spki(key: Any) -> bytes:
    out: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return out


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # InvalidSignature, ValueError, TypeError: not self-signed
        return False
    return True


# --- the provisioner ---------------------------------------------------------------------------------


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
        store: Store,
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
        self.actor = f"pm[{settings.dtype}]"
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix=f"pm-{self.dtype}")
        #: an alarm raised while the store could not record it: this process stays halted anyway
        self._unrecorded_alarm: tuple[m.Alarm, AuditEntry] | None = None

    # --- life cycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Provisioner:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- alarm -------------------------------------------------------------------------------------
    async def alarm(self) -> m.Alarm | None:
        """The active alarm, or None. An alarm this process could not record keeps it halted."""
        if self._unrecorded_alarm is not None:
            alarm, entry = self._unrecorded_alarm
            try:
                await self._run(
                    self.store.set_meta_with_audit, alarm_key(self.dtype), m.encode(alarm).decode(), [entry]
                )
                self._unrecorded_alarm = None
            except errors.UnavailableError as exc:
                log.error("pm-%s: the alarm is still not recorded in the store: %s", self.dtype, exc)
            return alarm
        found = await self._run(read_alarm, self.store, self.dtype)
        return found if found is not None and found.active else None

    async def clear_alarm(self, operator: str) -> m.Alarm:
        """Clear the alarm (audited): :func:`clear_alarm` on this pm's store."""
        self._unrecorded_alarm = None
        return await self._run(clear_alarm, self.store, self.dtype, operator, self.clock.now())

    async def _raise_alarm(
        self, exc: errors.RejectedError, check: str, release_counter: int | None, operator: str
    ) -> HaltedError:
        now = self.clock.now()
        alarm = m.Alarm(
            dtype=self.dtype,
            check=check,
            code=exc.code,
            message=exc.message[:1000],
            raised_at=_iso(now),
            raised_by=operator,
            release_counter=release_counter,
        )
        entry = AuditEntry(
            at=now,
            kind=fmt.ALARM,
            actor=self.actor,
            subject=f"pm-{self.dtype}",
            data={
                "action": "raised",
                "dtype": self.dtype,
                "check": check,
                "code": exc.code,
                "message": exc.message[:1000],
                "release_counter": release_counter,
                "operator": operator,
            },
        )
        log.critical("pm-%s HALTED: Algorithm 1 failed at %s: %s", self.dtype, check, exc.message)
        try:
            await self._run(self.store.set_meta_with_audit, alarm_key(self.dtype), m.encode(alarm).decode(), [entry])
        except errors.IotdlmError as store_exc:
            log.error("pm-%s: cannot record the alarm in the store (%s); halted in this process", self.dtype, store_exc)
            self._unrecorded_alarm = (alarm, entry)
        try:
            await self.bus.publish(alarm_subject(), m.encode(alarm))
        except errors.IotdlmError as bus_exc:
            log.error("pm-%s: cannot publish the alarm event: %s", self.dtype, bus_exc)
        return _halted(alarm)

    # --- preflight -----------------------------------------------------------------------------------
    async def preflight(self) -> str | None:
        """Refuse to work when halted (HaltedError), while cm runs or outside pm's modes (ModeError).
        Returns the operation mode the run is held to (None: none published, every step allowed)."""
        alarm = await self.alarm()
        if alarm is not None:
            raise _halted(alarm)
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

    def _allowed(self, mode: str | None) -> set[str]:
        every = set(self.settings.steps)
        if mode is None:
            return every
        allowed = {STEP_VERIFY}
        if mode in FLASH_MODES:
            allowed |= {STEP_SOFTWARE, STEP_CONFIG}
        if mode in DEVICE_CERTIFICATE_MODES:
            allowed |= {STEP_TRUSTSTORE, *(certificate_step(p) for p in self.settings.profiles)}
        return allowed & every

    # --- the bench -----------------------------------------------------------------------------------
    async def discover(self) -> list[DeviceOnBench]:
        """The devices of this dtype the flasher sees on the bench."""
        found = await self._run(self.flasher.discover)
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
            allowed = self._allowed(mode)
            bench = await self.discover()
            results, jobs = await self._plan(bench, devices, operator, force, allowed, started)
            timings: dict[str, float] = defaultdict(float)
            total = len(jobs)
            done = 0
            if progress is not None:
                progress(Progress(total=total, done=0, phase="planned"))
            software: _Software | None = None
            try:
                if any(STEP_SOFTWARE in j.todo for j in jobs):
                    t0 = time.perf_counter()
                    software = await self._load_software(operator)
                    timings["algorithm1"] += time.perf_counter() - t0
                chain: _Chain | None = None
                if any(STEP_TRUSTSTORE in j.todo or j.wants_certificates() for j in jobs):
                    chain = await self._chain()
                for chunk in _chunks(jobs, self.settings.batch_size):
                    await self._save(chunk, final=False, timings=timings)
                    if progress is not None:
                        progress(Progress(total=total, done=done, phase="certificates"))
                    await self._certificates(chunk, chain, timings)
                    for result in await self._flash(chunk, software, chain, timings, total, done, progress):
                        results.append(result)
                        done += 1
                    await self._save(chunk, final=True, timings=timings)
            finally:
                if software is not None:
                    with contextlib.suppress(OSError):
                        software.path.unlink()
            for job in jobs:
                for k, v in job.timings.items():
                    timings[k] += v
            report = m.ProvisionReport(
                dtype=self.dtype,
                operator=operator,
                started_at=_iso(started),
                finished_at=_iso(self.clock.now()),
                devices=sorted(results, key=lambda d: d.device_id),
                release_counter=software.release_counter if software is not None else None,
                image_sha256=software.sha256 if software is not None else None,
                mode=mode,
                timings={k: round(v, 6) for k, v in sorted(timings.items())},
            )
            await self._publish_batch(report)
            log.info(
                "pm-%s: %d complete, %d failed, %d in progress, %d refused (operator %s)",
                self.dtype,
                report.count(m.COMPLETE),
                report.count(m.FAILED),
                report.count(m.IN_PROGRESS),
                report.count(m.REFUSED),
                operator,
            )
            return report

    async def _publish_batch(self, report: m.ProvisionReport) -> None:
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

    # --- planning ------------------------------------------------------------------------------------
    async def _plan(
        self,
        bench: list[DeviceOnBench],
        devices: Sequence[str] | None,
        operator: str,
        force: bool,
        allowed: set[str],
        now: dt.datetime,
    ) -> tuple[list[m.DeviceResult], list[_Job]]:
        results: list[m.DeviceResult] = []
        by_ref: dict[str, DeviceOnBench] = {}
        by_id: dict[str, list[DeviceOnBench]] = defaultdict(list)
        for d in bench:
            by_ref[d.ref] = d
            by_ref.setdefault(Path(d.ref).name, d)
            by_id[d.device_id].append(d)
        chosen: list[DeviceOnBench] = []
        named = devices is not None
        if devices is None:
            chosen = list(bench)
        else:
            seen: set[str] = set()
            for wanted in devices:
                hit = by_ref.get(wanted) or (by_id[wanted][0] if len(by_id.get(wanted, [])) == 1 else None)
                if hit is None:
                    results.append(
                        m.DeviceResult(
                            device_id=wanted,
                            status=m.FAILED,
                            failed_step=STEP_DISCOVER,
                            code=errors.NotFoundError.code,
                            message=f"no {self.dtype} device {wanted!r} on the bench (by reference or device id)",
                        )
                    )
                    continue
                if hit.ref not in seen:
                    seen.add(hit.ref)
                    chosen.append(hit)
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
            try:
                check_id(d.device_id)
            except errors.BadRequestError as exc:
                results.append(
                    m.DeviceResult(
                        device_id=d.device_id[:255],
                        ref=d.ref,
                        status=m.FAILED,
                        failed_step=STEP_DISCOVER,
                        code=exc.code,
                        message=f"the flasher read an unusable device id: {exc.message}",
                    )
                )
                continue
            valid.append(d)
        chosen = valid
        records = await self._run(self.store.get_provisionings, [d.device_id for d in chosen])
        steps = self.settings.steps
        jobs: list[_Job] = []
        for d in chosen:
            old = records.get(d.device_id)
            if old is not None and old.dtype != self.dtype:
                results.append(
                    m.DeviceResult(
                        device_id=d.device_id,
                        ref=d.ref,
                        status=m.REFUSED,
                        code=errors.ConflictError.code,
                        message=f"device {d.device_id} was provisioned as dtype {old.dtype}, not {self.dtype}",
                    )
                )
                continue
            if old is not None and old.status == rec.PROVISIONING_COMPLETE and not force:
                results.append(
                    m.DeviceResult(
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
                )
                continue
            if old is None or force:
                done: list[str] = []
                certificates: dict[str, str] = {}
                release_counter, image_sha256 = None, None
                started_at = now
            else:  # resume from the first step not done
                done = [st for st in old.steps_done if st in steps]
                certificates = {p: sn for p, sn in old.certificates if p in self.settings.profiles}
                release_counter, image_sha256 = old.release_counter, old.image_sha256
                started_at = old.started_at
            remaining = [st for st in steps if st not in done]
            others_allowed = all(st in allowed for st in remaining if st != STEP_VERIFY)
            todo = [st for st in remaining if st in allowed and (st != STEP_VERIFY or others_allowed)]
            jobs.append(
                _Job(
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
            )
        return results, jobs

    # --- Algorithm 1 ---------------------------------------------------------------------------------
    async def _load_software(self, operator: str) -> _Software:
        """Scenario 1 / Algorithm 1 on pm's own staged copy; any failure halts pm."""
        if self.anchors.trusted_root is None or self.anchors.meta_key is None:
            raise errors.NotFoundError(
                f"pm-{self.dtype} cannot flash software: sm is not set up in this deployment, so pm has neither "
                "the repository's root (pk_repo) nor the sm-pm key; run `iotdlm sm setup` and restart pm",
                field="software",
            )
        loaded = await self.sm.load(self.dtype, self.settings.release_counter)
        try:
            staged = await self._run(self._stage, loaded)
        except errors.NotFoundError as exc:  # sm names an image that is not there: the repository was altered
            raise await self._raise_alarm(exc, "image", loaded.release_counter, operator) from exc
        try:
            verified = await self._run(self._algorithm1, staged, loaded)
        except errors.RejectedError as exc:
            with contextlib.suppress(OSError):
                staged.unlink()
            check = exc.field if exc.field in HALT_CHECKS else "image"
            raise await self._raise_alarm(exc, check, loaded.release_counter, operator) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise
        info = {
            "dtype": verified.dtype,
            "release_counter": verified.release_counter,
            "target_path": verified.target_path,
            "length": verified.length,
            "sha256": verified.sha256,
        }
        return _Software(path=staged, release_counter=verified.release_counter, sha256=verified.sha256, info=info)

    def _stage(self, loaded: sw.LoadResponse) -> Path:
        """Copy sm's image into pm's staging folder (0700 folder, 0400 file): what is verified next
        is this copy, and this copy is what is flashed -- sm's file may change, the copy does not."""
        source = Path(loaded.image_path)
        if not source.is_absolute():
            raise errors.BadRequestError(f"sm named a relative image path {loaded.image_path!r}", field="image_path")
        folder = self.settings.staging_dir
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
        target = folder / f"{self.dtype}-{loaded.release_counter}-{secrets.token_hex(8)}.image"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as dst:
                try:
                    with source.open("rb") as src:
                        shutil.copyfileobj(src, dst, software.CHUNK)
                except FileNotFoundError:
                    raise errors.NotFoundError(
                        f"the image sm names for {self.dtype}/{loaded.release_counter} does not exist: "
                        f"{loaded.image_path}",
                        field="image",
                    ) from None
            os.chmod(target, 0o400)
        except BaseException:
            with contextlib.suppress(OSError):
                target.unlink()
            raise
        return target

    def _algorithm1(self, staged: Path, loaded: sw.LoadResponse) -> software.VerifiedSoftware:
        a = self.anchors
        assert a.meta_key is not None
        assert a.trusted_root is not None
        meta = software.decrypt_meta(loaded.meta_enc, a.meta_key, self.dtype, loaded.release_counter)
        verified = software.verify_software(staged, meta, loaded.sig_sm, a.pk_sm, a.trusted_root, dtype=self.dtype)
        if verified.release_counter != loaded.release_counter:
            raise errors.UntrustedError(
                f"sm loaded release {loaded.release_counter}, the repository's metadata signs it as release "
                f"{verified.release_counter}",
                field="meta_repo",
            )
        return verified

    # --- the truststore ------------------------------------------------------------------------------
    async def _chain(self) -> _Chain:
        """Root and issuing CA certificates from km; the root must be the deployment's own."""
        reply = await self.km.chain()
        root = load_certificate(reply.root)
        if der(root) != der(self.anchors.root_ca):
            raise errors.UntrustedError(
                f"km's root CA ({root.subject.rfc4514_string()}) is not this deployment's root "
                f"({self.anchors.root_ca.subject.rfc4514_string()}); refusing its chain",
                field="chain",
            )
        now = self.clock.now()
        cas: list[x509.Certificate] = []
        for name in sorted(reply.chains):
            chain = reply.chains[name]
            if not chain:
                raise errors.BadRequestError(f"km's chain of {name} is empty", field="chain")
            ca = load_certificate(chain[0])
            verify_issued_by(ca, root, now=now, eku=None)
            if der(ca) not in {der(c) for c in cas}:
                cas.append(ca)
        return _Chain(root=root, cas=tuple(cas))

    # --- certificates (Scenario 2) ---------------------------------------------------------------------
    def _device_request(self, job: _Job) -> None:
        """What the device hands over: a CSR made on it (Fig. 4), else its public key, from which
        pm builds CRMF with raVerified (Fig. 5). Runs in a worker thread."""
        t0 = time.perf_counter()
        try:
            ref = job.device.ref
            csr = self.flasher.device_csr(ref)
            if csr is not None:
                req = parse_csr(csr)
                job.csr, job.public_key, job.request = csr, req.public_key, "csr"
            else:
                pub = self.flasher.device_public_key(ref)
                subject = device_subject(job.device_id, self.settings.organization, self.dtype)
                job.crmf = crmf.build_ra_verified(0, subject, pub)
                job.public_key, job.request = pub, "crmf"
        finally:
            job.timings["device_requests"] += time.perf_counter() - t0

    def _check_issued(self, job: _Job, profile: str, issued: kmsg.IssuedCertificate, chain: _Chain) -> x509.Certificate:
        """Before flashing it: the certificate km sent names the device, certifies the key the
        device handed over, and chains to the deployment's root."""
        cert = load_certificate(issued.certificate)
        if device_id_of(cert) != job.device_id:
            raise errors.UntrustedError(
                f"km's {profile} certificate names device {device_id_of(cert)!r}, not {job.device_id}",
                device_id=job.device_id,
            )
        assert job.public_key is not None
        if _spki(cert.public_key()) != _spki(job.public_key):
            raise errors.UntrustedError(
                f"km's {profile} certificate does not certify the key device {job.device_id} handed over",
                device_id=job.device_id,
            )
        self._path_validate(cert, chain.root, list(chain.cas))
        return cert

    def _path_validate(
        self, cert: x509.Certificate, root: x509.Certificate, intermediates: list[x509.Certificate]
    ) -> None:
        """RFC 5280 path validation (cryptography's verifier) from ``cert`` to ``root``. A
        certificate km has just issued may start a moment after pm's clock (km runs elsewhere):
        validity is checked at the later of now and its notBefore."""
        at = max(self.clock.now(), cert.not_valid_before_utc)
        verifier = verification.PolicyBuilder().store(verification.Store([root])).time(at).build_client_verifier()
        try:
            verifier.verify(cert, intermediates)
        except verification.VerificationError as exc:
            raise errors.UntrustedError(
                f"certificate {cert.subject.rfc4514_string()} does not chain to {root.subject.rfc4514_string()}: {exc}"
            ) from exc

    async def _certificates(self, chunk: Sequence[_Job], chain: _Chain | None, timings: dict[str, float]) -> None:
        need = [j for j in chunk if j.ok and j.wants_certificates()]
        if not need:
            return
        assert chain is not None
        first_step = {j.device_id: next(st for st in j.todo if st.startswith(CERTIFICATE_STEP_PREFIX)) for j in need}

        async def ask(job: _Job) -> None:
            try:
                await self._run(self._device_request, job)
            except Exception as exc:
                log.warning("pm-%s: device %s handed over no request: %s", self.dtype, job.device_id, exc)
                job.fail(first_step[job.device_id], exc)

        await asyncio.gather(*(ask(j) for j in need))
        for profile in self.settings.profiles:
            step = certificate_step(profile)
            asking = [j for j in need if j.ok and step in j.todo]
            for part in _chunks(asking, kmsg.MAX_BATCH):
                items = [kmsg.IssueItem(device_id=j.device_id, profile=profile, csr=j.csr, crmf=j.crmf) for j in part]
                t0 = time.perf_counter()
                try:
                    results = await self.km.issue_batch(items)
                except errors.IotdlmError as exc:
                    log.error("pm-%s: km refused the %s batch of %d: %s", self.dtype, profile, len(items), exc)
                    for j in part:
                        j.fail(step, exc)
                    continue
                finally:
                    timings["km"] += time.perf_counter() - t0
                by_id = {r.device_id: r for r in results}
                for j in part:
                    r = by_id.get(j.device_id)
                    if r is None:
                        j.fail_with(step, errors.InternalError.code, f"km's answer has no result for {j.device_id}")
                    elif r.error is not None:
                        j.fail_with(step, r.error.code, f"km refused the {profile} certificate: {r.error.message}")
                    elif r.certificate is None:
                        j.fail_with(step, errors.InternalError.code, f"km sent no {profile} certificate")
                    else:
                        try:
                            j.issued[profile] = self._check_issued(j, profile, r.certificate, chain)
                        except errors.IotdlmError as exc:
                            j.fail(step, exc)

    # --- flashing and verifying ----------------------------------------------------------------------
    def _config(self, job: _Job) -> dict[str, Any]:
        config: dict[str, Any] = {
            "device_id": job.device_id,
            "dtype": self.dtype,
            "enroll_uri": self.settings.enroll_uri,
            "provisioned_by": f"pm-{self.dtype}",
        }
        if self.settings.update_uri is not None:
            config["update_uri"] = self.settings.update_uri
        return config

    def _work(self, job: _Job, software: _Software | None, chain: _Chain | None) -> None:
        """Flash and verify one device, step by step, in a worker thread; stops at the first failure."""
        ref = job.device.ref
        for step in job.todo:
            if not job.ok:
                return
            t0 = time.perf_counter()
            phase = "flash_other"
            try:
                if step == STEP_SOFTWARE:
                    phase = "flash_software"
                    assert software is not None
                    self.flasher.flash_image(ref, software.path, software.info)
                    job.release_counter, job.image_sha256 = software.release_counter, software.sha256
                elif step == STEP_TRUSTSTORE:
                    assert chain is not None
                    self.flasher.flash_truststore(ref, chain.truststore)
                elif step == STEP_CONFIG:
                    self.flasher.flash_config(ref, self._config(job))
                elif step.startswith(CERTIFICATE_STEP_PREFIX):
                    profile = step[len(CERTIFICATE_STEP_PREFIX) :]
                    cert = job.issued[profile]
                    self.flasher.flash_certificate(ref, profile, cert)
                    job.certificates[profile] = rec.serial_to_hex(cert.serial_number)
                elif step == STEP_VERIFY:
                    phase = "verify"
                    self._verify(job, chain)
                else:  # pragma: no cover - the plan only holds known steps
                    raise RuntimeError(f"unknown step {step!r}")
            except Exception as exc:
                log.warning("pm-%s: device %s failed at %s: %s", self.dtype, job.device_id, step, exc)
                job.fail(step, exc)
                return
            finally:
                job.timings[phase] += time.perf_counter() - t0
            job.done.append(step)

    def _verify(self, job: _Job, chain: _Chain | None) -> None:
        """Read back from the device: truststore, certificates, key, image hash."""
        ref = job.device.ref
        root = self.anchors.root_ca
        truststore = self.flasher.read_truststore(ref)
        held = {der(c) for c in truststore}
        if chain is not None and held != {der(c) for c in chain.truststore}:
            raise errors.UntrustedError(
                "the truststore read back from the device is not the one flashed", field="truststore"
            )
        if der(root) not in held:
            raise errors.UntrustedError(
                "the device's truststore does not hold the deployment's root CA", field="truststore"
            )
        intermediates = [c for c in truststore if not _is_self_signed(c)]
        device_key = _spki(self.flasher.device_public_key(ref))
        for profile in self.settings.profiles:
            serial = job.certificates.get(profile)
            cert = self.flasher.read_certificate(ref, profile)
            if cert is None or serial is None or rec.serial_to_hex(cert.serial_number) != serial:
                raise errors.UntrustedError(
                    f"the {profile} certificate read back from the device is not the one flashed", field=profile
                )
            self._path_validate(cert, root, intermediates)  # through the truststore on the device
            if _spki(cert.public_key()) != device_key:
                raise errors.UntrustedError(
                    f"the {profile} certificate does not certify the key the device holds", field=profile
                )
        got = self.flasher.read_image_sha256(ref)
        if job.image_sha256 is None or got != job.image_sha256:
            raise errors.BadSignatureError(
                f"the image read back from the device has SHA-256 {got}, the verified software has {job.image_sha256}",
                field="image",
            )

    async def _flash(
        self,
        chunk: Sequence[_Job],
        software: _Software | None,
        chain: _Chain | None,
        timings: dict[str, float],
        total: int,
        done: int,
        progress: ProgressCallback | None,
    ) -> list[m.DeviceResult]:
        out: list[m.DeviceResult] = []

        def finished(job: _Job) -> None:
            nonlocal done
            out.append(self._result(job))
            done += 1
            if progress is not None:
                progress(Progress(total=total, done=done, phase="flashing", device=out[-1]))

        async def work(job: _Job) -> _Job:
            await self._run(self._work, job, software, chain)
            return job

        for job in chunk:
            if not job.ok:  # failed before anything was flashed (no certificate from km)
                finished(job)
        for next_done in asyncio.as_completed([work(j) for j in chunk if j.ok]):
            finished(await next_done)
        return out

    # --- records -------------------------------------------------------------------------------------
    def _status(self, job: _Job) -> str:
        if not job.ok:
            return rec.PROVISIONING_FAILED
        if all(st in job.done for st in self.settings.steps):
            return rec.PROVISIONING_COMPLETE
        return rec.PROVISIONING_IN_PROGRESS

    def _record(self, job: _Job, now: dt.datetime) -> ProvisioningRecord:
        status = self._status(job)
        message = job.message
        if status == rec.PROVISIONING_COMPLETE and job.forced_over:
            old = ", ".join(f"{p} {sn}" for p, sn in sorted(job.forced_over.items()))
            message = (
                f"provisioned again (forced); the certificates of the earlier provisioning ({old}) stay valid "
                "at km until revoked (`iotdlm ca revoke`)"
            )
        return ProvisioningRecord(
            device_id=job.device_id,
            dtype=self.dtype,
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

    async def _save(self, chunk: Sequence[_Job], *, final: bool, timings: dict[str, float]) -> None:
        """One store transaction for a chunk: marked in-progress before, the outcome after."""
        now = self.clock.now()
        records = []
        for job in chunk:
            r = self._record(job, now)
            if not final and r.status == rec.PROVISIONING_COMPLETE:  # nothing to do in this run
                continue
            records.append(r)
        t0 = time.perf_counter()
        await self._run(self.store.save_provisioning, records)
        timings["store"] += time.perf_counter() - t0

    def _result(self, job: _Job) -> m.DeviceResult:
        status = self._status(job)
        return m.DeviceResult(
            device_id=job.device_id,
            ref=job.device.ref,
            status={
                rec.PROVISIONING_COMPLETE: m.COMPLETE,
                rec.PROVISIONING_FAILED: m.FAILED,
                rec.PROVISIONING_IN_PROGRESS: m.IN_PROGRESS,
            }[status],
            steps_done=list(job.done),
            steps_pending=[st for st in self.settings.steps if st not in job.done] if status != "complete" else [],
            failed_step=job.failed_step,
            code=job.code,
            message=job.message,
            certificates=dict(sorted(job.certificates.items())),
            request=job.request,
        )

    # --- status --------------------------------------------------------------------------------------
    async def status(self) -> m.StatusReply:
        alarm = await self._run(read_alarm, self.store, self.dtype)
        if self._unrecorded_alarm is not None:
            alarm = self._unrecorded_alarm[0]
        counts = await self._run(lambda: self.store.count_provisioning(dtype=self.dtype))
        return m.StatusReply(
            dtype=self.dtype,
            halted=alarm is not None and alarm.active,
            busy=self.busy,
            records=counts,
            alarm=alarm,
            mode=self.guard.mode if self.guard is not None else None,
        )
