"""pm's Provisioner on the in-memory bus: km in process (KmService), sm's local repository served by
a stand-in answering ``sm.software.load`` from files made exactly as sm makes them (a real vendor
repository's metadata, meta.enc under the sm-pm key, sig_sm), simulated devices in folders.

Covers Algorithm 1 and its HALT (with the alarm audited, published and persisted), both certificate
flows, read-back verification, records, resume, force, single-device failures, cm running, the
operation modes of Table 1, and PmService."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509 import verification

from iotdlm import errors, software
from iotdlm.bus import subjects
from iotdlm.bus.api import Message
from iotdlm.bus.memory import MemoryBus, MemoryHub
from iotdlm.client.km import KmClient
from iotdlm.client.sm import SmClient
from iotdlm.clock import FixedClock, SystemClock
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.km import Km, KmService, KmSettings
from iotdlm.modes.guard import ModeGuard
from iotdlm.modes.table import Mode
from iotdlm.pki.ca import PublicUrls
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.pm.alarm import HaltedError, read_alarm
from iotdlm.pm.flasher import CommandFlasher, SimulatedFlasher
from iotdlm.pm.provisioner import Provisioner
from iotdlm.pm.service import PmClient, PmService
from iotdlm.pm.settings import Anchors, PmSettings, Progress
from iotdlm.repository import VendorRepository
from iotdlm.store import Store
from iotdlm.wire import pm as m
from iotdlm.wire import software as sw
from iotdlm.wire.envelope import Sealer
from tests.helpers import NOW, ORG, make_pki
from tests.mode_signing import put_mode, verifier
from tests.unit.test_software_check import bundle_of

DTYPE = "boardA"
PKI = make_pki()
SM = PKI.module("sm")
PM = PKI.module("pm", DTYPE)
META_KEY = os.urandom(32)
RELEASE = 3
TOOL = str(Path(__file__).parent.parent / "fake_vendor_tool.py")


@dataclasses.dataclass
class LocalRepo:
    """One version as sm stores it (Fig. 8): image, meta.enc, sig_sm."""

    folder: Path
    repo: VendorRepository
    meta: bytes  # the plaintext bundle

    @property
    def image(self) -> Path:
        return self.folder / "image"

    @property
    def meta_enc(self) -> Path:
        return self.folder / "meta.enc"

    @property
    def sig_sm(self) -> Path:
        return self.folder / "sig_sm"

    def store(self, meta: bytes | None = None, image: bytes | None = None) -> None:
        """(Re)write the version as a (possibly compromised) sm would: meta encrypted, sig_sm signed."""
        if image is not None:
            os.chmod(self.image, 0o644)
            self.image.write_bytes(image)
        meta = meta if meta is not None else self.meta
        self.meta_enc.write_bytes(software.encrypt_meta(meta, META_KEY, DTYPE, RELEASE))
        self.sig_sm.write_bytes(software.compute_sig_sm(SM.key, meta, self.image))

    def sha256(self) -> str:
        import hashlib

        return hashlib.sha256(self.image.read_bytes()).hexdigest()


def make_local_repo(tmp: Path) -> LocalRepo:
    repo = VendorRepository.init(tmp / "vendor", now=SystemClock().now())
    src = tmp / "fw.bin"
    src.write_bytes(os.urandom(200_000))
    repo.publish(DTYPE, RELEASE, src, now=SystemClock().now(), name="fw.bin")
    folder = tmp / "sm" / DTYPE / str(RELEASE)
    folder.mkdir(parents=True)
    (folder / "image").write_bytes(src.read_bytes())
    local = LocalRepo(folder, repo, bundle_of(repo, DTYPE, f"{DTYPE}/fw.bin"))
    local.store()
    return local


class FaultyFlasher(SimulatedFlasher):
    """A simulated bench where chosen operations fail for chosen devices, a number of times."""

    def __init__(self, bench: Path, dtype: str) -> None:
        super().__init__(bench, dtype)
        self.faults: dict[tuple[str, str], int] = {}

    def fail(self, op: str, device: str, times: int = 1) -> None:
        self.faults[(op, device)] = times

    def _maybe(self, op: str, ref: str) -> None:
        key = (op, Path(ref).name)
        if self.faults.get(key, 0) > 0:
            self.faults[key] -= 1
            raise errors.UnavailableError(f"flashing tool lost the device during {op} (JTAG chain broken)")

    def flash_image(self, ref: str, image: Path, info: Any) -> None:
        self._maybe("flash_image", ref)
        super().flash_image(ref, image, info)

    def flash_certificate(self, ref: str, kind: str, cert: x509.Certificate) -> None:
        self._maybe("flash_certificate", ref)
        super().flash_certificate(ref, kind, cert)


@dataclasses.dataclass
class Line:
    tmp: Path
    hub: MemoryHub
    store: Store
    clock: FixedClock
    bench: Path
    local: LocalRepo
    flasher: FaultyFlasher
    events: list[tuple[str, bytes]]
    sm_loads: list[int]
    km: Km

    def device(self, name: str, *, csr: bool = True) -> SimulatedDevice:
        return SimulatedDevice.manufacture(self.bench / name, name, DTYPE, can_make_csr=csr)

    def provisioner(
        self,
        *,
        profiles: tuple[str, ...] = ("factory", "operational"),
        sealer: Sealer | None = None,
        root_ca: x509.Certificate | None = None,
        guard: ModeGuard | None = None,
        require_mode: bool = False,
        batch_size: int = 100,
    ) -> Provisioner:
        bus = self.hub.bus("pm")
        settings = PmSettings(
            dtype=DTYPE,
            profiles=profiles,
            organization=ORG,
            enroll_uri="https://127.0.0.1:8443/.well-known/est",
            update_uri="https://updates.example/boardA",
            staging_dir=self.tmp / "pm" / DTYPE / "staging",
            batch_size=batch_size,
            cm_ping_timeout=0.2,
        )
        return Provisioner(
            settings,
            km=KmClient(bus, sealer or PM.sealer, self.clock, trust=PKI.km_trust()),
            sm=SmClient(bus),
            flasher=self.flasher,
            store=self.store,
            clock=self.clock,
            bus=bus,
            anchors=Anchors(
                pk_sm=SM.key.public_key(),
                trusted_root=self.local.repo.trusted_root(),
                meta_key=META_KEY,
                root_ca=root_ca or PKI.root,
            ),
            guard=guard,
            require_mode=require_mode,
        )

    async def published(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        """The events ``iotdlm.v1.events.pm.<name>`` received (waiting a little for ``count`` of them)."""
        for _ in range(200):
            got = [json.loads(d) for s, d in self.events if s == f"iotdlm.v1.events.pm.{name}"]
            if len(got) >= count:
                return got
            await asyncio.sleep(0.01)
        return got


@pytest.fixture
async def line(tmp_path: Path) -> AsyncIterator[Line]:
    hub = MemoryHub()
    clock = FixedClock(NOW)
    store = Store.open(f"sqlite:///{tmp_path / 'iotdlm.db'}")
    km = Km(
        cas=PKI.cas,
        profiles=DEFAULT_PROFILES,
        store=store,
        clock=clock,
        settings=KmSettings(organization=ORG, urls=PublicUrls("http://127.0.0.1:8080")),
    )
    km_service = KmService(km, hub.bus("km"), identity=PKI.km_identity())
    await km_service.start()
    local = make_local_repo(tmp_path)
    sm_bus = hub.bus("sm")
    loads: list[int] = []

    async def load(msg: Message) -> bytes:
        req = sw.decode(msg.data, sw.LoadRequest)
        loads.append(req.release_counter or RELEASE)
        return sw.encode(
            sw.LoadResponse(
                dtype=DTYPE,
                release_counter=RELEASE,
                image_path=str(local.image),
                meta_enc=local.meta_enc.read_bytes(),
                sig_sm=local.sig_sm.read_bytes(),
            )
        )

    await sm_bus.serve(subjects.SM_SOFTWARE_LOAD, load)
    admin = hub.bus("admin")
    events: list[tuple[str, bytes]] = []

    async def on_event(msg: Message) -> None:
        events.append((msg.subject, msg.data))

    await admin.subscribe(f"{subjects.EVENTS}.pm.>", on_event)
    bench = tmp_path / "bench"
    bench.mkdir()
    try:
        yield Line(tmp_path, hub, store, clock, bench, local, FaultyFlasher(bench, DTYPE), events, loads, km)
    finally:
        await km_service.stop()
        store.close()


def chains_to_its_truststore(dev: SimulatedDevice, kind: str, at: dt.datetime) -> x509.Certificate:
    """What a relying device would do: RFC 5280 path validation against its own truststore, at
    ``at`` -- the time of the clock that issued the certificate (a fixed date beside real-clock
    issuance fails on a later day)."""
    cert = dev.certificate(kind)
    assert cert is not None
    truststore = dev.truststore()
    roots = [c for c in truststore if c.subject == c.issuer]
    verifier = verification.PolicyBuilder().store(verification.Store(roots)).time(at).build_client_verifier()
    verifier.verify(cert, [c for c in truststore if c.subject != c.issuer])
    return cert


def nothing_flashed(dev: SimulatedDevice) -> bool:
    return (
        dev.image_sha256() is None
        and dev.truststore() == []
        and dev.certificate("factory") is None
        and dev.certificate("operational") is None
        and dev.config() == {}
    )


# --- both certificate flows, verified by reading back ------------------------------------------
async def test_csr_and_crmf_devices_get_software_truststore_config_and_both_certificates(line: Line) -> None:
    csr_dev, crmf_dev = line.device("dev-1"), line.device("dev-2", csr=False)
    seen: list[Progress] = []
    async with line.provisioner() as pm:
        report = await pm.provision_batch(None, "alice@line-7", progress=seen.append)
    assert [(d.device_id, d.status, d.request) for d in report.devices] == [
        ("dev-1", "complete", "csr"),
        ("dev-2", "complete", "crmf"),
    ]
    assert (report.release_counter, report.image_sha256, report.mode) == (RELEASE, line.local.sha256(), None)
    assert {"algorithm1", "km", "flash_software", "verify", "store"} <= set(report.timings)
    assert seen[0] == Progress(total=2, done=0, phase="planned")
    assert seen[-1].done == 2
    for dev in (csr_dev, crmf_dev):
        assert dev.image_sha256() == line.local.sha256()
        assert dev.image_info() is not None
        factory = chains_to_its_truststore(dev, "factory", NOW)
        operational = chains_to_its_truststore(dev, "operational", NOW)
        assert factory.public_key() == operational.public_key() == dev.public_key()
        assert dev.config() == {
            "device_id": dev.device_id,
            "dtype": DTYPE,
            "enroll_uri": "https://127.0.0.1:8443/.well-known/est",
            "update_uri": "https://updates.example/boardA",
            "provisioned_by": "pm-boardA",
        }
        rec = line.store.get_provisioning(dev.device_id)
        assert rec is not None
        assert (rec.status, rec.operator, rec.release_counter, rec.image_sha256) == (
            "complete",
            "alice@line-7",
            RELEASE,
            line.local.sha256(),
        )
        assert rec.steps_done == ("software", "truststore", "config", "certificate:factory",
                                  "certificate:operational", "verify")  # fmt: skip
        assert rec.certificate_serials == {
            "factory": format(factory.serial_number, "x"),
            "operational": format(operational.serial_number, "x"),
        }
    # km recorded them as requested by this pm, both profiles, 2 devices
    certs = line.store.list_certificates()
    assert sorted((c.device_id, c.profile, c.requested_by) for c in certs) == [
        ("dev-1", "factory", "pm[boardA]"),
        ("dev-1", "operational", "pm[boardA]"),
        ("dev-2", "factory", "pm[boardA]"),
        ("dev-2", "operational", "pm[boardA]"),
    ]
    assert not list((line.tmp / "pm" / DTYPE / "staging").iterdir())  # the staged image is gone
    (event,) = await line.published("provisioned")
    assert (event["complete"], event["failed"]) == (2, 0)


async def test_profiles_are_the_deployments_policy(line: Line) -> None:
    dev = line.device("dev-1")
    async with line.provisioner(profiles=("factory",)) as pm:
        result = await pm.provision("dev-1", "alice")
    assert result.status == "complete"
    assert list(result.certificates) == ["factory"]
    assert dev.certificate("operational") is None
    chains_to_its_truststore(dev, "factory", NOW)


# --- re-provisioning, resume, single failures -------------------------------------------------------
async def test_reprovisioning_is_refused_unless_forced(line: Line) -> None:
    line.device("dev-1")
    line.device("dev-2")
    async with line.provisioner() as pm:
        first = await pm.provision("dev-1", "alice")
        with pytest.raises(errors.ConflictError, match="already provisioned"):
            await pm.provision("dev-1", "bob")
        report = await pm.provision_batch(None, "bob")  # the whole bench: dev-1 is left alone
        assert {d.device_id: d.status for d in report.devices} == {"dev-1": "skipped", "dev-2": "complete"}
        assert not report.failures
        again = await pm.provision("dev-1", "carol", force=True)
    assert again.status == "complete"
    assert set(again.certificates.values()).isdisjoint(first.certificates.values())
    rec = line.store.get_provisioning("dev-1")
    assert rec is not None
    assert (rec.operator, rec.attempts) == ("carol", 2)
    assert rec.message is not None
    assert "stay valid at km until revoked" in rec.message
    assert first.certificates["factory"] in rec.message


async def test_half_provisioned_device_resumes_from_the_first_step_not_done(line: Line) -> None:
    dev = line.device("dev-1", csr=False)
    line.flasher.fail("flash_certificate", "dev-1")  # the tool crashes once, after the software
    async with line.provisioner() as pm:
        (failed,) = (await pm.provision_batch(["dev-1"], "alice")).devices
        assert (failed.status, failed.failed_step, failed.code) == ("failed", "certificate:factory", "unavailable")
        assert failed.steps_done == ["software", "truststore", "config"]
        assert "JTAG" in (failed.message or "")
        rec = line.store.get_provisioning("dev-1")
        assert rec is not None
        assert (rec.status, rec.failed_step) == ("failed", "certificate:factory")
        assert list(rec.steps_done) == failed.steps_done
        flashed = [e for e in dev.events() if e["event"] == "image_flashed"]
        resumed = await pm.provision("dev-1", "bob")
    assert resumed.status == "complete"
    assert [e for e in dev.events() if e["event"] == "image_flashed"] == flashed  # software not flashed again
    rec = line.store.get_provisioning("dev-1")
    assert rec is not None
    assert (rec.status, rec.attempts, rec.failed_step, rec.operator) == ("complete", 2, None, "bob")
    chains_to_its_truststore(dev, "operational", NOW)


async def test_one_device_failing_does_not_stop_the_batch(line: Line) -> None:
    for i in range(1, 6):
        line.device(f"dev-{i}", csr=i % 2 == 0)
    line.flasher.fail("flash_image", "dev-3", times=99)
    async with line.provisioner(batch_size=2) as pm:
        report = await pm.provision_batch(None, "alice")
    statuses = {d.device_id: d.status for d in report.devices}
    assert statuses == {"dev-1": "complete", "dev-2": "complete", "dev-3": "failed", "dev-4": "complete",
                        "dev-5": "complete"}  # fmt: skip
    (bad,) = report.failures
    assert (bad.device_id, bad.failed_step, bad.steps_done) == ("dev-3", "software", [])
    rec = line.store.get_provisioning("dev-3")
    assert rec is not None
    assert rec.status == "failed"
    assert rec.failed_step == "software"


async def test_unknown_devices_are_listed(line: Line) -> None:
    line.device("dev-1")
    async with line.provisioner() as pm:
        report = await pm.provision_batch(["dev-1", "ghost"], "alice")
    ghost = next(d for d in report.devices if d.device_id == "ghost")
    assert (ghost.status, ghost.failed_step, ghost.code) == ("failed", "discover", "not_found")


# --- Algorithm 1: HALT --------------------------------------------------------------------------------
def _flip(path: Path, at: int = -1) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _tamper_sig_sm(local: LocalRepo) -> None:
    _flip(local.sig_sm, 10)


def _tamper_meta_enc(local: LocalRepo) -> None:
    _flip(local.meta_enc, 40)


def _tamper_image(local: LocalRepo) -> None:
    _flip(local.image, 12345)


def _compromised_sm_rewrites_role(local: LocalRepo) -> None:
    """sm (compromised) changes the repository's role and re-signs meta || sw with sk_sm: sig_sm is
    valid, the repository's signature is not (paper 5.2.3)."""
    bundle = software.decode_bundle(local.meta)
    role = json.loads(bundle.role)
    target = role["signed"]["targets"][f"{DTYPE}/fw.bin"]
    target["custom"]["release_counter"] = 99
    forged = software.encode_bundle(
        dtype=DTYPE,
        target_path=bundle.target_path,
        roots=bundle.roots,
        targets=bundle.targets,
        role=json.dumps(role).encode(),
    )
    local.store(meta=forged)


