"""``iotdlm pm``: provision a line of blank devices, serve pm for a dtype, list the records, clear
an alarm, and manufacture simulated devices for demos and tests.

Listed in :data:`iotdlm.cli.main.COMMANDS`, which imports this module only when ``iotdlm pm`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import signal
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from iotdlm.cli.common import console, data_option, err_console, handle_errors, run
from iotdlm.cli.output import Column, iso_utc, json_option, print_json, print_table
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, ConflictError
from iotdlm.pki.keys import Algorithm
from iotdlm.pm.flasher import Flasher
from iotdlm.wire import pm as m

if TYPE_CHECKING:
    from iotdlm.store import ProvisioningRecord

log = logging.getLogger(__name__)

EXIT_FAILED = 4


def current_operator() -> str:
    """Who is at the keyboard, as the records name them by default."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _profiles(text: str | None) -> list[str] | None:
    if text is None:
        return None
    out = [p.strip() for p in text.split(",") if p.strip()]
    if not out:
        raise BadRequestError("--profiles needs factory, operational or both (comma-separated)", field="profiles")
    return out


@click.group("pm", context_settings={"help_option_names": ["-h", "--help"]})
def pm() -> None:
    """pm: the provisioning module -- flash verified software, truststore, config and device
    certificates into blank devices of one device type."""


_dtype_option = click.option("--dtype", required=True, help="Device type (one pm per device type).")
_bench_option = click.option(
    "--bench",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of simulated devices (`iotdlm pm bench make`).",
)
_flasher_option = click.option(
    "--flasher-config",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="JSON command templates driving the vendor's flashing tool.",
)


# --- setup --------------------------------------------------------------------------------------
@pm.command("setup")
@data_option
@_dtype_option
@click.option("--profiles", default=None, help="Certificates to issue: factory, operational or both (comma-separated).")
@click.option("--enroll-uri", default=None, help="cm's EST URL, flashed into devices (where they enroll).")
@click.option("--update-uri", default=None, help="Where devices ask for software updates.")
@_bench_option
@_flasher_option
@click.option("--release", "release_counter", type=int, default=None, help="Flash this release (default: latest).")
@handle_errors
def setup(
    data: Path,
    dtype: str,
    profiles: str | None,
    enroll_uri: str | None,
    update_uri: str | None,
    bench: Path | None,
    flasher_config: Path | None,
    release_counter: int | None,
) -> None:
    """Write pm's configuration for a device type (DATA/pm/TYPE/config.toml); unchanged fields are kept."""
    import msgspec

    from iotdlm.pm import config as pmconfig

    dep = Deployment.load(data)
    pmconfig.settings_from(dep, dtype, pmconfig.PmConfig())  # the dtype is the deployment's
    cfg = pmconfig.load_config(data, dtype)
    changes: dict[str, object] = {}
    if profiles is not None:
        changes["profiles"] = _profiles(profiles)
    if enroll_uri is not None:
        changes["enroll_uri"] = enroll_uri
    if update_uri is not None:
        changes["update_uri"] = update_uri
    if bench is not None:
        if not bench.is_dir():
            raise BadRequestError(
                f"bench folder {bench} does not exist: make blank devices there first with "
                f"`iotdlm pm bench make --dir {bench} --dtype {dtype} --count N`, or give the folder they are in",
                field="bench",
            )
        changes["bench"], changes["flasher_config"] = str(bench.resolve()), None
    if flasher_config is not None:
        changes["flasher_config"], changes["bench"] = str(flasher_config.resolve()), None
    if release_counter is not None:
        changes["release_counter"] = release_counter
    cfg = msgspec.structs.replace(cfg, **changes)
    path = pmconfig.save_config(data, dtype, cfg)
    settings = pmconfig.settings_from(dep, dtype, cfg)
    table = Table(show_header=False)
    table.add_row("certificates", ", ".join(settings.profiles))
    table.add_row("enroll URI (CA-URI)", settings.enroll_uri)
    table.add_row("update URI", settings.update_uri or "-")
    table.add_row(
        "flasher", cfg.bench or cfg.flasher_config or "[yellow]none[/yellow] (give --bench or --flasher-config)"
    )
    table.add_row("release", str(cfg.release_counter) if cfg.release_counter is not None else "latest stored by sm")
    console.print(f"[green]pm set up[/green] for {dtype}: {path}")
    console.print(table)


