"""Issue 13's acceptance scenario: a trust transfer where every step crosses the network.

Two deployments (SP1, SP2), each with its own nats-server, km (wired as ``iotdlm km serve`` wires
it: the peer and device transfer handlers, SP2's update folder) and cm on its own loopback ports --
km and cm started in-process as tests/integration/test_transfer_peer.py does, no supervisor (the
supervisor adds pm, sm and mode changes this flow does not need). A fleet of devices runs ``fleet
run``'s code in-process (:func:`iotdlm.cli.fleet.runner_for`, each device its own keys, state and
HTTPS connections). The operators' steps are the CLI as docs/operations.md section 10 writes them:

SP1 exports --serve; SP2 accepts --from --send and publishes its update; SP1 delivers (--transfer);
each device fetches its message at SP1's cm, resets, fetches SP2's anchors (/cacerts), attests at
SP2's raURI, updates from SP2's update server and reports it, re-enrolls with CA2 for a NEW key
(FR3); one device runs other firmware than SP1's reference: attestation fails, it falls back and
reports to SP1 (failed-fallback); SP2 confirms --send; CA1 revokes (revoked-at-CA1, OCSP says
revoked); both ``transfer status`` tables agree. Then a replayed, an altered, a wrongly signed and
an expired per-device message, served by SP1's cm, are refused by the device, logged there, and
reported to SP1's cm (POST /transfer/refusal): each is in SP1's audit log and its status table.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from iotdlm.bus.server import NatsUser
from iotdlm.cli.fleet import drive, ready_devices, runner_for
from iotdlm.cli.km import transfer_peer_routes
from iotdlm.cli.main import main
from iotdlm.clock import SystemClock
from iotdlm.cm import CmConfig, CmService, Limits
from iotdlm.deployment import PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.km import KmService
from iotdlm.km.registry import FactoryRegistry
from iotdlm.km.transfer_device_handlers import keep_messages
from iotdlm.modes.guard import ModeGuard
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.est_proof import spki_sha256
from iotdlm.pki.keys import Algorithm, check_public_key, generate_key
from iotdlm.runtime import build_km, km_identity, open_store, record_identities
from iotdlm.store import Store
from iotdlm.transfer import status as st
from iotdlm.transfer.agent import DeviceAgent
from iotdlm.transfer.http_clients import DeviceMessages
from iotdlm.transfer.identity import TransferIdentity, TransferSettings, create_identity
from iotdlm.transfer.messages import CwtHeader, TransferMessage, sign_device_message
from iotdlm.transfer.shell import Sp1Service
from tests.fixtures_nats import RunningNats, start_nats
from tests.integration.test_cm import ShiftClock, set_mode

pytestmark = [pytest.mark.nats, pytest.mark.real_clock]

PW = "pw"
DTYPE = "sensor"
SP1_ID = "urn:example:provider:sp1"
SP2_ID = "urn:example:provider:sp2"
FLEET = 50
FIRMWARE = b"boardA firmware 4.1 (SP1's reference)\n" * 64
OTHER_FIRMWARE = b"boardA firmware 4.1, patched by someone\n" * 64
UPDATE = b"boardA firmware 5.0 from SP2\n" * 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Side:
    dep: Deployment
    store: Store
    nats: RunningNats
    km: KmService
    cm: CmService
    identity: TransferIdentity

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.cm.https_port}"


@contextlib.asynccontextmanager
async def open_side(
    tmp: Path, org: str, provider_id: str, clock: ShiftClock, *, register: Side | None = None
) -> AsyncIterator[Side]:
    """One provider: nats-server, km as ``iotdlm km serve`` wires it, cm (HTTPS and HTTP for OCSP).
    ``register``: SP2's operator registers that provider's permanent CA (root, factory) with CA2
    before cm starts (``transfer register-ca``), so cm takes those devices' certificates."""
    made, _ = init_deployment(
        tmp / "d", organization=org, algorithm=Algorithm.P256, dtypes=[DTYPE], passphrase=PW.encode(),
        now=clock.now(), public_url="http://127.0.0.1:8080",
    )  # fmt: skip
    users = [NatsUser(module=m, user=c.user, password=c.password) for m, c in made.nats_users()]
    nats = start_nats(tmp, users=users, jetstream_dir=tmp / "js")
    dep = Deployment(
        made.root,
        msgspec.structs.replace(
            made.config, nats=msgspec.structs.replace(made.config.nats, port=nats.server.config.port)
        ),
    )
    store = open_store(dep)
    record_identities(dep, store, clock.now())
    port = _free_port()
    url = f"https://127.0.0.1:{port}"
    settings = TransferSettings(provider_id=provider_id, fallback_uri=f"{url}/transfer/fallback",
                                enroll_uri=f"{url}/.well-known/est")  # fmt: skip
    ident = create_identity(dep, settings, now=clock.now(), passphrase=PW.encode())
    if register is not None:
        FactoryRegistry(store, clock, enroll_uri=settings.enroll_uri).register_cas(
            [register.dep.ca_certificate("root"), register.dep.ca_certificate("factory")], actor="sp2-operator"
        )
    kmcore = build_km(dep, store, clock, passphrase=PW.encode())
    km_bus = await nats.connect("km")
    km = KmService(
        kmcore, km_bus, identity=km_identity(dep), extra_routes=transfer_peer_routes(dep, store, kmcore, km_bus),
        transfer_updates=dep.root / "transfer" / "updates",
    )  # fmt: skip
    await km.start()
    modes_bus = await nats.connect("modes")
    await set_mode(modes_bus, "certificate-management", dep)
    # cm's shipped limits: 50 devices share this event loop, and on a loaded machine a TLS handshake
    # or the pause between two requests on a keep-alive connection outlasts test_cm's 2 s / 0.5 s
    # (tests/integration/test_cm.py proves those guards; this scenario proves the transfer)
    cm = await CmService.from_deployment(dep, CmConfig(https_port=port, http_port=0, limits=Limits()), clock=clock)
    await cm.start()
    assert isinstance(cm.app.mode, ModeGuard)
    await cm.app.mode.wait_for("certificate-management")
    side = Side(dep, store, nats, km, cm, ident)
    try:
        yield side
    finally:
        await cm.stop()
        await km.stop()
        for b in (km_bus, modes_bus):
            await b.close()
        nats.server.stop()
        store.close()


