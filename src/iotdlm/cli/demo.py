"""``iotdlm demo``: the device lifecycle end to end, on the embedded default.

1. A deployment (root, factory / operational / service CAs, one identity per module).
2. The vendor's remote repository (TUF) publishes release 7 for the device type.
3. software-management (Table 1: cm + sm): sm finds the release through cm's egress proxy,
   verifies it, stores it with sig_sm and encrypted metadata, and reports the download.
4. provisioning-software (sm + pm): pm runs Algorithm 1 and flashes the software into blank
   simulated devices.
5. provisioning-certificate (km + pm): devices get factory and operational certificates, by a CSR
   made on the device or by a CRMF request with raVerified built by pm.
6. certificate-management (cm + km): a device re-enrolls over EST through cm; OCSP through cm says
   good, then revoked after the operator revokes it.
7. The audit log verifies.
8. Trust transfer over the network (issue 13): the fleet moves to a second deployment (SP2, its own
   NATS, km and cm); one device with other firmware fails attestation and falls back to SP1
   (:mod:`iotdlm.cli.demo_transfer`).
Every service is its own OS process under the modes supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from rich.table import Table

from iotdlm.bus.server import free_port
from iotdlm.cli.common import console, handle_errors, run
from iotdlm.cli.demo_transfer import init_sp1, transfer_fleet
from iotdlm.client.km import KmClient
from iotdlm.client.sm import SmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.device.simulated import SimulatedDevice, bench_device_id
from iotdlm.errors import IotdlmError, UnavailableError
from iotdlm.modes.table import WITHOUT_CONSOLE
from iotdlm.pki.chain import certs_to_pem, verify_issued_by
from iotdlm.pki.keys import Algorithm, generate_key, hash_for

if TYPE_CHECKING:
    from iotdlm.repository.repo import VendorRepository

DTYPE = "polarfire-soc"
T = TypeVar("T")


@click.command()
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
    run(run_demo(data, devices))


async def _until(what: str, probe: Callable[[], Awaitable[T | None]], wait: float = 90.0) -> T:
    """Poll ``probe`` until it returns something (UnavailableError counts as not yet)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            out = await probe()
            if out is not None:
                return out
        except UnavailableError:
            pass
        if time.monotonic() > deadline:
            raise UnavailableError(f"timed out waiting for {what}; see the logs under the data folder")
        await asyncio.sleep(0.25)


def _csr(key: object, name: str) -> bytes:
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    )
    return csr.sign(key, hash_for(key)).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


async def run_demo(data: Path | None, devices: int) -> None:
    import aiohttp

    from iotdlm.device.est_client import EstClient
    from iotdlm.repository.repo import VendorRepository
    from iotdlm.repository.server import RepositoryServer
    from iotdlm.supervisor.supervisor import Supervisor

    clock = SystemClock()
    tmp = tempfile.TemporaryDirectory(prefix="iotdlm-demo-")
    work = Path(tmp.name)
    data = data if data is not None else work / "data"
    passphrase = os.urandom(16).hex()
    os.environ[PASSPHRASE_ENV] = passphrase  # the services the supervisor starts decrypt the CA keys
    https_port, http_port, egress_port = free_port(), free_port(), free_port()
    console.rule("[bold]iotdlm demo[/bold]: the device lifecycle, end to end")

    dep = _create_deployment(data, passphrase, http_port, clock)
    init_sp1(dep, f"https://127.0.0.1:{https_port}", clock, passphrase.encode())  # before km starts

    vendor = VendorRepository.init(work / "vendor", now=clock.now(), report_ca=dep.root / "ca" / "service.pem")
    image = work / "firmware-7.bin"
    image.write_bytes(os.urandom(1 << 20))
    published = vendor.publish(DTYPE, 7, image, now=clock.now())
    supervisor = Supervisor(dep, commands=WITHOUT_CONSOLE)
    async with RepositoryServer(vendor) as repo_server:
        console.print(f"2. vendor repository at {repo_server.url}: {DTYPE} release 7 ({published.length} bytes)")
        bench = _configure(dep, work, repo_server.url, vendor, devices, (https_port, http_port, egress_port))
        try:
            await _software_to_certificates(dep, supervisor, repo_server, vendor, devices)
            await _field(dep, supervisor, bench, https_port, http_port, EstClient, aiohttp)
            _verify_audit(dep)
            await transfer_fleet(
                dep,
                f"https://127.0.0.1:{https_port}",
                [SimulatedDevice(bench / bench_device_id(DTYPE, i)) for i in range(1, devices + 1)],
                image,
                work,
                passphrase,
                clock,
            )
        finally:
            with console.status("stopping the services"):
                await supervisor.stop()
    if data.is_relative_to(work):
        console.print("done; the deployment was removed (use --data DIR to keep it)")
    else:
        _leave_ready(dep, passphrase)
        console.print(f"done; try `iotdlm ca list --data {data}` or `iotdlm audit list --data {data}`")
        console.print(
            f"the console: `iotdlm up --data {data}` (resumes the last mode), then `iotdlm console url --data {data}`"
        )
    hint = path_hint(sys.executable, os.environ.get("PATH", ""))
    if hint is not None:
        console.print(hint)
    tmp.cleanup()


