"""``iotdlm up``, ``iotdlm mode set``, ``iotdlm status``: run a deployment and switch its modes.

Listed in :data:`iotdlm.cli.main.COMMANDS`, which imports this module only when one of them runs.
Also runnable on its own: ``python -m iotdlm.cli.modes up --data DIR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import signal
import socket
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from iotdlm.bus import subjects
from iotdlm.cli.common import EXIT_UNAVAILABLE, console, data_option, err_console, handle_errors, run
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import UnavailableError
from iotdlm.modes.table import DEFAULT_COMMANDS, CommandTable, Mode, parse_mode
from iotdlm.wire import modes as m

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
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
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
    help="Run sm in provisioning-software (Table 1: optional). Default: as last time, else without.",
)
@click.option(
    "--commands",
    "commands_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help='JSON {"km": ["{python}", "-m", ...], ...} replacing how services start '
    "(placeholders {python} {data} {name} {module} {dtype}).",
)
@handle_errors
def up(data: Path, mode_name: str | None, with_sm: bool | None, commands_file: Path | None) -> None:
    """Start NATS and the services of a mode (Table 1); supervise them until Ctrl-C / SIGTERM.

    Each service is its own process, logging to DATA/logs/<service>.log; a crashed one is
    restarted with backoff. Stopping stops everything in reverse order.
    """
    from iotdlm.supervisor.supervisor import ensure_identity, read_commands

    dep = Deployment.load(data)
    handler = _log_to_file(data)
    try:
        if ensure_identity(dep, SystemClock()):
            console.print(f"created the supervisor's identity in {data / 'modules' / subjects.SUPERVISOR}")
            dep = Deployment.load(data)
        commands: CommandTable = read_commands(commands_file) if commands_file is not None else DEFAULT_COMMANDS
        mode = parse_mode(mode_name) if mode_name is not None else None
        run(_up(dep, mode, with_sm, commands))
    finally:
        logging.getLogger("iotdlm").removeHandler(handler)
        handler.close()


async def _up(dep: Deployment, mode: Mode | None, with_sm: bool | None, commands: CommandTable) -> None:
    from iotdlm.supervisor.supervisor import Supervisor

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sup = Supervisor(dep, commands=commands)
    try:
        await sup.start(mode, with_sm=with_sm, by=operator())
        _print_status(sup.status())
        console.print(f"supervising on {sup.nats_url}; Ctrl-C stops everything")
        await stop.wait()
        console.print("stopping (services drain first; this can take a moment)")
    finally:
        await sup.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    console.print("stopped")


# --- talking to a running supervisor -----------------------------------------------------------
async def _ask(dep: Deployment, subject: str, body: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
    from iotdlm.runtime import connect_identity

    bus, _ = await connect_identity(dep, "admin")
    try:
        return await bus.request(subject, body, timeout=timeout)
    finally:
        await bus.close()


def _no_supervisor(data: Path, exc: UnavailableError) -> None:
    from iotdlm.supervisor.supervisor import load_saved_mode

    err_console.print(f"[red]no supervisor answers[/red] for {data}: {exc.message}")
    saved = None
    with contextlib.suppress(Exception):  # only a hint; the error above is the message
        saved = load_saved_mode(data)
    if saved is not None:
        err_console.print(f"The last mode was {saved.mode} (since {saved.since}, by {saved.by}).")
    hint = f"iotdlm up --data {data}" + ("" if saved else " --mode MODE")
    err_console.print(f"Start one with `{hint}`.")


@click.group("mode")
def mode() -> None:
    """The operation mode (the paper's Table 1): which modules run."""


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


def _print_status(st: m.StatusReply) -> None:
    head = f"mode [bold]{st.mode or 'none'}[/bold]"
    if st.since:
        head += f" since {st.since} by {st.by}"
    if st.mode == Mode.PROVISIONING_SOFTWARE:
        head += " (with sm)" if st.with_sm else " (without sm)"
    if st.switching:
        head += f" [yellow]switching {st.switching}[/yellow]"
    console.print(head)
    if st.record == "verified":
        console.print("mode record: [green]verified[/green] (signed by the supervisor)")
    else:
        console.print(
            f"mode record: [red]NOT VERIFIED[/red]: {escape(st.record)} "
            f"(`iotdlm mode set {st.mode or '<mode>'}` re-asserts it)"
        )
    console.print(f"supervisor pid {st.supervisor_pid}, NATS {st.nats_url}")
    table = Table("service", "state", "pid", "running", "restarts", "uptime", "last exit")
    colors = {"running": "green", "failed": "red", "backoff": "yellow", "stopping": "yellow", "off": "dim"}
    for s in st.services:
        color = colors.get(s.state, "white")
        table.add_row(
            s.name,
            f"[{color}]{s.state}[/{color}]",
            str(s.pid) if s.pid is not None else "-",
            "yes" if s.running else "no",
            str(s.restarts),
            _uptime(s.uptime),
            str(s.last_exit) if s.last_exit is not None else "-",
        )
    console.print(table)


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
    """The operation mode and each service's health (pid, running, restarts, uptime)."""
    dep = Deployment.load(data)
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
    _print_status(st)


def _watch(data: Path, dep: Deployment, as_json: bool) -> None:
    """``status --watch`` (docs/adr/0098)."""
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
cli.add_command(mode)
cli.add_command(status)

if __name__ == "__main__":
    cli()
