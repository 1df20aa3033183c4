"""``iotdlm ca rotate``: a new issuing CA beside the old one, with an overlap (issue 16; ADR 0026).

The rotation runs as the operator (the admin identity) directly on the data folder and the store
with the CA keys, like ``ca renew``: the new CA's key is made by
:func:`iotdlm.deployment.new_issuing_ca` (the one place CA keys are made) and signed by the root;
the new CA certificate is recorded as the root's (so ``ca revoke-ca`` can list it on the root's
CRL) with an audit record of kind ``ca_rotation`` in the same transaction; then
``ca/generations.json`` names the new generation active. The pure rules are
:mod:`iotdlm.pki.rotation`. ``ca show NAME`` and ``ca list --cas`` show each CA's state.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from iotdlm.cli.common import console, data_option, handle_errors
from iotdlm.cli.output import Column, iso_utc, json_option, print_json, print_table
from iotdlm.clock import Clock, SystemClock
from iotdlm.deployment import GENERATIONS_FILE, Deployment
from iotdlm.errors import ConflictError
from iotdlm.pki import rotation

if TYPE_CHECKING:
    from cryptography import x509

    from iotdlm.pki.ca import IssuingCA
    from iotdlm.store import Store


@dataclass(frozen=True)
class Rotated:
    new: IssuingCA
    old: rotation.Generation  # as it is after the rotation (rotated_at, overlap_until set)
    checkpoint: int | None  # the audit record up to which km's key signed a tree head at once


def rotate_ca(
    dep: Deployment, store: Store, role: str, *, overlap: dt.timedelta, clock: Clock, passphrase: bytes, actor: str
) -> Rotated:
    """Rotate issuing CA ``role``: a new generation (new key, signed by the root) becomes active
    now; the old one is rotated out, in /cacerts until ``now + overlap``. Audited."""
    from iotdlm.deployment import new_issuing_ca
    from iotdlm.km import audit as km_audit
    from iotdlm.km.va import ca_record
    from iotdlm.runtime import load_root
    from iotdlm.store import AuditEntry
    from iotdlm.wire import audit as fmt

    now = clock.now()
    before = dep.ca_generations()
    after, new_gen = rotation.rotate(before, role, now=now, overlap=overlap)
    old_gen = next(g for g in after if g.role == role and g.number == new_gen.number - 1)
    for suffix in (".pem", ".key.pem"):
        if (dep.root / "ca" / f"{new_gen.name}{suffix}").exists():
            raise ConflictError(
                f"{dep.root / 'ca' / (new_gen.name + suffix)} exists but ca/{GENERATIONS_FILE} does not name it: "
                "move it aside (a rotation that stopped half-way) and run `ca rotate` again",
                field="ca",
            )
    root = load_root(dep, passphrase)  # a wrong passphrase stops here, before anything is made
    old_cert = dep.ca_certificate(old_gen.name)
    life = old_cert.not_valid_after_utc - old_cert.not_valid_before_utc  # as long as the old one's
    new = new_issuing_ca(dep, role, new_gen, root.signer, root.certificate, passphrase, now=now, validity=life)
    audit = AuditEntry(
        at=now,
        kind=fmt.CA_ROTATION,
        actor=actor,
        subject=f"ca:{role}",
        data={
            "role": role,
            "new": new_gen.name,
            "new_sha256": _sha256(new.certificate),
            "new_serial": format(new.certificate.serial_number, "x"),
            "old": old_gen.name,
            "old_sha256": _sha256(old_cert),
            "overlap_until": iso_utc(old_gen.overlap_until),
        },
    )
    store.add_certificates([ca_record(new.certificate, actor, now)], audit=[audit])
    dep.write_ca_generations(after)
    # the rotation's record under a tree head signed with km's key now, not at km's next minute
    ident = dep.identity("km")
    cp = km_audit.checkpoint(store, ident.key, ident.certificate, now, anchor_dir=dep.audit_anchor_dir)
    return Rotated(new=new, old=old_gen, checkpoint=None if cp is None else cp.seq)


def _sha256(cert: x509.Certificate) -> str:
    from iotdlm.pki.ca import fingerprint

    return fingerprint(cert)


def ca_states(dep: Deployment, store: Store, now: dt.datetime) -> list[dict[str, object]]:
    """Every issuing CA generation with its state (keys in docs/operations.md, "JSON output")."""
    out: list[dict[str, object]] = []
    for gen in sorted(dep.ca_generations(), key=lambda g: (g.role, g.number)):
        cert = dep.ca_certificate(gen.name)
        last = store.last_expiry(gen.name, except_profile="ocsp")
        out.append(
            {
                "name": gen.name,
                "role": gen.role,
                "generation": gen.number,
                "state": str(gen.state(now, last)),
                "in_cacerts": gen.in_cacerts(now),
                "rotated_at": iso_utc(gen.rotated_at),
                "overlap_until": iso_utc(gen.overlap_until),
                "last_certificate_expires": iso_utc(last),
                "subject": cert.subject.rfc4514_string(),
                "serial": format(cert.serial_number, "x"),
                "not_after": iso_utc(cert.not_valid_after_utc),
                "sha256": _sha256(cert),
            }
        )
    return out


def is_ca_name(dep: Deployment, text: str) -> bool:
    return text in {g.name for g in dep.ca_generations()}


def show_ca(dep: Deployment, name: str, as_json: bool) -> None:
    """``ca show NAME``: one issuing CA generation and its state."""
    from iotdlm.runtime import open_store

    store = open_store(dep)
    try:
        row = next(r for r in ca_states(dep, store, SystemClock().now()) if r["name"] == name)
    finally:
        store.close()
    if as_json:
        print_json(row)
        return
    table = Table(show_header=False)
    for key, value in row.items():
        table.add_row(key.replace("_", " "), "-" if value is None else str(value))
    table.columns[1].overflow = "fold"
    console.print(table)


def list_cas(dep: Deployment, as_json: bool) -> None:
    """``ca list --cas``: every issuing CA generation and its state."""
    from iotdlm.runtime import open_store

    store = open_store(dep)
    try:
        rows = ca_states(dep, store, SystemClock().now())
    finally:
        store.close()
    if as_json:
        print_json({"cas": rows})
        return
    columns = (
        Column("name", whole=True),
        Column("state", whole=True),
        Column("in /cacerts"),
        Column("overlap until", drop=2),
        Column("last cert expires", drop=3),
    )
    print_table(
        console,
        columns,
        [
            [str(r["name"]), str(r["state"]), "yes" if r["in_cacerts"] else "no", _day(r["overlap_until"]),
             _day(r["last_certificate_expires"])]
            for r in rows
        ],
    )  # fmt: skip


def _day(value: object) -> str:
    return str(value)[:10] if value else "-"


@click.command("rotate")
@data_option
@click.argument("issuing_ca", metavar="ISSUING-CA", type=click.Choice(rotation.ROTATABLE_ROLES))
@click.option(
    "--overlap-days",
    type=click.IntRange(0, rotation.MAX_OVERLAP.days),
    default=rotation.DEFAULT_OVERLAP.days,
    show_default=True,
    help="How long devices are told to trust both the old and the new CA.",
)
@json_option
@handle_errors
def ca_rotate(data: Path, issuing_ca: str, overlap_days: int, as_json: bool) -> None:
    """Replace an issuing CA with a new one, keeping the old one trusted for an overlap.

    ISSUING-CA is operational or factory. The new CA has a new key and is signed by the root.

    From now on the new CA issues every new certificate and renewal. For --overlap-days,
    EST /cacerts lists both CAs, so devices add the new one to their truststore when they fetch
    it; then only the new one. The old CA's CRLs and OCSP answers go on until the last
    certificate it issued expires (`iotdlm ca list --cas` then says retired). Restart km and cm
    (`iotdlm down`, then `iotdlm up`) so they load the new CA. Audited.
    """
    from iotdlm.cli.ca_extra import _admin
    from iotdlm.runtime import open_store

    dep = Deployment.load(data)
    store = open_store(dep)
    try:
        done = rotate_ca(
            dep,
            store,
            issuing_ca,
            overlap=dt.timedelta(days=overlap_days),
            clock=SystemClock(),
            passphrase=dep.passphrase(),
            actor=_admin(dep).describe() + " (local CLI)",
        )
    finally:
        store.close()
    new = done.new
    out = {
        "role": issuing_ca,
        "new": new.name,
        "new_subject": new.certificate.subject.rfc4514_string(),
        "new_sha256": _sha256(new.certificate),
        "old": done.old.name,
        "overlap_until": iso_utc(done.old.overlap_until),
        "audit_checkpoint": done.checkpoint,
    }
    if as_json:
        print_json(out)
        return
    console.print(
        f"the {issuing_ca} CA is rotated: {new.name} ({out['new_subject']}) issues from now on; "
        f"{done.old.name} is rotated out and stays in /cacerts until {out['overlap_until']}. "
        f"Audited (record {done.checkpoint}, under a tree head signed with km's key).\n"
        f"Next: `iotdlm restart --data {data} km cm` so they load {new.name} (the mode stays; with no "
        f"supervisor running, they load it when they start)."
    )


__all__ = ["Rotated", "ca_rotate", "ca_states", "is_ca_name", "list_cas", "rotate_ca", "show_ca"]