def _compromised_sm_swaps_image(local: LocalRepo) -> None:
    local.store(image=os.urandom(200_000))


@pytest.mark.parametrize(
    ("tamper", "check"),
    [
        (_tamper_sig_sm, "sig_sm"),
        (_tamper_meta_enc, "meta_enc"),
        (_tamper_image, "sig_sm"),  # sm's signature covers the image: it is the first to fail
        (_compromised_sm_rewrites_role, "meta_repo"),
        (_compromised_sm_swaps_image, "image"),
    ],
)
async def test_algorithm_1_failure_halts_everything_until_an_operator_clears_it(
    line: Line, tamper: Callable[[LocalRepo], None], check: str
) -> None:
    devices = [line.device("dev-1"), line.device("dev-2", csr=False)]
    good = (line.local.image.read_bytes(), line.local.meta_enc.read_bytes(), line.local.sig_sm.read_bytes())
    tamper(line.local)
    async with line.provisioner() as pm:
        with pytest.raises(HaltedError) as info:
            await pm.provision_batch(None, "alice")
        assert info.value.field == check
        assert info.value.code == "halted"
        assert all(nothing_flashed(d) for d in devices)
        assert line.store.count_certificates() == 0
        assert line.store.list_provisioning() == []
        (audit,) = line.store.list_audit(kind="alarm")
        assert audit.data["action"] == "raised"
        assert audit.data["check"] == check
        assert audit.actor == "pm[boardA]"
        (event,) = await line.published("alarm")
        assert (event["check"], event["state"], event["release_counter"]) == (check, "raised", RELEASE)
        # the local repository is repaired, but pm stays halted -- also across a restart
        line.local.image.chmod(0o644)
        for path, data in zip((line.local.image, line.local.meta_enc, line.local.sig_sm), good, strict=True):
            path.write_bytes(data)
        with pytest.raises(HaltedError, match="clear-alarm"):
            await pm.provision_batch(None, "alice")
    async with line.provisioner() as restarted:
        with pytest.raises(HaltedError):
            await restarted.provision("dev-1", "alice")
        assert len(line.sm_loads) == 1  # halted before even asking sm again
        cleared = await restarted.clear_alarm("security-officer")
        assert (cleared.state, cleared.cleared_by) == ("cleared", "security-officer")
        audits = line.store.list_audit(kind="alarm")
        assert [a.data["action"] for a in audits] == ["cleared", "raised"]
        assert audits[0].actor == "security-officer"
        report = await restarted.provision_batch(None, "alice")
    assert [d.status for d in report.devices] == ["complete", "complete"]
    assert all(d.image_sha256() == line.local.sha256() for d in devices)
    alarm = read_alarm(line.store, DTYPE)
    assert alarm is not None
    assert not alarm.active