def path_hint(executable: str, path: str) -> str | None:
    """How to get ``iotdlm`` on PATH after ``make demo`` (which runs it as .venv/bin/iotdlm), or
    ``None`` when ``iotdlm`` already is on ``path``."""
    if shutil.which("iotdlm", path=path) is not None:
        return None
    bindir = Path(os.path.abspath(executable)).parent  # the venv's bin, not where its python links to
    with contextlib.suppress(ValueError):
        bindir = bindir.relative_to(Path.cwd())
    if (bindir / "activate").is_file():
        return (
            f"`iotdlm` is not on your PATH: run `source {bindir}/activate` (the environment `make demo` made) "
            "for the commands in the README, or install it for your user with `pipx install .`"
        )
    return "`iotdlm` is not on your PATH: install it for your user with `pipx install .` (in the source folder)"


def _create_deployment(data: Path, passphrase: str, http_port: int, clock: SystemClock) -> Deployment:
    """Step 1: root and issuing CAs, one identity per module, recorded in the store."""
    from iotdlm.runtime import open_store, record_identities

    with console.status("1. creating the deployment (CAs, module identities)"):
        dep, _ = init_deployment(
            data,
            organization="Demo Factory",
            algorithm=Algorithm.P256,
            dtypes=[DTYPE],
            passphrase=passphrase.encode(),
            nats_port=free_port(),
            metrics_port=free_port(),  # never the default: another deployment may hold it
            public_url=f"http://127.0.0.1:{http_port}",
            now=clock.now(),
        )
        store = open_store(dep)
        record_identities(dep, store, clock.now())
        store.close()
    console.print(f"1. deployment in {data}")
    return dep


def _leave_ready(dep: Deployment, passphrase: str) -> None:
    """A kept deployment opens at once: ``iotdlm up`` (and the console, which issues its HTTPS
    certificate when it first starts) find the CA passphrase where ``init`` keeps one it generated
    (DIR/secrets/ca-passphrase, 0600: move it offline for real use)."""
    from iotdlm.files import atomic_write

    (dep.root / "secrets").mkdir(mode=0o700, exist_ok=True)
    atomic_write(dep.root / "secrets" / "ca-passphrase", passphrase.encode() + b"\n", mode=0o600)


def _configure(
    dep: Deployment, work: Path, repo_url: str, vendor: VendorRepository, devices: int, ports: tuple[int, int, int]
) -> Path:
    """cm's ports and egress allow-list, sm's repository, pm's bench of blank simulated devices
    (returned) and its EST URI."""
    from iotdlm.cm.config import CM_FILE
    from iotdlm.pm.config import PmConfig, save_config
    from iotdlm.sm import config as sm_config

    https_port, http_port, egress_port = ports
    (dep.root / CM_FILE).write_bytes(
        tomli_w.dumps(
            {
                "https_port": https_port,
                "http_port": http_port,
                "egress_port": egress_port,
                "allow_origins": [repo_url],
            }
        ).encode()
    )
    sm_config.setup(
        dep.root,
        repository_url=repo_url,
        root=vendor.trusted_root(),
        dtypes=[DTYPE],
        egress_proxy=f"http://127.0.0.1:{egress_port}",
    )
    bench = work / "bench"
    for i in range(1, devices + 1):
        # the same ids as `iotdlm pm bench make --no-csr-every 2`: every second device cannot make a CSR
        device_id = bench_device_id(DTYPE, i)
        SimulatedDevice.manufacture(bench / device_id, device_id, DTYPE, can_make_csr=i % 2 == 1)
    save_config(
        dep.root, DTYPE, PmConfig(bench=str(bench), enroll_uri=f"https://127.0.0.1:{https_port}/.well-known/est")
    )
    return bench


def _verify_audit(dep: Deployment) -> None:
    """Step 7: the audit log's hash chain and checkpoints verify."""
    from iotdlm.km import audit as km_audit
    from iotdlm.runtime import open_store

    store = open_store(dep)
    try:
        km_key = dep.identity("km").certificate.public_key()
        report = km_audit.verify(store, lambda _fp: km_key)  # type: ignore[arg-type,return-value]
    finally:
        store.close()
    verdict = "[green]intact[/green]" if report.ok else "[red]damaged[/red]"
    console.print(f"7. audit log: {report.records} records, {verdict}")


