"""``iotdlm``: set up a deployment, run its services, operate its CA."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from iotdlm import __version__
from iotdlm.cli.common import console, data_option, handle_errors, run
from iotdlm.clock import SystemClock
from iotdlm.deployment import PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.errors import BadRequestError, ConflictError, IotdlmError, NotFoundError, RejectedError
from iotdlm.km.ra import ModulePrincipal
from iotdlm.pki.chain import certs_to_pem, load_certificate
from iotdlm.pki.keys import Algorithm
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER
from iotdlm.wire import km as msg

if TYPE_CHECKING:
    from iotdlm.store import Store


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iotdlm")
@click.option("-v", "--verbose", is_flag=True, help="Log more (to stderr).")
def main(verbose: bool) -> None:
    """iotdlm: device-lifecycle security for IoT and industrial fleets.

    Start with `iotdlm demo`, or `iotdlm init --data DIR` for a deployment of your own.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


# --- init -------------------------------------------------------------------------------------
@main.command()
@data_option
@click.option("--organization", default="iotdlm", show_default=True, help="Organization (O=) in every name.")
@click.option(
    "--algorithm",
    type=click.Choice([a.value for a in Algorithm]),
    default=Algorithm.P256.value,
    show_default=True,
    help="Key algorithm of the CAs and module identities.",
)
@click.option("--dtype", "dtypes", multiple=True, help="A device type to provision (one pm identity each). Repeatable.")
@click.option(
    "--public-url",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="Base URL where cm serves OCSP and CRLs (written into certificates).",
)
@click.option("--database-url", default=None, help="SQLAlchemy URL; default: SQLite under the data folder.")
@click.option(
    "--passphrase-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help=f"File holding the CA key passphrase (else ${PASSPHRASE_ENV}, else one is generated).",
)
@click.option("--nats-port", type=int, default=14222, show_default=True, help="Port of the embedded NATS server.")
@click.option("--nats-tls", is_flag=True, help="Embedded NATS over TLS; modules also present their certificates.")
@click.option(
    "--cm-name",
    "cm_names",
    multiple=True,
    metavar="NAME",
    help="A DNS name or IP address devices reach cm by, besides the --public-url host. Repeatable.",
)
@click.option(
    "--enterprise-number",
    type=int,
    default=DEFAULT_ENTERPRISE_NUMBER,
    show_default=True,
    help="Your IANA Private Enterprise Number: roots certificate policy OIDs and device URNs "
    "(urn:dev:org:<PEN>-<id>). The default is RFC 5612's documentation number: replace it with your own.",
)
@handle_errors
def init(
    data: Path,
    organization: str,
    algorithm: str,
    dtypes: tuple[str, ...],
    public_url: str,
    database_url: str | None,
    passphrase_file: Path | None,
    nats_port: int,
    nats_tls: bool,
    cm_names: tuple[str, ...],
    enterprise_number: int,
) -> None:
    """Create a deployment: root and issuing CAs, module identities, NATS credentials."""
    import os

    passphrase: bytes | None = None
    if passphrase_file is not None:
        passphrase = passphrase_file.read_bytes().strip()
    elif os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    clock = SystemClock()
    with console.status("creating deployment") as status:
        dep, _cas = init_deployment(
            data,
            organization=organization,
            algorithm=Algorithm(algorithm),
            dtypes=list(dtypes),
            public_url=public_url,
            passphrase=passphrase,
            database_url=database_url,
            nats_port=nats_port,
            nats_tls=nats_tls,
            cm_names=cm_names,
            enterprise_number=enterprise_number,
            now=clock.now(),
            progress=lambda m: status.update(f"creating {m}"),
        )
        from iotdlm.runtime import open_store, record_identities

        status.update("creating database")
        store = open_store(dep)
        record_identities(dep, store, clock.now())
        from iotdlm.cli.cm_certificate import record_https_certificate

        record_https_certificate(dep, store, clock.now(), actor="init")
        store.close()
    console.print(f"[green]deployment created[/green] in {data}")
    table = Table("identity", "certificate subject", "expires")
    for name in dep.identity_names():
        ident = dep.identity(name)
        table.add_row(
            name, ident.certificate.subject.rfc4514_string(), ident.certificate.not_valid_after_utc.date().isoformat()
        )
    console.print(table)
    if passphrase is None:
        console.print(
            f"[yellow]The CA passphrase was generated into {data / 'secrets' / 'ca-passphrase'}.[/yellow] "
            f"Move it offline and supply it through ${PASSPHRASE_ENV} when starting km."
        )
    console.print(f"Next: `iotdlm nats serve --data {data}` and `iotdlm km serve --data {data}`.")


