"""What ``iotdlm up`` checks before it starts anything (issue 14): a service that cannot start
must not be found out by its crash loop, with the reason only in its log.

:func:`preflight` returns every problem it finds, each naming what is wrong and what to do:

- no other supervisor runs for the deployment (``DIR/modes.lock``);
- the data folders are folders and writable (the data folder, ``logs/``, ``nats/``, ``db/``);
- the CA passphrase (``$IOTDLM_CA_PASSPHRASE``, else the file) opens the CA keys -- whenever one
  is given, and always when km runs in the mode (km signs with them);
- the ports are free: embedded NATS, and cm's HTTPS, HTTP and egress ports (``DIR/cm.toml``); the
  operator console's (``[console]``, every mode) too, but taken it is a warning: the rest starts;
- the module settings the mode needs are valid: ``cm.toml``, sm's set-up, pm's flasher per dtype.

A module whose start command the operator replaced (``iotdlm up --commands``) is not checked: the
checks are about what iotdlm's own services need. The NATS port is checked whatever runs behind it.
A NATS server a supervisor killed hard left on the port is not a problem: ``up`` stops it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from iotdlm import errors
from iotdlm.deployment import PASSPHRASE_ENV, Deployment
from iotdlm.modes.table import CONSOLE, DEFAULT_COMMANDS, CommandTable, Mode, modules_on

#: held by the supervisor that runs the deployment (its pid inside)
LOCK_FILE = "modes.lock"
#: pid of the NATS server the supervisor started (a supervisor killed hard leaves it running)
NATS_PID_FILE = "nats/nats-server.pid"
#: cm's listeners when neither its flags nor ``DIR/cm.toml`` say otherwise (``iotdlm cm serve``)
CM_HTTPS_PORT = 8443
CM_HTTP_PORT = 8080
CM_EGRESS_PORT = 3128
CONSOLE_LABEL = "the operator console"


@dataclass(frozen=True)
class Problem:
    """One reason not to start: ``what`` is checked, ``message`` says what is wrong and what to do.
    ``unavailable``: something outside the configuration holds what we need (exit 3), else the
    configuration is wrong (exit 4). ``warning``: said, but ``up`` starts anyway -- the console's
    port taken keeps the console alone off (ADR 0030: a UI's port must not stop the CA and OCSP)."""

    what: str
    message: str
    unavailable: bool = False
    warning: bool = False


def lock_holder(root: Path) -> int | None:
    """The pid of the supervisor that runs for the deployment at ``root``, or ``None`` when none
    does (nobody holds ``DIR/modes.lock``). 0 when one does but its pid cannot be read."""
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None  # no supervisor ever ran here
    except OSError:
        return 0  # not ours to read (another user's supervisor?): asking it over NATS will tell
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# --- ports -------------------------------------------------------------------------------------------


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not listen on (host, port) now: another socket listens there. (An
    address that is not on this machine is not "in use": binding says so later, in its own words.)"""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            s.bind(address)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def port_holder(port: int) -> str | None:
    """Who listens on TCP ``port`` on this machine -- ``"nats-server (pid 123)"`` -- when Linux's
    /proc says and the process is ours to look at; ``None`` otherwise."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return f"{(proc / 'comm').read_text().strip()} (pid {proc.name})"
    return None


def port_in_use_message(port: int, what: str, choose: str) -> str:
    """``port 8443 (cm HTTPS) is in use by nginx (pid 12): stop it, or choose another port: ...``"""
    holder = port_holder(port)
    by = f"by {holder}" if holder else "by another program (`ss -ltnp` names it)"
    return f"port {port} ({what}) is in use {by}: stop it, or choose another port: {choose}"


def _stale_nats(root: Path) -> bool:
    """A NATS server a supervisor killed hard left behind runs on the port (``up`` stops it)."""
    try:
        pid = int((root / NATS_PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    return str(root / "nats" / "nats.conf").encode() in cmdline


def _cm_ports(dep: Deployment) -> tuple[str, list[tuple[str, int, str]]] | Problem:
    """cm's host and (label, port, where to change it), from ``DIR/cm.toml`` and cm's defaults."""
    from iotdlm.cm.config import CM_FILE, load_cm_file

    try:
        file = load_cm_file(dep.root)
    except errors.RejectedError as exc:
        return Problem(CM_FILE, f"{exc.message}: fix {dep.root / CM_FILE}")
    where = f"set it in {dep.root / CM_FILE}"
    ports = [("cm HTTPS", file.https_port or CM_HTTPS_PORT, f"https_port: {where}")]
    if file.http:
        ports.append(("cm HTTP", file.http_port or CM_HTTP_PORT, f"http_port: {where}"))
    if file.allow_origins:
        ports.append(("cm egress proxy", file.egress_port or CM_EGRESS_PORT, f"egress_port: {where}"))
    for name in (file.tls_cert, file.tls_key):
        if name is not None and not (dep.root / name).is_file():
            return Problem(
                CM_FILE, f"cm's TLS file {dep.root / name} does not exist: fix tls_cert or tls_key ({where})"
            )
    return file.host or "127.0.0.1", ports


def _check_ports(dep: Deployment, cm: bool, embedded_nats: bool, console: bool = False) -> list[Problem]:
    wanted: list[tuple[str, str, int, str]] = []
    if embedded_nats and not _stale_nats(dep.root):
        n = dep.config.nats
        wanted.append(("NATS", n.host, n.port, f"set [nats] port in {dep.root / 'iotdlm.toml'}"))
    if console:  # two deployments on one machine both default to 8444
        c = dep.config.console
        where = (f"set [console] port in {dep.root / 'iotdlm.toml'} (or enabled = false there); "
                 "everything but the console starts meanwhile")  # fmt: skip
        wanted.append((CONSOLE_LABEL, c.host, c.port, where))
    out: list[Problem] = []
    if cm:
        got = _cm_ports(dep)
        if isinstance(got, Problem):
            out.append(got)
        else:
            host, ports = got
            wanted += [(label, host, port, where) for label, port, where in ports]
    seen: dict[int, str] = {}
    for label, host, port, where in wanted:
        if port in seen:
            out.append(Problem(f"port {port}", f"{label} and {seen[port]} are both set to port {port}: {where}"))
            continue
        seen[port] = label
        if port_in_use(host, port):
            out.append(
                Problem(
                    f"port {port}", port_in_use_message(port, label, where), unavailable=True,
                    warning=label == CONSOLE_LABEL,
                )
            )  # fmt: skip
    return out


# --- folders, the passphrase, module settings ---------------------------------------------------------


def _check_folders(dep: Deployment) -> list[Problem]:
    root = dep.root
    folders = [root, root / "logs", root / "nats"]
    if dep.config.database_url is None:
        folders.append(root / "db")
    out: list[Problem] = []
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            out.append(Problem(str(folder), f"{folder} is not a folder: move it away (the services need the folder)"))
        elif folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
            fix = "`chown` it, or run `iotdlm up` as its owner"
            out.append(Problem(str(folder), f"{folder} is not writable by this user: {fix}"))
    return out


def _check_hsm(dep: Deployment, km_runs: bool) -> list[Problem]:
    """With the CA keys in an HSM: the token opens with the PIN and holds every CA key."""
    if not km_runs:
        return []
    try:
        dep.load_cas()
    except errors.IotdlmError as exc:
        return [Problem("CA keys in the HSM", f"km signs with the CA keys in the HSM and {exc.message}")]
    return []


def _check_passphrase(dep: Deployment, km_runs: bool) -> list[Problem]:
    if dep.config.hsm is not None:
        return _check_hsm(dep, km_runs)
    from_env = bool(os.environ.get(PASSPHRASE_ENV))
    try:
        passphrase = dep.passphrase()
    except errors.NotFoundError as exc:
        if not km_runs:
            return []  # kept offline while km is off: fine
        return [Problem("CA passphrase", f"km signs with the CA keys and {exc.message}")]
    try:
        dep.load_cas(passphrase)
    except errors.NotFoundError as exc:
        return [Problem("CA keys", exc.message)]
    except (errors.RejectedError, ValueError):
        source = f"${PASSPHRASE_ENV}" if from_env else "the passphrase file"
        fix = f"set ${PASSPHRASE_ENV} to the passphrase `iotdlm init` used" + (
            f" (or unset it to use {dep.root / 'secrets' / 'ca-passphrase'})" if from_env else ""
        )
        return [Problem("CA passphrase", f"{source} does not open the CA keys in {dep.root / 'ca'}: {fix}")]
    except OSError as exc:
        return [Problem("CA keys", f"cannot read the CA keys in {dep.root / 'ca'}: {exc.strerror or exc}")]
    return []


def _check_sm(dep: Deployment) -> list[Problem]:
    from iotdlm.sm import config as sm_config

    try:
        sm_config.load_config(dep.root)
        sm_config.load_trusted_root(dep.root)
        sm_config.load_meta_key(dep.root)
    except errors.RejectedError as exc:
        return [Problem("sm", f"sm cannot start: {exc.message}")]
    return []


def _check_pm(dep: Deployment) -> list[Problem]:
    from iotdlm.pm import config as pm_config

    out: list[Problem] = []
    for dtype in dep.config.dtypes:
        name = f"pm-{dtype}"
        try:
            cfg = pm_config.load_config(dep.root, dtype)
        except errors.RejectedError as exc:
            out.append(Problem(name, f"{name} cannot start: {exc.message}"))
            continue
        setup = f"`iotdlm pm setup --data {dep.root} --dtype {dtype} --bench DIR` (or --flasher-config FILE)"
        if cfg.bench is not None and not Path(cfg.bench).is_dir():
            out.append(Problem(name, f"{name}'s bench folder {cfg.bench} does not exist: make it or run {setup}"))
        if cfg.flasher_config is not None and not Path(cfg.flasher_config).is_file():
            out.append(
                Problem(name, f"{name}'s flasher configuration {cfg.flasher_config} does not exist: run {setup}")
            )
    return out


def preflight(
    dep: Deployment,
    mode: Mode,
    *,
    with_sm: bool,
    commands: CommandTable = DEFAULT_COMMANDS,
    embedded_nats: bool | None = None,
    only: frozenset[str] | None = None,
) -> list[Problem]:
    """Every reason ``iotdlm up --mode MODE`` would fail or crash-loop, found before anything starts
    (of the modules in ``only`` alone, when given: ``up --services``)."""
    other = lock_holder(dep.root)
    if other is not None:
        pid = f"pid {other}" if other else "its pid unknown"
        return [
            Problem(
                "supervisor",
                f"another supervisor ({pid}) runs for {dep.root}: `iotdlm status --data {dep.root}` shows it, "
                f"`iotdlm down --data {dep.root}` stops it",
            )
        ]
    on = tuple(name for name in modules_on(mode, with_sm=with_sm) if only is None or name in only)
    ours = {module for module in on if _is_default(commands, module)}
    out = _check_folders(dep)
    out += _check_passphrase(dep, km_runs="km" in ours)
    embedded = dep.config.nats.url is None if embedded_nats is None else embedded_nats
    console = dep.config.console.enabled and _is_default(commands, CONSOLE)
    out += _check_ports(dep, cm="cm" in ours, embedded_nats=embedded, console=console)
    if "sm" in ours:
        out += _check_sm(dep)
    if "pm" in ours:
        out += _check_pm(dep)
    return out


def _is_default(commands: Mapping[str, object], module: str) -> bool:
    return tuple(commands.get(module, ())) == tuple(DEFAULT_COMMANDS[module])  # type: ignore[arg-type]
