"""Step 8 of ``iotdlm demo``: the demo fleet moves to a second deployment over the network (issue 13).

The operators' steps are the CLI as docs/operations.md section 10 writes them, each its own
process; the devices run ``fleet run``'s loop (:func:`iotdlm.cli.fleet.runner_for`), every step
over HTTPS:

SP2 (a second deployment under the demo's data folder, its own NATS, km and cm on free loopback
ports, under its own supervisor) registers SP1's permanent CA; SP1 exports --serve; SP2 accepts
--from --send and publishes its update; SP1 delivers; each device fetches its message at SP1's cm,
attests at SP2 -- one runs other firmware than the reference, fails attestation and falls back to
SP1 -- the rest update and re-enroll with CA2 for a NEW key (FR3); SP2 confirms --send; CA1
revokes. A table of each device's status at both providers (what ``transfer status --devices``
lists at each) and a one-line summary close it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import tomli_w
from rich.table import Table

from iotdlm.bus.server import free_port
from iotdlm.cli.common import console
from iotdlm.clock import Clock
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import IotdlmError, UnavailableError, UntrustedError
from iotdlm.modes.table import WITHOUT_CONSOLE
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.est_proof import spki_sha256
from iotdlm.pki.keys import Algorithm, check_public_key

SP1_ID = "urn:example:provider:demo-sp1"
SP2_ID = "urn:example:provider:demo-sp2"
UPDATE = b"release 8 from SP2\n" * 256
OTHER_FIRMWARE = b"release 7, patched by someone\n" * 256


class DemoStepError(IotdlmError):
    """An operator's command in the demo failed."""

    code = "demo_step_failed"


def init_sp1(dep: Deployment, https_url: str, clock: Clock, passphrase: bytes) -> None:
    """``transfer init`` for the demo's deployment (SP1), before km starts: km then serves the
    provider-to-provider handlers, and cm's fallback route names SP1's cm."""
    from iotdlm.transfer.identity import TransferSettings, create_identity

    settings = TransferSettings(provider_id=SP1_ID, fallback_uri=f"{https_url}/transfer/fallback")
    create_identity(dep, settings, now=clock.now(), passphrase=passphrase)


def key_of(dev: SimulatedDevice, kind: str) -> str | None:
    """The SPKI SHA-256 of the device's ``kind`` certificate's key (None: it has none)."""
    cert = dev.certificate(kind)
    return None if cert is None else spki_sha256(check_public_key(cert.public_key()))