async def test_clearing_without_an_alarm_is_not_found(line: Line) -> None:
    async with line.provisioner() as pm:
        with pytest.raises(errors.NotFoundError, match="no alarm"):
            await pm.clear_alarm("bob")
        with pytest.raises(errors.BadRequestError, match="operator"):
            await pm.provision_batch(None, "")


async def test_image_missing_from_the_local_repository_halts(line: Line) -> None:
    dev = line.device("dev-1")
    line.local.image.unlink()
    async with line.provisioner() as pm:
        with pytest.raises(HaltedError) as info:
            await pm.provision_batch(None, "alice")
    assert info.value.field == "image"
    assert nothing_flashed(dev)


# --- km's side ---------------------------------------------------------------------------------------
async def test_km_refuses_a_request_not_signed_by_pm_and_nothing_is_flashed(line: Line) -> None:
    devices = [line.device("dev-1"), line.device("dev-2", csr=False)]
    forged = Sealer(generate_key(Algorithm.P256), PM.cert)  # pm's certificate, another key
    async with line.provisioner(sealer=forged) as pm:
        report = await pm.provision_batch(None, "alice")
    assert [(d.status, d.failed_step, d.code) for d in report.devices] == [
        ("failed", "certificate:factory", "bad_signature"),
        ("failed", "certificate:factory", "bad_signature"),
    ]
    assert all(nothing_flashed(d) for d in devices)
    assert line.store.count_certificates() == 0
    assert line.store.list_audit(kind="refused")  # km audited the refusal


