"""Issue 13's acceptance scenario with each deployment under its own supervisor.

Two deployments (SP1, SP2), each started as an operator starts it: ``iotdlm up --data DIR --mode
certificate-management`` as a process of its own, which starts the deployment's nats-server, km
and cm (on loopback ports of its own, from ``cm.toml``) and stops them on SIGTERM. Nothing of
either deployment runs in this test's process: the operators' commands are processes too
(``iotdlm transfer ...``), and the fleet of device agents (``fleet run``'s code,
:func:`iotdlm.cli.fleet.runner_for`) speaks HTTPS to the two cm.

The whole transfer crosses the network: the fleet enrolls with CA1 over EST; SP1 exports --serve;
SP2 accepts --from --send and publishes its update; SP1 delivers; each device fetches its message
at SP1's cm, fetches SP2's anchors, attests at SP2's raURI (one runs other firmware: refused, it
falls back and reports to SP1's fallback route), updates, re-enrolls with CA2 for a NEW key (FR3)
and commits; SP2 confirms --send and SP1's km revokes the old certificates at CA1; both
``transfer status`` tables say so. Last, an altered message served by SP1's cm is refused by the
device, reported over HTTPS and audited by SP1's supervised km.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import tomli_w

from iotdlm.bus.server import free_port
from iotdlm.cli.demo_transfer import _until_cm_trusts, iotdlm
from iotdlm.cli.fleet import drive, ready_devices, runner_for
from iotdlm.clock import Clock, SystemClock
from iotdlm.cm.config import CM_FILE
from iotdlm.deployment import PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.km.registry import FactoryRegistry
from iotdlm.km.transfer_device_handlers import keep_messages
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.est_proof import spki_sha256
from iotdlm.pki.keys import Algorithm, check_public_key
from iotdlm.runtime import open_store, record_identities
from iotdlm.transfer import status as st
from iotdlm.transfer.agent import DeviceAgent
from iotdlm.transfer.identity import TransferSettings, create_identity, load_identity

pytestmark = [pytest.mark.nats, pytest.mark.real_clock]

PW = "supervised-pw"
DTYPE = "sensor"
SP1_ID = "urn:example:provider:sup-sp1"
SP2_ID = "urn:example:provider:sup-sp2"
FLEET = 50
FIRMWARE = b"boardA firmware 4.1 (SP1's reference)\n" * 64
OTHER_FIRMWARE = b"boardA firmware 4.1, patched by someone\n" * 64
UPDATE = b"boardA firmware 5.0 from SP2\n" * 64
STOP_WAIT = 60.0


def _create(root: Path, org: str, provider_id: str, clock: Clock, *, register: Deployment | None) -> str:
    """A deployment with cm's ports in cm.toml and its transfer identity (``transfer init``), and,
    for SP2, the other provider's permanent CA registered with CA2 (``transfer register-ca``), all
    before its supervisor starts km. Returns cm's HTTPS URL."""
    https_port, http_port, egress_port = free_port(), free_port(), free_port()
    url = f"https://127.0.0.1:{https_port}"
    # every port its own: two supervisors run at once, and the defaults (/metrics on 14290, the
    # console on 8444) would be taken by the first (the second's console gave up after 5 crashes)
    dep, _ = init_deployment(
        root, organization=org, algorithm=Algorithm.P256, dtypes=[DTYPE], passphrase=PW.encode(),
        nats_port=free_port(), metrics_port=free_port(), public_url=f"http://127.0.0.1:{http_port}",
        now=clock.now(),
    )  # fmt: skip
    (dep.root / CM_FILE).write_bytes(
        tomli_w.dumps({"https_port": https_port, "http_port": http_port, "egress_port": egress_port}).encode()
    )
    with (dep.root / "iotdlm.toml").open("a", encoding="utf-8") as f:
        f.write(f"\n[console]\nport = {free_port()}\n")
    settings = TransferSettings(
        provider_id=provider_id, fallback_uri=f"{url}/transfer/fallback", enroll_uri=f"{url}/.well-known/est"
    )
    create_identity(dep, settings, now=clock.now(), passphrase=PW.encode())
    store = open_store(dep)
    try:
        record_identities(dep, store, clock.now())
        if register is not None:
            FactoryRegistry(store, clock, enroll_uri=settings.enroll_uri).register_cas(
                [register.ca_certificate("root"), register.ca_certificate("factory")], actor="sp2-operator"
            )
    finally:
        store.close()
    return url


