"""``iotdlm repo``: the software vendor's remote repository -- create it, publish releases, serve it."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import signal
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from iotdlm.cli.common import EXIT_UNAVAILABLE, console, err_console, handle_errors, run
from iotdlm.clock import SystemClock
from iotdlm.errors import BadRequestError, UnavailableError
from iotdlm.repository.repo import ALGORITHMS, DTYPE_ROLE_PREFIX, KEY_ROLES, VendorRepository

REPO_ENV = "IOTDLM_REPO"
#: where `repo serve` listens by default: a port no other iotdlm default uses (cm has 8443, 8080
#: and 3128, embedded NATS 14222), so the README's commands run side by side on one machine
DEFAULT_PORT = 8700

F = TypeVar("F", bound=Callable[..., Any])


def _dir_option(f: F) -> F:
    return click.option(
        "--dir",
        "repo_dir",
        type=click.Path(path_type=Path, file_okay=False),
        envvar=REPO_ENV,
        required=True,
        help=f"Repository folder (or ${REPO_ENV}).",
    )(f)


def _role_ints(values: tuple[str, ...], option: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in values:
        role, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise BadRequestError(f"{option} takes ROLE=N (e.g. root=2), got {item!r}", field=option.lstrip("-"))
        out[role.strip()] = int(n)
    return out


@click.group("repo", context_settings={"help_option_names": ["-h", "--help"]})
def repo() -> None:
    """The software vendor's remote repository (TUF): publish releases per device type, serve them to
    sm, and keep sm's signed download reports.

    Start with `iotdlm repo init --dir REPO`, give sm REPO/metadata/1.root.json as its trust anchor,
    then `iotdlm repo publish` and `iotdlm repo serve`.
    """


@repo.command()
@_dir_option
@click.option(
    "--algorithm", type=click.Choice(list(ALGORITHMS)), default="ecdsa-p256", show_default=True, help="Key algorithm."
)
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    metavar="ROLE=N",
    help=f"Signatures required for ROLE (one of {', '.join(KEY_ROLES)}); default 1. Repeatable.",
)
@click.option(
    "--keys",
    "keys",
    multiple=True,
    metavar="ROLE=N",
    help="Number of keys of ROLE; default: its threshold. Repeatable.",
)
@click.option(
    "--report-ca",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="PEM bundle of the CAs whose certificates may sign sm's download reports: the service CA of each "
    "deployment whose sm reports here (DATA/ca/service.pem, written by `iotdlm init`).",
)
@click.option(
    "--no-reports",
    is_flag=True,
    help="Trust no one's download reports for now (they are refused until `iotdlm repo trust --ca FILE`).",
)
@handle_errors
def init(
    repo_dir: Path,
    algorithm: str,
    thresholds: tuple[str, ...],
    keys: tuple[str, ...],
    report_ca: Path | None,
    no_reports: bool,
) -> None:
    """Create a repository: keys for every role, root, targets, snapshot and timestamp metadata."""
    if report_ca is None and not no_reports:
        raise BadRequestError(
            "say whose download reports this repository accepts: --report-ca DATA/ca/service.pem (the service CA "
            "of the deployment whose sm reports here), or --no-reports and `iotdlm repo trust --ca FILE` later; "
            "otherwise the repository refuses every report sm sends",
            field="report-ca",
        )
    if report_ca is not None and no_reports:
        raise BadRequestError("give --report-ca or --no-reports, not both", field="report-ca")
    r = VendorRepository.init(
        repo_dir,
        now=SystemClock().now(),
        algorithm=algorithm,
        thresholds=_role_ints(thresholds, "--threshold"),
        keys_per_role=_role_ints(keys, "--keys"),
        report_ca=report_ca,
    )
    console.print(f"[green]repository created[/green] in {r.path}")
    for info in r.roles():
        console.print(f"  {info.role}: {len(info.keyids)} key(s), threshold {info.threshold}")
    console.print(f"Trust anchor for clients (sm): {r.metadata_dir / '1.root.json'}")
    console.print(f"Private keys are in {r.keys_dir} (mode 0600): keep the root keys offline.")
    if report_ca is None:
        console.print(
            "[yellow]No report CA yet[/yellow]: sm's reports are refused until `iotdlm repo trust --ca FILE`."
        )


@repo.command()
@_dir_option
@click.option("--dtype", required=True, help="Device type the image is for.")
@click.option("--version", "release_counter", type=int, required=True, help="Release counter (integer, increasing).")
@click.option("--name", default=None, help="Target name (default: the file's name).")
@click.argument("image", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@handle_errors
def publish(repo_dir: Path, dtype: str, release_counter: int, name: str | None, image: Path) -> None:
    """Sign IMAGE as release --version of --dtype and make it available to clients."""
    r = VendorRepository(repo_dir)
    size = image.stat().st_size
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"hashing and copying {image.name}", total=size)
        target = r.publish(
            dtype,
            release_counter,
            image,
            now=SystemClock().now(),
            name=name,
            progress=lambda n: progress.advance(task, n),
        )
    console.print(
        f"[green]published[/green] {target.path} as release {target.release_counter} of {target.dtype} "
        f"({target.length} bytes, sha256 {target.sha256})"
    )


async def _serve(r: VendorRepository, port: int, ssl_context: ssl.SSLContext | None) -> None:
    from iotdlm.repository.server import RepositoryServer

    async with RepositoryServer(r, port=port, ssl_context=ssl_context, log_requests=False) as server:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        console.print(f"repository serving on {server.url} (metadata: /metadata/, images: /targets/); Ctrl-C stops")
        if not r.report_cas():
            console.print(
                "[yellow]no report CA[/yellow]: sm's download reports are refused (403) until "
                f"`iotdlm repo trust --dir {r.path} --ca DATA/ca/service.pem`"
            )
        await stop.wait()


@repo.command()
@_dir_option
@click.option(
    "--port",
    type=int,
    default=DEFAULT_PORT,
    show_default=True,
    help="TCP port on 127.0.0.1 (the default is none of cm's: 8443, 8080, 3128).",
)
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="PEM certificate chain.")
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="PEM private key.")
@handle_errors
def serve(repo_dir: Path, port: int, tls_cert: Path | None, tls_key: Path | None) -> None:
    """Serve metadata, images and the report endpoint on 127.0.0.1 until interrupted."""
    r = VendorRepository(repo_dir)
    ssl_context = None
    if (tls_cert is None) != (tls_key is None):
        raise BadRequestError("give both --tls-cert and --tls-key, or neither", field="tls")
    if tls_cert is not None and tls_key is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(tls_cert, tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise BadRequestError(f"cannot load the TLS certificate and key: {exc}", field="tls") from exc
    try:
        run(_serve(r, port, ssl_context))
    except UnavailableError as exc:
        cause = exc.__cause__
        if not isinstance(cause, OSError) or cause.errno != errno.EADDRINUSE:
            raise
        from iotdlm.supervisor.preflight import port_in_use_message

        err_console.print(
            f"[red]error[/red]: {escape(port_in_use_message(port, 'repository', 'give another with --port'))}"
        )
        raise SystemExit(EXIT_UNAVAILABLE) from None


@repo.command()
@_dir_option
@click.option("--role", required=True, type=click.Choice(list(KEY_ROLES)), help="Role whose keys are replaced.")
@handle_errors
def rotate(repo_dir: Path, role: str) -> None:
    """Replace a role's keys; clients holding an older root follow the rotation."""
    r = VendorRepository(repo_dir)
    r.rotate(role, now=SystemClock().now())
    console.print(f"[green]rotated[/green] the keys of {role}; old keys are in {r.keys_dir / 'retired'}")