# --- provision ------------------------------------------------------------------------------------
def _summary(report: m.ProvisionReport, elapsed: float, data: Path) -> None:
    done = report.count(m.COMPLETE)
    n = len(report.devices)
    head = Table(show_header=False, title=f"pm-{report.dtype}: provisioning by {escape(report.operator)}")
    head.add_row("devices", str(n))
    head.add_row("complete", f"[green]{done}[/green]")
    for label, status, color in (
        ("failed", m.FAILED, "red"),
        ("refused", m.REFUSED, "red"),
        ("in progress", m.IN_PROGRESS, "yellow"),
        ("skipped (already complete)", m.SKIPPED, "dim"),
    ):
        if report.count(status):
            head.add_row(label, f"[{color}]{report.count(status)}[/{color}]")
    if report.release_counter is not None:
        head.add_row("software", f"release {report.release_counter}, sha256 {report.image_sha256}")
    head.add_row("mode", report.mode or "none published (every step; cm checked off)")
    head.add_row("time", f"{elapsed:.2f} s" + (f" ({done / elapsed:,.1f} devices/s)" if elapsed > 0 and done else ""))
    if report.timings:
        head.add_row("where time went", ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items()))
    console.print(head)
    if report.count(m.IN_PROGRESS) and report.mode is not None:
        nxt = "provisioning-certificate" if report.mode == "provisioning-software" else "provisioning-software"
        console.print(
            f"{report.count(m.IN_PROGRESS)} device(s) wait for steps mode {report.mode} does not allow: "
            f"`iotdlm mode set --data {data} {nxt}`, then provision again (they resume where they stopped)"
        )
    shown = [d for d in report.devices if d.status not in (m.COMPLETE, m.SKIPPED)]
    if n <= 20:
        shown = [d for d in report.devices if d.status != m.SKIPPED]
    if not shown:
        return
    colors = {m.COMPLETE: "green", m.FAILED: "red", m.REFUSED: "red", m.IN_PROGRESS: "yellow"}
    rows = []
    for d in shown:
        color = colors.get(d.status, "white")
        if d.status == m.COMPLETE:
            detail = ", ".join(d.steps_done)
        elif d.status == m.IN_PROGRESS:
            detail = "pending: " + ", ".join(d.steps_pending)
        else:
            where = f"at {d.failed_step}: " if d.failed_step else ""
            detail = f"{where}({d.code}) {d.message or ''}"
        asked = f" ({d.request} request)" if d.request else ""
        rows.append(
            [d.device_id, f"[{color}]{d.status}[/{color}]{asked}\n{escape(detail)}",
             _certificates_cell(d.certificates.items())]
        )  # fmt: skip
    print_table(console, _REPORT_COLUMNS, rows)
    if n > 20 and len(shown) < n:
        console.print(f"({n - len(shown)} complete devices not listed: `iotdlm pm records --dtype {report.dtype}`)")


_REPORT_COLUMNS = (
    Column("device", whole=True),
    Column("status / detail", min=14),
    Column("certificates (serial)", whole=True),
)


def _certificates_cell(certs: Iterable[tuple[str, str]]) -> str:
    """Each certificate on two lines (its profile, then its whole serial), "-" for none."""
    return "\n".join(f"{p}:\n{sn}" for p, sn in certs) or "-"


async def _provision(
    data: Path,
    dtype: str,
    bench: Path | None,
    flasher_config: Path | None,
    devices: list[str] | None,
    operator: str,
    force: bool,
    profiles: list[str] | None,
) -> m.ProvisionReport:
    import msgspec

    from iotdlm.modes.guard import ModeGuard
    from iotdlm.modes.signed import ModeVerifier
    from iotdlm.pm import config as pmconfig
    from iotdlm.pm.settings import Progress as RunProgress

    dep = Deployment.load(data)
    cfg = pmconfig.load_config(data, dtype)
    if profiles is not None:
        cfg = msgspec.structs.replace(cfg, profiles=profiles)
        cfg.validate()
    flasher = pmconfig.make_flasher(dep, dtype, cfg, bench=bench, flasher_config=flasher_config)
    clock = SystemClock()
    store = pmconfig.open_store(dep)
    try:
        bus = await pmconfig.connect_pm(dep, dtype)
        try:
            async with ModeGuard(bus, ModeVerifier.for_deployment(dep)) as guard:
                provisioner = pmconfig.build_provisioner(
                    dep, dtype, bus=bus, store=store, flasher=flasher, clock=clock, config=cfg, guard=guard
                )
                async with provisioner:
                    loop = asyncio.get_running_loop()
                    start = loop.time()
                    with Progress(
                        TextColumn("{task.description}"),
                        BarColumn(),
                        MofNCompleteColumn(),
                        TimeElapsedColumn(),
                        console=console,
                        transient=True,
                    ) as bar:
                        task = bar.add_task(f"pm-{dtype}: checking (Algorithm 1)", total=None)

                        def update(p: RunProgress) -> None:
                            bar.update(task, total=p.total, completed=p.done, description=f"pm-{dtype}: {p.phase}")

                        report = await provisioner.provision_batch(devices, operator, force=force, progress=update)
                    _summary(report, loop.time() - start, data)
                    return report
        finally:
            await bus.drain()
    finally:
        store.close()


