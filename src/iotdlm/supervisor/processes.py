"""The supervisor's process table: one service process (start, watch, restart with an exponential
backoff, give up after quick crashes in a row, stop with SIGTERM, wait, SIGKILL) and the embedded
NATS server, supervised alike. Every child gets a process group of its own and, on Linux, SIGTERM
when the supervisor dies. :mod:`iotdlm.supervisor.supervisor` decides which run."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import os
import re
import shlex
import signal
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from iotdlm.bus.server import (
    EmbeddedNatsServer,
    find_nats_server,
    foreign_server_message,
    greeting_name,
    greeting_tls,
    instance_name,
    render_config,
)
from iotdlm.clock import Clock
from iotdlm.modes.table import ServiceSpec
from iotdlm.wire import modes as m

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisorSettings:
    #: how long a service may drain after SIGTERM before it is killed (above the bus's own drain
    #: timeout, 30 s, so a draining service finishes before it is killed)
    stop_timeout: float = 45.0
    #: first restart delay; doubles after each quick crash, up to ``backoff_max``
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: a process that ran less than this long crashed "quickly"
    quick_crash: float = 10.0
    #: quick crashes in a row after which the supervisor gives up on a service
    give_up_after: int = 5
    #: how often the embedded NATS server is checked (and restarted if it died)
    nats_check_every: float = 1.0

    def __post_init__(self) -> None:
        if min(self.stop_timeout, self.backoff_initial, self.backoff_max, self.quick_crash, self.nats_check_every) <= 0:
            raise ValueError("supervisor timings must be positive")
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        if self.give_up_after < 1:
            raise ValueError("give_up_after must be at least 1")


class RestartPolicy:
    """Exponential backoff with a cap, and a give-up after too many quick crashes in a row. Pure."""

    def __init__(self, settings: SupervisorSettings) -> None:
        self._s = settings
        self._next = settings.backoff_initial
        self.quick_crashes = 0

    def after_exit(self, ran_for: float) -> float | None:
        """The delay before the next start, or ``None`` to give up."""
        if ran_for >= self._s.quick_crash:  # it ran well for a while: start afresh
            self.quick_crashes = 0
            self._next = self._s.backoff_initial
        else:
            self.quick_crashes += 1
            if self.quick_crashes >= self._s.give_up_after:
                return None
        delay = self._next
        self._next = min(self._next * 2, self._s.backoff_max)
        return delay


# --- what a service said last -----------------------------------------------------------------------

#: the supervisor's own lines in a service's log (``--- <time> iotdlm modes: ...``)
_NOTE = "--- "
#: a line that names a failure: the CLI's one-line errors (``refused (code): ...``, ``error (code):
#: ...``), a log record at ERROR or CRITICAL, the last line of a traceback (``SomeError: ...``)
_ERROR_LINE = re.compile(
    r"^(refused|error|warning) \(|\b(ERROR|CRITICAL)\b|^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*:|\berror:"
)
#: a log tail this long holds the last run's failure (a traceback included)
TAIL_BYTES = 16 * 1024
LAST_ERROR_MAX = 300


def last_error_line(text: str) -> str | None:
    """The line of a service's log that says why its last run ended: among the lines it wrote since
    the supervisor last started it, the last one naming a failure, else the last one; ``None`` when
    it wrote nothing. Pure; the text may be anything (a log tail cut mid-line, binary noise)."""
    lines = text.splitlines()
    start = 0
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(_NOTE) and " starting " in lines[i]:
            start = i + 1
            break
    own = [line.strip() for line in lines[start:] if line.strip() and not line.startswith(_NOTE)]
    own = ["".join(ch for ch in line if ch.isprintable()) for line in own]
    own = [line for line in own if line]
    if not own:
        return None
    errors_ = [line for line in own if _ERROR_LINE.search(line)]
    line = errors_[-1] if errors_ else own[-1]
    return line if len(line) <= LAST_ERROR_MAX else line[: LAST_ERROR_MAX - 3] + "..."


def read_last_error(path: Path) -> str | None:
    """:func:`last_error_line` of the end of the log at ``path`` (``None`` if it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - TAIL_BYTES))
            tail = f.read(TAIL_BYTES)
    except OSError:
        return None
    return last_error_line(tail.decode("utf-8", "replace"))


# --- one service process --------------------------------------------------------------------------


@functools.cache
def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the supervisor dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


def _open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "ab")