async def test_a_chain_from_another_root_is_refused(line: Line) -> None:
    dev = line.device("dev-1")
    async with line.provisioner(root_ca=make_pki().root) as pm:
        with pytest.raises(errors.UntrustedError, match="not this deployment's root"):
            await pm.provision_batch(None, "alice")
    assert nothing_flashed(dev)


# --- defence in depth: cm, modes ---------------------------------------------------------------------------
async def test_pm_refuses_while_cm_runs(line: Line) -> None:
    dev = line.device("dev-1")

    async def pong(_m: Message) -> bytes:
        return b"pong"

    sub = await line.hub.bus("cm").serve(subjects.CM_PING, pong)
    async with line.provisioner() as pm:
        with pytest.raises(errors.ModeError, match="provisioning mode") as info:
            await pm.provision_batch(None, "alice")
        assert info.value.field == "mode"
        await sub.unsubscribe()
        assert (await pm.provision("dev-1", "alice")).status == "complete"
    assert line.local.sha256() == dev.image_sha256()


async def _set_mode(hub: MemoryHub, mode: Mode) -> None:
    kv = await MemoryBus(hub, subjects.SUPERVISOR).key_value(subjects.MODE_BUCKET, create=True)
    await put_mode(kv, mode, by="t")


async def test_table_1_software_first_then_certificates(line: Line) -> None:
    """pm and km both held to the mode: software in provisioning-software (km is not asked),
    certificates in provisioning-certificate (sm is not asked), the device resumes in between."""
    dev = line.device("dev-1", csr=False)
    await _set_mode(line.hub, Mode.PROVISIONING_SOFTWARE)
    async with (
        ModeGuard(line.hub.bus("km"), verifier()) as km_guard,
        ModeGuard(line.hub.bus("pm"), verifier()) as guard,
        line.provisioner(guard=guard, require_mode=True) as pm,
    ):
        line.km.mode = km_guard
        await guard.wait_for(Mode.PROVISIONING_SOFTWARE)
        (first,) = (await pm.provision_batch(None, "alice")).devices
        assert (first.status, first.steps_done) == ("in-progress", ["software", "config"])
        assert first.steps_pending == ["truststore", "certificate:factory", "certificate:operational", "verify"]
        assert line.store.count_certificates() == 0  # km is off in this mode: never asked
        assert dev.truststore() == []
        await _set_mode(line.hub, Mode.PROVISIONING_CERTIFICATE)
        await guard.wait_for(Mode.PROVISIONING_CERTIFICATE)
        await km_guard.wait_for(Mode.PROVISIONING_CERTIFICATE)
        report = await pm.provision_batch(None, "alice")
        (second,) = report.devices
        assert report.mode == "provisioning-certificate"
        assert report.release_counter is None  # sm is off in this mode: never asked
    assert second.status == "complete"
    assert len(line.sm_loads) == 1
    chains_to_its_truststore(dev, "factory", NOW)