@pm.command("provision")
@data_option
@_dtype_option
@_bench_option
@_flasher_option
@click.option(
    "--device",
    "devices",
    multiple=True,
    help="A device to provision (flasher reference or device id). Repeatable. Default: every device on the bench.",
)
@click.option("--operator", default=None, help="Who runs the line (default: user@host).")
@click.option("--force", is_flag=True, help="Provision again devices already provisioned (new certificates).")
@click.option("--profiles", default=None, help="Certificates to issue: factory, operational or both (comma-separated).")
@handle_errors
def provision(
    data: Path,
    dtype: str,
    bench: Path | None,
    flasher_config: Path | None,
    devices: tuple[str, ...],
    operator: str | None,
    force: bool,
    profiles: str | None,
) -> None:
    """Provision blank devices on the bench, in this process as pm-TYPE: verified software
    (checked again before flashing), truststore, config, device certificates from km; then read back and verify.

    Needs NATS, km and sm running, and cm off. Exit code 4 when any device failed or was refused.
    """
    report = run(
        _provision(
            data,
            dtype,
            bench,
            flasher_config,
            list(devices) or None,
            operator or current_operator(),
            force,
            _profiles(profiles),
        )
    )
    if report.failures:
        err_console.print(f"[red]{len(report.failures)} device(s) not provisioned[/red]; listed above")
        raise SystemExit(EXIT_FAILED)


@pm.command("request")
@data_option
@_dtype_option
@click.option("--device", "devices", multiple=True, help="A device (reference or id). Repeatable. Default: all.")
@click.option("--operator", default=None, help="Who runs the line (default: user@host).")
@click.option("--force", is_flag=True, help="Provision again devices already provisioned (new certificates).")
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="Seconds to wait for the report.")
@json_option
@handle_errors
def request(
    data: Path, dtype: str, devices: tuple[str, ...], operator: str | None, force: bool, timeout: float, as_json: bool
) -> None:
    """Ask the running pm service of a device type (`iotdlm up`) to provision, as the operator (admin).

    Exit code 4 when any device failed or was refused."""
    from iotdlm.pm import config as pmconfig
    from iotdlm.pm.service import PmClient

    async def ask() -> tuple[m.ProvisionReport, float]:
        bus = await pmconfig.connect_as(Deployment.load(data), "admin")
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            with console.status(f"pm-{dtype} is provisioning") if not as_json else contextlib.nullcontext():
                report = await PmClient(bus, dtype, timeout=timeout).provision(
                    list(devices) or None, operator=operator or current_operator(), force=force
                )
            return report, loop.time() - start
        finally:
            await bus.close()

    report, elapsed = run(ask())
    if as_json:
        import msgspec

        print_json(msgspec.to_builtins(report))
    else:
        _summary(report, elapsed, data)
    if report.failures:
        err_console.print(f"[red]{len(report.failures)} device(s) not provisioned[/red]; listed above")
        raise SystemExit(EXIT_FAILED)


