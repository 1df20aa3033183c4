"""``iotdlm ca``: operate the CA directly from the data folder -- issue, list, show, chain, revoke, CRLs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path
from typing import TYPE_CHECKING

import click
from cryptography.hazmat.primitives.serialization import Encoding
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from iotdlm.cli.cert_format import SUFFIX, encode_certificates, format_option
from iotdlm.cli.common import EXIT_ERROR, console, data_option, err_console, handle_errors
from iotdlm.cli.lazy import Lazy, LazyGroup
from iotdlm.cli.output import (
    Column,
    check_out_dir,
    check_out_file,
    iso_utc,
    json_option,
    parse_serial,
    print_json,
    print_table,
    serial_hex,
    write_after_work,
)
from iotdlm.cli.revoke import REASONS_HELP, print_revoked, revoke
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, ConflictError, IotdlmError, NotFoundError, RejectedError
from iotdlm.pki.ca import crl_partition
from iotdlm.pki.chain import certs_to_pem, load_certificate
from iotdlm.wire import km as msg

if TYPE_CHECKING:
    from cryptography import x509

    from iotdlm.km import Km
    from iotdlm.km.ra import ModulePrincipal
    from iotdlm.store import CertRecord, Store


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
        "rotate": Lazy(
            "iotdlm.cli.ca_rotate:ca_rotate",
            "Replace an issuing CA with a new one, keeping the old one trusted for an overlap.",
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
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output file (or folder with --csr-dir).")
@click.option(
    "--force",
    is_flag=True,
    help="Issue even to a device that already holds a valid certificate of this profile (else it is skipped).",
)
@format_option("the certificate (a folder gets <device>.pem or <device>.c509)")
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
    fmt: str,
) -> None:
    """Issue certificates as the operator (RA rule `operator`: signature proof of possession only).

    A device that already holds a valid certificate of the profile is skipped (with --csr-dir) or
    refused (with --csr/--crmf) unless --force. Whatever a request asked for and the certificate does
    not carry (subject attributes, SANs, extensions) is printed as "dropped from the request".
    """
    from iotdlm.km.ra import ModulePrincipal
    from iotdlm.pki.ca import fingerprint
    from iotdlm.runtime import build_km, open_store

    if sum(x is not None for x in (csr, crmf, csr_dir)) != 1:
        raise BadRequestError("give exactly one of --csr, --crmf or --csr-dir")
    if csr_dir is None and not device_id:
        raise BadRequestError("--device-id is required with --csr or --crmf")
    if csr_dir is not None:  # checked before anything is issued
        check_out_dir(out)
    else:
        check_out_file(out)
    jobs = _issue_jobs(csr, crmf, csr_dir, profile, device_id)
    dep = Deployment.load(data)
    store = open_store(dep)
    kmcore = build_km(dep, store, SystemClock())
    issue = _Issuer(store, kmcore, ModulePrincipal("admin", None, fingerprint(dep.identity("admin").certificate)))
    if csr_dir is not None:
        out.mkdir(parents=True, exist_ok=True)
    try:
        with _progress() as progress:
            task = progress.add_task("issuing", total=len(jobs))
            for dev, src, item in jobs:
                issue.one(
                    dev,
                    src,
                    item,
                    profile=profile,
                    dtype=dtype,
                    force=force,
                    out=out,
                    folder=csr_dir is not None,
                    fmt=fmt,
                )
                progress.advance(task)
    finally:
        store.close()
    print_table(console, _ISSUED_COLUMNS, issue.rows, has_json=False)
    for note in issue.notes:
        console.print(escape(note), soft_wrap=True)
    if csr_dir is not None:
        summary = (
            f"issued {len(jobs) - issue.skipped - issue.failures}, failed {issue.failures}, skipped {issue.skipped}"
        )
        if issue.skipped:
            summary += f" (they already hold a valid {profile} certificate; --force issues anyway)"
        console.print(summary)
    for problem in issue.unwritten:
        err_console.print(f"[red]error[/red] (write_failed): {escape(problem)}")
    if issue.unwritten:
        raise SystemExit(EXIT_ERROR)
    if issue.failures:
        raise SystemExit(4)


_ISSUED_COLUMNS = (
    Column("device", whole=True),
    Column("serial", whole=True),
    Column("not after / why", min=20),
    Column("file", drop=1),
)


class _Issuer:
    """Issue one request after another as the operator, collecting the rows to print."""

    def __init__(self, store: Store, kmcore: Km, principal: ModulePrincipal) -> None:
        self.store, self.kmcore, self.principal = store, kmcore, principal
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self.unwritten: list[str] = []
        self.failures = self.skipped = 0

    def one(
        self, dev: str, src: Path, item: msg.IssueItem, *, profile: str, dtype: str | None, force: bool, out: Path,
        folder: bool, fmt: str = "pem",
    ) -> None:  # fmt: skip
        kmcore = self.kmcore
        try:
            holder = None if force else _valid_certificate(self.store, dev, profile, kmcore.clock.now())
            if holder is not None:
                if not folder:
                    raise ConflictError(
                        f"device {dev} already holds a valid {profile} certificate (serial {holder}); "
                        "give --force to issue another",
                        device_id=dev,
                    )
                self.skipped += 1
                self.rows.append([dev, holder, f"[yellow]skipped[/yellow]: holds this valid {profile} certificate", ""])
                return
            grant, rec, left_out = kmcore.prepare(self.principal, item, "issue")
            if dtype:
                grant = dataclasses.replace(grant, dtype=dtype)
            (rec,) = kmcore.commit([(grant, rec)])
        except IotdlmError as exc:
            if not folder:
                if isinstance(exc, RejectedError) and exc.field in ("csr", "crmf"):
                    raise type(exc)(f"{src.name}: {exc.message}", field=exc.field, device_id=exc.device_id) from exc
                raise
            self.failures += 1
            self.rows.append([dev, "-", f"[red]{exc.code}[/red] {escape(src.name)}: {escape(exc.message)}", ""])
            return
        serial = serial_hex(rec.serial)
        target = out / f"{dev}{SUFFIX[fmt]}" if folder else out
        try:
            body = encode_certificates([rec.der], fmt, bag=False)
            problem = write_after_work(target, body, done=f"certificate {serial} for {dev} was issued")
        except RejectedError as exc:  # issued, but it has no C509 form
            problem = f"certificate {serial} for {dev} was issued but not written: {exc.message}"
        if problem is not None:
            self.unwritten.append(
                f"{problem}. It is kept in the database: `iotdlm ca show {serial} --pem` prints it again."
            )
        self.rows.append(
            [dev, serial, iso_utc(rec.not_after) or "", "[red]not written[/red]" if problem else str(target)]
        )
        if left_out:
            self.notes.append(f"{dev}: dropped from the request: {'; '.join(left_out)}")


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
@click.option("--cas", "cas", is_flag=True, help="List the issuing CAs and their state (active, rotated-out, retired).")
@json_option
@handle_errors
def ca_list(
    data: Path,
    device_id: str | None,
    profile: str | None,
    status: str | None,
    limit: int,
    offset: int,
    cas: bool,
    as_json: bool,
) -> None:
    """List issued certificates, newest first (serials whole, as `ca show` and `ca revoke` take them)."""
    from iotdlm.runtime import open_store

    if cas:
        from iotdlm.cli.ca_rotate import list_cas

        list_cas(Deployment.load(data), as_json)
        return
    store = open_store(Deployment.load(data))
    recs = store.list_certificates(device_id=device_id, profile=profile, status=status, limit=limit, offset=offset)
    total = store.count_certificates(device_id=device_id, profile=profile, status=status)
    store.close()
    if as_json:
        print_json({"certificates": [_cert_json(r) for r in recs], "total": total, "offset": offset})
        return
    columns = (
        Column("serial", whole=True),
        Column("device", whole=True),
        Column("profile", drop=2),
        Column("status"),
        Column("not after", whole=True),
        Column("issuer", drop=3),
        Column("requested by", drop=4),
    )
    rows = [
        [serial_hex(r.serial), r.device_id or "-", r.profile, r.status, r.not_after.date().isoformat(), r.issuer,
         r.requested_by]
        for r in recs
    ]  # fmt: skip
    print_table(console, columns, rows)
    console.print(f"{len(recs)} of {total} shown")


def _cert_json(r: CertRecord) -> dict[str, object]:
    """One certificate as every --json answer gives it (keys in docs/operations.md)."""
    return {
        "serial": serial_hex(r.serial),
        "issuer": r.issuer,
        "subject": r.subject,
        "device_id": r.device_id,
        "profile": r.profile,
        "status": r.status,
        "not_before": iso_utc(r.not_before),
        "not_after": iso_utc(r.not_after),
        "requested_by": r.requested_by,
        "issued_at": iso_utc(r.created_at),
        "revoked_at": iso_utc(r.revoked_at),
        "revocation_reason": r.revocation_reason,
        "sha256": r.fingerprint,
        "crl_partition": r.crl_partition,
    }


def _crl_location(dep: Deployment, rec: CertRecord, cert: x509.Certificate) -> tuple[int, str]:
    """The CRL partition that lists ``rec`` once revoked, and that CRL's URL (the certificate's own
    CRL distribution point when it names one)."""
    from cryptography import x509 as x

    partition = rec.crl_partition
    if partition is None:
        partition = 0 if rec.issuer == "root" else crl_partition(rec.serial, dep.config.crl_partitions)
    url = dep.public_urls.crl(rec.issuer, partition)
    try:
        cdp = cert.extensions.get_extension_for_class(x.CRLDistributionPoints).value
    except x.ExtensionNotFound:
        return partition, url
    for point in cdp:
        for name in point.full_name or ():
            if isinstance(name, x.UniformResourceIdentifier):
                return partition, name.value
    return partition, url


@ca.command("show")
@data_option
@click.argument("serial")
@click.option("--pem", "as_pem", is_flag=True, help="Print only the certificate in PEM.")
@json_option
@handle_errors
def ca_show(data: Path, serial: str, as_pem: bool, as_json: bool) -> None:
    """Show one certificate by serial: hex as `ca list` prints it, or as openssl does (67:FD:15:...).

    Also says which CRL (partition and URL) lists it once revoked. Given an issuing CA's name
    (operational, operational-2, ...), shows that CA and its state instead."""
    from iotdlm.cli.ca_rotate import is_ca_name, show_ca
    from iotdlm.runtime import open_store

    dep = Deployment.load(data)
    if is_ca_name(dep, serial):
        show_ca(dep, serial, as_json)
        return
    value = parse_serial(serial)
    store = open_store(dep)
    recs = store.find_by_serial(value)
    store.close()
    if not recs:
        raise NotFoundError(f"no certificate with serial {serial_hex(value)} (`iotdlm ca list` lists them)")
    rec = recs[0]
    cert = load_certificate(rec.der)
    pem = certs_to_pem([cert]).decode()
    if as_pem:
        click.echo(pem, nl=False)
        return
    partition, url = _crl_location(dep, rec, cert)
    if as_json:
        print_json({**_cert_json(rec), "crl_partition": partition, "crl_url": url, "pem": pem})
        return
    table = Table(show_header=False)
    for k, v in [
        ("serial", serial_hex(rec.serial)),
        ("issuer CA", rec.issuer),
        ("subject", rec.subject),
        ("device", rec.device_id or "-"),
        ("profile", rec.profile),
        ("status", rec.status),
        ("not before", rec.not_before.isoformat()),
        ("not after", rec.not_after.isoformat()),
        ("requested by", rec.requested_by),
        ("issued at", rec.created_at.isoformat()),
        *(
            [("revoked at", iso_utc(rec.revoked_at) or "-"), ("reason", rec.revocation_reason or "-")]
            if rec.revoked_at
            else []
        ),
        ("CRL partition", f"{partition} of the {rec.issuer} CA"),
        ("CRL", url),
        ("sha256", rec.fingerprint),
    ]:
        table.add_row(k, v)
    table.columns[1].overflow = "fold"
    console.print(table)
    click.echo(pem, nl=False)


#: an issuing CA by name: a role, or a generation of it after `ca rotate` (ADR 0026); or the root
_ISSUER_NAME = re.compile(r"(factory|operational|service)(-[1-9][0-9]{0,2})?|root")


def _issuer_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An issuing CA's name (``ca crl`` also takes root; `ca revoke-ca` revokes an issuing CA)."""
    if value is None or (_ISSUER_NAME.fullmatch(value) and (value != "root" or ctx.info_name == "crl")):
        return value
    shown = value if len(value) <= 40 else value[:37] + "..."
    raise click.BadParameter(
        f"{shown!r} is not an issuing CA: give factory, operational, service or a rotated one such as "
        f"operational-2 (`iotdlm ca list --cas` lists them){', or root' if ctx.info_name == 'crl' else ''}",
        param=param,
    )


