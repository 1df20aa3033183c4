"""``iotdlm up``, ``iotdlm down``, ``iotdlm mode set``, ``iotdlm status``: run a deployment and
switch its modes.

Listed in :data:`iotdlm.cli.main.COMMANDS`, which imports this module only when one of them runs.
Also runnable on its own: ``python -m iotdlm.cli.modes up --data DIR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from iotdlm.bus import subjects
from iotdlm.cli.common import (
    EXIT_REJECTED,
    EXIT_UNAVAILABLE,
    console,
    data_option,
    err_console,
    handle_errors,
    quiet_library_logs,
    run,
)
from iotdlm.cli.logformat import formatter
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, UnavailableError
from iotdlm.modes.table import DEFAULT_COMMANDS, CommandTable, Mode, parse_mode
from iotdlm.wire import modes as m

if TYPE_CHECKING:
    from iotdlm.supervisor.host_status import HostStatus

log = logging.getLogger(__name__)

_MODES = click.Choice([mode.value for mode in Mode])


def operator() -> str:
    """Who is at the keyboard, as the audit log names them."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _log_to_file(data: Path) -> logging.Handler:
    (data / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(data / "logs" / "modes.log", encoding="utf-8")
    handler.setFormatter(formatter())  # text, or JSON lines with `iotdlm --log-format json`
    handler.setLevel(logging.INFO)
    top = logging.getLogger("iotdlm")
    top.addHandler(handler)
    if top.getEffectiveLevel() > logging.INFO:
        top.setLevel(logging.INFO)
    return handler


# --- up ---------------------------------------------------------------------------------------
@click.command("up")
@data_option
@click.option("--mode", "mode_name", type=_MODES, default=None, help="Operation mode (default: the last one).")
@click.option(
    "--with-sm/--without-sm",
    default=None,
    help="Run sm in provisioning-software (optional there). Default: as last time, else without.",
)
@click.option(
    "--commands",
    "commands_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help='JSON {"km": ["{python}", "-m", ...], ...} replacing how services start '
    "(placeholders {python} {data} {name} {module} {dtype}).",
)
@click.option(
    "--services",
    "services_list",
    default=None,
    metavar="km,cm,...",
    help="Run only these modules of the mode on this host (one host of several sharing a NATS cluster "
    "and a database; needs [nats] url). Default: all of them, with NATS on this host.",
)
@handle_errors
def up(
    data: Path, mode_name: str | None, with_sm: bool | None, commands_file: Path | None, services_list: str | None
) -> None:
    """Start NATS and the services a mode runs; supervise them until Ctrl-C / SIGTERM.

    Each service is its own process, logging to DATA/logs/<service>.log; a crashed one is
    restarted with backoff. Before starting anything, `up` checks what it can (another
    supervisor, folders, the CA passphrase, free ports, the modules' settings) and stops with
    what to fix. `iotdlm down` (or Ctrl-C) stops everything in reverse order.
    """
    from iotdlm.supervisor.setup import ensure_identity, read_commands

    dep = Deployment.load(data)
    commands: CommandTable = read_commands(commands_file) if commands_file is not None else DEFAULT_COMMANDS
    mode = parse_mode(mode_name) if mode_name is not None else None
    only = parse_services(services_list, dep) if services_list is not None else None
    _preflight(dep, mode, with_sm, commands, only)
    handler = _log_to_file(data)
    try:
        if ensure_identity(dep, SystemClock()):
            console.print(f"created the supervisor's identity in {data / 'modules' / subjects.SUPERVISOR}")
            dep = Deployment.load(data)
        run(_up(dep, mode, with_sm, commands, only))
    finally:
        logging.getLogger("iotdlm").removeHandler(handler)
        handler.close()


def parse_services(text: str, dep: Deployment) -> frozenset[str]:
    """``--services km,cm``: known modules of Table 1, at least one; this host needs a shared NATS."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in DEFAULT_COMMANDS]
    if not names or unknown:
        what = f"unknown module(s) {', '.join(unknown)}" if unknown else "no module"
        raise BadRequestError(f"--services names {what}; choose among {', '.join(DEFAULT_COMMANDS)}", field="services")
    if dep.config.nats.url is None:
        raise BadRequestError(
            f"--services runs part of a deployment that other hosts share, over one NATS: set [nats] url in "
            f"{dep.root / 'iotdlm.toml'} to the NATS cluster's URLs (comma-separated), then run it again",
            field="nats.url",
        )
    return frozenset(names)


def _preflight(
    dep: Deployment, mode: Mode | None, with_sm: bool | None, commands: CommandTable, only: frozenset[str] | None
) -> None:
    """Print every problem :func:`~iotdlm.supervisor.preflight.preflight` finds and exit: 4 when
    the configuration is wrong, 3 when only something outside it is in the way (a port taken)."""
    from iotdlm.supervisor.preflight import preflight
    from iotdlm.supervisor.supervisor import load_saved_mode

    saved = load_saved_mode(dep.root)
    if mode is None:
        if saved is None:
            return  # the supervisor says what to do (give --mode the first time)
        mode = parse_mode(saved.mode)
    if with_sm is None:
        with_sm = saved.with_sm if saved is not None else False
    found = preflight(dep, mode, with_sm=with_sm, commands=commands, only=only)
    for p in (p for p in found if p.warning):  # the console's port: the rest starts
        err_console.print(f"[yellow]warning[/yellow]: {escape(p.message)}")
    problems = [p for p in found if not p.warning]
    if not problems:
        return
    err_console.print(f"[red]not starting[/red] {mode.value} for {dep.root}: nothing was started")
    for p in problems:
        err_console.print(f"- {escape(p.message)}")
    raise SystemExit(EXIT_REJECTED if not all(p.unavailable for p in problems) else EXIT_UNAVAILABLE)


async def _up(
    dep: Deployment, mode: Mode | None, with_sm: bool | None, commands: CommandTable, only: frozenset[str] | None
) -> None:
    from iotdlm.supervisor.supervisor import Supervisor

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sup = Supervisor(dep, commands=commands, only=only)
    try:
        await sup.start(mode, with_sm=with_sm, by=operator())
        _print_status(sup.status(), dep.root)
        console.print(f"supervising on {sup.nats_url}; Ctrl-C or `iotdlm down --data {dep.root}` stops everything")
        asked = asyncio.ensure_future(sup.stop_requested.wait())
        signalled = asyncio.ensure_future(stop.wait())
        await asyncio.wait({asked, signalled}, return_when=asyncio.FIRST_COMPLETED)
        asked.cancel()
        signalled.cancel()
        console.print("stopping (services drain first; this can take a moment)")
    finally:
        await sup.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    console.print("stopped")


# --- talking to a running supervisor -----------------------------------------------------------
async def _ask(dep: Deployment, subject: str, body: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
    from iotdlm.runtime import connect_identity

    with quiet_library_logs():
        bus, _ = await connect_identity(dep, "admin")
        try:
            return await bus.request(subject, body, timeout=timeout)
        finally:
            await bus.close()


def _start_hint(data: Path) -> str:
    """``start one with `iotdlm up --data DIR` (last mode: ...)``: what to run when nothing runs."""
    from iotdlm.supervisor.supervisor import load_saved_mode

    saved = None
    with contextlib.suppress(Exception):  # only a hint
        saved = load_saved_mode(data)
    if saved is None:
        return f"start one with `iotdlm up --data {data} --mode MODE`"
    return f"start one with `iotdlm up --data {data}` (it resumes the last mode, {saved.mode})"


def _require_supervisor(data: Path) -> int:
    """The running supervisor's pid; exit 3 with one line when none runs for ``data``."""
    from iotdlm.supervisor.preflight import lock_holder

    pid = lock_holder(data)
    if pid is None:
        err_console.print(f"no supervisor runs for {data}: {_start_hint(data)}")
        raise SystemExit(EXIT_UNAVAILABLE)
    return pid


def _no_supervisor(data: Path, exc: UnavailableError) -> None:
    err_console.print(
        f"[red]the supervisor of {data} does not answer[/red] ({escape(exc.message)}): "
        f"its log is {data / 'logs' / 'modes.log'}"
    )


@click.group("mode")
def mode() -> None:
    """The operation mode: which modules run (provisioning, software or certificate management)."""


@mode.command("set")
@click.argument("mode_name", metavar="MODE", type=_MODES)
@data_option
@click.option("--with-sm/--without-sm", default=None, help="sm in provisioning-software (default: unchanged).")
@click.option(
    "--timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds to wait for the switch (services drain their in-flight work first).",
)
@handle_errors
def mode_set(mode_name: str, data: Path, with_sm: bool | None, timeout: float) -> None:
    """Switch the running supervisor to MODE: drain and stop what turns off, start what turns on."""
    dep = Deployment.load(data)
    _require_supervisor(data)
    req = m.SetRequest(mode=mode_name, with_sm=with_sm, by=operator())
    with console.status(f"switching to {mode_name} (draining what turns off)"):
        try:
            raw = run(_ask(dep, subjects.MODES_SET, m.encode(req), timeout))
        except UnavailableError as exc:
            _no_supervisor(data, exc)
            raise SystemExit(EXIT_UNAVAILABLE) from None
    reply = m.decode(raw, m.SetReply)
    if not reply.changed:
        console.print(f"already in mode [bold]{reply.to}[/bold] (since {reply.since}); nothing changed")
        return
    if reply.repaired is not None:
        console.print(
            f"[yellow]mode record repaired[/yellow]: {escape(reply.repaired)}; "
            f"[bold]{reply.to}[/bold] signed and written again (audited)"
        )
        if reply.from_mode == reply.to and not (reply.stopped or reply.started or reply.restarted):
            return
    console.print(f"mode [bold]{reply.from_mode or 'off'}[/bold] -> [bold green]{reply.to}[/bold green]")
    table = Table("change", "services")
    for label, names in (
        ("stopped", reply.stopped),
        ("started", reply.started),
        ("restarted", reply.restarted),
        ("kept", reply.kept),
    ):
        if names:
            table.add_row(label, ", ".join(names))
    console.print(table)


# --- status -----------------------------------------------------------------------------------
def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


_COLORS = {"running": "green", "failed": "red", "backoff": "yellow", "stopping": "yellow", "off": "dim"}

#: the service table, one (header, cell) per column: a column (readiness, when the services
#: answer it) is one more entry here
COLUMNS: tuple[tuple[str, Callable[[m.ServiceHealth], str]], ...] = (
    ("service", lambda s: s.name),
    ("state", lambda s: f"[{_COLORS.get(s.state, 'white')}]{s.state}[/{_COLORS.get(s.state, 'white')}]"),
    ("pid", lambda s: str(s.pid) if s.pid is not None else "-"),
    ("restarts", lambda s: str(s.restarts)),
    ("uptime", lambda s: _uptime(s.uptime)),
    ("last exit", lambda s: str(s.last_exit) if s.last_exit is not None else "-"),
)


def _print_status(st: m.StatusReply, data: Path | None = None) -> None:
    head = f"mode [bold]{st.mode or 'none'}[/bold]"
    if st.since:
        head += f" since {st.since} by {st.by}"
    if st.mode == Mode.PROVISIONING_SOFTWARE:
        head += " (with sm)" if st.with_sm else " (without sm)"
    if st.switching:
        head += f" [yellow]switching {st.switching}[/yellow]"
    console.print(head)
    where = f"--data {data} " if data is not None else ""
    if st.record == "verified":
        console.print("mode record: [green]verified[/green] (signed by the supervisor)")
    else:
        console.print(
            f"mode record: [red]NOT VERIFIED[/red]: {escape(st.record)} "
            f"(`iotdlm mode set {where}{st.mode or '<mode>'}` re-asserts it)"
        )
    console.print(f"supervisor pid {st.supervisor_pid}, NATS {st.nats_url}")
    table = Table(*(header for header, _ in COLUMNS))
    shown = [*st.services, *([st.console] if st.console is not None else [])]
    for s in shown:
        table.add_row(*(cell(s) for _, cell in COLUMNS))
    console.print(table)
    if st.console is not None:
        console.print(f"console: {st.console_url} ({st.console.state}; only the admin client certificate logs in)")
    else:
        console.print(
            escape("console: not started ([console] enabled = false in iotdlm.toml, or not in the command table)")
        )
    if st.console is not None and st.console.state == "failed":
        toml = data / "iotdlm.toml" if data is not None else "DIR/iotdlm.toml"
        console.print(
            escape(
                f"The console stays off: fix what its log says (its port taken: set [console] port in {toml}), "
                "then `iotdlm down` and `iotdlm up`."
            )
        )
    for s in shown:
        if not s.running and s.state != "off" and (s.last_error or s.last_exit is not None):
            why = escape(s.last_error) if s.last_error else "(it wrote nothing)"
            console.print(f"[red]{s.name}[/red] {s.state}, last exit {s.last_exit}: {why}  (log: {s.log})")
    if any(s.state == "failed" for s in st.services):
        console.print(f"Fix what the log says, then `iotdlm mode set {where}{st.mode or 'MODE'}` starts it again.")


@click.command("status")
@data_option
@click.option("--json", "as_json", is_flag=True, help="Print the supervisor's JSON answer.")
@click.option(
    "--watch",
    is_flag=True,
    help="Refresh every 2 s: each service's readiness, requests in flight, latency and counters "
    "(Ctrl-C leaves). With --json: print that once.",
)
@handle_errors
def status(data: Path, as_json: bool, watch: bool) -> None:
    """The operation mode and each service's health, and why a service that is not running stopped."""
    dep = Deployment.load(data)
    here = _this_host(data, _require_supervisor(data))
    if here is not None:
        _print_host(here, data, as_json, watch)
        return
    if watch:
        _watch(data, dep, as_json)
        return
    try:
        raw = run(_ask(dep, subjects.MODES_STATUS, b"", 5.0))
    except UnavailableError as exc:
        _no_supervisor(data, exc)
        raise SystemExit(EXIT_UNAVAILABLE) from None
    st = m.decode(raw, m.StatusReply)
    if as_json:
        click.echo(raw.decode())
        return
    _print_status(st, data)


# --- down -------------------------------------------------------------------------------------
@click.command("down")
@data_option
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for everything to stop (services drain their in-flight work first).",
)
@handle_errors
def down(data: Path, timeout: float) -> None:
    """Stop the running supervisor of a deployment: every service in reverse order, then NATS."""
    from iotdlm.supervisor.preflight import lock_holder

    dep = Deployment.load(data)
    pid = lock_holder(data)
    if pid is None:
        console.print(f"nothing is running for {data} (no supervisor); nothing to stop")
        return
    here = _this_host(data, pid)
    if here is not None:  # never the bus: it would stop the whole supervisor of another host
        _stop_host(here, data, timeout)
        return
    req = m.StopRequest(by=operator())
    try:
        reply = m.decode(run(_ask(dep, subjects.MODES_STOP, m.encode(req), 10.0)), m.StopReply)
    except UnavailableError as exc:
        _no_supervisor(data, exc)
        pid = lock_holder(data)
        if pid:
            err_console.print(f"Stop it by its pid: `kill {pid}` (SIGTERM: it stops everything in order).")
        raise SystemExit(EXIT_UNAVAILABLE) from None
    what = ", ".join([*reply.stopping, *(["NATS"] if reply.embedded_nats else [])]) or "nothing but itself"
    _wait_stopped(data, reply.supervisor_pid, what, timeout)
    console.print(f"[green]stopped[/green] {what} (supervisor pid {reply.supervisor_pid}) for {data}")


