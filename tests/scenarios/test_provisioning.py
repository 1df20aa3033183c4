"""The paper's provisioning end to end (4.2, Algorithm 1, Figs 3-5; seed 003 VI-B), on the embedded
nats-server with every module as its own NATS user: km (in process, on NATS), sm storing software
from a real vendor repository served on loopback (Algorithm 2), pm provisioning simulated devices.

- both certificate flows (a device that makes its CSR, a device that only hands over its public
  key -> CRMF raVerified), factory and operational; each certificate chains to the truststore
  flashed into its device; the image on the device is the repository's;
- no device private key appears outside its device folder: not in the data folder, not in the
  database, not on the bus (every payload pm, km and sm sent or received is recorded);
- a tampered local repository (sig_sm, meta.enc, the bundle re-encrypted with a modified role and
  re-signed by a compromised sm, the image) HALTS pm: nothing flashed, alarm audited and published,
  pm stays halted until `iotdlm pm clear-alarm`;
- km refuses a request not signed by pm's key: nothing flashed;
- re-provisioning refused unless forced; a half-provisioned device resumes; one device's failure
  does not stop the batch; pm refuses while cm answers its ping;
- `iotdlm pm provision` on a small bench.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm import errors, software
from iotdlm.bus import Bus, Message, Subscription
from iotdlm.bus import subjects as s
from iotdlm.bus.api import AppendOnlyStream, EventHandler, KeyValue, RequestHandler
from iotdlm.bus.server import free_port
from iotdlm.cli.pm import pm as pm_cli
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.km import KmService
from iotdlm.pki.keys import Algorithm, generate_key, load_private_key_pem
from iotdlm.pm import config as pmconfig
from iotdlm.pm.alarm import HaltedError
from iotdlm.pm.flasher import SimulatedFlasher
from iotdlm.pm.provisioner import Provisioner
from iotdlm.repository import VendorRepository
from iotdlm.repository.server import RepositoryServer
from iotdlm.runtime import build_km, connect_identity, km_identity, nats_server, open_store, record_identities
from iotdlm.sm import HttpFetcher
from iotdlm.sm import config as smconfig
from iotdlm.sm.service import SmService
from iotdlm.store import Store
from iotdlm.wire.envelope import Sealer
from tests.helpers import pem
from tests.unit.test_pm_core import chains_to_its_truststore, nothing_flashed

pytestmark = pytest.mark.nats

DTYPE = "polarfire-soc"
PASSPHRASE = b"scenario passphrase"
IMAGE_BYTES = 1024 * 1024


class RecordingBus:
    """A Bus that records every payload it sends or receives (requests, replies, events, handled
    messages): what an eavesdropper on the internal plane would see of this module."""

    def __init__(self, inner: Bus, seen: list[bytes]) -> None:
        self.inner = inner
        self.seen = seen

    @property
    def module(self) -> str:
        return self.inner.module

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
        self.seen.append(data)
        reply = await self.inner.request(subject, data, timeout=timeout)
        self.seen.append(reply)
        return reply

    async def publish(self, subject: str, data: bytes) -> None:
        self.seen.append(data)
        await self.inner.publish(subject, data)

    async def serve(self, subject: str, handler: RequestHandler, *, queue: str | None = None) -> Subscription:
        async def recorded(m: Message) -> bytes:
            self.seen.append(m.data)
            out = await handler(m)
            self.seen.append(out)
            return out

        return await self.inner.serve(subject, recorded, queue=queue)

    async def subscribe(self, subject: str, handler: EventHandler, *, queue: str | None = None) -> Subscription:
        async def recorded(m: Message) -> None:
            self.seen.append(m.data)
            await handler(m)

        return await self.inner.subscribe(subject, recorded, queue=queue)

    async def key_value(self, bucket: str, *, create: bool = False) -> KeyValue:
        return await self.inner.key_value(bucket, create=create)

    async def append_only_stream(self, name: str, subject: str, *, create: bool = False) -> AppendOnlyStream:
        return await self.inner.append_only_stream(name, subject, create=create)

    async def drain(self) -> None:
        await self.inner.drain()

    async def close(self) -> None:
        await self.inner.close()


@dataclasses.dataclass
class Site:
    tmp: Path
    dep: Deployment
    store: Store
    repo: VendorRepository
    bench: Path
    traffic: list[bytes]
    buses: list[Bus]
    published_sha256: str

    @property
    def data(self) -> Path:
        return self.dep.root

    def device(self, name: str, *, csr: bool = True) -> SimulatedDevice:
        return SimulatedDevice.manufacture(self.bench / name, name, DTYPE, can_make_csr=csr)

    def local_version(self) -> Path:
        (folder,) = (self.data / "sm" / DTYPE).iterdir()
        return folder

    async def pm_bus(self, module_bus: Bus | None = None) -> Bus:
        bus = RecordingBus(module_bus or await pmconfig.connect_pm(self.dep, DTYPE), self.traffic)
        self.buses.append(bus)
        return bus

    async def provisioner(
        self, *, flasher: SimulatedFlasher | None = None, sealer: Sealer | None = None
    ) -> Provisioner:
        prov = pmconfig.build_provisioner(
            self.dep,
            DTYPE,
            bus=await self.pm_bus(),
            store=self.store,
            flasher=flasher or SimulatedFlasher(self.bench, DTYPE),
            clock=SystemClock(),
        )
        if sealer is not None:
            prov.km.sealer = sealer
        return prov


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    now = SystemClock().now()
    dep, _cas = init_deployment(
        tmp_path / "data", organization="Scenario Factory", algorithm=Algorithm.P256, dtypes=[DTYPE],
        passphrase=PASSPHRASE, nats_port=free_port(), now=now - dt.timedelta(hours=1),
    )  # fmt: skip
    store = open_store(dep)
    record_identities(dep, store, now)
    server = nats_server(dep)
    server.start()
    traffic: list[bytes] = []
    buses: list[Bus] = []
    services: list[Any] = []
    # the vendor's repository, on loopback
    report_ca = tmp_path / "service-ca.pem"
    report_ca.write_bytes(pem(dep.ca_certificate("service")))
    repo = VendorRepository.init(tmp_path / "repo", now=now, report_ca=report_ca)
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(IMAGE_BYTES))
    published = repo.publish(DTYPE, 5, image, now=now, name="fw.bin")
    try:
        async with RepositoryServer(repo) as repo_server:
            # km on NATS, as its own NATS user
            km_bus, _ = await connect_identity(dep, "km")
            km_bus = RecordingBus(km_bus, traffic)
            buses.append(km_bus)
            km = KmService(
                build_km(dep, store, SystemClock(), passphrase=PASSPHRASE), km_bus, identity=km_identity(dep)
            )
            await km.start()
            services.append(km)
            # sm: Algorithm 2 against the repository, then pm's API on NATS
            smconfig.setup(dep.root, repository_url=repo_server.url, root=repo.trusted_root(), dtypes=[DTYPE])
            manager = smconfig.build(dep.root, fetcher=HttpFetcher(), clock=SystemClock())
            result = await asyncio.to_thread(manager.check, DTYPE)
            assert result.outcome == "stored"
            sm_bus, _ = await connect_identity(dep, "sm")
            sm_bus = RecordingBus(sm_bus, traffic)
            buses.append(sm_bus)
            sm_service = SmService(manager, sm_bus, dtypes=[DTYPE], poll_interval=None)
            await sm_service.start()
            services.append(sm_service)
            bench = tmp_path / "bench"
            bench.mkdir()
            yield Site(tmp_path, dep, store, repo, bench, traffic, buses, published.sha256)
    finally:
        for svc in reversed(services):
            await svc.stop()
        for bus in buses:
            with contextlib.suppress(Exception):
                await bus.close()
        server.stop()
        store.close()


# --- the line ---------------------------------------------------------------------------------------------
def _needles(key: ec.EllipticCurvePrivateKey, pem_file: bytes) -> dict[str, bytes]:
    """Every form the device's private key could leak in: PEM, DER (PKCS#8 and SEC1), the raw
    scalar; each also as hex and as base64 (JSON carries bytes as base64) at every alignment."""
    raw = key.private_numbers().private_value.to_bytes(32, "big")
    forms = {
        "pem": pem_file,
        "pkcs8": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()),
        "sec1": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()),
        "raw": raw,
    }  # fmt: skip
    out = dict(forms)
    for name, value in forms.items():
        if name == "pem":
            continue
        out[f"{name}.hex"] = value.hex().encode()
        for shift in range(3):
            for enc, fn in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
                encoded = fn(b"\0" * shift + value)
                # drop the characters that mix in the padding bytes or the end
                out[f"{name}.{enc}{shift}"] = encoded[4 if shift else 0 : -4]
    return out


def _dump_database(path: Path) -> bytes:
    conn = sqlite3.connect(path)
    try:
        parts = []
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 -- table names from the schema
                for value in row:
                    parts.append(value if isinstance(value, bytes) else str(value).encode())
        return b"\n".join(parts)
    finally:
        conn.close()


async def test_a_line_is_provisioned_both_ways_and_no_device_key_leaves_its_device(site: Site) -> None:
    devices = [site.device("pf-001"), site.device("pf-002", csr=False), site.device("pf-003"),
               site.device("pf-004", csr=False)]  # fmt: skip
    async with await site.provisioner() as pm:
        report = await pm.provision_batch(None, "alice@line-7")
    assert [(d.device_id, d.status, d.request) for d in report.devices] == [
        ("pf-001", "complete", "csr"),
        ("pf-002", "complete", "crmf"),
        ("pf-003", "complete", "csr"),
        ("pf-004", "complete", "crmf"),
    ]
    assert report.image_sha256 == site.published_sha256
    for dev in devices:
        assert dev.image_sha256() == site.published_sha256
        for kind in ("factory", "operational"):
            cert = chains_to_its_truststore(dev, kind, SystemClock().now())
            assert cert.public_key() == dev.public_key()
        assert dev.config()["enroll_uri"] == "https://127.0.0.1:8443/.well-known/est"
        rec = site.store.get_provisioning(dev.device_id)
        assert rec is not None
        assert rec.status == "complete"
    assert site.store.count_certificates(profile="factory") == 4
    assert site.store.count_certificates(profile="operational") == 4

    # no device private key outside its own device folder
    assert site.traffic, "the recording buses saw nothing"
    bus_bytes = b"\n".join(site.traffic)
    database = _dump_database(site.data / "db" / "iotdlm.db")
    data_files = {p: p.read_bytes() for p in site.data.rglob("*") if p.is_file()}
    bench_files = {p: p.read_bytes() for p in site.bench.rglob("*") if p.is_file()}
    for dev in devices:
        key_pem = (dev.path / "secure" / "key.pem").read_bytes()
        key = load_private_key_pem(key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        for form, needle in _needles(key, key_pem).items():
            assert needle not in bus_bytes, f"{dev.device_id}'s key ({form}) went over the bus"
            assert needle not in database, f"{dev.device_id}'s key ({form}) is in the database"
            for path, content in data_files.items():
                assert needle not in content, f"{dev.device_id}'s key ({form}) is in {path}"
            for path, content in bench_files.items():
                if dev.path not in path.parents:
                    assert needle not in content, f"{dev.device_id}'s key ({form}) is in {path}"
    # the scan would have seen a leak: a key carried in JSON (msgspec: bytes as base64), as hex, as PEM
    own_pem = (devices[0].path / "secure" / "key.pem").read_bytes()
    own = load_private_key_pem(own_pem, None)
    assert isinstance(own, ec.EllipticCurvePrivateKey)
    needles = _needles(own, own_pem).values()
    pkcs8 = own.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())  # fmt: skip
    for leak in (msgspec.json.encode({"x": b"ab" + pkcs8}), pkcs8.hex().encode(), b"..." + own_pem):
        assert any(n in leak for n in needles)


# --- Algorithm 1 on sm's real local repository -------------------------------------------------------------
def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _sig_sm(folder: Path, site: Site) -> None:
    _flip(folder / "sig_sm", 8)


def _meta_enc(folder: Path, site: Site) -> None:
    _flip(folder / "meta.enc", 50)


def _image(folder: Path, site: Site) -> None:
    _flip(folder / "image", IMAGE_BYTES // 2)


def _role_rewritten_by_a_compromised_sm(folder: Path, site: Site) -> None:
    """sm holds the sm-pm key and sk_sm: it decrypts the bundle, changes the dtype role (the hash
    of the target, to match an image of its own), re-encrypts and re-signs (paper 5.2.3)."""
    counter = int(folder.name)
    key = smconfig.load_meta_key(site.data)
    meta = software.decrypt_meta((folder / "meta.enc").read_bytes(), key, DTYPE, counter)
    bundle = software.decode_bundle(meta)
    role = json.loads(bundle.role)
    evil = os.urandom(IMAGE_BYTES)
    target = role["signed"]["targets"][bundle.target_path]
    target["hashes"] = {"sha256": hashlib.sha256(evil).hexdigest()}
    forged = software.encode_bundle(
        dtype=DTYPE, target_path=bundle.target_path, roots=bundle.roots, targets=bundle.targets,
        role=json.dumps(role).encode(),
    )  # fmt: skip
    (folder / "image").write_bytes(evil)
    (folder / "meta.enc").write_bytes(software.encrypt_meta(forged, key, DTYPE, counter))
    sk_sm = load_private_key_pem((site.data / "modules" / "sm" / "key.pem").read_bytes(), None)
    (folder / "sig_sm").write_bytes(software.compute_sig_sm(sk_sm, forged, folder / "image"))


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(pm_cli, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


@pytest.mark.parametrize(
    ("tamper", "check"),
    [
        (_sig_sm, "sig_sm"),
        (_meta_enc, "meta_enc"),
        (_role_rewritten_by_a_compromised_sm, "meta_repo"),
        (_image, "sig_sm"),  # sig_sm covers meta || sw: the altered image fails it first
    ],
)
async def test_a_tampered_local_repository_halts_pm_until_an_operator_clears_it(
    site: Site, tamper: Callable[[Path, Site], None], check: str
) -> None:
    devices = [site.device("pf-001"), site.device("pf-002", csr=False)]
    folder = site.local_version()
    good = {name: (folder / name).read_bytes() for name in ("image", "meta.enc", "sig_sm")}
    tamper(folder, site)
    admin = await connect_identity(site.dep, "admin")
    alarms: list[dict[str, Any]] = []

    async def on_alarm(m: Message) -> None:
        alarms.append(json.loads(m.data))

    await admin[0].subscribe(f"{s.EVENTS}.pm.alarm", on_alarm)
    try:
        async with await site.provisioner() as pm:
            with pytest.raises(HaltedError) as info:
                await pm.provision_batch(None, "alice")
            assert info.value.field == check
            assert all(nothing_flashed(d) for d in devices)
            assert site.store.list_provisioning() == []
            (audit,) = site.store.list_audit(kind="alarm")
            assert (audit.data["action"], audit.data["check"]) == ("raised", check)
            for _ in range(100):
                if alarms:
                    break
                await asyncio.sleep(0.02)
            assert [a["check"] for a in alarms] == [check]
            for name, data in good.items():  # repaired; pm stays halted (persisted, not in memory)
                (folder / name).write_bytes(data)
        async with await site.provisioner() as restarted:
            with pytest.raises(HaltedError, match="clear-alarm"):
                await restarted.provision_batch(None, "alice")
        r = await asyncio.to_thread(_invoke, "status", "--data", str(site.data), "--dtype", DTYPE)
        assert "HALTED" in r.output
        r = await asyncio.to_thread(
            _invoke, "clear-alarm", "--data", str(site.data), "--dtype", DTYPE, "--operator", "security-officer"
        )
        assert r.exit_code == 0, r.output
        assert "cleared by security-officer" in r.output
        assert [a.data["action"] for a in site.store.list_audit(kind="alarm")] == ["cleared", "raised"]
        async with await site.provisioner() as cleared:
            report = await cleared.provision_batch(None, "alice")
        assert [d.status for d in report.devices] == ["complete", "complete"]
    finally:
        await admin[0].close()


async def test_km_refuses_a_request_without_a_valid_pm_signature(site: Site) -> None:
    devices = [site.device("pf-001"), site.device("pf-002", csr=False)]
    ident = site.dep.identity(f"pm-{DTYPE}")
    forged = Sealer(generate_key(Algorithm.P256), ident.certificate)  # pm's certificate, another key
    async with await site.provisioner(sealer=forged) as pm:
        report = await pm.provision_batch(None, "mallory")
    assert {(d.status, d.failed_step, d.code) for d in report.devices} == {
        ("failed", "certificate:factory", "bad_signature")
    }
    assert all(nothing_flashed(d) for d in devices)
    assert site.store.count_certificates(profile="factory") == 0
    assert [a.data.get("code") for a in site.store.list_audit(kind="refused")] == ["bad_signature"]


class CrashOnce(SimulatedFlasher):
    def __init__(self, bench: Path, op: str, device: str) -> None:
        super().__init__(bench, DTYPE)
        self.op, self.device, self.armed = op, device, True

    def _trip(self, op: str, ref: str) -> None:
        if self.armed and op == self.op and Path(ref).name == self.device:
            self.armed = False
            raise errors.UnavailableError(f"{op}: USB device disconnected")

    def flash_certificate(self, ref: str, kind: str, cert: x509.Certificate) -> None:
        self._trip("flash_certificate", ref)
        super().flash_certificate(ref, kind, cert)

    def flash_image(self, ref: str, image: Path, info: Any) -> None:
        self._trip("flash_image", ref)
        super().flash_image(ref, image, info)


async def test_resume_refuse_force_and_single_failures(site: Site) -> None:
    a, b, c = site.device("pf-001"), site.device("pf-002", csr=False), site.device("pf-003")
    # a crash after the software (a flasher that raises on flash_certificate once)
    async with await site.provisioner(flasher=CrashOnce(site.bench, "flash_certificate", "pf-002")) as pm:
        report = await pm.provision_batch(None, "alice")
    assert {d.device_id: d.status for d in report.devices} == {"pf-001": "complete", "pf-002": "failed",
                                                                "pf-003": "complete"}  # fmt: skip
    (failure,) = report.failures
    assert (failure.failed_step, failure.steps_done) == ("certificate:factory", ["software", "truststore", "config"])
    images = len([e for e in b.events() if e["event"] == "image_flashed"])
    async with await site.provisioner() as pm:
        report = await pm.provision_batch(None, "bob")  # the line again: pf-002 resumes, the others stay
        assert {d.device_id: d.status for d in report.devices} == {"pf-001": "skipped", "pf-002": "complete",
                                                                    "pf-003": "skipped"}  # fmt: skip
        assert len([e for e in b.events() if e["event"] == "image_flashed"]) == images
        with pytest.raises(errors.ConflictError, match="already provisioned"):
            await pm.provision("pf-001", "bob")
        before = site.store.get_provisioning("pf-001")
        again = await pm.provision("pf-001", "carol", force=True)
    assert before is not None
    assert again.certificates["factory"] != before.certificate_serials["factory"]
    for dev in (a, b, c):
        chains_to_its_truststore(dev, "factory", SystemClock().now())


async def test_pm_refuses_while_cm_runs(site: Site) -> None:
    dev = site.device("pf-001")
    cm_bus, _ = await connect_identity(site.dep, "cm")

    async def pong(_m: Message) -> bytes:
        return b"{}"

    await cm_bus.serve(s.CM_PING, pong)
    try:
        async with await site.provisioner() as pm:
            with pytest.raises(errors.ModeError, match="Switch to a provisioning mode"):
                await pm.provision_batch(None, "alice")
    finally:
        await cm_bus.close()
    assert nothing_flashed(dev)


async def test_cli_provisions_a_small_bench(site: Site) -> None:
    r = await asyncio.to_thread(
        _invoke, "bench", "make", "--dir", str(site.bench), "--dtype", DTYPE, "--count", "3", "--no-csr-every", "3"
    )
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # the bench's path is in the sentence: it wraps where the path ends
    assert "manufactured 3" in said
    assert "1 that cannot make CSRs" in said
    args = ["provision", "--data", str(site.data), "--dtype", DTYPE, "--bench", str(site.bench), "--operator", "op"]
    r = await asyncio.to_thread(_invoke, *args)
    assert r.exit_code == 0, r.output
    assert "complete" in r.output
    assert f"{DTYPE}-00003" in r.output
    assert "crmf" in r.output
    r = await asyncio.to_thread(_invoke, *args, "--device", f"{DTYPE}-00001")
    assert r.exit_code == 4, r.output
    assert "already provisioned" in r.output
    r = await asyncio.to_thread(_invoke, "records", "--data", str(site.data), "--dtype", DTYPE)
    assert r.exit_code == 0, r.output
    assert r.output.count("complete") == 3
    for cmd in ("setup", "provision", "serve", "records", "status", "clear-alarm"):
        assert (await asyncio.to_thread(_invoke, cmd, "--help")).exit_code == 0


async def test_cli_request_asks_the_running_pm_service(site: Site) -> None:
    from iotdlm.pm.service import PmService

    site.device("pf-001")
    site.device("pf-002", csr=False)
    async with await site.provisioner() as pm:
        service = PmService(pm, pm.bus)
        await service.start()
        try:
            base = ["request", "--data", str(site.data), "--dtype", DTYPE, "--operator", "alice"]
            r = await asyncio.to_thread(_invoke, *base)
            assert r.exit_code == 0, r.output
            assert "pf-002" in r.output
            assert "crmf" in r.output
            r = await asyncio.to_thread(_invoke, *base, "--device", "pf-001")
            assert r.exit_code == 4, r.output
            assert "already provisioned" in r.output
        finally:
            await service.stop()
    assert {rec.device_id: rec.status for rec in site.store.list_provisioning()} == {
        "pf-001": "complete",
        "pf-002": "complete",
    }
