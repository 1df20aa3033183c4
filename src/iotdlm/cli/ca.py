"""``iotdlm ca``: operate the CA directly from the data folder -- issue, list, show, chain, revoke, CRLs."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from iotdlm.cli.common import console, data_option, handle_errors
from iotdlm.cli.lazy import Lazy, LazyGroup
from iotdlm.cli.revoke import REASONS_HELP, is_hex, print_revoked, revoke
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, ConflictError, IotdlmError, NotFoundError, RejectedError
from iotdlm.pki.chain import certs_to_pem, load_certificate
from iotdlm.wire import km as msg

if TYPE_CHECKING:
    from iotdlm.store import Store


@click.group(
    cls=LazyGroup,
    lazy_subcommands={
        "renew": Lazy(
            "iotdlm.cli.ca_extra:ca_renew",
            "Renew a valid certificate: same device and profile, new validity; the old one is superseded.",
        ),
        "certificate": Lazy(
            "iotdlm.cli.ca_extra:ca_certificate",
            "Make a new key and its certificate in one step (for operators and tests).",
        ),
    },
)
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
    from iotdlm.km.ra import ModulePrincipal
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


@ca.command("revoke")
@data_option
@click.argument("serial")
@click.option("--issuer", type=click.Choice(["factory", "operational", "service"]), help="If the serial is ambiguous.")
@click.option("--reason", default=None, help=REASONS_HELP)
@handle_errors
def ca_revoke(data: Path, serial: str, issuer: str | None, reason: str | None) -> None:
    """Revoke one certificate by serial (hex). OCSP shows it at once; the next CRL lists it."""
    if not is_hex(serial):
        raise BadRequestError(f"serial {serial!r} is not hexadecimal (copy it from `iotdlm ca list`)", field="serial")
    dep = Deployment.load(data)
    revoked, how = revoke(dep, serial=serial, issuer=issuer, reason=reason)
    print_revoked(revoked, how)


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
    revoked, how = revoke(dep, ca=name, reason=reason)
    print_revoked(revoked, how)
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