async def iotdlm(*args: str, columns: int = 80) -> str:
    """One operator command, as its own process; its output (exit code 0) or a DemoStepError."""
    env = {**os.environ, "COLUMNS": str(columns)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iotdlm.cli.main", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise DemoStepError(f"`iotdlm {' '.join(args[:2])}` failed (exit {proc.returncode}): {text.strip()}")
    return text


def _create_sp2(root: Path, passphrase: str, sp1: Deployment, clock: Clock) -> tuple[Deployment, str]:
    """SP2: a deployment of its own (CAs, identities, NATS and cm ports), its transfer identity,
    and SP1's permanent CA registered with CA2 (``transfer register-ca``) before cm starts."""
    from iotdlm.cm.config import CM_FILE
    from iotdlm.km.registry import FactoryRegistry
    from iotdlm.runtime import open_store, record_identities
    from iotdlm.transfer.identity import TransferSettings, create_identity

    https_port, http_port, egress_port = free_port(), free_port(), free_port()
    url = f"https://127.0.0.1:{https_port}"
    dep, _ = init_deployment(
        root, organization="Demo Operator Two", algorithm=Algorithm.P256, dtypes=[sp1.config.dtypes[0]],
        passphrase=passphrase.encode(), nats_port=free_port(), public_url=f"http://127.0.0.1:{http_port}",
        metrics_port=free_port(), now=clock.now(),
    )  # fmt: skip
    (dep.root / CM_FILE).write_bytes(
        tomli_w.dumps({"https_port": https_port, "http_port": http_port, "egress_port": egress_port}).encode()
    )
    settings = TransferSettings(
        provider_id=SP2_ID, fallback_uri=f"{url}/transfer/fallback", enroll_uri=f"{url}/.well-known/est"
    )
    create_identity(dep, settings, now=clock.now(), passphrase=passphrase.encode())
    store = open_store(dep)
    try:
        record_identities(dep, store, clock.now())
        FactoryRegistry(store, clock, enroll_uri=settings.enroll_uri).register_cas(
            [sp1.ca_certificate("root"), sp1.ca_certificate("factory")], actor="demo"
        )
    finally:
        store.close()
    return dep, url


async def transfer_fleet(
    sp1: Deployment,
    sp1_url: str,
    devices: Sequence[SimulatedDevice],
    reference: Path,
    work: Path,
    passphrase: str,
    clock: Clock,
) -> None:
    """Step 8 (see the module's docstring). ``reference``: the image SP1 flashed (slot-a)."""
    from iotdlm.cli.fleet import drive, runner_for
    from iotdlm.modes.table import Mode
    from iotdlm.supervisor.supervisor import Supervisor

    with console.status("8. trust transfer: starting SP2 (its own NATS, km and cm)"):
        sp2, sp2_url = await asyncio.to_thread(_create_sp2, sp1.root / "sp2", passphrase, sp1, clock)
        supervisor = Supervisor(sp2, commands=WITHOUT_CONSOLE)
        await supervisor.start(Mode.CERTIFICATE_MANAGEMENT, by="demo")
    try:
        console.print(f"8. SP2 deployment in {sp2.root}: cm at {sp2_url}; SP1's root and factory CA registered")
        stay = [d for d in devices if not d.hardware.can_make_csr]
        devices = [d for d in devices if d.hardware.can_make_csr]
        if len(devices) < 2:
            raise DemoStepError("the trust transfer needs two devices that can make a CSR: give --devices 3 or more")
        if stay:
            console.print(
                f"   {len(stay)} device(s) cannot make a CSR (FR3: a new key pair made on the device with CA2) "
                f"and stay with SP1; {len(devices)} are handed over"
            )
        files = work / "transfer"
        files.mkdir(exist_ok=True)
        other = files / "other.bin"
        other.write_bytes(OTHER_FIRMWARE)
        ids = [d.device_id for d in devices]
        bad = devices[-1]
        bad.write_image("slot-a", other, {"version": "7"})  # not what SP1 flashed: attestation will tell
        old_keys = {d.device_id: key_of(d, "operational") for d in devices}
        tid, sp1_root = await _hand_over(sp1, sp1_url, sp2, sp2_url, devices, reference, files)

        with console.status("   SP2's cm takes SP1's factory CA once its km answers"):
            await _until_cm_trusts(sp2_url, devices[0], certs_to_pem([sp2.ca_certificate("root")]))
        with console.status("   the devices fetch, attest at SP2, update and re-enroll with CA2"):
            runners = [runner_for(d, clock, renew_at=2 / 3, timeout=60.0) for d in devices]
            await drive(runners, once=True, interval=1.0, progress=False)
        moved = [
            d for d in devices if (c := d.certificate("operational")) is not None
            and c.issuer == sp2.ca_certificate("operational").subject
        ]  # fmt: skip
        new_keys = sum(1 for d in moved if key_of(d, "operational") != old_keys[d.device_id])
        updated = sum(1 for d in moved if d.image_sha256("slot-b") == hashlib.sha256(UPDATE).hexdigest())
        console.print(
            f"   {len(moved)} device(s) attested at SP2 and re-enrolled with CA2 ({new_keys} with a new key "
            f"pair, FR3; {updated} with SP2's release 8 installed first)"
        )
        reasons = await _fallback_reasons(sp1, tid, ids)
        for device_id, why in reasons.items():
            if device_id != bad.device_id:
                console.print(f"   [red]{device_id} fell back too: {why}[/red]")
        back = bad.certificate("operational")
        with_sp1 = back is not None and back.issuer == sp1.ca_certificate("operational").subject
        console.print(
            f"   {bad.device_id} runs other firmware: attestation at SP2 failed and it fell back to SP1 "
            + ("(still on its CA1 certificate)" if with_sp1 else "[red](but it left CA1: this is a bug)[/red]")
        )
        console.print(f"   its report to SP1's fallback route: {reasons.get(bad.device_id, 'none came')}")

        with console.status("   SP2 confirms --send; CA1 revokes the moved devices' certificates"):
            said = await iotdlm("transfer", "confirm", "--data", str(sp2.root), "--transfer", tid,
                                "--send", sp1_url, "--cacert", str(sp1_root))  # fmt: skip
        console.print(f"   SP2 confirms to SP1: {said.strip().splitlines()[-1] if said.strip() else ''}")
        await _report(sp1, sp2, tid, ids)
    finally:
        with console.status("stopping SP2"):
            await supervisor.stop()


async def _rows(dep: Deployment, tid: str, role: str, ids: Sequence[str]) -> dict[str, str]:
    """The per-device status this provider records (what ``transfer status --devices`` lists)."""
    from iotdlm.runtime import open_store

    def read() -> dict[str, str]:
        store = open_store(dep)
        try:
            return {d: r.status for d, r in store.get_transfer_devices(role, tid, list(ids)).items()}
        finally:
            store.close()

    return await asyncio.to_thread(read)


async def _fallback_reasons(dep: Deployment, tid: str, ids: Sequence[str]) -> dict[str, str]:
    """SP1's rows: why each device that fell back says it did."""
    from iotdlm.runtime import open_store

    def read() -> dict[str, str]:
        store = open_store(dep)
        try:
            rows = store.get_transfer_devices("sp1", tid, list(ids))
        finally:
            store.close()
        out = {}
        for device_id, row in rows.items():
            try:
                why = json.loads(row.detail or "{}").get("fallback")
            except ValueError:
                why = None
            if why:
                out[device_id] = str(why)
        return out

    return await asyncio.to_thread(read)


async def _until_cm_trusts(url: str, dev: SimulatedDevice, anchor_pem: bytes, wait: float = 90.0) -> None:
    """Until SP2's cm accepts the device's factory certificate in the TLS handshake (cm loads the
    registered factory CAs from km after it starts; a device that came earlier would be refused)."""
    from iotdlm.device.est_client import EstClient

    cert_pem, key_pem = dev.tls_identity("factory")
    deadline = time.monotonic() + wait
    while True:
        try:
            async with EstClient(
                url, trust_anchor_pem=anchor_pem, client_cert_pem=cert_pem, client_key_pem=key_pem, timeout=10.0
            ) as est:
                await est.cacerts()
            return
        except (UnavailableError, UntrustedError):  # UntrustedError: the TLS handshake refused the certificate
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _hand_over(
    sp1: Deployment,
    sp1_url: str,
    sp2: Deployment,
    sp2_url: str,
    devices: Sequence[SimulatedDevice],
    reference: Path,
    files: Path,
) -> tuple[str, Path]:
    """The operators: SP1 export --serve, SP2 accept --from --send and publish-update, SP1 deliver.
    Returns the transfer id and SP1's root (PEM file)."""
    from iotdlm.transfer.identity import load_identity

    sp1_cert, sp2_cert, sp1_root = files / "sp1.pem", files / "sp2.pem", files / "sp1-root.pem"
    sp1_cert.write_bytes(certs_to_pem([load_identity(sp1.root).certificate]))
    sp2_cert.write_bytes(certs_to_pem([load_identity(sp2.root).certificate]))
    sp1_root.write_bytes(certs_to_pem([sp1.ca_certificate("root")]))
    update = files / "release-8.bin"
    update.write_bytes(UPDATE)
    ids = [d.device_id for d in devices]
    fleet_file = files / "fleet.txt"
    fleet_file.write_text("\n".join(ids) + "\n")
    # pm flashed km's chain; SP1's transfer certificate and its CA go beside it, as `fleet run`'s
    # factory line flashes them once `transfer init` made them (the messages name it by x5t)
    chain = load_identity(sp1.root).chain
    for d in devices:
        d.write_truststore([*d.truststore(), *(c for c in chain if c not in d.truststore())])

    with console.status("   SP1 exports --serve; SP2 accepts --from --send; SP1 delivers"):
        said = await iotdlm(
            "transfer", "export", "--data", str(sp1.root), "--peer-id", SP2_ID, "--peer-cert", str(sp2_cert),
            "--devices-file", str(fleet_file), "--reference", str(reference), "--serve",
        )  # fmt: skip
        tid = said.split("transfer ")[1].split(":")[0].strip()
        await iotdlm(
            "transfer", "accept", "--data", str(sp2.root), "--from", sp1_url, "--transfer", tid,
            "--cacert", str(sp1_root), "--peer-id", SP1_ID, "--peer-cert", str(sp1_cert),
            "--ra-uri", f"{sp2_url}/transfer/attestation", "--update-uri", f"{sp2_url}/transfer/update",
            "--update-first", "--send",
        )  # fmt: skip
        await iotdlm("transfer", "publish-update", "--data", str(sp2.root), "--transfer", tid,
                     "--image", str(update), "--version", "8")  # fmt: skip
        await iotdlm("transfer", "deliver", "--data", str(sp1.root), "--transfer", tid)
    console.print(
        f"   transfer {tid}: SP1 exported {len(ids)} device(s) and served the UpdateInfoList; SP2 accepted "
        f"it and sent the TransferMessage back; SP1 delivered {len(ids)} per-device message(s) at its cm"
    )
    return tid, sp1_root


async def _report(sp1: Deployment, sp2: Deployment, tid: str, ids: Sequence[str]) -> None:
    """Each device's status at both providers (a table that fits 80 columns) and the one-line summary."""
    from iotdlm.transfer import status as st

    rows1, rows2 = await _rows(sp1, tid, "sp1", ids), await _rows(sp2, tid, "sp2", ids)
    table = Table("device", "at SP1 (CA1)", "at SP2 (CA2)", title=f"transfer status {tid}")
    for device_id in ids:
        table.add_row(device_id, rows1.get(device_id, "-"), rows2.get(device_id, "-"))
    console.print(table)
    revoked = sum(1 for v in rows1.values() if v == st.REVOKED_AT_CA1)
    fell_back = sum(1 for v in rows1.values() if v == st.FAILED_FALLBACK)
    enrolled = sum(1 for v in rows2.values() if v == st.ENROLLED)
    console.print(
        f"8. trust transfer over the network: {enrolled} of {len(ids)} device(s) enrolled with CA2 "
        f"(new keys), {revoked} revoked-at-CA1, {fell_back} failed-fallback (back with SP1)"
    )
