"""The supervisor: the embedded NATS server, then exactly the services Table 1 turns on for a mode.

Each service is its own OS process (the command comes from a :data:`~iotdlm.modes.table.CommandTable`),
its output appended to ``DIR/logs/<service>.log``. A service that exits on its own is restarted
after an exponential backoff; after ``give_up_after`` quick crashes in a row the supervisor gives
up on it (logged, shown by ``iotdlm status``; ``iotdlm mode set`` to the same mode re-arms it).

The current mode lives in the JetStream key-value bucket ``iotdlm_mode`` (key ``mode``, JSON
``{"mode", "since", "by"}``), which every service reads (:class:`~iotdlm.modes.guard.ModeGuard`),
and in ``DIR/mode.json``, so ``iotdlm up`` without ``--mode`` resumes it. A switch
(``iotdlm.v1.modes.set``, admin only) is audited first -- no audit record, no switch -- then
drains and stops, in reverse start order, what turns off (SIGTERM, wait, SIGKILL), writes the new
mode, and starts what turns on. Stopping the supervisor stops everything in reverse order, NATS
last, and removes the mode from the bucket (a service left running by hand then finds no mode and
refuses, as :class:`ModeGuard` denies by default).

Child processes -- NATS included -- get a process group of their own (a Ctrl-C in the terminal
reaches only the supervisor, which stops them in order, NATS last) and, on Linux, SIGTERM when the
supervisor dies (no orphans). A NATS server left by a supervisor that died anyway (no such signal
elsewhere) is stopped by the next ``iotdlm up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import Bus, KeyValue, Message, Subscription
from iotdlm.clock import Clock, SystemClock
from iotdlm.deployment import PASSPHRASE_ENV, Deployment
from iotdlm.files import atomic_write
from iotdlm.modes.guard import MODE_ALARM, AlarmLimiter
from iotdlm.modes.signed import ModeVerifier, seal_record
from iotdlm.modes.table import (
    CONSOLE,
    DEFAULT_COMMANDS,
    START_ORDER,
    CommandTable,
    Mode,
    ServiceSpec,
    check_commands,
    chosen_services,
    modules_on,
    parse_mode,
    render_command,
    services,
)
from iotdlm.observe.gather import MetricsListener, Target, start_listener
from iotdlm.store import AuditEntry
from iotdlm.supervisor import host_status
from iotdlm.supervisor.preflight import LOCK_FILE, NATS_PID_FILE
from iotdlm.supervisor.processes import (
    NatsProcess,
    RestartPolicy,
    ServiceProcess,
    SupervisorSettings,
    off_health,
    reap_stale_nats,
)
from iotdlm.supervisor.storage import ModesStore
from iotdlm.wire import audit as audit_fmt
from iotdlm.wire import modes as m
from iotdlm.wire.envelope import Sealer

log = logging.getLogger(__name__)

MODE_FILE = "mode.json"
#: the console is given up after this many quick exits in a row (a taken port does not free itself),
#: counting an exit within CONSOLE_QUICK seconds of its start as quick
CONSOLE_TRIES = 3
CONSOLE_QUICK = 60.0
_BY_MAX = 128


# --- persistence ----------------------------------------------------------------------------------


def load_saved_mode(root: Path) -> m.SavedMode | None:
    """The last mode of the deployment at ``root`` (``DIR/mode.json``), if any."""
    path = root / MODE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    saved = m.decode(data, m.SavedMode)
    parse_mode(saved.mode)
    return saved


def save_mode(root: Path, saved: m.SavedMode) -> None:
    """Write ``DIR/mode.json`` atomically (a crash leaves the old or the new file, never half)."""
    atomic_write(root / MODE_FILE, m.encode(saved), mode=0o644)


def _clean_by(by: str) -> str:
    text = "".join(ch for ch in by if ch.isprintable()).strip()[:_BY_MAX]
    return text or "unknown"


# --- the supervisor -----------------------------------------------------------------------------


class Supervisor:
    """Runs a deployment's NATS server and the services of its current mode; switches modes.

    ``commands`` (default :data:`~iotdlm.modes.table.DEFAULT_COMMANDS`) says how each module is
    started; ``embedded_nats`` (default: when the deployment names no external NATS ``url``)
    whether the supervisor runs the NATS server itself; ``only`` (``iotdlm up --services``) the
    modules this host runs of each mode -- one host of several sharing a NATS cluster (ADR 0027):
    it needs an external NATS, leaves the mode in the bucket when it stops (the other hosts run
    on) and answers ``mode set`` (each host switches its own part) but not ``status`` or ``down``.
    """

    def __init__(
        self,
        dep: Deployment,
        *,
        commands: CommandTable = DEFAULT_COMMANDS,
        settings: SupervisorSettings | None = None,
        clock: Clock | None = None,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        embedded_nats: bool | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        only: frozenset[str] | None = None,
    ) -> None:
        check_commands(commands)
        self._only = only
        self.dep = dep
        self._commands = commands
        self._settings = settings or SupervisorSettings()
        self._clock = clock or SystemClock()
        self._python = python
        base_env = dict(os.environ if env is None else env)
        base_env.setdefault("PYTHONUNBUFFERED", "1")
        self._env = base_env
        self._embedded = dep.config.nats.url is None if embedded_nats is None else embedded_nats
        self._monotonic = monotonic
        #: a module (or a stolen login) flooding mode alarms does not flood the audit log
        self._alarms = AlarmLimiter(monotonic=monotonic)
        self._nats: NatsProcess | None = None
        self._bus: Bus | None = None
        self._kv: KeyValue | None = None
        self._sealer: Sealer | None = None
        self._verifier: ModeVerifier | None = None
        self._store: ModesStore | None = None
        self._lock_fd: int | None = None
        self._services: dict[str, ServiceProcess] = {}
        self._current: m.SavedMode | None = None
        self._switching: str | None = None
        self._subs: list[Subscription] = []
        self._monitor: asyncio.Task[None] | None = None
        self._switch_lock = asyncio.Lock()
        self._stopping = False
        self._started = False
        #: set when an operator asks the supervisor to stop (``iotdlm down``); ``iotdlm up`` waits on it
        self.stop_requested = asyncio.Event()
        self._metrics: MetricsListener | None = None  # the /metrics of ADR 0018
        self._console: ServiceProcess | None = None  # the operator console of ADR 0030, in every mode
        all_specs = self._plan(START_ORDER)
        self._order = {spec.name: i for i, spec in enumerate(all_specs)}

    # --- reading ----------------------------------------------------------------------------
    @property
    def mode(self) -> Mode | None:
        return Mode(self._current.mode) if self._current is not None else None

    @property
    def nats_url(self) -> str:
        return self._nats.url if self._nats is not None else self.dep.nats_url

    def services(self) -> dict[str, ServiceProcess]:
        """The services the current mode turned on, by name (a copy)."""
        return dict(self._services)

    def _targets(self) -> list[Target]:
        return [Target(r.name, r.module, r.pid, r.restarts) for r in self.status().services]

    def status(self) -> m.StatusReply:
        logs = self.dep.root / "logs"
        rows = [
            svc.health() if (svc := self._services.get(spec.name)) is not None else off_health(spec, logs)
            for spec in self._plan(START_ORDER)
        ]
        cur = self._current
        return m.StatusReply(
            mode=cur.mode if cur else None,
            since=cur.since if cur else None,
            by=cur.by if cur else None,
            with_sm=cur.with_sm if cur else False,
            supervisor_pid=os.getpid(),
            nats_url=self.nats_url,
            switching=self._switching,
            services=rows,
            console=self._console.health() if self._console is not None else None,
            console_url=self.dep.config.console.url if self._console is not None else None,
        )

    # --- life cycle ---------------------------------------------------------------------------
    async def start(self, mode: Mode | None = None, *, with_sm: bool | None = None, by: str = "modes") -> None:
        """Start NATS, then the services of ``mode`` (default: the last mode, from ``DIR/mode.json``).

        Raises ``BadRequestError`` when there is no mode to resume, ``ConflictError`` when another
        supervisor runs for this deployment. On failure everything started is stopped again.
        """
        if self._started:
            raise RuntimeError("the supervisor is already started")
        self._started = True
        saved = load_saved_mode(self.dep.root)
        if mode is None:
            if saved is None:
                raise errors.BadRequestError(
                    f"no mode to resume in {self.dep.root}: give one the first time, e.g. "
                    f"`iotdlm up --data {self.dep.root} --mode provisioning-certificate`",
                    field="mode",
                )
            mode = parse_mode(saved.mode)
        if with_sm is None:
            with_sm = saved.with_sm if saved is not None else False
        try:
            self._take_lock()
            self._check_identity()
            ident = self.dep.identity(subjects.SUPERVISOR)
            self._sealer = Sealer(ident.key, ident.certificate)
            self._verifier = ModeVerifier.for_deployment(self.dep, self._clock)
            if self._embedded and self._only is not None:
                raise errors.BadRequestError(
                    "--services runs part of a deployment that other hosts share: set [nats] url in "
                    f"{self.dep.root / 'iotdlm.toml'} to the NATS cluster's URLs",
                    field="nats.url",
                )
            if self._embedded:
                await self._start_nats()
            self._bus = await self._connect()
            self._kv = await self._bus.key_value(subjects.MODE_BUCKET, create=True)
            # the audit log's append-only anchor: km writes its signed tree heads there (ADR 0005)
            try:
                await self._bus.append_only_stream(subjects.AUDIT_HEADS_STREAM, subjects.AUDIT_TREE_HEAD, create=True)
            except errors.ConflictError as exc:  # loud, but the deployment still runs: km keeps appending
                log.error("the audit log's anchor stream: %s", exc.message)
            self._store = await asyncio.to_thread(self._open_store)
            async with self._switch_lock:
                await self._apply(mode, with_sm, by=_clean_by(by), actor=subjects.SUPERVISOR, reason="up")
            self._subs.append(await self._bus.serve(subjects.MODES_SET, self._on_set))
            if self._only is None:  # one host of several: `status` and `down` are for one supervisor
                self._subs.append(await self._bus.serve(subjects.MODES_STATUS, self._on_status))
                self._subs.append(await self._bus.serve(subjects.MODES_STOP, self._on_stop))
                self._subs.append(await self._bus.serve(subjects.MODES_RESTART, self._on_restart))
            self._subs.append(await self._bus.subscribe(subjects.events("*", MODE_ALARM), self._on_mode_alarm))
            self._subs.append(
                await self._bus.subscribe(subjects.events("*", subjects.SIGNER_ALARM), self._on_signer_alarm)
            )
            if self._nats is not None:
                self._monitor = asyncio.get_running_loop().create_task(self._watch_nats(), name="modes-nats")
            elif self._only is not None:  # what this host runs, for `status` and `down` here (host_status)
                watch = host_status.keep_written(self.dep.root, sorted(self._only), self.checked_status)
                self._monitor = asyncio.get_running_loop().create_task(watch, name="modes-host-status")
            self._metrics = await start_listener(self._bus, self._targets, port=self.dep.config.metrics_port)
            self._console = self._spawn_console()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every service in reverse order, then NATS. Safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        for sub in self._subs:
            with contextlib.suppress(errors.IotdlmError):
                await sub.unsubscribe()
        self._subs.clear()
        if self._console is not None:
            await self._console.stop()
        if self._metrics is not None:
            await self._metrics.stop()
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        async with self._switch_lock:
            for name in sorted(self._services, key=self._order.__getitem__, reverse=True):
                try:
                    await self._services.pop(name).stop()
                except Exception:
                    log.exception("%s: stopping it failed", name)
            if self._lock_fd is not None:  # ours (not the file of the supervisor whose lock we did not get)
                host_status.remove(self.dep.root)
            if self._current is not None:
                try:
                    await self._audit(
                        subjects.SUPERVISOR,
                        self._current.mode,
                        "off",
                        self._current.by,
                        self._current.with_sm,
                        stopped=[],
                        started=[],
                        reason="shutdown",
                    )
                except errors.IotdlmError as exc:
                    log.error("could not audit the shutdown: %s", exc)
            if self._kv is not None and self._only is None:
                try:  # no supervisor, no mode: a service left running refuses (ModeGuard)
                    await self._kv.delete(subjects.MODE_KEY)
                except errors.IotdlmError as exc:
                    log.warning("could not clear the mode in bucket %s: %s", subjects.MODE_BUCKET, exc)
            if self._bus is not None:
                with contextlib.suppress(errors.IotdlmError):
                    await self._bus.close()
            await self._stop_nats()
            if self._store is not None:
                with contextlib.suppress(Exception):
                    self._store.close()
            self._release_lock()

    # --- switching ------------------------------------------------------------------------------
    async def switch(self, mode: Mode, *, with_sm: bool | None = None, by: str, actor: str = "admin") -> m.SetReply:
        """Switch to ``mode`` (what ``iotdlm mode set`` asks for); see the module doc for the steps."""
        if self._stopping or self._bus is None:
            raise errors.UnavailableError("the supervisor is not running (or is shutting down)")
        async with self._switch_lock:
            if with_sm is None:
                with_sm = self._current.with_sm if self._current is not None else False
            return await self._apply(mode, with_sm, by=_clean_by(by), actor=actor, reason="mode set")

    async def restart(self, names: list[str], *, by: str, actor: str = "admin") -> m.SetReply:
        """Stop and start again the running services ``names`` in the mode in force (``iotdlm restart``,
        after `ca rotate` or a changed cm.toml); audited like a switch, with reason ``restart``."""
        if self._stopping or self._bus is None or self._current is None:
            raise errors.UnavailableError("the supervisor is not running (or is shutting down)")
        async with self._switch_lock:
            cur = self._current
            running = {n: self._services[n].spec.module for n in sorted(self._services, key=self._order.__getitem__)}
            chosen = chosen_services(running, names, cur.mode)
            return await self._apply(Mode(cur.mode), cur.with_sm, by=_clean_by(by), actor=actor, reason="restart",
                                     restart=chosen)  # fmt: skip

    def _plan(self, modules: tuple[str, ...]) -> list[ServiceSpec]:
        return services(
            [name for name in modules if self._only is None or name in self._only],
            dtypes=self.dep.config.dtypes,
            commands=self._commands,
            data=str(self.dep.root),
            python=self._python,
        )

    async def _apply(
        self, mode: Mode, with_sm: bool, *, by: str, actor: str, reason: str, restart: frozenset[str] = frozenset()
    ) -> m.SetReply:
        target = self._plan(modules_on(mode, with_sm=with_sm))
        names = [s.name for s in target]
        current = self._services
        stopping = sorted((n for n in current if n not in names), key=self._order.__getitem__, reverse=True)
        restarted = [n for n in names if n in current and (current[n].state == "failed" or n in restart)]
        starting = [n for n in names if n not in current]
        kept = [n for n in names if n in current and n not in restarted]
        from_mode = self._current.mode if self._current is not None else None
        since = m.timestamp(self._clock.now())
        if from_mode == mode.value and not (stopping or starting or restarted):
            assert self._current is not None
            if self._current.with_sm != with_sm:  # a preference for later (sm is not optional here)
                self._current = msgspec.structs.replace(self._current, with_sm=with_sm)
                await asyncio.to_thread(save_mode, self.dep.root, self._current)
            # the mode is in force here; re-assert it where services read it if that record is not ours
            problem = await self.record_problem()
            if problem is not None:
                await self._audit_alarm(
                    actor, "mode_record_repaired", {"mode": mode.value, "by": by, "problem": problem}
                )
                await self._publish(self._current)
                log.warning("the mode record did not verify (%s): %s signed and written again", problem, mode.value)
            return m.SetReply(
                from_mode=from_mode,
                to=mode.value,
                with_sm=with_sm,
                since=self._current.since,
                kept=kept,
                repaired=problem,
            )
        if not target:
            log.warning("mode %s turns on no service here (no dtype for pm?)", mode.value)
        # audit first: no record, no switch
        await self._audit(
            actor,
            from_mode or "off",
            mode.value,
            by,
            with_sm,
            stopped=stopping,
            started=starting + restarted,
            reason=reason,
        )
        self._switching = f"{from_mode or 'off'} -> {mode.value}"
        log.info(
            "mode %s -> %s (by %s): stopping %s, starting %s", from_mode or "off", mode.value, by, stopping, starting
        )
        try:
            for name in stopping + sorted(restarted, key=self._order.__getitem__, reverse=True):
                await self._services.pop(name).stop()
            if reason != "restart" or self._current is None:  # a restart leaves the mode's record as it is
                await self._publish(record := m.SavedMode(mode=mode.value, since=since, by=by, with_sm=with_sm))
                self._current = record
            for spec in target:
                if spec.name in starting or spec.name in restarted:
                    svc = ServiceProcess(
                        spec,
                        log_dir=self.dep.root / "logs",
                        env=self._env,
                        settings=self._settings,
                        clock=self._clock,
                        monotonic=self._monotonic,
                    )
                    self._services[spec.name] = svc
                    svc.start()
        finally:
            self._switching = None
        return m.SetReply(
            from_mode=from_mode,
            to=mode.value,
            with_sm=with_sm,
            since=self._current.since if self._current is not None else since,
            stopped=stopping,
            started=starting,
            kept=kept,
            restarted=restarted,
        )

    def _spawn_console(self) -> ServiceProcess | None:
        """Start the operator console (every mode) unless turned off or not in the command table."""
        if not self.dep.config.console.enabled or CONSOLE not in self._commands:
            return None
        values = {"python": self._python, "data": str(self.dep.root), "name": CONSOLE, "module": CONSOLE}
        spec = ServiceSpec(CONSOLE, CONSOLE, None, render_command(self._commands[CONSOLE], values))
        settings = dataclasses.replace(
            self._settings, give_up_after=CONSOLE_TRIES, quick_crash=max(self._settings.quick_crash, CONSOLE_QUICK)
        )
        hint = (f"the console stays off: if its port is taken, set [console] port in {self.dep.root / 'iotdlm.toml'}, "
                "then `iotdlm down` and `iotdlm up`")  # fmt: skip
        svc = ServiceProcess(spec, log_dir=self.dep.root / "logs", env=self._env, settings=settings,
                             clock=self._clock, monotonic=self._monotonic, give_up_hint=hint)  # fmt: skip
        svc.start()
        return svc

    async def _publish(self, record: m.SavedMode) -> None:
        """The new mode, where services read it (the bucket) and where ``up`` resumes it (mode.json)."""
        assert self._kv is not None
        assert self._sealer is not None
        mode_record = m.ModeRecord(mode=record.mode, since=record.since, by=record.by)
        value = seal_record(self._sealer, mode_record, now=self._clock.now())
        await self._kv.put(subjects.MODE_KEY, value)
        await asyncio.to_thread(save_mode, self.dep.root, record)

    async def _audit(
        self,
        actor: str,
        from_mode: str,
        to_mode: str,
        by: str,
        with_sm: bool,
        *,
        stopped: list[str],
        started: list[str],
        reason: str,
    ) -> None:
        store = self._store
        if store is None:
            raise errors.UnavailableError("the store is not open: cannot audit the mode switch")
        entry = AuditEntry(
            at=self._clock.now(),
            kind=audit_fmt.MODE_SWITCH,
            actor=actor,
            subject=None,
            data={
                "from": from_mode,
                "to": to_mode,
                "by": by,
                "with_sm": with_sm,
                "stopped": stopped,
                "started": started,
                "reason": reason,
            },
        )
        await asyncio.to_thread(store.append_audit, [entry])

    async def _audit_alarm(self, actor: str, check: str, data: dict[str, object]) -> None:
        store = self._store
        if store is None:
            raise errors.UnavailableError("the store is not open: cannot audit the alarm")
        entry = AuditEntry(
            at=self._clock.now(), kind=audit_fmt.ALARM, actor=actor, subject=None, data={"check": check, **data}
        )
        await asyncio.to_thread(store.append_audit, [entry])

    async def record_problem(self) -> str | None:
        """Why the mode record in the bucket is not the supervisor's current mode, or ``None``:
        it verifies (signed by the modes identity) and names the mode in force."""
        if self._kv is None or self._verifier is None:
            return "the supervisor is not running"
        try:
            entry = await self._kv.get(subjects.MODE_KEY)
        except errors.IotdlmError as exc:
            return f"it cannot be read: {exc.message}"
        if entry is None or not entry.value:
            return "there is none" if self._current is not None else None
        try:
            record = self._verifier.verify(entry.value)
        except errors.RejectedError as exc:
            return exc.message
        cur = self._current
        if cur is None or (record.mode, record.since, record.by) != (cur.mode, cur.since, cur.by):
            return f"it names mode {record.mode} since {record.since}, not the mode in force"
        return None

    # --- bus handlers ---------------------------------------------------------------------------
    async def _on_mode_alarm(self, msg: Message) -> None:
        """A service refused the mode record: into the audit log (the alarm names the publishing
        module from the subject, which the NATS permissions tie to its login, not from the body)."""
        module = msg.subject.split(".")[-2]
        try:
            alarm = m.decode(msg.data, m.ModeAlarm)
            data: dict[str, object] = {"module": module, "revision": alarm.revision, "reason": alarm.reason[:500]}
            if alarm.suppressed:
                data["suppressed"] = alarm.suppressed
        except errors.RejectedError as exc:
            data = {"module": module, "reason": f"malformed alarm: {exc.message}"[:500]}
        held = self._alarms.admit(f"{module}: {data['reason']}")
        if held is None:
            log.debug("mode alarm of %s held back (rate limit): %s", module, data["reason"])
            return
        if held:
            data["held_back_by_supervisor"] = held
        log.error("%s refused the mode record: %s", module, data.get("reason"))
        try:
            await self._audit_alarm(module, "mode_record_refused", data)
        except errors.IotdlmError as exc:
            log.error("could not audit the mode alarm of %s: %s", module, exc)

    async def _on_signer_alarm(self, msg: Message) -> None:
        """A module refused a message whose signer (km, the supervisor) has a revoked certificate:
        into the audit log, rate-limited like the mode alarms."""
        module = msg.subject.split(".")[-2]
        try:
            body = msgspec.json.decode(msg.data, type=dict[str, object])
            data: dict[str, object] = {"module": module, "signer": str(body.get("signer"))[:40]}
            data["reason"] = str(body.get("reason"))[:500]
        except msgspec.DecodeError:
            data = {"module": module, "reason": "malformed signer alarm"}
        if self._alarms.admit(f"{module}: {data['reason']}") is None:
            return
        log.error("%s refused a message of a revoked signer: %s", module, data["reason"])
        try:
            await self._audit_alarm(module, "revoked_signer", data)
        except errors.IotdlmError as exc:
            log.error("could not audit the signer alarm of %s: %s", module, exc)

    async def _on_set(self, msg: Message) -> bytes:
        req = m.decode(msg.data, m.SetRequest)
        mode = parse_mode(req.mode)
        reply = await self.switch(mode, with_sm=req.with_sm, by=req.by, actor="admin")
        return m.encode(reply)

    async def _on_restart(self, msg: Message) -> bytes:
        req = m.decode(msg.data, m.RestartRequest)
        return m.encode(await self.restart(req.services, by=req.by))

    async def _on_status(self, msg: Message) -> bytes:
        return m.encode(await self.checked_status())

    async def checked_status(self) -> m.StatusReply:
        """:meth:`status` with the mode record in the bucket checked (``record``)."""
        problem = await self.record_problem()
        return msgspec.structs.replace(self.status(), record=problem or "verified")

    async def _on_stop(self, msg: Message) -> bytes:
        """``iotdlm down``: answer with what stops, then let whoever runs the supervisor stop it."""
        req = m.decode(msg.data, m.StopRequest)
        log.warning("asked to stop by %s", _clean_by(req.by))
        order = sorted(self._services, key=self._order.__getitem__, reverse=True)
        self.stop_requested.set()
        return m.encode(m.StopReply(supervisor_pid=os.getpid(), stopping=order, embedded_nats=self._nats is not None))

    # --- plumbing -------------------------------------------------------------------------------
    def _take_lock(self) -> None:
        path = self.dep.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            other = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise errors.ConflictError(
                    f"another supervisor (pid {other}) runs for {self.dep.root}; use "
                    f"`iotdlm mode set --data {self.dep.root} MODE` / `iotdlm status --data {self.dep.root}` instead"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    def _check_identity(self) -> None:
        if subjects.SUPERVISOR not in self.dep.identity_names():
            raise errors.NotFoundError(
                f"the deployment in {self.dep.root} has no identity for the supervisor "
                f"(modules/{subjects.SUPERVISOR}): it was created before modes existed. "
                f"`iotdlm up --data {self.dep.root}` creates it when the CA passphrase is available (${PASSPHRASE_ENV})"
            )

    def _open_store(self) -> ModesStore:
        from iotdlm.runtime import open_store

        return open_store(self.dep)

    async def _start_nats(self) -> None:
        from iotdlm.runtime import nats_server

        config = nats_server(self.dep)
        if config.config.jetstream_dir is None:
            raise RuntimeError("the embedded NATS server needs JetStream for the mode bucket")
        await asyncio.to_thread(reap_stale_nats, self.dep.root / NATS_PID_FILE, config.config_path,
                                stop_timeout=self._settings.stop_timeout, monotonic=self._monotonic)  # fmt: skip
        server = NatsProcess(config)
        try:
            await server.start()
        except RuntimeError as exc:
            raise errors.UnavailableError(f"cannot start the embedded NATS server: {exc}") from exc
        self._nats = server
        (self.dep.root / NATS_PID_FILE).write_text(f"{server.pid}\n")
        log.info("NATS listening on %s (pid %s)", server.url, server.pid)

    async def _stop_nats(self) -> None:
        if self._nats is not None:
            await self._nats.stop()
            with contextlib.suppress(OSError):
                (self.dep.root / NATS_PID_FILE).unlink()

    async def _connect(self) -> Bus:
        from iotdlm.runtime import connect_identity

        bus, _ident = await connect_identity(self.dep, subjects.SUPERVISOR)
        return bus

    async def _watch_nats(self) -> None:
        """Restart the embedded NATS server if it dies (with backoff); services reconnect by themselves."""
        server = self._nats
        assert server is not None
        policy = RestartPolicy(self._settings)
        began = self._monotonic()
        while True:
            await asyncio.sleep(self._settings.nats_check_every)
            if server.running:
                continue
            delay = policy.after_exit(self._monotonic() - began) or self._settings.backoff_max
            log.error("the NATS server died; restarting it in %.2f s (its log: %s)", delay, server.log_path)
            await asyncio.sleep(delay)
            began = self._monotonic()
            try:
                await server.start()
                (self.dep.root / NATS_PID_FILE).write_text(f"{server.pid}\n")
                log.warning("NATS restarted (pid %s)", server.pid)
            except (RuntimeError, OSError) as exc:
                log.error("cannot restart NATS: %s", exc)