# --- serve -----------------------------------------------------------------------------------------
async def _serve(data: Path, dtype: str, bench: Path | None, flasher_config: Path | None) -> None:
    from iotdlm.modes.guard import ModeGuard
    from iotdlm.modes.signed import ModeVerifier
    from iotdlm.pm import config as pmconfig
    from iotdlm.pm.service import PmService, provision_subject

    dep = Deployment.load(data)
    cfg = pmconfig.load_config(data, dtype)
    flasher: Flasher
    try:
        flasher = pmconfig.make_flasher(dep, dtype, cfg, bench=bench, flasher_config=flasher_config)
    except BadRequestError as exc:  # serve anyway (status; requests refused, saying what to do)
        log.warning("pm-%s: %s", dtype, exc.message)
        err_console.print(f"[yellow]warning[/yellow]: {exc.message}")
        flasher = pmconfig.UnconfiguredFlasher(dtype, data)
    store = pmconfig.open_store(dep)
    from iotdlm.observe import ModuleMetrics, Observer
    from iotdlm.observe.serve import InstrumentedBus

    metrics = ModuleMetrics("pm")
    bus = InstrumentedBus(await pmconfig.connect_pm(dep, dtype), metrics)  # requests timed (docs/adr/0018)
    try:
        async with ModeGuard(bus, ModeVerifier.for_deployment(dep)) as guard:
            # a service (started by the supervisor) is held to the mode: unknown -> refused
            provisioner = pmconfig.build_provisioner(
                dep,
                dtype,
                bus=bus,
                store=store,
                flasher=flasher,
                clock=SystemClock(),
                config=cfg,
                guard=guard,
                require_mode=True,
            )
            async with provisioner:
                service = PmService(provisioner, bus)
                await service.start()
                observer = Observer(bus, metrics, mode=guard)
                await observer.start()
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                console.print(f"pm-{dtype} serving on {provision_subject(dtype)}")
                await stop.wait()
                await observer.stop()
                await service.stop()
    finally:
        await bus.drain()
        store.close()


@pm.command("serve")
@data_option
@_dtype_option
@_bench_option
@_flasher_option
@handle_errors
def serve(data: Path, dtype: str, bench: Path | None, flasher_config: Path | None) -> None:
    """Run pm for one device type on NATS (iotdlm.v1.pm.TYPE.provision / .status), held to the operation mode."""
    run(_serve(data, dtype, bench, flasher_config))


# --- records, status, alarm -----------------------------------------------------------------------
@pm.command("records")
@data_option
@click.option("--dtype", default=None, help="Only this device type.")
@click.option("--status", type=click.Choice(["complete", "failed", "in-progress"]), default=None)
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--offset", type=int, default=0, show_default=True)
@json_option
@handle_errors
def records(data: Path, dtype: str | None, status: str | None, limit: int, offset: int, as_json: bool) -> None:
    """List provisioning records: who provisioned which device, when, with what software and certificates."""
    from iotdlm.pm.config import open_store

    store = open_store(Deployment.load(data))
    try:
        rows = store.list_provisioning(dtype=dtype, status=status, limit=limit, offset=offset)
    finally:
        store.close()
    if as_json:
        print_json({"records": [_record_json(r) for r in rows], "offset": offset})
        return
    columns = (
        Column("device", whole=True),
        Column("status / detail", min=14),
        Column("certificates (serial)", whole=True),
        Column("updated (UTC)", whole=True, drop=2),
        Column("release", drop=3),
        Column("operator", drop=4),
        Column("dtype", drop=5),
        Column("sha256 (start)", drop=6),
    )
    colors = {"complete": "green", "failed": "red", "in-progress": "yellow"}
    table_rows = []
    for r in rows:
        if r.status == "failed":
            detail = f"at {r.failed_step}: {r.message or ''}"
        elif r.status == "in-progress":
            detail = "done: " + (", ".join(r.steps_done) or "-")
        else:
            detail = r.message or ""
        state = f"[{colors[r.status]}]{r.status}[/{colors[r.status]}]" + (f"\n{escape(detail)}" if detail else "")
        table_rows.append(
            [r.device_id, state, _certificates_cell(r.certificates),
             (iso_utc(r.updated_at) or "").replace("T", " ").rstrip("Z"),
             str(r.release_counter) if r.release_counter is not None else "-", escape(r.operator), r.dtype,
             (r.image_sha256 or "-")[:16]]
        )  # fmt: skip
    print_table(console, columns, table_rows)
    console.print(f"{len(rows)} record(s)")


def _record_json(r: ProvisioningRecord) -> dict[str, object]:
    """One provisioning record as `pm records --json` gives it (keys in docs/operations.md)."""
    return {
        "device_id": r.device_id,
        "dtype": r.dtype,
        "status": r.status,
        "operator": r.operator,
        "started_at": iso_utc(r.started_at),
        "updated_at": iso_utc(r.updated_at),
        "completed_at": iso_utc(r.completed_at),
        "flasher_ref": r.ref,
        "steps_done": list(r.steps_done),
        "release_counter": r.release_counter,
        "image_sha256": r.image_sha256,
        "certificates": dict(r.certificates),
        "failed_step": r.failed_step,
        "message": r.message,
        "attempts": r.attempts,
    }