@contextlib.asynccontextmanager
async def supervised(root: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``iotdlm up`` for the deployment at ``root``, as its own process; SIGTERM at the end (it
    stops km, cm and its nats-server and exits 0)."""
    with (root / "up.out").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "iotdlm.cli.main", "up", "--data", str(root), "--mode", "certificate-management",
            stdout=out, stderr=asyncio.subprocess.STDOUT, env={**os.environ, PASSPHRASE_ENV: PW},
            start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.wait_for(proc.wait(), STOP_WAIT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise
            assert code == 0, (root / "up.out").read_text()[-3000:]


def key_of(dev: SimulatedDevice, kind: str) -> str:
    cert = dev.certificate(kind)
    assert cert is not None
    return spki_sha256(check_public_key(cert.public_key()))


def _rows(dep: Deployment, role: str, tid: str, ids: list[str]) -> dict[str, tuple[str, dict[str, object]]]:
    store = open_store(dep)
    try:
        return {d: (r.status, json.loads(r.detail)) for d, r in store.get_transfer_devices(role, tid, ids).items()}
    finally:
        store.close()


async def test_a_fleet_moves_between_two_supervised_deployments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PW)  # the factory line here, and the operators' commands
    clock = SystemClock()
    sp1_url = await asyncio.to_thread(_create, tmp_path / "sp1", "SP1", SP1_ID, clock, register=None)
    sp1 = Deployment.load(tmp_path / "sp1")
    sp2_url = await asyncio.to_thread(_create, tmp_path / "sp2", "SP2", SP2_ID, clock, register=sp1)
    sp2 = Deployment.load(tmp_path / "sp2")
    files = tmp_path / "files"
    files.mkdir()
    sp1_cert, sp2_cert, sp1_root = files / "sp1-transfer.pem", files / "sp2-transfer.pem", files / "sp1-root.pem"
    sp1_cert.write_bytes(certs_to_pem([load_identity(sp1.root).certificate]))
    sp2_cert.write_bytes(certs_to_pem([load_identity(sp2.root).certificate]))
    sp1_root.write_bytes(certs_to_pem([sp1.ca_certificate("root")]))
    fw, other, update = files / "fw.bin", files / "other.bin", files / "fw5.bin"
    fw.write_bytes(FIRMWARE)
    other.write_bytes(OTHER_FIRMWARE)
    update.write_bytes(UPDATE)

    # the factory line (SP1's factory CA; the devices hold SP1's transfer certificate by x5t)
    paths = [tmp_path / "fleet" / f"sup-{i:04d}" for i in range(FLEET)]
    devices = await asyncio.to_thread(ready_devices, paths, dtype=DTYPE, data=sp1.root, cm=sp1_url, clock=clock)
    bad = devices[11]
    for dev in devices:
        dev.write_image("slot-a", other if dev is bad else fw, {"version": "4.1"})
    ids = [d.device_id for d in devices]
    fleet_file = files / "fleet.txt"
    fleet_file.write_text("\n".join(ids) + "\n")

    async with supervised(sp1.root) as up1, supervised(sp2.root) as up2:
        # each cm answers once its supervisor started NATS, km and cm in certificate-management
        await _until_cm_trusts(sp1_url, devices[0], certs_to_pem([sp1.ca_certificate("root")]), wait=120.0)
        await _until_cm_trusts(sp2_url, devices[0], certs_to_pem([sp2.ca_certificate("root")]), wait=120.0)
        assert up1.returncode is None
        assert up2.returncode is None

        # --- SP1's fleet enrolls with CA1 over EST -----------------------------------------------------------
        runners = [runner_for(d, clock, renew_at=2 / 3, timeout=60.0) for d in devices]
        for r in runners:
            assert isinstance(r.transfers, DeviceAgent)
            r.transfers.retry_delay = 0.2
        summary = await drive(runners, once=True, interval=1.0, progress=False)
        assert summary.counts == {"enrolled": FLEET}, summary.to_json()["failed"]
        sp1_keys = {k for d in devices for k in (key_of(d, "factory"), key_of(d, "operational"))}
        sp1_ops = {d.device_id: d.certificate("operational") for d in devices}

        # --- the operators, each command a process: export --serve, accept --from --send, deliver -----------
        said = await iotdlm(
            "transfer", "export", "--data", str(sp1.root), "--peer-id", SP2_ID, "--peer-cert", str(sp2_cert),
            "--devices-file", str(fleet_file), "--reference", str(fw), "--serve",
        )  # fmt: skip
        tid = said.split("transfer ")[1].split(":")[0].strip()
        said = await iotdlm(
            "transfer", "accept", "--data", str(sp2.root), "--from", sp1_url, "--transfer", tid,
            "--cacert", str(sp1_root), "--peer-id", SP1_ID, "--peer-cert", str(sp1_cert),
            "--ra-uri", f"{sp2_url}/transfer/attestation", "--update-uri", f"{sp2_url}/transfer/update",
            "--update-first", "--send",
        )  # fmt: skip
        assert "TransferMessage accepted" in said, said
        await iotdlm("transfer", "publish-update", "--data", str(sp2.root), "--transfer", tid, "--image",
                     str(update), "--version", "5.0")  # fmt: skip
        said = await iotdlm("transfer", "deliver", "--data", str(sp1.root), "--transfer", tid)
        assert f"{FLEET} device message(s) waiting at cm" in said, said
        kept = _rows(sp1, "sp1", tid, [bad.device_id])[bad.device_id][1]["message"]
        assert isinstance(kept, str)
        original = base64.b64decode(kept)

        # --- the devices: fetch, reset, anchors, attest, update, enroll with CA2 (new key), commit -----------
        summary = await drive(runners, once=True, interval=1.0, progress=False)
        assert summary.counts.get("transfer-committed") == FLEET - 1, summary.to_json()
        sp2_operational = sp2.ca_certificate("operational").subject
        for dev in devices:
            if dev is bad:
                continue
            op = dev.certificate("operational")
            assert op is not None
            assert op.issuer == sp2_operational, dev.device_id
            assert dev.config()["enroll_uri"] == f"{sp2_url}/.well-known/est"
            assert dev.image_sha256("slot-b") is not None
            assert key_of(dev, "operational") not in sp1_keys  # FR3
        assert bad.certificate("operational") == sp1_ops[bad.device_id]
        assert bad.config()["enroll_uri"] == f"{sp1_url}/.well-known/est"

        # --- SP2 confirms over the network; SP1's km revokes at CA1 ------------------------------------------
        said = await iotdlm("transfer", "confirm", "--data", str(sp2.root), "--transfer", tid, "--send", sp1_url,
                            "--cacert", str(sp1_root))  # fmt: skip
        assert f"{FLEET - 1} device(s) revoked-at-CA1" in said, said

        rows1, rows2 = _rows(sp1, "sp1", tid, ids), _rows(sp2, "sp2", tid, ids)
        assert rows1[bad.device_id][0] == st.FAILED_FALLBACK
        assert str(rows1[bad.device_id][1]["fallback"]).endswith("differs from the reference agreed with SP1")
        assert rows2[bad.device_id][0] == st.FAILED_FALLBACK
        assert {s for d, (s, _x) in rows1.items() if d != bad.device_id} == {st.REVOKED_AT_CA1}
        assert {s for d, (s, _x) in rows2.items() if d != bad.device_id} == {st.ENROLLED}
        for d, (_s, x) in rows2.items():
            if d != bad.device_id:
                assert x["attestation"] == "measurement matches the reference"
                assert x["update"] == "5.0"
        store = open_store(sp1)
        try:
            for device_id, op in sp1_ops.items():
                assert op is not None
                rec = store.get_certificate("operational", op.serial_number)
                assert rec is not None
                assert rec.status == ("valid" if device_id == bad.device_id else "revoked"), device_id
        finally:
            store.close()
        table1 = await iotdlm("transfer", "status", "--data", str(sp1.root), "--transfer", tid, "--devices",
                             columns=200)  # fmt: skip
        table2 = await iotdlm("transfer", "status", "--data", str(sp2.root), "--transfer", tid, "--devices",
                             columns=200)  # fmt: skip
        assert sum(1 for line in table1.splitlines() if "revoked-at-CA1" in line and "sup-" in line) == FLEET - 1
        assert sum(1 for line in table2.splitlines() if " enrolled " in line and "sup-" in line) == FLEET - 1
        for table in (table1, table2):
            [line] = [ln for ln in table.splitlines() if bad.device_id in ln]
            assert "failed-fallback" in line

        # --- an altered message served by SP1's cm: refused by the device, audited by SP1's km ---------------
        altered = original[:-1] + bytes([original[-1] ^ 1])
        await asyncio.to_thread(_keep, sp1, tid, bad.device_id, altered)
        report = await runners[devices.index(bad)].tick()
        assert [e for e in report.errors if "transfer message refused" in e], report
        store = open_store(sp1)
        try:
            audited = [r.data for r in store.list_audit(kind="device_refusal") if r.subject == bad.device_id]
        finally:
            store.close()
        assert [(a["reason"], a["ours"], a["transfer"]) for a in audited] == [("altered", True, tid)]
        assert up1.returncode is None
        assert up2.returncode is None


def _keep(dep: Deployment, tid: str, device_id: str, token: bytes) -> None:
    store = open_store(dep)
    try:
        keep_messages(store, tid, {device_id: token}, SystemClock().now())
    finally:
        store.close()