@repo.command()
@_dir_option
@click.option(
    "--role",
    "roles",
    multiple=True,
    default=("timestamp",),
    show_default=True,
    help=f"Role to sign again with a new expiry: {', '.join(KEY_ROLES)} or {DTYPE_ROLE_PREFIX}<D>. Repeatable.",
)
@handle_errors
def refresh(repo_dir: Path, roles: tuple[str, ...]) -> None:
    """Sign roles again with fresh expiry dates (run timestamp refresh more often than it expires)."""
    r = VendorRepository(repo_dir)
    r.refresh(now=SystemClock().now(), roles=roles)
    console.print(f"[green]refreshed[/green] {', '.join(roles)}")


@repo.command()
@_dir_option
@click.option("--role", required=True, type=click.Choice(list(KEY_ROLES)), help="Role.")
@click.option("--days", type=float, required=True, help="Expiry period in days, used from its next signing.")
@handle_errors
def expiry(repo_dir: Path, role: str, days: float) -> None:
    """Set a role's expiry period (takes effect at its next signing: `iotdlm repo refresh`)."""
    VendorRepository(repo_dir).set_expiry(role, dt.timedelta(days=days))
    console.print(f"{role} now expires {days:g} days after each signing")


@repo.command()
@_dir_option
@click.option(
    "--ca",
    "ca_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="PEM bundle of CA certificates.",
)
@click.option("--append", is_flag=True, help="Add to the trusted CAs instead of replacing them.")
@handle_errors
def trust(repo_dir: Path, ca_file: Path, append: bool) -> None:
    """Set the CAs whose certificates may sign sm's download reports."""
    certs = VendorRepository(repo_dir).trust_report_ca(ca_file.read_bytes(), append=append)
    for cert in certs:
        console.print(f"trusting reports signed under {cert.subject.rfc4514_string()}")


def _when(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@repo.command()
@_dir_option
@handle_errors
def status(repo_dir: Path) -> None:
    """Published releases and the version, expiry and keys of every role."""
    r = VendorRepository(repo_dir)
    targets = Table(title="releases")
    for col in ("dtype", "release counter", "target", "length", "sha256", "published"):
        targets.add_column(col)
    for t in r.list_targets():
        targets.add_row(
            t.dtype, str(t.release_counter), t.path, str(t.length), t.sha256[:16] + "...", _when(t.published_at)
        )
    console.print(targets)
    now = SystemClock().now()
    roles = Table(title="roles")
    for col in ("role", "version", "expires", "threshold", "keys"):
        roles.add_column(col)
    for info in r.roles():
        expires = _when(info.expires)
        if info.expires <= now:
            expires = f"[red]{expires} (expired)[/red]"
        roles.add_row(info.role, str(info.version), expires, str(info.threshold), str(len(info.keyids)))
    console.print(roles)


@repo.command()
@_dir_option
@handle_errors
def reports(repo_dir: Path) -> None:
    """Download reports received from sm: which deployment verified and stored which release."""
    table = Table(title="reports")
    for col in ("received", "reporter", "dtype", "release counter", "target", "sha256"):
        table.add_column(col)
    for rep in VendorRepository(repo_dir).reports():
        table.add_row(
            _when(rep.received_at),
            rep.reporter,
            rep.dtype,
            str(rep.release_counter),
            rep.target_path,
            rep.sha256[:16] + "...",
        )
    console.print(table)


__all__ = ["repo"]
