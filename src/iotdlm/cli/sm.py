"""``iotdlm sm``: set up software management, check the repository now, list and show what is stored, serve."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from iotdlm import software
from iotdlm.cli.common import console, data_option, handle_errors, run
from iotdlm.cli.output import Column, iso_utc, json_option, print_json, print_table
from iotdlm.clock import SystemClock
from iotdlm.cm.config import CM_FILE
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, IotdlmError, NotFoundError, RejectedError, UnavailableError
from iotdlm.files import atomic_write
from iotdlm.pki.keys import check_public_key
from iotdlm.sm import config as smconfig
from iotdlm.sm.updater import CheckResult, SoftwareManager

if TYPE_CHECKING:
    from iotdlm.sm.local import StoredPaths
    from iotdlm.wire.software import StoredSoftware

log = logging.getLogger(__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def sm() -> None:
    """sm: software management: check the vendor repository, verify what it offers, store it for pm."""


def _manager(data: Path) -> tuple[SoftwareManager, smconfig.SmConfig]:
    config = smconfig.load_config(data)
    return smconfig.build(data, fetcher=smconfig.fetcher_for(config), clock=SystemClock(), config=config), config


@sm.command("setup")
@data_option
@click.option("--repository", "repository_url", required=True, help="Base URL of the vendor repository.")
@click.option(
    "--root",
    "root_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="The repository's root metadata (1.root.json), obtained out of band: sm trusts the repository through it.",
)
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    help="A device type to manage. Repeatable. Default: the deployment's device types.",
)
@click.option(
    "--ca-bundle",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="PEM CAs that may sign the repository's TLS certificate (https; default: the system store).",
)
@click.option(
    "--egress-proxy",
    default=None,
    help="Reach the repository through this forward proxy instead of cm's (http://host:port). "
    "Default: cm's egress proxy, as cm.toml configures it (127.0.0.1:3128 unless changed).",
)
@click.option(
    "--direct",
    is_flag=True,
    help="Connect to the repository directly, not through cm (a bench or test setup; the deployment then has "
    "a second way out).",
)
@click.option(
    "--poll-interval",
    type=int,
    default=3600,
    show_default=True,
    help="Seconds between checks of each device type (serve).",
)
@click.option("--max-image-bytes", type=int, default=None, help="Refuse images larger than this many bytes.")
@handle_errors
def setup(
    data: Path,
    repository_url: str,
    root_file: Path,
    dtypes: tuple[str, ...],
    ca_bundle: Path | None,
    egress_proxy: str | None,
    direct: bool,
    poll_interval: int,
    max_image_bytes: int | None,
) -> None:
    """Configure sm: repository URL, pinned root, device types; create the sm-pm key (DIR/secrets/sm-pm.key).

    sm reaches the repository through cm's egress proxy: unless you give --egress-proxy or
    --direct, setup points sm at it and adds the repository's origin to cm's allow-list
    (DIR/cm.toml), which cm reads when it starts.
    """
    if direct and egress_proxy is not None:
        raise BadRequestError("give --egress-proxy or --direct, not both", field="egress-proxy")
    dep = Deployment.load(data)
    chosen = list(dtypes) or list(dep.config.dtypes)
    opened: str | None = None
    if not direct and egress_proxy is None:
        egress_proxy, opened = _through_cm(data, repository_url)
    cfg = smconfig.setup(
        data,
        repository_url=repository_url,
        root=root_file.read_bytes(),
        dtypes=chosen,
        ca_bundle=ca_bundle,
        egress_proxy=egress_proxy,
        poll_interval_seconds=poll_interval,
        max_image_bytes=max_image_bytes,
    )
    console.print(f"[green]sm set up[/green] in {smconfig.sm_dir(data)}")
    table = Table(show_header=False)
    table.add_row("repository", cfg.repository_url)
    table.add_row("egress", f"through cm's proxy {cfg.egress_proxy}" if cfg.egress_proxy else "direct (--direct)")
    table.add_row("trusted root", str(smconfig.trusted_root_path(data)))
    table.add_row("device types", ", ".join(cfg.dtypes) or "[yellow]none[/yellow] (give --dtype)")
    table.add_row("sm-pm key", str(smconfig.key_path(data)))
    table.add_row("poll interval", f"{cfg.poll_interval_seconds} s")
    console.print(table)
    if opened is not None:
        console.print(
            f"cm's egress proxy now allows {opened} ({data / CM_FILE}); cm reads it when it starts (a running cm: "
            f"`iotdlm restart --data {data} cm`), and opens the proxy in software-management only."
        )
    console.print(
        f"Next: `iotdlm mode set --data {data} software-management` (sm checks on its own), "
        f"or `iotdlm sm check --data {data}` while cm runs in that mode."
    )


def _through_cm(data: Path, repository_url: str) -> tuple[str, str | None]:
    """cm's egress proxy URL from DIR/cm.toml, with the repository's origin added to cm's allow-list
    if it is not there yet; returns the proxy and the origin added (None: it was allowed already)."""
    import tomllib

    import tomli_w

    from iotdlm.cm.config import load_cm_file
    from iotdlm.cm.egress import parse_origin

    parts = urllib.parse.urlsplit(repository_url.strip())
    origin_url = f"{parts.scheme}://{parts.netloc}"
    try:
        origin = parse_origin(origin_url)
    except ValueError as exc:
        raise BadRequestError(f"--repository: {exc}", field="repository") from None
    file = load_cm_file(data)  # checks the file as cm will
    proxy = f"http://{file.egress_host or '127.0.0.1'}:{file.egress_port or 3128}"
    allowed = set()
    for entry in file.allow_origins:
        with contextlib.suppress(ValueError):
            allowed.add(parse_origin(entry))
    if origin in allowed:
        return proxy, None
    path = data / CM_FILE
    settings = tomllib.loads(path.read_text()) if path.is_file() else {}
    settings["allow_origins"] = [*settings.get("allow_origins", []), origin_url]
    atomic_write(path, tomli_w.dumps(settings).encode(), mode=0o644)
    return proxy, origin_url


def _describe(r: CheckResult) -> tuple[str, str]:
    if r.outcome == "stored":
        assert r.stored is not None
        if r.reported:
            note = "reported to the repository"
        elif r.report_refused is not None:
            note = f"report refused, kept and resent at the next check ({r.report_refused})"
        else:
            note = "report pending (retried after the next check)"
        return "[green]stored[/green]", f"release {r.stored.release_counter}, {r.stored.length} bytes; {note}"
    if r.outcome == "up_to_date":
        return "up to date", f"latest {r.latest}, stored {r.current}"
    return "no release", "the repository has published nothing for this device type"


@sm.command("check")
@data_option
@click.option("--dtype", "dtypes", multiple=True, help="Check only this device type. Repeatable. Default: all managed.")
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=15.0,
    show_default=True,
    help="Seconds to keep trying while cm's egress proxy does not answer (cm may still be starting after a "
    "mode switch).",
)
@handle_errors
def check(data: Path, dtypes: tuple[str, ...], wait: float) -> None:
    """Check the repository now; download, verify and store any newer release (progress bar)."""
    manager, config = _manager(data)
    chosen = list(dtypes) or config.dtypes
    if not chosen:
        raise click.UsageError("no dtype to check: give --dtype or set dtypes with `iotdlm sm setup`")
    table = Table("dtype", "outcome", "details")
    refused = 0
    unavailable = 0
    for dtype in chosen:
        with Progress(
            TextColumn(f"{dtype}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("download", total=None)

            def update(done: int, total: int, task: TaskID = task, progress: Progress = progress) -> None:
                progress.update(task, completed=done, total=total)

            try:
                result = _check_patiently(manager, dtype, update, wait if config.egress_proxy else 0.0)
            except RejectedError as exc:
                refused += 1
                field = f" [field: {exc.field}]" if exc.field else ""
                table.add_row(dtype, f"[red]refused[/red] ({exc.code})", escape(f"{exc.message}{field}"))
                continue
            except UnavailableError as exc:
                unavailable += 1
                table.add_row(dtype, f"[yellow]unavailable[/yellow] ({exc.code})", escape(exc.message))
                continue
        outcome, details = _describe(result)
        table.add_row(dtype, outcome, escape(details))
    console.print(table)
    if refused:
        raise SystemExit(4)
    if unavailable:
        raise SystemExit(3)


def _check_patiently(
    manager: SoftwareManager, dtype: str, progress: Callable[[int, int], None], wait: float
) -> CheckResult:
    """``manager.check``, tried again after 1, 2, 4... s while the repository cannot be reached,
    for ``wait`` seconds at most (cm's egress proxy opens a moment after cm starts)."""
    deadline = time.monotonic() + wait
    delay = 1.0
    while True:
        try:
            return manager.check(dtype, progress=progress)
        except UnavailableError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            pause = min(delay, left)
            console.print(f"{dtype}: the repository does not answer through cm's proxy yet; again in {pause:.0f} s")
            time.sleep(pause)
            delay *= 2


@sm.command("list")
@data_option
@click.option("--dtype", default=None, help="Only this device type.")
@json_option
@handle_errors
def list_cmd(data: Path, dtype: str | None, as_json: bool) -> None:
    """List the software stored in the local repository."""
    from iotdlm.sm.local import LocalRepository

    versions = LocalRepository(smconfig.sm_dir(data)).list(dtype)
    if as_json:
        print_json({"versions": [_version_json(v) for v in versions]})
        return
    columns = (
        Column("dtype", whole=True),
        Column("release", whole=True),
        Column("target"),
        Column("bytes", whole=True, drop=2),
        Column("sha256 (start)", drop=3),
        Column("stored at (UTC)", whole=True, drop=1),
    )
    rows = [
        [v.dtype, str(v.release_counter), v.target_path, f"{v.length:,}", v.sha256[:16] + "...",
         (iso_utc(v.stored_at) or "").replace("T", " ").rstrip("Z")]
        for v in versions
    ]  # fmt: skip
    print_table(console, columns, rows)
    console.print(f"{len(versions)} stored")


def _version_json(v: StoredSoftware) -> dict[str, object]:
    """One stored version as `sm list --json` / `sm show --json` give it (keys in docs/operations.md)."""
    return {
        "dtype": v.dtype,
        "release_counter": v.release_counter,
        "target_path": v.target_path,
        "length": v.length,
        "sha256": v.sha256,
        "stored_at": iso_utc(v.stored_at),
    }


@sm.command("show")
@data_option
@click.argument("dtype")
@click.argument("counter", type=int, required=False)
@click.option("--no-verify", is_flag=True, help="Do not verify the stored files.")
@json_option
@handle_errors
def show(data: Path, dtype: str, counter: int | None, no_verify: bool, as_json: bool) -> None:
    """Show one stored version (default: the latest) and verify it as pm will before flashing it."""
    from iotdlm.sm.local import LocalRepository

    local = LocalRepository(smconfig.sm_dir(data))
    paths = local.paths(dtype, counter)
    info = local.info(dtype, int(paths.folder.name))
    failed: IotdlmError | None = None
    if not no_verify:
        with console.status("verifying (Algorithm 1)") if not as_json else contextlib.nullcontext():
            failed = _verify_stored(data, dtype, paths, info)
    if as_json:
        why = None if failed is None else {"code": failed.code, "field": failed.field, "message": failed.message}
        verified = None if no_verify else failed is None
        print_json({**_version_json(info), "folder": str(paths.folder), "verified": verified, "verify_error": why})
    else:
        table = Table(show_header=False)
        for k, v in [
            ("dtype", info.dtype),
            ("release counter", str(info.release_counter)),
            ("target", info.target_path),
            ("length", f"{info.length:,} bytes"),
            ("sha256", info.sha256),
            ("stored at", info.stored_at),
            ("folder", str(paths.folder)),
        ]:
            table.add_row(k, v)
        if failed is not None:
            table.add_row(
                "Algorithm 1", f"[red]FAILED[/red] ({failed.code}, field {failed.field}): {escape(failed.message)}"
            )
        elif not no_verify:
            table.add_row("Algorithm 1", "[green]sig_sm, meta_repo and image verify[/green]")
        console.print(table)
    if failed is not None:
        raise SystemExit(4)


def _verify_stored(data: Path, dtype: str, paths: StoredPaths, info: StoredSoftware) -> IotdlmError | None:
    """Verify a stored version as pm will (Algorithm 1); the error if it does not verify."""
    try:
        meta = software.decrypt_meta(
            paths.meta_enc.read_bytes(), smconfig.load_meta_key(data), dtype, info.release_counter
        )
        pk_sm = check_public_key(Deployment.load(data).identity("sm").certificate.public_key())
        software.verify_software(
            paths.image, meta, paths.sig_sm.read_bytes(), pk_sm, smconfig.load_trusted_root(data), dtype=dtype
        )
    except IotdlmError as exc:
        return exc
    except OSError as exc:  # a file of the stored version (or sm's key) is missing or unreadable
        return NotFoundError(f"cannot read {exc.filename}: {exc.strerror} (the stored version is incomplete)")
    return None


async def _serve(data: Path) -> None:
    from iotdlm.modes.guard import ModeGuard
    from iotdlm.modes.signed import ModeVerifier
    from iotdlm.observe import ModuleMetrics, Observer
    from iotdlm.observe.serve import InstrumentedBus
    from iotdlm.runtime import connect_identity
    from iotdlm.sm.service import SmService

    manager, config = _manager(data)
    dep = Deployment.load(data)
    metrics = ModuleMetrics("sm")
    nats_bus, _ident = await connect_identity(dep, "sm")
    bus = InstrumentedBus(nats_bus, metrics)  # every request timed, refusals counted (docs/adr/0018)
    guard = ModeGuard(bus, ModeVerifier.for_deployment(dep))
    interval = float(config.poll_interval_seconds)
    service = SmService(manager, bus, dtypes=config.dtypes, poll_interval=interval, guard=guard)
    await service.start()
    observer = Observer(bus, metrics, mode=guard)
    await observer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console.print(f"sm serving; checking {', '.join(config.dtypes)} every {config.poll_interval_seconds} s")
    await stop.wait()
    await observer.stop()
    await service.stop()
    await bus.drain()


@sm.command("serve")
@data_option
@handle_errors
def serve(data: Path) -> None:
    """Run sm: the NATS API for pm, the poll schedule, repository notifications."""
    run(_serve(data))
