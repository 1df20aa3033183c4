"""``iotdlm audit``: list the tamper-evident audit log, verify its hash chain and checkpoints, sign one."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape

from iotdlm.cli.common import console, data_option, handle_errors, run
from iotdlm.cli.output import Column, iso_utc, json_option, print_json, print_table
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, IotdlmError
from iotdlm.pki.chain import load_certificate

if TYPE_CHECKING:
    from iotdlm.km import audit as km_audit


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit log: who issued, revoked and refused what, and when."""


@audit_group.command("list")
@data_option
@click.option(
    "--kind",
    default=None,
    help="issuance, revocation, decommission, crl, mode_switch, login, refused, device_refusal",
)
@click.option("--actor", default=None)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--offset", type=int, default=0, show_default=True)
@json_option
@handle_errors
def audit_list(data: Path, kind: str | None, actor: str | None, limit: int, offset: int, as_json: bool) -> None:
    """List audit records, newest first."""
    import json

    from iotdlm.runtime import open_store

    store = open_store(Deployment.load(data))
    try:
        recs = store.list_audit(kind=kind, actor=actor, limit=limit, offset=offset)
        total = store.count_audit()
    finally:
        store.close()
    if as_json:
        records = [
            {"seq": r.seq, "at": iso_utc(r.at), "kind": r.kind, "actor": r.actor, "subject": r.subject,
             "details": json.loads(r.data_json), "hash": r.hash}
            for r in recs
        ]  # fmt: skip
        print_json({"records": records, "total": total, "offset": offset})
        return
    columns = (
        Column("seq", whole=True),
        Column("at (UTC)", whole=True),
        Column("kind / actor", min=12),
        Column("subject", whole=True),
        Column("details", drop=1, min=16),
    )
    rows = [
        [str(r.seq), (iso_utc(r.at) or "").replace("T", "\n").rstrip("Z"), escape(f"{r.kind}\n{r.actor}"),
         escape(_subject_cell(r.subject)), escape(_short(r.data_json, 160))]
        for r in recs
    ]  # fmt: skip
    print_table(console, columns, rows)
    console.print(f"{len(recs)} of {total} records shown")


def _subject_cell(subject: str | None) -> str:
    """A subject such as ``operational:<serial>`` on two lines, so the serial is printed whole."""
    if subject is None:
        return "-"
    head, sep, tail = subject.partition(":")
    return f"{head}{sep}\n{tail}" if sep and len(subject) > 30 else subject


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


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
@click.option(
    "--no-bus",
    is_flag=True,
    help="Do not read the tree heads in the deployment's append-only NATS stream (read by default when NATS answers).",
)
@handle_errors
def audit_verify(data: Path, anchor_dir: Path | None, checkpoint_files: tuple[Path, ...], no_bus: bool) -> None:
    """Check the whole hash chain, every signed checkpoint in the database and every one kept outside
    it (the anchor folder, the append-only NATS stream, --checkpoint files); name the first bad or
    missing record."""
    from iotdlm.km import audit as km_audit
    from iotdlm.runtime import audit_stream_heads
    from iotdlm.wire import audit as wire_audit

    dep = Deployment.load(data)
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
    streamed: list[km_audit.Anchored] = []
    if no_bus:
        unreadable.append("--no-bus: the tree heads in the append-only NATS stream were not read")
    else:
        try:
            streamed, bad = run(audit_stream_heads(dep))
            unreadable += bad
        except IotdlmError as exc:
            unreadable.append(f"the append-only NATS stream was not read ({exc.message}); is the deployment up?")
    anchors += streamed
    with console.status("verifying the audit chain") as status:
        report = verify_log(dep, anchors, progress=lambda n: status.update(f"verified {n} records"))
    console.print(
        f"{report.records} records, {report.checkpoints} signed checkpoints in the database, "
        f"{len(anchors)} kept outside it ({len(streamed)} in the append-only NATS stream), "
        f"{report.unsigned_tail} records after the last checkpoint"
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


def verify_log(
    dep: Deployment, anchors: list[km_audit.Anchored], *, progress: Callable[[int], None] | None = None
) -> km_audit.AuditReport:
    """Check the whole hash chain and every signed checkpoint of ``dep``'s audit log against the
    tree heads kept outside the database (``anchors``): what ``audit verify`` and the console's
    audit page report."""
    from iotdlm.km import audit as km_audit
    from iotdlm.km.service import Schedule
    from iotdlm.pki.chain import verify_issued_by
    from iotdlm.runtime import open_store

    service_ca = dep.ca_certificate("service")
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
        return km_audit.verify(
            store,
            signer_key,  # type: ignore[arg-type]
            anchors=anchors,
            now=SystemClock().now(),
            checkpoint_every=every,
            progress=progress or (lambda _n: None),
        )
    finally:
        store.close()


@audit_group.command("witness")
@click.option("--url", required=True, help="cm's public address, e.g. https://cm.example.com.")
@click.option(
    "--state",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The witness's own folder: the signed tree heads it kept (one file each, like the anchor folder).",
)
@click.option(
    "--service-ca",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="The deployment's service CA certificate (PEM): km's tree heads must be signed under it.",
)
@click.option(
    "--tls-ca",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Trust anchor (PEM) for cm's HTTPS certificate (default: the system's).",
)
@handle_errors
def audit_witness(url: str, state: Path, service_ca: Path, tls_ca: Path | None) -> None:
    """Witness the audit log from outside: fetch and verify km's newest signed tree head from cm,
    check that it extends the one kept in --state (consistency proof), keep it. Exit 0 when
    consistent; exit 4 naming both sizes when the log was truncated or rewritten."""
    from iotdlm.km.witness import tls_context, witness

    ca = load_certificate(service_ca.read_bytes())
    result = run(witness(url, state, ca, tls=tls_context(tls_ca)))
    console.print(f"[green]{escape(result.summary)}[/green]")


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