async def test_a_pm_held_to_the_mode_refuses_when_none_is_published(line: Line) -> None:
    line.device("dev-1")
    guard = ModeGuard(line.hub.bus("pm"), verifier())
    async with guard, line.provisioner(guard=guard, require_mode=True) as pm:
        with pytest.raises(errors.ModeError, match="unknown"):
            await pm.provision_batch(None, "alice")


# --- the service --------------------------------------------------------------------------------------------
async def test_service_provisions_and_reports_status(line: Line) -> None:
    line.device("dev-1")
    line.device("dev-2", csr=False)
    async with line.provisioner() as pm:
        service = PmService(pm, line.hub.bus("pm"))
        await service.start()
        try:
            client = PmClient(line.hub.bus("admin"), DTYPE, timeout=60)
            report = await client.provision(["dev-2"], operator="alice")
            assert [(d.device_id, d.status, d.request) for d in report.devices] == [("dev-2", "complete", "crmf")]
            status = await client.status()
            assert (status.halted, status.busy, status.records) == (False, False, {"complete": 1})
            with pytest.raises(errors.ConflictError, match="already provisioned"):
                await pm.provision("dev-2", "alice")
            _tamper_sig_sm(line.local)
            with pytest.raises(HaltedError) as info:  # rebuilt from the wire as itself
                await client.provision(None, operator="alice")
            assert info.value.field == "sig_sm"
            assert isinstance(info.value, errors.ConflictError)
            status = await client.status()
            assert status.halted
            assert status.alarm is not None
            assert status.alarm.check == "sig_sm"
            with pytest.raises(errors.BadRequestError):
                await line.hub.bus("admin").request("iotdlm.v1.pm.boardA.provision", b'{"devices": 3}')
        finally:
            await service.stop()