# --- restart ----------------------------------------------------------------------------------
@click.command("restart")
@click.argument("services", nargs=-1, required=True, metavar="SERVICE...")
@data_option
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the supervisor's answer (each service drains its in-flight work first).",
)
@handle_errors
def restart(services: tuple[str, ...], data: Path, timeout: float) -> None:
    """Stop and start again some running services (after `ca rotate`, or a changed cm.toml); the mode stays.

    SERVICE... as `iotdlm status` names them (`km`, `cm`, `pm-board-a`; a module's name, `pm`, stands
    for each of its services), stopped in reverse order, each draining its in-flight work, then
    started, so they load what changed: a rotated CA (`iotdlm ca rotate`), cm.toml (the egress
    allow-list, ports), profiles. The other services and the mode stay; the restart is written to
    the audit log."""
    dep = Deployment.load(data)
    pid = _require_supervisor(data)
    here = _this_host(data, pid)
    if here is not None:  # the bus's restart request would reach another host's whole supervisor
        err_console.print(
            f"the supervisor of {data} runs only {', '.join(here.services)} (`up --services`) and answers no "
            f"restart request: `iotdlm down --data {data}`, then the same `iotdlm up --services ...` again"
        )
        raise SystemExit(EXIT_REJECTED)
    req = m.RestartRequest(services=list(services), by=operator())
    try:
        with console.status(f"restarting {', '.join(services)} (each drains its in-flight work first)"):
            reply = m.decode(run(_ask(dep, subjects.MODES_RESTART, m.encode(req), timeout)), m.SetReply)
    except UnavailableError as exc:
        _no_supervisor(data, exc)
        raise SystemExit(EXIT_UNAVAILABLE) from None
    console.print(f"[green]restarted[/green] {', '.join(reply.restarted)} (mode {reply.to}, unchanged)")