def reap_stale_nats(
    pid_file: Path, config_path: Path, *, stop_timeout: float, monotonic: Callable[[], float] = time.monotonic
) -> None:
    """Stop the NATS server a supervisor killed hard left behind (it holds the port): the pid in
    ``pid_file``, if that process runs ``config_path`` (else the pid was reused: left alone). SIGTERM,
    then SIGKILL after ``stop_timeout`` seconds."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return  # no pid file, or no such process (or no /proc: nothing we can check safely)
    if str(config_path).encode() not in cmdline:
        return  # the pid was reused by something else
    log.warning("stopping the NATS server (pid %d) a previous supervisor left behind", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = monotonic() + stop_timeout
    while monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def off_health(spec: ServiceSpec, log_dir: Path) -> m.ServiceHealth:
    """The status row of a service of the plan that is not running (its mode does not turn it on)."""
    return m.ServiceHealth(
        name=spec.name, module=spec.module, dtype=spec.dtype, state="off", pid=None, running=False, restarts=0,
        uptime=None, last_exit=None, log=str(log_dir / f"{spec.name}.log"),
    )  # fmt: skip


class ServiceProcess:
    """Runs one service: start, watch, restart with backoff, stop (SIGTERM, wait, SIGKILL)."""

    def __init__(
        self,
        spec: ServiceSpec,
        *,
        log_dir: Path,
        env: Mapping[str, str],
        settings: SupervisorSettings,
        clock: Clock,
        monotonic: Callable[[], float] = time.monotonic,
        give_up_hint: str | None = None,
    ) -> None:
        """``give_up_hint``: what the operator does once the supervisor gave up on it (default: a
        ``mode set`` re-arms it)."""
        self.spec = spec
        self.give_up_hint = give_up_hint
        self.log_path = log_dir / f"{spec.name}.log"
        self.state = "starting"
        self.restarts = 0
        self.last_exit: int | None = None
        self.last_error: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._started_at: float | None = None
        self._env = dict(env)
        self._settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"service-{self.name}")

    async def stop(self) -> None:
        """Drain and stop the process (SIGTERM, wait up to ``stop_timeout``, SIGKILL); no restart."""
        self._stop.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        self.state = "off"

    def health(self) -> m.ServiceHealth:
        pid = self.pid
        uptime = None
        if pid is not None and self._started_at is not None:
            uptime = round(self._monotonic() - self._started_at, 3)
        return m.ServiceHealth(
            name=self.name,
            module=self.spec.module,
            dtype=self.spec.dtype,
            state=self.state,
            pid=pid,
            running=pid is not None,
            restarts=self.restarts,
            uptime=uptime,
            last_exit=self.last_exit,
            log=str(self.log_path),
            last_error=self.last_error if pid is None else None,
        )

    def _note(self, text: str) -> None:
        with contextlib.suppress(OSError), _open_log(self.log_path) as out:
            out.write(f"--- {m.timestamp(self._clock.now())} iotdlm modes: {text}\n".encode())

    async def _spawn(self) -> asyncio.subprocess.Process:
        self._note(f"starting {self.name}: {shlex.join(self.spec.argv)}")
        with _open_log(self.log_path) as out:
            return await asyncio.create_subprocess_exec(
                *self.spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env,
                process_group=0,
                preexec_fn=_die_with_parent(),
            )

    async def _run(self) -> None:
        policy = RestartPolicy(self._settings)
        try:
            while not self._stop.is_set():
                began = self._monotonic()
                code: int | None = None
                try:
                    proc = await self._spawn()
                except OSError as exc:
                    log.error("%s: cannot start %s: %s", self.name, self.spec.argv[0], exc)
                    self._note(f"cannot start: {exc}")
                    self.last_error = f"cannot start {self.spec.argv[0]}: {exc}"
                else:
                    self._proc = proc
                    self._started_at = began
                    self.state = "running"
                    log.info("%s: started, pid %d", self.name, proc.pid)
                    exited = asyncio.ensure_future(proc.wait())
                    stopping = asyncio.ensure_future(self._stop.wait())
                    await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    stopping.cancel()
                    if not exited.done():
                        exited.cancel()
                        await self._terminate(proc)
                        return
                    code = proc.returncode
                    self.last_error = await asyncio.to_thread(read_last_error, self.log_path)
                if self._stop.is_set():
                    return
                ran = self._monotonic() - began
                self.last_exit = code
                delay = policy.after_exit(ran)
                how = f"exited with status {code}" if code is not None else "could not start"
                if delay is None:
                    self.state = "failed"
                    hint = (
                        self.give_up_hint or f"`iotdlm mode set --data {self.log_path.parent.parent} MODE` re-arms it"
                    )
                    log.error(
                        "%s %s; gave up after %d quick crashes in a row: %s (see %s); %s",
                        self.name,
                        how,
                        policy.quick_crashes,
                        self.last_error or "it wrote no error",
                        self.log_path,
                        hint,
                    )
                    self._note(f"{how}; gave up after {policy.quick_crashes} quick crashes in a row")
                    return
                self.state = "backoff"
                log.warning("%s %s after %.1f s; restarting in %.2f s", self.name, how, ran, delay)
                self._note(f"{how} after {ran:.1f} s; restarting in {delay:.2f} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return
                self.restarts += 1
        finally:
            if self._stop.is_set():
                self.state = "off"

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        self.state = "stopping"
        if proc.returncode is None:
            log.info(
                "%s: SIGTERM to pid %d, waiting up to %g s for it to drain",
                self.name,
                proc.pid,
                self._settings.stop_timeout,
            )
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._settings.stop_timeout)
            except TimeoutError:
                log.warning(
                    "%s did not stop within %g s of SIGTERM; killing it", self.name, self._settings.stop_timeout
                )
                self._note(f"did not stop within {self._settings.stop_timeout:g} s of SIGTERM; SIGKILL")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its own group: helpers it started go too
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.last_exit = proc.returncode
        self._note(f"stopped (status {proc.returncode})")
        log.info("%s: stopped (status %s)", self.name, proc.returncode)


# --- the embedded NATS server, supervised like a service -----------------------------------------


class NatsProcess:
    """The deployment's embedded nats-server (configured by :func:`iotdlm.runtime.nats_server`),
    run with the same protections as the services: a process group of its own, so a Ctrl-C in the
    terminal does not take NATS down while the services still drain through it, and SIGTERM when
    the supervisor dies. (``EmbeddedNatsServer.start`` offers neither.)"""

    def __init__(self, server: EmbeddedNatsServer, *, stop_timeout: float = 10.0) -> None:
        self.server = server
        self._stop_timeout = stop_timeout
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    async def start(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Write the configuration, spawn the server, return once it greets clients on its port."""
        if self.running:
            raise RuntimeError("nats-server is already running")
        # a fresh name per start: the server on the port must greet with it before the supervisor
        # connects (with the modes user's password) -- another server there gets no credentials
        name = instance_name()
        cfg = self.server.config
        text = render_config(dataclasses.replace(cfg, server_name=name))
        if cfg.jetstream_dir is not None:
            cfg.jetstream_dir.mkdir(parents=True, exist_ok=True)
        path = self.server.config_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds passwords
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        with _open_log(self.log_path) as out:
            proc = await asyncio.create_subprocess_exec(
                find_nats_server(),
                "-c",
                str(path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                process_group=0,
                preexec_fn=_die_with_parent(),
            )
        self._proc = proc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        foreign = False
        while True:
            tls = greeting_tls(self.server.client_tls) if cfg.tls and cfg.tls_handshake_first else None
            greeting = await _greeting(cfg.host, cfg.port, tls)
            if greeting is not None and greeting_name(greeting) == name:
                return
            foreign = foreign or greeting is not None
            if proc.returncode is not None:
                self._proc = None
                if foreign:
                    raise RuntimeError(foreign_server_message(cfg.host, cfg.port, self.server.stderr_tail()))
                raise RuntimeError(
                    f"nats-server exited with status {proc.returncode} at start (config {path}); "
                    f"its output:\n{self.server.stderr_tail()}"
                )
            if loop.time() > deadline:
                await self.stop()
                raise RuntimeError(f"nats-server did not accept connections on port {cfg.port} within {timeout:g} s")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """SIGTERM, wait, SIGKILL. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._stop_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _greeting(host: str, port: int, tls: ssl.SSLContext | None) -> bytes | None:
    """The first line a server on (host, port) sends -- a NATS server greets every client with
    ``INFO {...}`` -- or ``None`` if nothing answers. Nothing is sent to it (with ``tls``, for a
    server that expects the TLS handshake first, nothing but the handshake)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls is not None else None), 0.5
        )
    except (OSError, TimeoutError):
        return None
    try:
        line = await asyncio.wait_for(reader.readline(), 0.5)
    except (OSError, TimeoutError, ValueError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return line or None
