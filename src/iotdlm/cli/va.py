"""``iotdlm va``: ask for a certificate's status as a relying party would (OCSP)."""

from __future__ import annotations

from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.table import Table

from iotdlm.cli.common import console, data_option, handle_errors, run
from iotdlm.cli.output import parse_serial
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import NotFoundError
from iotdlm.pki.chain import load_certificate


@click.group()
def va() -> None:
    """Validation authority: ask for a certificate's status as a relying party would."""


@va.command("ocsp")
@data_option
@click.option(
    "--serial", required=True, help="Serial of the certificate to check (hex, as `ca list` or openssl prints it)."
)
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
        recs = store.find_by_serial(parse_serial(serial))
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