@pm.command("status")
@data_option
@_dtype_option
@json_option
@handle_errors
def status(data: Path, dtype: str, as_json: bool) -> None:
    """Whether pm-TYPE is halted by an alarm, and its provisioning records per status."""
    from iotdlm.pm.alarm import read_alarm
    from iotdlm.pm.config import open_store

    store = open_store(Deployment.load(data))
    try:
        alarm = read_alarm(store, dtype)
        counts = store.count_provisioning(dtype=dtype)
    finally:
        store.close()
    if as_json:
        active = alarm is not None and alarm.active
        print_json(
            {
                "dtype": dtype,
                "state": "halted" if active else "ready",
                "alarm": None
                if not active or alarm is None
                else {"raised_at": iso_utc(alarm.raised_at), "check": alarm.check, "message": alarm.message},
                "records": {st: counts.get(st, 0) for st in ("complete", "failed", "in-progress")},
            }
        )
        return
    table = Table(show_header=False, title=f"pm-{dtype}")
    if alarm is not None and alarm.active:
        table.add_row("state", f"[red]HALTED[/red] since {alarm.raised_at}: {alarm.check} failed")
        table.add_row("alarm", escape(alarm.message))
    else:
        table.add_row("state", "[green]ready[/green]")
    for st in ("complete", "failed", "in-progress"):
        table.add_row(st, str(counts.get(st, 0)))
    console.print(table)


@pm.command("clear-alarm")
@data_option
@_dtype_option
@click.option("--operator", required=True, help="Who clears the alarm (audited).")
@handle_errors
def clear_alarm_cmd(data: Path, dtype: str, operator: str) -> None:
    """Clear pm's alarm after investigating sm's local repository (audited); pm works again."""
    from iotdlm.pm.alarm import clear_alarm
    from iotdlm.pm.config import open_store

    store = open_store(Deployment.load(data))
    try:
        cleared = clear_alarm(store, dtype, operator, SystemClock().now())
    finally:
        store.close()
    console.print(
        f"alarm of pm-{dtype} cleared by {escape(operator)} (raised {cleared.raised_at}: {cleared.check} failed)"
    )


# --- bench -----------------------------------------------------------------------------------------
@pm.group("bench")
def bench_group() -> None:
    """Simulated devices: a folder per device, its flash and its secure key store."""


@bench_group.command("make")
@click.option("--dir", "folder", type=click.Path(path_type=Path, file_okay=False), required=True)
@_dtype_option
@click.option("--count", type=click.IntRange(1, 100_000), required=True, help="How many devices.")
@click.option(
    "--no-csr-every",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Every K-th device cannot make a CSR (it hands over its public key; pm builds CRMF). 0: none.",
)
@click.option("--prefix", default=None, help="Device id prefix (default: the device type).")
@click.option("--start", type=click.IntRange(0), default=1, show_default=True, help="First device number.")
@click.option(
    "--algorithm",
    type=click.Choice([a.value for a in Algorithm]),
    default=Algorithm.P256.value,
    show_default=True,
    help="Key algorithm the devices use.",
)
@handle_errors
def bench_make(
    folder: Path, dtype: str, count: int, no_csr_every: int, prefix: str | None, start: int, algorithm: str
) -> None:
    """Manufacture simulated blank devices (an id on the sticker, empty flash) for demos and tests."""
    from iotdlm.device.simulated import SimulatedDevice, bench_device_id

    prefix = prefix or dtype
    made = 0
    without_csr = 0
    for i in range(start, start + count):
        device_id = bench_device_id(prefix, i)
        can_csr = not (no_csr_every and (i - start + 1) % no_csr_every == 0)
        try:
            SimulatedDevice.manufacture(
                folder / device_id, device_id, dtype, can_make_csr=can_csr, algorithm=Algorithm(algorithm)
            )
        except ConflictError:
            raise ConflictError(
                f"{folder / device_id} already holds a device; choose --start or another --dir"
            ) from None
        made += 1
        without_csr += 0 if can_csr else 1
    console.print(f"manufactured {made} blank {dtype} device(s) in {folder} ({without_csr} that cannot make CSRs)")
