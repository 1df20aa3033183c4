"""``iotdlm ca renew`` and ``iotdlm ca certificate``: renew a certificate, or make a key and its
certificate in one step (as ``step ca renew`` / ``step ca certificate`` do), from the data folder.

Both act as the operator (the admin identity) directly on the store with the CA keys, like
``ca issue``; both check where they will write before they issue anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from iotdlm.cli.cert_format import encode_certificates, format_option
from iotdlm.cli.common import console, data_option, handle_errors
from iotdlm.cli.output import parse_serial as parse_serial  # one parser for every command (ADR 0020)
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, ConflictError, NotFoundError

if TYPE_CHECKING:
    import datetime as dt

    from iotdlm.km import Km
    from iotdlm.km.ra import ModulePrincipal
    from iotdlm.pki.keys import PrivateKey
    from iotdlm.store import CertRecord, Store

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-3072")


def check_output(path: Path, force: bool, what: str) -> None:
    """Refuse, before anything is issued, an output file that cannot or should not be written."""
    if path.is_dir():
        raise BadRequestError(f"{what} {path} is a folder; give a file name", field=what.lstrip("-"))
    if not path.parent.is_dir():
        raise BadRequestError(
            f"{what} {path}: folder {path.parent} does not exist; create it first", field=what.lstrip("-")
        )
    if path.exists() and not force:
        raise ConflictError(f"{what} {path} exists; give --force to overwrite it", field=what.lstrip("-"))


def _admin(dep: Deployment) -> ModulePrincipal:
    from iotdlm.km.ra import ModulePrincipal
    from iotdlm.pki.ca import fingerprint

    return ModulePrincipal("admin", None, fingerprint(dep.identity("admin").certificate))


def _pem_bundle(kmcore: Km, rec: CertRecord) -> bytes:
    """The certificate and the CA that issued it (what a TLS client or server presents)."""
    from iotdlm.pki.chain import certs_to_pem, load_certificate

    return certs_to_pem([load_certificate(rec.der), kmcore.cas[rec.issuer].certificate])


def _print(rec: CertRecord, rows: list[tuple[str, str]], as_json: bool) -> None:
    fields = {
        "serial": format(rec.serial, "x"),
        "issuer": rec.issuer,
        "device_id": rec.device_id,
        "profile": rec.profile,
        "not_before": rec.not_before.isoformat(),
        "not_after": rec.not_after.isoformat(),
        "sha256": rec.fingerprint,
    }
    extra = dict(rows)
    if as_json:
        click.echo(json.dumps({**fields, **extra}, sort_keys=True))
        return
    table = Table(show_header=False)
    for key, value in [*fields.items(), *extra.items()]:
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


def _find(store: Store, serial: int, issuer: str | None) -> CertRecord:
    recs = [r for r in store.find_by_serial(serial) if issuer is None or r.issuer == issuer]
    if not recs:
        raise NotFoundError(
            f"no certificate with serial {serial:x}; `iotdlm ca list` shows the serials", field="serial"
        )
    if len(recs) > 1:
        names = ", ".join(r.issuer for r in recs)
        raise BadRequestError(f"serial {serial:x} was issued by {names}: choose one with --issuer", field="serial")
    return recs[0]


@click.command("renew")
@data_option
@click.argument("serial")
@click.option(
    "--csr",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Renew for this new key (PKCS#10 request, PEM/DER) instead of the same key.",
)
@click.option("--issuer", type=click.Choice(["factory", "operational", "service"]), help="If the serial is ambiguous.")
@click.option(
    "--out", type=click.Path(path_type=Path), help="Write the new certificate and its CA here (PEM; default: print)."
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the new certificate's details as one JSON object.")
@handle_errors
def ca_renew(
    data: Path, serial: str, csr: Path | None, issuer: str | None, out: Path | None, force: bool, as_json: bool
) -> None:
    """Renew a valid certificate: same device and profile, new validity; the old one is superseded.

    The new certificate certifies the same public key, or the key of --csr. The old certificate
    stays good for `superseded_grace_seconds` (iotdlm.toml), then OCSP and CRLs say revoked
    (reason superseded). The renewal is in the audit log. Factory certificates are not renewable.
    """
    from iotdlm.runtime import build_km, open_store

    value = parse_serial(serial)
    if out is not None:
        check_output(out, force, "--out")
    dep = Deployment.load(data)
    store = open_store(dep)
    try:
        old = _find(store, value, issuer)
        kmcore = build_km(dep, store, SystemClock())
        grant, rec, left_out = kmcore.prepare_renewal(_admin(dep), old, csr.read_bytes() if csr else None)
        (rec,) = kmcore.commit([(grant, rec)])
        pem = _pem_bundle(kmcore, rec)
    finally:
        store.close()
    if out is not None:
        from iotdlm.files import atomic_write

        atomic_write(out, pem, mode=0o644)
    rows = [("supersedes", format(old.serial, "x")), ("key", "new (from --csr)" if csr else "same as before")]
    if out is not None:
        rows.append(("file", str(out)))
    if left_out:
        rows.append(("dropped from the request", "; ".join(left_out)))
    _print(rec, rows, as_json)
    if out is None and not as_json:
        click.echo(pem.decode(), nl=False)


@click.command("certificate")
@data_option
@click.option("--device-id", required=True, help="The device (or client) the certificate is for.")
@click.option("--profile", required=True, help="factory, operational, service, tls-server or ocsp.")
@click.option(
    "--key-out",
    type=click.Path(path_type=Path),
    required=True,
    help="Write the new private key here (PEM, mode 0600, unencrypted).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Write the certificate and its CA here.")
@format_option("the certificate and its CA (C509: one COSE_C509 bag)")
@click.option("--key-type", type=click.Choice(KEY_TYPES), help="Key type (default: the deployment's algorithm).")
@click.option("--dtype", help="Register the device as this device type.")
@click.option(
    "--force",
    is_flag=True,
    help="Overwrite --key-out and --out, and issue even if the device holds a valid certificate of the profile.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the certificate's details as one JSON object.")
@handle_errors
def ca_certificate(
    data: Path,
    device_id: str,
    profile: str,
    key_out: Path,
    out: Path,
    key_type: str | None,
    dtype: str | None,
    force: bool,
    as_json: bool,
    fmt: str = "pem",
) -> None:
    """Make a new key and its certificate in one step (for operators and tests).

    The key is made here, never leaves this machine but in --key-out (mode 0600), and the
    certificate is issued as the operator (RA rule `operator`). Nothing is written over an
    existing file unless --force.
    """
    from iotdlm.pki.keys import Algorithm, generate_key, private_key_to_pem
    from iotdlm.pki.names import check_id

    check_id(device_id)
    if key_out.resolve() == out.resolve():
        raise BadRequestError("--key-out and --out must be different files", field="key-out")
    check_output(key_out, force, "--key-out")
    check_output(out, force, "--out")
    dep = Deployment.load(data)
    key = generate_key(Algorithm(key_type or dep.config.algorithm))
    rec, pem = _issue_for_key(dep, key, device_id, profile, dtype, force, fmt)
    from iotdlm.files import atomic_write

    atomic_write(key_out, private_key_to_pem(key, None), mode=0o600)
    atomic_write(out, pem, mode=0o644)
    _print(rec, [("key", str(key_out)), ("file", str(out))], as_json)


def _issue_for_key(
    dep: Deployment, key: PrivateKey, device_id: str, profile: str, dtype: str | None, force: bool, fmt: str = "pem"
) -> tuple[CertRecord, bytes]:
    """Issue a certificate of ``profile`` for ``key`` (a CSR signed with it proves possession)."""
    import dataclasses

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    from iotdlm.pki.keys import hash_for
    from iotdlm.runtime import build_km, open_store
    from iotdlm.wire import km as msg

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hash_for(key))
    item = msg.IssueItem(device_id=device_id, profile=profile, csr=csr.public_bytes(serialization.Encoding.DER))
    store = open_store(dep)
    try:
        kmcore = build_km(dep, store, SystemClock())
        if not force:
            _refuse_second(store, device_id, profile, kmcore.clock.now())
        grant, rec, _left_out = kmcore.prepare(_admin(dep), item, "issue")
        if dtype:
            grant = dataclasses.replace(grant, dtype=dtype)
        (rec,) = kmcore.commit([(grant, rec)])
        if fmt == "pem":
            return rec, _pem_bundle(kmcore, rec)
        ca_der = kmcore.cas[rec.issuer].certificate.public_bytes(serialization.Encoding.DER)
        return rec, encode_certificates([rec.der, ca_der], fmt, bag=True, serial=f"{rec.serial:x}")
    finally:
        store.close()


def _refuse_second(store: Store, device_id: str, profile: str, now: dt.datetime) -> None:
    for rec in store.list_certificates(device_id=device_id, profile=profile, status="valid", limit=20):
        if rec.not_before <= now <= rec.not_after:
            raise ConflictError(
                f"device {device_id} already holds a valid {profile} certificate (serial {rec.serial:x}); "
                f"renew it with `iotdlm ca renew {rec.serial:x}`, or give --force to issue another",
                device_id=device_id,
            )