# --- nats -------------------------------------------------------------------------------------
@main.group()
def nats() -> None:
    """The embedded NATS server (loopback only, one user per module)."""


@nats.command("serve")
@data_option
@handle_errors
def nats_serve(data: Path) -> None:
    """Run the deployment's embedded NATS server in the foreground until interrupted."""
    from iotdlm.runtime import nats_server

    dep = Deployment.load(data)
    server = nats_server(dep)
    server.start()
    console.print(f"NATS listening on {server.url} (pid {server.pid}); Ctrl-C stops it")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()


# --- km ---------------------------------------------------------------------------------------
@main.group()
def km() -> None:
    """km: certificate authority, registration authority and (later) validation authority."""


async def _serve_km(dep: Deployment) -> None:
    from iotdlm.km import KmService
    from iotdlm.km.service import Schedule
    from iotdlm.modes.guard import ModeGuard
    from iotdlm.modes.signed import ModeVerifier
    from iotdlm.runtime import build_km, connect_identity, open_store

    store = open_store(dep)
    kmcore = build_km(dep, store, SystemClock())
    bus, ident = await connect_identity(dep, "km")
    guard = ModeGuard(bus, ModeVerifier.for_deployment(dep))
    await guard.start()
    kmcore.mode = guard
    service = KmService(
        kmcore, bus, identity=(ident.key, ident.certificate), schedule=Schedule(), anchor_dir=dep.audit_anchor_dir
    )
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console.print(f"km serving on {dep.nats_url}")
    await stop.wait()
    await service.stop()
    await guard.stop()
    await bus.drain()
    store.close()


@km.command("serve")
@data_option
@handle_errors
def km_serve(data: Path) -> None:
    """Run a km worker. Start several: they share the work through a NATS queue group."""
    run(_serve_km(Deployment.load(data)))


# --- ca ---------------------------------------------------------------------------------------
@main.group()
def ca() -> None:
    """Operate the CA directly from the data folder (the operator's tools)."""


