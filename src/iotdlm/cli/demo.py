"""``iotdlm demo``: a deployment in a folder, the embedded NATS server, km as its own process,
and a provisioning line asking km for device certificates the two ways the paper gives:
a CSR made on the device (Fig. 4) and a CRMF request with raVerified made by pm (Fig. 5)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.table import Table

from iotdlm.bus.server import free_port
from iotdlm.cli.common import console
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import PASSPHRASE_ENV, init_deployment
from iotdlm.errors import IotdlmError, UnavailableError
from iotdlm.pki import crmf
from iotdlm.pki.chain import load_certificate, verify_issued_by
from iotdlm.pki.keys import Algorithm, generate_key, hash_for
from iotdlm.pki.names import device_subject
from iotdlm.wire import km as msg

DTYPE = "polarfire-soc"


async def _wait_for_km(client: KmClient, wait: float = 30.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            await client.chain()
            return
        except UnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def run_demo(data: Path | None, devices: int) -> None:
    from iotdlm.modes.supervisor import Supervisor
    from iotdlm.modes.table import Mode
    from iotdlm.runtime import connect_identity, open_store, record_identities, sealer_for

    clock = SystemClock()
    tmp = None
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="iotdlm-demo-")
        data = Path(tmp.name) / "data"
    passphrase = os.urandom(16).hex()
    console.rule("[bold]iotdlm demo[/bold]: km over NATS")
    with console.status("creating deployment (root, factory, operational and service CAs; module identities)"):
        dep, _ = init_deployment(
            data,
            organization="Demo Factory",
            algorithm=Algorithm.P256,
            dtypes=[DTYPE],
            passphrase=passphrase.encode(),
            nats_port=free_port(),
            now=clock.now(),
        )
        store = open_store(dep)
        record_identities(dep, store, clock.now())
        store.close()
    console.print(f"deployment in {data}")

    os.environ[PASSPHRASE_ENV] = passphrase  # the services the supervisor starts decrypt the CA keys
    supervisor = Supervisor(dep)
    with console.status("starting NATS and the services of provisioning-certificate (Table 1: km and pm)"):
        await supervisor.start(Mode.PROVISIONING_CERTIFICATE, by="demo")
    console.print(f"embedded NATS on {supervisor.nats_url}, one user per module; mode provisioning-certificate")
    try:
        pm_bus, pm_ident = await connect_identity(dep, f"pm-{DTYPE}")
        pm = KmClient(pm_bus, sealer_for(pm_ident), clock)
        with console.status("waiting for km"):
            await _wait_for_km(pm)
        km_pid = supervisor.services()["km"].pid
        console.print(f"km running as its own process (pid {km_pid}), supervised")
        chain = await pm.chain()
        root = x509.load_der_x509_certificate(chain.root)
        cas = {n: x509.load_der_x509_certificate(c[0]) for n, c in chain.chains.items()}

        rows: list[tuple[str, str, str, msg.IssuedCertificate]] = []
        half = max(1, devices // 2)
        # Scenario 2a: the device makes its key and a CSR; pm forwards it in a pm-signed request
        for i in range(half):
            dev = f"{DTYPE}-{i:04d}"
            key = generate_key(Algorithm.P256)
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, dev)]))
                .sign(key, hash_for(key))
                .public_bytes(serialization.Encoding.DER)
            )
            issued = await pm.issue(dev, "operational", csr=csr)
            rows.append((dev, "CSR by device", "single", issued))
        # Scenario 2b: the device only hands over its public key; pm builds CRMF with raVerified.
        # A provisioning line sends them as one batch.
        items = []
        for i in range(half, devices):
            dev = f"{DTYPE}-{i:04d}"
            pub = generate_key(Algorithm.P256).public_key()
            der = crmf.build_ra_verified(i, device_subject(dev, "Demo Factory", DTYPE), pub)
            items.append(msg.IssueItem(device_id=dev, profile="factory", crmf=der))
        if items:
            for r in await pm.issue_batch(items):
                if r.certificate is None:
                    raise IotdlmError(f"{r.device_id}: {r.error}")
                rows.append((r.device_id, "CRMF raVerified by pm", "batch", r.certificate))

        table = Table("device", "request (sent as)", "profile", "serial", "chain")
        for dev, how, sent, ic in rows:
            cert = load_certificate(ic.certificate)
            try:
                verify_issued_by(cert, cas[ic.issuer], now=clock.now())
                verify_issued_by(cas[ic.issuer], root, now=clock.now(), eku=None)
                ok = "[green]verified[/green]"
            except IotdlmError as exc:
                ok = f"[red]{exc.message}[/red]"
            table.add_row(dev, f"{how} ({sent})", ic.profile, ic.serial[:10], ok)
        console.print(table)

        # Req.4: only an authorized entity gets device certificates. Two layers say no:
        # the NATS server (cm may not even publish there) and km's RA (deny by default).
        cm_bus, cm_ident = await connect_identity(dep, "cm")
        cm = KmClient(cm_bus, sealer_for(cm_ident), clock)
        for who, client, device, profile in (
            ("cm asks for a device certificate", cm, "intruder-1", "operational"),
            ("pm asks for a service certificate", pm, f"{DTYPE}-9999", "service"),
        ):
            try:
                await client.issue(device, profile, csr=csr)
                console.print(f"[red]{who}: allowed -- this is a bug[/red]")
            except IotdlmError as exc:
                console.print(f"{who}: [yellow]refused[/yellow] ({exc.code}: {exc.message})")
        await cm_bus.close()
        await pm_bus.close()
        console.print(
            f"{len(rows)} certificates issued and recorded; try `iotdlm ca list --data {data}`"
            if tmp is None
            else f"{len(rows)} certificates issued and recorded (deployment removed; use --data DIR to keep it)"
        )
    finally:
        await supervisor.stop()
        if tmp is not None:
            tmp.cleanup()