# --- a vendor tool without read-back ---------------------------------------------------------------------------
async def test_command_flasher_without_read_back_fails_verification_clearly(line: Line) -> None:
    line.device("dev-1")
    py = [sys.executable, TOOL, str(line.bench)]
    line.flasher = CommandFlasher(  # type: ignore[assignment]
        DTYPE,
        {
            "discover": [*py, "list"],
            "flash_image": [*py, "program", "{device}", "{image}", "{file}"],
            "flash_file": [*py, "write", "{device}", "{kind}", "{file}"],
            "public_key": [*py, "pubkey", "{device}"],
            "csr": [*py, "csr", "{device}"],
            "image_sha256": [*py, "sha256", "{device}"],
        },
    )
    async with line.provisioner(profiles=("factory",)) as pm:
        (result,) = (await pm.provision_batch(None, "alice")).devices
    assert (result.status, result.failed_step, result.code) == ("failed", "verify", "unsupported")
    assert "read_file" in (result.message or "")
    assert result.steps_done == ["software", "truststore", "config", "certificate:factory"]


def test_settings_refuse_what_is_not_a_policy(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "dtype": DTYPE,
        "organization": ORG,
        "enroll_uri": "https://x/.well-known/est",
        "update_uri": None,
        "staging_dir": tmp_path,
    }
    for profiles, match in (((), "at least one"), (("service",), "not device profiles"), (("factory",) * 2, "repeats")):
        with pytest.raises(ValueError, match=match):
            PmSettings(profiles=profiles, **base)
    with pytest.raises(ValueError, match="batch_size"):
        PmSettings(profiles=("factory",), batch_size=5000, **base)