@ca.command("issue")
@data_option
@click.option("--csr", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="PKCS#10 request (PEM/DER).")
@click.option(
    "--crmf",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="CRMF CertReqMessages (DER), or a whole CMP message (ir, cr, kur) holding them.",
)
@click.option(
    "--csr-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Issue for every *.csr / *.pem in this folder; the device id is the file name without extension.",
)
@click.option("--profile", required=True, help="factory, operational, service or ocsp.")
@click.option("--device-id", help="Device id (with --csr/--crmf).")
@click.option("--dtype", help="Register the device as this device type.")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Output PEM file (or folder with --csr-dir)."
)
@click.option(
    "--force",
    is_flag=True,
    help="Issue even to a device that already holds a valid certificate of this profile (else it is skipped).",
)
@handle_errors
def ca_issue(
    data: Path,
    csr: Path | None,
    crmf: Path | None,
    csr_dir: Path | None,
    profile: str,
    device_id: str | None,
    dtype: str | None,
    out: Path,
    force: bool,
) -> None:
    """Issue certificates as the operator (RA rule `operator`: signature proof of possession only).

    A device that already holds a valid certificate of the profile is skipped (with --csr-dir) or
    refused (with --csr/--crmf) unless --force. Whatever a request asked for and the certificate does
    not carry (subject attributes, SANs, extensions) is printed as "dropped from the request".
    """
    from iotdlm.runtime import build_km, open_store

    if sum(x is not None for x in (csr, crmf, csr_dir)) != 1:
        raise BadRequestError("give exactly one of --csr, --crmf or --csr-dir")
    if csr_dir is None and not device_id:
        raise BadRequestError("--device-id is required with --csr or --crmf")
    jobs = _issue_jobs(csr, crmf, csr_dir, profile, device_id)
    dep = Deployment.load(data)
    store = open_store(dep)
    kmcore = build_km(dep, store, SystemClock())
    admin = dep.identity("admin")
    from iotdlm.pki.ca import fingerprint

    principal = ModulePrincipal("admin", None, fingerprint(admin.certificate))
    if csr_dir is not None:
        out.mkdir(parents=True, exist_ok=True)
    table = Table("device", "serial", "not after", "file")
    failures, skipped, notes = 0, 0, []
    with _progress() as progress:
        task = progress.add_task("issuing", total=len(jobs))
        for dev, src, item in jobs:
            try:
                holder = None if force else _valid_certificate(store, dev, profile, kmcore.clock.now())
                if holder is not None:
                    if csr_dir is None:
                        raise ConflictError(
                            f"device {dev} already holds a valid {profile} certificate (serial {holder}); "
                            "give --force to issue another",
                            device_id=dev,
                        )
                    skipped += 1
                    table.add_row(dev, "[yellow]skipped[/yellow]", f"holds valid {profile} certificate {holder}", "")
                    progress.advance(task)
                    continue
                grant, rec, left_out = kmcore.prepare(principal, item, "issue")
                if dtype:
                    grant = dataclasses.replace(grant, dtype=dtype)
                (rec,) = kmcore.commit([(grant, rec)])
                target = out / f"{dev}.pem" if csr_dir is not None else out
                target.write_bytes(certs_to_pem([load_certificate(rec.der)]))
                table.add_row(dev, format(rec.serial, "x"), rec.not_after.isoformat(), str(target))
                if left_out:
                    notes.append(f"{dev}: dropped from the request: {'; '.join(left_out)}")
            except IotdlmError as exc:
                if csr_dir is None:
                    if isinstance(exc, RejectedError) and exc.field in ("csr", "crmf"):
                        raise type(exc)(f"{src.name}: {exc.message}", field=exc.field, device_id=exc.device_id) from exc
                    raise
                failures += 1
                table.add_row(dev, f"[red]{exc.code}[/red]", f"{src.name}: {exc.message}", "")
            progress.advance(task)
    store.close()
    console.print(table)
    for note in notes:
        console.print(escape(note), soft_wrap=True)
    if csr_dir is not None:
        summary = f"issued {len(jobs) - skipped - failures}, failed {failures}, skipped {skipped}"
        if skipped:
            summary += f" (they already hold a valid {profile} certificate; --force issues anyway)"
        console.print(summary)
    if failures:
        raise SystemExit(4)


def _issue_jobs(
    csr: Path | None, crmf: Path | None, csr_dir: Path | None, profile: str, device_id: str | None
) -> list[tuple[str, Path, msg.IssueItem]]:
    """(device id, source file, request item) per certificate to issue; a CMP message given to
    --crmf is unwrapped to its CertReqMessages (saying that its CMP protection is not checked)."""
    from iotdlm.pki import crmf as crmf_mod

    if csr_dir is not None:
        files = sorted([*csr_dir.glob("*.csr"), *csr_dir.glob("*.pem")])
        return [(f.stem, f, msg.IssueItem(device_id=f.stem, profile=profile, csr=f.read_bytes())) for f in files]
    assert device_id is not None
    if csr is not None:
        return [(device_id, csr, msg.IssueItem(device_id=device_id, profile=profile, csr=csr.read_bytes()))]
    assert crmf is not None
    raw = crmf.read_bytes()
    if crmf_mod.looks_like_cmp(raw):
        try:
            cmp = crmf_mod.unwrap_cmp(raw)
        except RejectedError as exc:
            raise type(exc)(f"{crmf.name}: {exc.message}", field=exc.field) from exc
        protection = (
            f"Its CMP protection ({cmp.protection}) is not verified" if cmp.protection else "It has no CMP protection"
        )
        console.print(
            escape(
                f"{crmf.name}: a CMP {cmp.body} message (RFC 4210); taking the CertReqMessages out of it. "
                f"{protection}; the CRMF proof of possession still is checked."
            ),
            soft_wrap=True,
        )
        raw = cmp.cert_req_messages
    return [(device_id, crmf, msg.IssueItem(device_id=device_id, profile=profile, crmf=raw))]