@ca.command("chain")
@data_option
@click.option(
    "--issuer",
    type=click.Choice(["factory", "operational", "service", "root"]),
    default=None,
    help="One issuing CA's chain (default: every CA, root last).",
)
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the chain here.")
@format_option("the chain (C509: one COSE_C509 bag, a constrained device's truststore; needs --out)")
@handle_errors
def ca_chain(data: Path, issuer: str | None, out: Path | None, fmt: str) -> None:
    """Print CA certificates in PEM (for truststores and `openssl verify -CAfile`), or write them
    as a C509 truststore."""
    if out is not None:
        check_out_file(out)
    elif fmt != "pem":
        raise BadRequestError("C509 is binary: give --out FILE to write it", field="out")
    dep = Deployment.load(data)
    listed = dep.issuing_ca_certificates(SystemClock().now())  # after a rotation: those /cacerts lists
    names = list(listed) if issuer is None else [issuer]
    certs = [listed.get(n) or dep.ca_certificate(n) for n in names if n != "root"] + [dep.ca_certificate("root")]
    pem = encode_certificates([c.public_bytes(Encoding.DER) for c in certs], fmt, bag=True)
    if out is None:
        click.echo(pem.decode(), nl=False)
        return
    problem = write_after_work(out, pem, done=f"the chain of {len(certs)} certificates was read")
    if problem is not None:
        raise BadRequestError(f"{problem}; `iotdlm ca chain` without --out prints it", field="out")
    console.print(f"wrote {len(certs)} certificates to {out}")