async def test_messages_round_trip() -> None:
    report = m.ProvisionReport(
        dtype=DTYPE,
        operator="a",
        started_at="s",
        finished_at="f",
        devices=[m.DeviceResult(device_id="d", status="failed", failed_step="software", code="x", message="y")],
    )
    back = m.decode(m.encode(report), m.ProvisionReport)
    assert back == report
    assert back.failures == report.devices
    with pytest.raises(errors.BadRequestError):
        m.decode(b'{"devices": ["a"], "nope": 1}', m.ProvisionRequest)
    await asyncio.sleep(0)


async def test_an_alarm_the_store_could_not_record_still_halts_and_is_recorded_later(
    line: Line, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = line.device("dev-1")
    _tamper_sig_sm(line.local)
    real = line.store.set_meta_with_audit

    def down(*_args: object) -> object:
        raise errors.UnavailableError("database is down")

    monkeypatch.setattr(line.store, "set_meta_with_audit", down)
    async with line.provisioner() as pm:
        with pytest.raises(HaltedError):
            await pm.provision_batch(None, "alice")
        assert read_alarm(line.store, DTYPE) is None
        with pytest.raises(HaltedError):  # halted in this process all the same
            await pm.provision_batch(None, "alice")
        monkeypatch.setattr(line.store, "set_meta_with_audit", real)
        with pytest.raises(HaltedError):  # ... and now recorded for every pm and every restart
            await pm.provision_batch(None, "alice")
        status = await pm.status()
    alarm = read_alarm(line.store, DTYPE)
    assert alarm is not None
    assert alarm.active
    assert status.halted
    assert [a.data["check"] for a in line.store.list_audit(kind="alarm")] == ["sig_sm"]
    assert nothing_flashed(dev)