def _valid_certificate(store: Store, device_id: str, profile: str, now: dt.datetime) -> str | None:
    """The serial (hex) of a certificate of ``profile`` that ``device_id`` holds and that is valid at ``now``."""
    for rec in store.list_certificates(device_id=device_id, profile=profile, status="valid", limit=20):
        if rec.not_before <= now <= rec.not_after:
            return format(rec.serial, "x")
    return None


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


@ca.command("list")
@data_option
@click.option("--device-id", help="Only this device's certificates.")
@click.option("--profile", help="Only this profile.")
@click.option("--status", type=click.Choice(["valid", "revoked", "superseded"]), help="Only this status.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--offset", type=int, default=0, show_default=True)
@handle_errors
def ca_list(
    data: Path, device_id: str | None, profile: str | None, status: str | None, limit: int, offset: int
) -> None:
    """List issued certificates, newest first."""
    from iotdlm.runtime import open_store

    store = open_store(Deployment.load(data))
    recs = store.list_certificates(device_id=device_id, profile=profile, status=status, limit=limit, offset=offset)
    total = store.count_certificates(device_id=device_id, profile=profile, status=status)
    store.close()
    table = Table("serial", "issuer", "profile", "device", "status", "not after", "requested by")
    for r in recs:
        table.add_row(
            format(r.serial, "x"),
            r.issuer,
            r.profile,
            r.device_id or "-",
            r.status,
            r.not_after.date().isoformat(),
            r.requested_by,
        )
    console.print(table)
    console.print(f"{len(recs)} of {total} shown")


@ca.command("show")
@data_option
@click.argument("serial")
@click.option("--pem", "as_pem", is_flag=True, help="Print only the certificate in PEM.")
@handle_errors
def ca_show(data: Path, serial: str, as_pem: bool) -> None:
    """Show one certificate by serial (hex)."""
    from iotdlm.runtime import open_store

    try:
        value = int(serial, 16)
    except ValueError:
        raise BadRequestError(f"serial {serial!r} is not hexadecimal (copy it from `iotdlm ca list`)") from None
    store = open_store(Deployment.load(data))
    recs = store.find_by_serial(value)
    store.close()
    if not recs:
        raise NotFoundError(f"no certificate with serial {serial}")
    rec = recs[0]
    pem = certs_to_pem([load_certificate(rec.der)]).decode()
    if as_pem:
        click.echo(pem, nl=False)
        return
    table = Table(show_header=False)
    for k, v in [
        ("serial", format(rec.serial, "x")),
        ("issuer CA", rec.issuer),
        ("subject", rec.subject),
        ("device", rec.device_id or "-"),
        ("profile", rec.profile),
        ("status", rec.status),
        ("not before", rec.not_before.isoformat()),
        ("not after", rec.not_after.isoformat()),
        ("requested by", rec.requested_by),
        ("issued at", rec.created_at.isoformat()),
        ("sha256", rec.fingerprint),
    ]:
        table.add_row(k, v)
    console.print(table)
    click.echo(pem, nl=False)


@ca.command("chain")
@data_option
@click.option(
    "--issuer",
    type=click.Choice(["factory", "operational", "service", "root"]),
    default=None,
    help="One issuing CA's chain (default: every CA, root last).",
)
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write PEM here.")
@handle_errors
def ca_chain(data: Path, issuer: str | None, out: Path | None) -> None:
    """Print CA certificates in PEM (for truststores and `openssl verify -CAfile`)."""
    dep = Deployment.load(data)
    names = ["factory", "operational", "service"] if issuer is None else [issuer]
    certs = [dep.ca_certificate(n) for n in names if n != "root"] + [dep.ca_certificate("root")]
    pem = certs_to_pem(certs)
    if out is not None:
        out.write_bytes(pem)
        console.print(f"wrote {len(certs)} certificates to {out}")
    else:
        click.echo(pem.decode(), nl=False)


REASONS_HELP = (
    "RFC 5280 reason: keyCompromise, cACompromise, affiliationChanged, superseded, cessationOfOperation, "
    "privilegeWithdrawn, aACompromise (removeFromCRL and certificateHold are refused)"
)