@ca.command("revoke")
@data_option
@click.argument("serial")
@click.option(
    "--issuer",
    callback=_issuer_name,
    help="If the serial is ambiguous: factory, operational, service, or a rotated one such as operational-2.",
)
@click.option("--reason", default=None, help=REASONS_HELP)
@handle_errors
def ca_revoke(data: Path, serial: str, issuer: str | None, reason: str | None) -> None:
    """Revoke one certificate by serial (hex, as `ca list` or openssl prints it). OCSP shows it at
    once; the next CRL lists it."""
    value = parse_serial(serial)
    dep = Deployment.load(data)
    revoked, how = revoke(dep, serial=serial_hex(value), issuer=issuer, reason=reason)
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
    callback=_issuer_name,
    default="operational",
    show_default=True,
    help="An issuing CA (factory, operational, service, or a rotated one such as operational-2), or root: "
    "the root's one CRL (partition 0, no delta) of issuing-CA certificates.",
)
@click.option("--partition", type=int, default=None, help="One partition (default: all, written to --out as a folder).")
@click.option("--delta", is_flag=True, help="Delta CRLs instead of full ones.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="File (one partition) or folder.")
@handle_errors
def ca_crl(data: Path, issuer: str, partition: int | None, delta: bool, out: Path) -> None:
    """Generate CRLs now (DER): one partition to a file, or every partition of a CA to a folder."""
    from iotdlm.runtime import build_km, open_store

    if partition is not None:  # checked before any CRL is signed
        check_out_file(out)
    else:
        check_out_dir(out)
    dep = Deployment.load(data)
    store = open_store(dep)
    kept = "kept in the database: cm serves it, `iotdlm ca crl` writes it again"
    try:
        kmcore = build_km(dep, store, SystemClock())
        assert kmcore.va is not None
        if partition is not None:
            rec = kmcore.va.generate_crl(issuer, partition, delta=delta)
            problem = write_after_work(out, rec.der, done=f"CRL {issuer}/{partition} number {rec.number} was signed")
            if problem is not None:
                raise BadRequestError(f"{problem}; it is {kept}", field="out")
            console.print(f"CRL {issuer}/{partition} number {rec.number} ({len(rec.der)} bytes) written to {out}")
            return
        out.mkdir(parents=True, exist_ok=True)
        parts = 1 if issuer == "root" else dep.config.crl_partitions
        total = 0
        with _progress() as progress:
            task = progress.add_task(f"{issuer} CRLs", total=parts)
            for p in range(parts):
                rec = kmcore.va.generate_crl(issuer, p, delta=delta)
                target = out / f"{issuer}-{p}.{'delta' if delta else 'crl'}"
                problem = write_after_work(target, rec.der, done=f"CRL {issuer}/{p} number {rec.number} was signed")
                if problem is not None:
                    raise BadRequestError(f"{problem}; it and the {p} before it are {kept}", field="out")
                total += len(rec.der)
                progress.advance(task)
        console.print(f"{parts} CRLs of the {issuer} CA ({total} bytes in all) written to {out}")
    finally:
        store.close()