async def _software_to_certificates(dep, supervisor, repo_server, vendor, devices: int) -> None:  # type: ignore[no-untyped-def]
    from iotdlm.modes.table import Mode
    from iotdlm.pm.service import PmClient
    from iotdlm.runtime import connect_identity, km_trust

    with console.status("3. software-management (cm + sm): sm checks the repository through cm"):
        await supervisor.start(Mode.SOFTWARE_MANAGEMENT, by="demo")
        admin, _ = await connect_identity(dep, "admin")
        sm = SmClient(admin)

        async def stored() -> list | None:  # type: ignore[type-arg]
            await sm.notify(DTYPE)
            versions = await sm.list(DTYPE)
            return versions or None

        versions = await _until("sm to store the release", stored)
    v = versions[-1]
    console.print(
        f"3. sm stored {DTYPE} release {v.release_counter} (sha256 {v.sha256[:16]}...) with sig_sm and encrypted "
        f"metadata; repository received {len(vendor.reports())} signed download report(s); "
        f"requests carried no installed version"
    )
    pm = PmClient(admin, DTYPE)
    try:
        with console.status("4. provisioning-software (sm + pm): Algorithm 1, then flashing"):
            await supervisor.switch(Mode.PROVISIONING_SOFTWARE, with_sm=True, by="demo")
            await _until("pm to start", pm.status)
            first = await pm.provision(operator="demo")
        console.print(f"4. software flashed into {sum('software' in d.steps_done for d in first.devices)} devices")
        with console.status("5. provisioning-certificate (km + pm): certificates"):
            await supervisor.switch(Mode.PROVISIONING_CERTIFICATE, by="demo")
            km = KmClient(admin, sealer_for_module(dep, "admin"), SystemClock(), trust=km_trust(dep))
            await _until("km to start", km.chain)
            await _until("pm to start", pm.status)
            second = await pm.provision(operator="demo")
        table = Table("device", "request", "factory", "operational", "status")
        for d in second.devices:
            how = {"csr": "CSR made on the device", "crmf": "CRMF raVerified by pm"}.get(d.request or "", "-")
            status = "[green]complete[/green]" if d.status == "complete" else f"[red]{d.status}: {d.message}[/red]"
            table.add_row(
                d.device_id,
                how,
                d.certificates.get("factory", "-")[:10],
                d.certificates.get("operational", "-")[:10],
                status,
            )
        console.print("5. provisioned (certificates verified on each device against the truststore flashed into it):")
        console.print(table)
        # Req.4: only an authorized entity gets device certificates
        try:
            key = generate_key(Algorithm.P256)
            await KmClient(admin, sealer_for_module(dep, "cm"), SystemClock(), trust=km_trust(dep)).issue(
                "intruder-1", "operational", csr=_csr(key, "intruder-1")
            )
            console.print("[red]   a cm-signed request for a device certificate was accepted: this is a bug[/red]")
        except IotdlmError as exc:
            console.print(
                f"   a cm-signed request for a device certificate: [yellow]refused[/yellow] ({exc.code}: {exc.message})"
            )
    finally:
        await admin.close()


def sealer_for_module(dep, name: str):  # type: ignore[no-untyped-def]
    from iotdlm.runtime import sealer_for

    return sealer_for(dep.identity(name))


async def _field(dep, supervisor, bench: Path, https_port: int, http_port: int, EstClient, aiohttp) -> None:  # type: ignore[no-untyped-def]
    from iotdlm.client.km import KmClient as _Km
    from iotdlm.modes.table import Mode
    from iotdlm.runtime import connect_identity, km_trust

    with console.status("6. certificate-management (cm + km): a device re-enrolls over EST"):
        await supervisor.switch(Mode.CERTIFICATE_MANAGEMENT, by="demo")
        device = SimulatedDevice(bench / bench_device_id(DTYPE, 1))
        cert_pem, key_pem = device.tls_identity("operational")
        anchor = certs_to_pem([dep.ca_certificate("root")])
        new_key = generate_key(Algorithm.P256)

        async def enroll() -> x509.Certificate | None:
            async with EstClient(
                f"https://127.0.0.1:{https_port}",
                trust_anchor_pem=anchor,
                client_cert_pem=cert_pem,
                client_key_pem=key_pem,
            ) as est:
                issued: x509.Certificate = await est.simplereenroll(_csr(new_key, device.device_id))
                return issued

        cert = await _until("cm to answer EST", enroll)
    verify_issued_by(cert, dep.ca_certificate("operational"), now=SystemClock().now())
    serial = format(cert.serial_number, "x")[:10]
    console.print(f"6. {device.device_id} re-enrolled over EST through cm: new operational certificate {serial}")

    async def ocsp_status() -> str:
        req = (
            ocsp.OCSPRequestBuilder().add_certificate(cert, dep.ca_certificate("operational"), hashes.SHA256()).build()
        )
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{http_port}/ocsp",
                data=req.public_bytes(serialization.Encoding.DER),
                headers={"Content-Type": "application/ocsp-request"},
            ) as resp,
        ):
            answer = ocsp.load_der_ocsp_response(await resp.read())
        return answer.certificate_status.name.lower()

    console.print(f"   OCSP over HTTP through cm: {await ocsp_status()}")
    admin, _ = await connect_identity(dep, "admin")
    try:
        await _Km(admin, sealer_for_module(dep, "admin"), SystemClock(), trust=km_trust(dep)).revoke(
            serial=format(cert.serial_number, "x"), reason="keyCompromise"
        )
    finally:
        await admin.close()
    console.print(f"   the operator revokes it (keyCompromise); OCSP through cm at once: {await ocsp_status()}")