async def _revoke_remote(dep: Deployment, **kwargs: object) -> list[msg.CertificateInfo]:
    from iotdlm.client.km import KmClient
    from iotdlm.runtime import connect_identity, km_trust, sealer_for

    bus, ident = await connect_identity(dep, "admin")
    try:
        return await KmClient(bus, sealer_for(ident), SystemClock(), trust=km_trust(dep)).revoke(**kwargs)  # type: ignore[arg-type]
    finally:
        await bus.close()


def _revoke(dep: Deployment, **kwargs: object) -> tuple[list[msg.CertificateInfo], str]:
    """Revoke through a running km (so every worker drops cached OCSP answers at once); if none
    answers, revoke directly in the store with the CA keys (needs the CA passphrase)."""
    from iotdlm.errors import UnavailableError
    from iotdlm.km.cert_views import info
    from iotdlm.pki.crl import revocation_reason
    from iotdlm.runtime import build_km, open_store

    reason = kwargs.get("reason")
    assert reason is None or isinstance(reason, str)
    revocation_reason(reason)  # refused here, before km is asked (km refuses it too)
    try:
        return run(_revoke_remote(dep, **kwargs)), "through km"
    except UnavailableError:
        pass
    store = open_store(dep)
    try:
        kmcore = build_km(dep, store, SystemClock())
        assert kmcore.va is not None
        va = kmcore.va
        actor = "admin (local CLI)"
        if kwargs.get("ca") is not None:
            recs = [va.revoke_ca(str(kwargs["ca"]), reason=reason, actor=actor)]
        elif kwargs.get("serial") is not None:
            serial = int(str(kwargs["serial"]), 16)
            issuer = kwargs.get("issuer")
            recs = [va.revoke(serial, issuer=issuer if isinstance(issuer, str) else None, reason=reason, actor=actor)]
        elif kwargs.get("decommission"):
            recs = va.decommission(str(kwargs["device_id"]), actor=actor, reason=reason or "cessationOfOperation")
        else:
            recs = va.revoke_device(str(kwargs["device_id"]), reason=reason, actor=actor)
        return [info(r) for r in recs], "directly in the store (km not reachable)"
    finally:
        store.close()


def _print_revoked(revoked: list[msg.CertificateInfo], how: str) -> None:
    table = Table("serial", "issuer", "profile", "device", "revoked at", "reason")
    for r in revoked:
        table.add_row(
            r.serial, r.issuer, r.profile, r.device_id or "-", r.revoked_at or "-", r.revocation_reason or "-"
        )
    console.print(table)
    console.print(f"{len(revoked)} certificate(s) revoked {how}")


@ca.command("revoke")
@data_option
@click.argument("serial")
@click.option("--issuer", type=click.Choice(["factory", "operational", "service"]), help="If the serial is ambiguous.")
@click.option("--reason", default=None, help=REASONS_HELP)
@handle_errors
def ca_revoke(data: Path, serial: str, issuer: str | None, reason: str | None) -> None:
    """Revoke one certificate by serial (hex). OCSP shows it at once; the next CRL lists it."""
    if not _is_hex(serial):
        raise BadRequestError(f"serial {serial!r} is not hexadecimal (copy it from `iotdlm ca list`)", field="serial")
    dep = Deployment.load(data)
    revoked, how = _revoke(dep, serial=serial, issuer=issuer, reason=reason)
    _print_revoked(revoked, how)


@ca.command("revoke-ca")
@data_option
@click.argument("name", type=click.Choice(["factory", "operational", "service"]))
@click.option("--reason", default=None, help=REASONS_HELP)
@click.option("--yes", is_flag=True, help="Confirm: every certificate the CA issued stops validating.")
@handle_errors
def ca_revoke_ca(data: Path, name: str, reason: str | None, yes: bool) -> None:
    """Revoke an issuing CA's certificate: the root's CRL lists it, so relying parties that check
    the chain reject everything that CA ever issued. There is no undo."""
    if not yes:
        raise BadRequestError(
            f"revoking the {name} CA makes every certificate it issued fail validation, and cannot be "
            "undone; run again with --yes if that is what you want",
            field="yes",
        )
    dep = Deployment.load(data)
    revoked, how = _revoke(dep, ca=name, reason=reason)
    _print_revoked(revoked, how)
    console.print(f"the {name} CA is revoked; the root's CRL ({dep.public_urls.crl('root', 0)}) lists it")