def _wait_stopped(data: Path, pid: int, what: str, timeout: float) -> None:
    """Until the supervisor ``pid`` let go of ``DIR/modes.lock``; exit 3 after ``timeout`` seconds."""
    from iotdlm.supervisor.preflight import lock_holder

    with console.status(f"stopping {what} (services drain first)"):
        deadline = time.monotonic() + timeout
        while lock_holder(data) is not None:
            if time.monotonic() > deadline:
                err_console.print(
                    f"[yellow]the supervisor (pid {pid}) is still stopping after {timeout:g} s[/yellow]; "
                    f"`iotdlm status --data {data}` shows what is left, its log is {data / 'logs' / 'modes.log'}"
                )
                raise SystemExit(EXIT_UNAVAILABLE)
            time.sleep(0.1)


# --- a host of several (`iotdlm up --services`) -------------------------------------------------
def _this_host(data: Path, pid: int) -> HostStatus | None:
    """What the supervisor ``pid`` of ``data`` runs, when it runs only part of a deployment."""
    from iotdlm.supervisor import host_status

    return host_status.read(data, pid)


def _print_host(here: HostStatus, data: Path, as_json: bool, watch: bool) -> None:
    """``status`` on a ``--services`` host: what its own supervisor wrote (the bus's answer would be
    another host's)."""
    if watch:
        err_console.print(
            f"`status --watch` follows the supervisor of a whole deployment; the one of {data} runs only "
            f"{', '.join(here.services)} (`up --services`): `iotdlm status --data {data}` shows it, each "
            "service's /health and /metrics show it live (docs/operations.md, section 2)"
        )
        raise SystemExit(EXIT_REJECTED)
    if as_json:  # the shape of the whole supervisor's answer: its services are this host's
        click.echo(m.encode(here.status).decode())
        return
    _print_status(here.status, data)
    console.print(
        f"this host runs only {', '.join(here.services)} of the deployment (`iotdlm up --services`), "
        f"as of {here.written_at}; the other hosts: `iotdlm status` on each"
    )


def _stop_host(here: HostStatus, data: Path, timeout: float) -> None:
    """``down`` on a ``--services`` host: SIGTERM to its supervisor, which stops its services in
    order and leaves the mode in the bucket for the other hosts."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(here.pid, signal.SIGTERM)
    what = ", ".join(reversed(here.services))
    _wait_stopped(data, here.pid, what, timeout)
    console.print(
        f"[green]stopped[/green] {what} on this host (supervisor pid {here.pid}) for {data}; "
        "the other hosts run on, the mode stays in the bucket"
    )


def _watch(data: Path, dep: Deployment, as_json: bool) -> None:
    """``status --watch`` (docs/adr/0018)."""
    from iotdlm.cli.watch import watch_status

    try:
        watch_status(dep, as_json=as_json)
    except UnavailableError as exc:
        _no_supervisor(data, exc)
        raise SystemExit(EXIT_UNAVAILABLE) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Operation modes on their own (the same commands as in `iotdlm`)."""


cli.add_command(up)
cli.add_command(down)
cli.add_command(mode)
cli.add_command(status)
cli.add_command(restart)

if __name__ == "__main__":
    cli()