async def cli(*args: str) -> str:
    """The command line in a thread of its own (cm and km answer on this event loop meanwhile)."""
    runner = CliRunner(env={PASSPHRASE_ENV: PW})
    out = await asyncio.to_thread(runner.invoke, main, list(args), catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return out.output


def key_of(dev: SimulatedDevice, kind: str) -> str:
    cert = dev.certificate(kind)
    assert cert is not None
    return spki_sha256(check_public_key(cert.public_key()))


def refused_events(dev: SimulatedDevice) -> list[str]:
    return [str(e.get("message", "")) for e in dev.events() if e.get("event") == "transfer_refused"]


async def test_a_fleet_moves_to_sp2_over_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PW)
    clock = ShiftClock()
    async with (
        open_side(tmp_path / "sp1", "SP1", SP1_ID, clock) as sp1,
        open_side(tmp_path / "sp2", "SP2", SP2_ID, clock, register=sp1) as sp2,
    ):
        sp1_dir, sp2_dir = sp1.dep.root, sp2.dep.root
        sp1_cert, sp2_cert, sp1_root = tmp_path / "sp1-transfer.pem", tmp_path / "sp2-transfer.pem", tmp_path / "r.pem"
        sp1_cert.write_bytes(certs_to_pem([sp1.identity.certificate]))
        sp2_cert.write_bytes(certs_to_pem([sp2.identity.certificate]))
        sp1_root.write_bytes(certs_to_pem([sp1.dep.ca_certificate("root")]))
        fw, other, update = tmp_path / "fw.bin", tmp_path / "other.bin", tmp_path / "fw5.bin"
        fw.write_bytes(FIRMWARE)
        other.write_bytes(OTHER_FIRMWARE)
        update.write_bytes(UPDATE)

        # --- SP1's fleet on the network: factory line, then EST enrollment with CA1 (fleet run) -------------
        real = SystemClock()
        paths = [tmp_path / "fleet" / f"sim-{i:04d}" for i in range(FLEET)]
        devices = await asyncio.to_thread(ready_devices, paths, dtype=DTYPE, data=sp1_dir, cm=sp1.url, clock=real)
        bad = devices[7]
        for dev in devices:
            # the factory line flashed SP1's transfer certificate and its CA (the messages name it by x5t)
            assert set(sp1.identity.chain) <= set(dev.truststore())
            dev.write_image("slot-a", other if dev is bad else fw, {"version": "4.1"})
        runners = [runner_for(d, real, renew_at=2 / 3, timeout=60.0) for d in devices]
        for r in runners:
            assert isinstance(r.transfers, DeviceAgent)
            r.transfers.retry_delay = 0.2  # a transient failure under load is retried soon
        summary = await drive(runners, once=True, interval=1.0, progress=False)
        assert summary.counts == {"enrolled": FLEET}, summary.to_json()["failed"]
        sp1_keys = {k for d in devices for k in (key_of(d, "factory"), key_of(d, "operational"))}
        sp1_ops = {d.device_id: d.certificate("operational") for d in devices}
        ids = [d.device_id for d in devices]
        fleet_file = tmp_path / "fleet.txt"
        fleet_file.write_text("\n".join(ids) + "\n")

        # --- the operators: export --serve, accept --from --send, publish-update, deliver --------------------
        said = await cli(
            "transfer", "export", "--data", str(sp1_dir), "--peer-id", SP2_ID, "--peer-cert", str(sp2_cert),
            "--devices-file", str(fleet_file), "--reference", str(fw), "--serve",
        )  # fmt: skip
        tid = said.split("transfer ")[1].split(":")[0].strip()
        said = await cli(
            "transfer", "accept", "--data", str(sp2_dir), "--from", sp1.url, "--transfer", tid,
            "--cacert", str(sp1_root), "--peer-id", SP1_ID, "--peer-cert", str(sp1_cert),
            "--ra-uri", f"{sp2.url}/transfer/attestation", "--update-uri", f"{sp2.url}/transfer/update",
            "--update-first", "--send",
        )  # fmt: skip
        assert "TransferMessage accepted" in said
        await cli("transfer", "publish-update", "--data", str(sp2_dir), "--transfer", tid, "--image", str(update),
                  "--version", "5.0")  # fmt: skip
        said = await cli("transfer", "deliver", "--data", str(sp1_dir), "--transfer", tid)
        assert f"{FLEET} device message(s) waiting at cm" in said, said
        kept = json.loads(sp1.store.get_transfer_devices("sp1", tid, [bad.device_id])[bad.device_id].detail)
        original = base64.b64decode(kept["message"])
        t1 = Sp1Service(store=sp1.store, identity=sp1.identity, clock=clock, fallback_uri="")._load(tid)
        t_accepted, t_ref = t1.accepted, t1.transfer_ref

        # --- the devices' next pass: fetch, reset, anchors, attest, update, enroll with CA2, commit ----------
        summary = await drive(runners, once=True, interval=1.0, progress=False)
        assert summary.counts.get("transfer-committed") == FLEET - 1, summary.to_json()
        assert summary.counts.get("transfer-idle", 0) + summary.counts.get("transfer-fallback", 0) == 1, summary.counts
        sp2_operational = sp2.dep.ca_certificate("operational").subject
        for dev in devices:
            if dev is bad:
                continue
            op = dev.certificate("operational")
            assert op is not None
            assert op.issuer == sp2_operational, dev.device_id
            assert dev.config()["enroll_uri"] == f"{sp2.url}/.well-known/est"
            assert dev.image_sha256("slot-b") is not None  # SP2's update, installed before enrolling
            assert key_of(dev, "operational") not in sp1_keys  # FR3: a key of no SP1-era certificate
        # the one with other firmware: refused at SP2's raURI, back with SP1 on its old credential
        assert bad.certificate("operational") == sp1_ops[bad.device_id]
        assert not bad.has_key("pending")
        assert bad.config()["enroll_uri"] == f"{sp1.url}/.well-known/est"

        # --- SP2 confirms over the network; CA1 revokes -----------------------------------------------------
        said = await cli("transfer", "confirm", "--data", str(sp2_dir), "--transfer", tid, "--send", sp1.url,
                         "--cacert", str(sp1_root))  # fmt: skip
        assert f"{FLEET - 1} device(s) revoked-at-CA1" in said, said

        sp1_rows = sp1.store.get_transfer_devices("sp1", tid, ids)
        sp2_rows = sp2.store.get_transfer_devices("sp2", tid, ids)
        assert sp1_rows[bad.device_id].status == st.FAILED_FALLBACK
        assert sp2_rows[bad.device_id].status == st.FAILED_FALLBACK
        assert {r.status for d, r in sp1_rows.items() if d != bad.device_id} == {st.REVOKED_AT_CA1}
        assert {r.status for d, r in sp2_rows.items() if d != bad.device_id} == {st.ENROLLED}
        for dev in devices:
            if dev is bad:
                continue
            detail = json.loads(sp2_rows[dev.device_id].detail)
            assert detail["attestation"] == "measurement matches the reference"
            assert detail["update"] == "5.0"  # the device's report to SP2's update server
            op = dev.certificate("operational")
            assert op is not None
            assert detail["serial"] == format(op.serial_number, "x")
        why_back = json.loads(sp1_rows[bad.device_id].detail)["fallback"]
        assert why_back.endswith("the measured firmware differs from the reference agreed with SP1"), why_back
        for device_id, op in sp1_ops.items():
            assert op is not None
            rec = sp1.store.get_certificate("operational", op.serial_number)
            assert rec is not None
            assert rec.status == ("valid" if device_id == bad.device_id else "revoked"), device_id
        # the operators' tables
        table1 = await cli("transfer", "status", "--data", str(sp1_dir), "--transfer", tid, "--devices")
        table2 = await cli("transfer", "status", "--data", str(sp2_dir), "--transfer", tid, "--devices")
        assert "revoked-at-CA1" in table1
        assert "failed-fallback" in table1
        assert "enrolled" in table2
        assert "failed-fallback" in table2
        for line in table1.splitlines():
            if bad.device_id in line:
                assert "failed-fallback" in line
        # the VA: one of the old certificates is revoked, asked with openssl at SP1's cm (OCSP over HTTP)
        if shutil.which("openssl") is not None:
            gone = sp1_ops[devices[0].device_id]
            assert gone is not None
            leaf, issuer = tmp_path / "leaf.pem", tmp_path / "issuer.pem"
            leaf.write_bytes(certs_to_pem([gone]))
            issuer.write_bytes(certs_to_pem([sp1.dep.ca_certificate("operational")]))
            chain = tmp_path / "chain.pem"
            chain.write_bytes(certs_to_pem([sp1.dep.ca_certificate("root"), sp1.dep.ca_certificate("operational")]))
            proc = await asyncio.create_subprocess_exec(
                "openssl", "ocsp", "-url", f"http://127.0.0.1:{sp1.cm.http_port}/ocsp", "-issuer", str(issuer),
                "-cert", str(leaf), "-CAfile", str(chain),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            assert b": revoked" in out, (out, err)

        # --- hostile per-device messages, served by SP1's cm, refused by the device ---------------------------
        assert t_accepted is not None
        bad_runner = runners[devices.index(bad)]
        agent = bad_runner.transfers
        assert isinstance(agent, DeviceAgent)

        def message(*, impostor: bool = False, expired: bool = False, signer: TransferIdentity | None = None) -> bytes:
            """A per-device message as SP1 makes it (sp1.device_messages), or one made wrong."""
            assert t_accepted is not None
            now = clock.now()
            start, end = now - dt.timedelta(minutes=1), t_accepted.claims.reset_not_after
            if expired:
                start, end = now - dt.timedelta(days=3), now - dt.timedelta(days=2)
            claims = dataclasses.replace(t_accepted.claims, fallback_uri=f"{sp1.url}/transfer/fallback",
                                         reset_not_before=start, reset_not_after=end)  # fmt: skip
            header = CwtHeader(issuer=None, audience=bad.device_id, cti=os.urandom(16), issued_at=start,
                               not_before=start, expires=end)  # fmt: skip
            ident = dataclasses.replace(sp1.identity, key=generate_key(Algorithm.P256)) if impostor else sp1.identity
            if signer is not None:  # another provider's transfer identity, its chain in the message
                return sign_device_message(TransferMessage(header, t_ref, claims), signer.signer(with_chain=True))
            return sign_device_message(TransferMessage(header, t_ref, claims), ident.signer(with_chain=False))

        async def refused(token: bytes) -> str:
            """SP1's cm serves ``token`` (as deliver keeps it); the device's next pass fetches it over
            HTTPS and its agent refuses it, in its log."""
            keep_messages(sp1.store, tid, {bad.device_id: token}, clock.now())
            before = len(refused_events(bad))
            report = await bad_runner.tick()
            assert [e for e in report.errors if "transfer message refused" in e], report
            assert len(refused_events(bad)) == before + 1
            return refused_events(bad)[-1]

        # replayed: the message it accepted (and fell back from), served again. The loop does not hand
        # the same bytes over twice; handed over anyway, the agent refuses it: its cti was seen.
        keep_messages(sp1.store, tid, {bad.device_id: original}, clock.now())
        assert (await bad_runner.tick()).actions == []
        token = await DeviceMessages(timeout=30.0).fetch(bad, sp1.url)
        assert token == original
        receipt = await agent.handle(token)
        assert not receipt.accepted
        assert "received before" in receipt.detail
        fresh = message()
        altered = fresh[:-1] + bytes([fresh[-1] ^ 1])  # a bit of the signature flipped
        why = {
            "altered": await refused(altered),
            "impostor": await refused(message(impostor=True)),
            "expired": await refused(message(expired=True)),
            "wrong-signer": await refused(message(signer=sp2.identity)),
        }
        assert why["altered"] == "the signature of the transfer message does not verify", why
        assert why["impostor"] == "the signature of the transfer message does not verify", why
        assert why["expired"].startswith("the message expired at "), why
        assert why["wrong-signer"].endswith("does not chain to a trusted root"), why
        # ... and each reached SP1 over the network: audited, and in SP1's status table
        audited = [
            (r.data["reason"], r.data["ours"])
            for r in sp1.store.list_audit(kind="device_refusal", limit=50)
            if r.subject == bad.device_id
        ]
        # all five were served by SP1's cm (kept by it): the reports name them by hash ("ours")
        assert sorted(audited) == [(r, True) for r in ("altered", "altered", "expired", "replayed", "wrong-signer")]
        row = sp1.store.get_transfer_devices("sp1", tid, [bad.device_id])[bad.device_id]
        assert row.status == st.FETCHED  # it fetched the messages; refusing them moved it no further
        assert json.loads(row.detail)["refused"] == 5
        table1 = await cli("transfer", "status", "--data", str(sp1_dir), "--transfer", tid, "--devices")
        assert "wrong-signer:" in table1, table1
        # none of it moved the device: still with SP1, its old credential, no new key
        assert bad.certificate("operational") == sp1_ops[bad.device_id]
        assert not bad.has_key("pending")
        assert bad.config()["enroll_uri"] == f"{sp1.url}/.well-known/est"