@ca.command("crl")
@data_option
@click.option(
    "--issuer",
    type=click.Choice(["factory", "operational", "service", "root"]),
    default="operational",
    show_default=True,
    help="An issuing CA, or root: the root's one CRL (partition 0, no delta) of issuing-CA certificates.",
)
@click.option("--partition", type=int, default=None, help="One partition (default: all, written to --out as a folder).")
@click.option("--delta", is_flag=True, help="Delta CRLs instead of full ones.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="File (one partition) or folder.")
@handle_errors
def ca_crl(data: Path, issuer: str, partition: int | None, delta: bool, out: Path) -> None:
    """Generate CRLs now (DER): one partition to a file, or every partition of a CA to a folder."""
    from iotdlm.runtime import build_km, open_store

    dep = Deployment.load(data)
    store = open_store(dep)
    try:
        kmcore = build_km(dep, store, SystemClock())
        assert kmcore.va is not None
        if partition is not None:
            rec = kmcore.va.generate_crl(issuer, partition, delta=delta)
            out.write_bytes(rec.der)
            console.print(f"CRL {issuer}/{partition} number {rec.number} ({len(rec.der)} bytes) written to {out}")
            return
        out.mkdir(parents=True, exist_ok=True)
        parts = 1 if issuer == "root" else dep.config.crl_partitions
        total = 0
        with _progress() as progress:
            task = progress.add_task(f"{issuer} CRLs", total=parts)
            for p in range(parts):
                rec = kmcore.va.generate_crl(issuer, p, delta=delta)
                (out / f"{issuer}-{p}.{'delta' if delta else 'crl'}").write_bytes(rec.der)
                total += len(rec.der)
                progress.advance(task)
        console.print(f"{parts} CRLs of the {issuer} CA ({total} bytes in all) written to {out}")
    finally:
        store.close()


# --- device -----------------------------------------------------------------------------------
@main.group()
def device() -> None:
    """Device lifecycle: revoke all of a device's certificates, or decommission it (End-of-Life)."""


@device.command("revoke")
@data_option
@click.argument("device_id")
@click.option("--reason", default=None, help=REASONS_HELP)
@handle_errors
def device_revoke(data: Path, device_id: str, reason: str | None) -> None:
    """Revoke every certificate the device holds (it may still be provisioned again)."""
    revoked, how = _revoke(Deployment.load(data), device_id=device_id, reason=reason)
    _print_revoked(revoked, how)


@device.command("decommission")
@data_option
@click.argument("device_id")
@click.option("--reason", default="cessationOfOperation", show_default=True, help=REASONS_HELP)
@handle_errors
def device_decommission(data: Path, device_id: str, reason: str) -> None:
    """End-of-Life: revoke everything the device holds and retire it; km refuses it from then on."""
    revoked, how = _revoke(Deployment.load(data), device_id=device_id, reason=reason, decommission=True)
    _print_revoked(revoked, how)
    console.print(f"device {device_id} is retired")


# --- va ---------------------------------------------------------------------------------------
@main.group()
def va() -> None:
    """Validation authority: ask for a certificate's status as a relying party would."""


@va.command("ocsp")
@data_option
@click.option("--serial", required=True, help="Serial (hex) of the certificate to check.")
@click.option("--issuer", type=click.Choice(["factory", "operational", "service"]), default=None)
@click.option("--nonce/--no-nonce", default=True, show_default=True, help="Send a nonce (then the answer is fresh).")
@handle_errors
def va_ocsp(data: Path, serial: str, issuer: str | None, nonce: bool) -> None:
    """Build an OCSP request for a certificate and ask km's VA (over NATS, or locally if km is down)."""
    import os as _os

    from cryptography.hazmat.primitives import hashes as _hashes
    from cryptography.x509 import ocsp as _ocsp

    from iotdlm.errors import UnavailableError
    from iotdlm.runtime import build_km, connect_identity, open_store

    dep = Deployment.load(data)
    store = open_store(dep)
    try:
        recs = store.find_by_serial(int(serial, 16)) if _is_hex(serial) else []
        recs = [r for r in recs if issuer is None or r.issuer == issuer]
        if not recs:
            raise NotFoundError(f"no certificate with serial {serial} (see `iotdlm ca list`)")
        rec = recs[0]
        cert = load_certificate(rec.der)
        builder = _ocsp.OCSPRequestBuilder().add_certificate(cert, dep.ca_certificate(rec.issuer), _hashes.SHA1())  # noqa: S303 -- RFC 5019 CertID
        if nonce:
            builder = builder.add_extension(x509.OCSPNonce(_os.urandom(16)), critical=False)
        req = builder.build().public_bytes(serialization.Encoding.DER)

        async def remote() -> bytes:
            from iotdlm.client.km import KmClient
            from iotdlm.runtime import km_trust, sealer_for

            bus, ident = await connect_identity(dep, "admin")
            try:
                return await KmClient(bus, sealer_for(ident), SystemClock(), trust=km_trust(dep)).ocsp(req)
            finally:
                await bus.close()

        try:
            der, how = run(remote()), "km over NATS"
        except UnavailableError:
            kmcore = build_km(dep, store, SystemClock())
            assert kmcore.va is not None
            der, how = kmcore.va.ocsp(req), "local VA (km not reachable)"
    finally:
        store.close()
    resp = _ocsp.load_der_ocsp_response(der)
    table = Table(show_header=False)
    table.add_row("answered by", how)
    table.add_row("response status", resp.response_status.name)
    if resp.response_status == _ocsp.OCSPResponseStatus.SUCCESSFUL:
        table.add_row("certificate status", resp.certificate_status.name)
        if resp.revocation_time_utc is not None:
            table.add_row("revoked at", resp.revocation_time_utc.isoformat())
            table.add_row("reason", resp.revocation_reason.value if resp.revocation_reason else "-")
        table.add_row("this update", resp.this_update_utc.isoformat())
        table.add_row("next update", resp.next_update_utc.isoformat() if resp.next_update_utc else "-")
        table.add_row(
            "nonce echoed", "yes" if any(isinstance(e.value, x509.OCSPNonce) for e in resp.extensions) else "no"
        )
    console.print(table)


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


# --- audit ------------------------------------------------------------------------------------
@main.group("audit")
def audit_group() -> None:
    """The tamper-evident audit log: who issued, revoked and refused what, and when."""


@audit_group.command("list")
@data_option
@click.option("--kind", default=None, help="issuance, revocation, decommission, crl, mode_switch, login, refused")
@click.option("--actor", default=None)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--offset", type=int, default=0, show_default=True)
@handle_errors
def audit_list(data: Path, kind: str | None, actor: str | None, limit: int, offset: int) -> None:
    """List audit records, newest first."""
    from iotdlm.runtime import open_store

    store = open_store(Deployment.load(data))
    try:
        recs = store.list_audit(kind=kind, actor=actor, limit=limit, offset=offset)
        total = store.count_audit()
    finally:
        store.close()
    table = Table("seq", "at", "kind", "actor", "subject", "details")
    for r in recs:
        table.add_row(
            str(r.seq), r.at.isoformat(timespec="seconds"), r.kind, r.actor, r.subject or "-", r.data_json[:80]
        )
    console.print(table)
    console.print(f"{len(recs)} of {total} records shown")


@audit_group.command("verify")
@data_option
@click.option(
    "--anchor-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The folder where km keeps a copy of every signed tree head (default: audit_anchor_dir in iotdlm.toml).",
)
@click.option(
    "--checkpoint",
    "checkpoint_files",
    type=click.Path(path_type=Path, dir_okay=False),
    multiple=True,
    help="A signed tree head kept elsewhere (e.g. fetched from cm's /audit/checkpoint); repeatable.",
)
@handle_errors
def audit_verify(data: Path, anchor_dir: Path | None, checkpoint_files: tuple[Path, ...]) -> None:
    """Check the whole hash chain, every signed checkpoint in the database and every one kept outside
    it (the anchor folder, --checkpoint files); name the first bad or missing record."""
    from iotdlm.km import audit as km_audit
    from iotdlm.km.service import Schedule
    from iotdlm.pki.chain import verify_issued_by
    from iotdlm.runtime import open_store
    from iotdlm.wire import audit as wire_audit

    dep = Deployment.load(data)
    service_ca = dep.ca_certificate("service")
    anchors: list[km_audit.Anchored] = []
    unreadable: list[str] = []
    anchor_dir = anchor_dir or dep.audit_anchor_dir
    if anchor_dir is not None:
        anchors, unreadable = km_audit.read_anchor_dir(anchor_dir)
    for path in checkpoint_files:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise BadRequestError(f"cannot read {path}: {exc.strerror}") from None
        anchors.append(km_audit.Anchored(wire_audit.decode_tree_head(raw, where=str(path)), str(path)))
    store = open_store(dep)

    def signer_key(fp: str) -> object | None:
        rec = store.get_by_fingerprint(fp)
        if rec is None or rec.status != "valid" or rec.issuer != "service":
            return None
        cert = load_certificate(rec.der)
        try:
            verify_issued_by(cert, service_ca, now=cert.not_valid_before_utc, eku=None)
        except IotdlmError:
            return None
        return cert.public_key()

    every = dt.timedelta(seconds=Schedule().checkpoint_every)
    try:
        with console.status("verifying the audit chain") as status:
            report = km_audit.verify(
                store,
                signer_key,  # type: ignore[arg-type]
                anchors=anchors,
                now=SystemClock().now(),
                checkpoint_every=every,
                progress=lambda n: status.update(f"verified {n} records"),
            )
    finally:
        store.close()
    outside = len(anchors)
    console.print(
        f"{report.records} records, {report.checkpoints} signed checkpoints in the database, "
        f"{outside} kept outside it, {report.unsigned_tail} records after the last checkpoint"
    )
    for w in [*unreadable, *report.warnings]:
        console.print(f"[yellow]{w}[/yellow]")
    if report.ok:
        console.print("[green]audit log intact[/green]")
        return
    for p in report.problems[:50]:
        console.print(f"[red]{p}[/red]")
    raise BadRequestError(
        f"audit log damaged: {len(report.problems)} problem(s), first at record {report.first_bad_seq}: "
        f"{report.problems[0]}"
    )


@audit_group.command("checkpoint")
@data_option
@handle_errors
def audit_checkpoint(data: Path) -> None:
    """Sign a tree head of the whole audit log with km's key (km does this every minute too) and
    keep a copy in the anchor folder if one is configured."""
    from iotdlm.km import audit as km_audit
    from iotdlm.runtime import open_store

    dep = Deployment.load(data)
    ident = dep.identity("km")
    store = open_store(dep)
    try:
        cp = km_audit.checkpoint(
            store, ident.key, ident.certificate, SystemClock().now(), anchor_dir=dep.audit_anchor_dir
        )
    finally:
        store.close()
    console.print("nothing new to sign" if cp is None else f"checkpoint signed at record {cp.seq}")


# --- demo -------------------------------------------------------------------------------------
@main.command()
@click.option(
    "--data",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Keep the deployment here (default: a temporary folder).",
)
@click.option("--devices", type=int, default=6, show_default=True, help="How many simulated devices.")
@handle_errors
def demo(data: Path | None, devices: int) -> None:
    """Run the whole system end to end on the embedded default and print what happened."""
    from iotdlm.cli.demo import run_demo

    run(run_demo(data, devices))


def _register_groups() -> None:
    """Command groups that live with their modules."""
    from iotdlm.cli.cm_certificate import certificate as cm_certificate
    from iotdlm.cm.cli import cm
    from iotdlm.modes.cli import mode, status, up
    from iotdlm.pm.cli import pm
    from iotdlm.repository.cli import repo
    from iotdlm.sm.cli import sm
    from iotdlm.transfer.cli import transfer

    main.add_command(repo)
    main.add_command(sm)
    cm.add_command(cm_certificate)  # offline, with the CA keys: lives in cli/, not in cm/
    main.add_command(cm)
    main.add_command(pm)
    main.add_command(transfer)
    main.add_command(up)
    main.add_command(mode)
    main.add_command(status)


_register_groups()

if __name__ == "__main__":
    main()
