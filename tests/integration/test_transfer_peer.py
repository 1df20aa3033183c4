"""Trust transfer between two providers over HTTPS (issue 13, docs/adr/0011): two deployments made
by ``init_deployment``, each with its own nats-server, km (with the transfer handlers, wired as
``iotdlm km serve`` wires them) and cm on its own loopback ports. SP2 fetches SP1's
UpdateInfoList with a signed request, posts its TransferMessage and its confirmation to SP1's cm;
SP1's km accepts and has CA1 revoke. Refused and audited at SP1: an unknown provider, a wrong
signer, replayed, stale and altered messages.

What devices do in between (reset, enrollment with CA2) is not this file's: SP2's enrollment
records are set directly before it confirms."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from click.testing import CliRunner
from cryptography import x509

from iotdlm.bus import Bus, Message, subjects
from iotdlm.bus.server import NatsUser
from iotdlm.cli.km import transfer_peer_routes
from iotdlm.cli.transfer import transfer
from iotdlm.client.km import KmClient
from iotdlm.cm import CmConfig, CmService
from iotdlm.cm.config import Limits
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.device.est_client import EstClient
from iotdlm.errors import BadRequestError, NotFoundError, UnavailableError, UntrustedError
from iotdlm.km import KmService
from iotdlm.km.registry import FactoryRegistry
from iotdlm.modes.guard import ModeGuard
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.keys import Algorithm, PrivateKey, generate_key, private_key_to_pem
from iotdlm.runtime import build_km, km_identity, km_trust, open_store, record_identities, sealer_for
from iotdlm.store import Store
from iotdlm.transfer import peer
from iotdlm.transfer import status as st
from iotdlm.transfer.identity import TransferIdentity, TransferSettings, create_identity
from iotdlm.transfer.messages import VersionInfo
from iotdlm.transfer.peer_client import PeerClient
from iotdlm.transfer.peer_handlers import publish_update_info
from iotdlm.transfer.peer_parts import PeerLimits
from iotdlm.transfer.shell import Sp1Service, Sp2Service
from iotdlm.wire import audit as fmt
from tests.fixtures_nats import RunningNats, start_nats
from tests.helpers import make_csr
from tests.integration.test_cm import LIMITS, ShiftClock, set_mode

pytestmark = [pytest.mark.nats, pytest.mark.real_clock]

PW = b"pw"
DTYPE = "sensor"
SP1_ID = "urn:example:provider:sp1"
SP2_ID = "urn:example:provider:sp2"
SP1_FALLBACK = "https://updates.sp1.example/fallback"


@dataclasses.dataclass
class Side:
    """One provider's deployment: nats-server, km (with the transfer handlers) and cm."""

    dep: Deployment
    store: Store
    clock: ShiftClock
    nats: RunningNats
    km: KmService
    cm: CmService
    identity: TransferIdentity
    buses: list[Bus]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.cm.https_port}"

    @property
    def root_pem(self) -> bytes:
        return (self.dep.root / "ca" / "root.pem").read_bytes()

    async def client(self, name: str) -> KmClient:
        bus = await self.nats.connect(name.partition("-")[0])
        self.buses.append(bus)
        return KmClient(bus, sealer_for(self.dep.identity(name)), self.clock, trust=km_trust(self.dep))


@contextlib.asynccontextmanager
async def open_side(
    tmp: Path,
    org: str,
    provider_id: str,
    clock: ShiftClock,
    limits: PeerLimits | None = None,
    cm_limits: Limits = LIMITS,
) -> AsyncIterator[Side]:
    made, _ = init_deployment(
        tmp / "d", organization=org, algorithm=Algorithm.P256, dtypes=[DTYPE], passphrase=PW, now=clock.now(),
        public_url="http://127.0.0.1:8080",
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
    ident = create_identity(
        dep, TransferSettings(provider_id=provider_id, fallback_uri=SP1_FALLBACK), now=clock.now(), passphrase=PW
    )
    kmcore = build_km(dep, store, clock, passphrase=PW)
    km_bus = await nats.connect("km")
    km = KmService(
        kmcore, km_bus, identity=km_identity(dep), extra_routes=transfer_peer_routes(dep, store, kmcore, km_bus, limits)
    )
    await km.start()
    modes_bus = await nats.connect("modes")
    await set_mode(modes_bus, "certificate-management", dep)
    cm = await CmService.from_deployment(dep, CmConfig(https_port=0, http_port=None, limits=cm_limits), clock=clock)
    await cm.start()
    assert isinstance(cm.app.mode, ModeGuard)
    await cm.app.mode.wait_for("certificate-management")
    side = Side(dep, store, clock, nats, km, cm, ident, [km_bus, modes_bus])
    try:
        yield side
    finally:
        await cm.stop()
        await km.stop()
        for b in side.buses:
            await b.close()
        nats.server.stop()
        store.close()


@dataclasses.dataclass
class Pair:
    sp1: Side
    sp2: Side
    sp1svc: Sp1Service
    sp2svc: Sp2Service
    devices: dict[str, tuple[PrivateKey, x509.Certificate]]

    def peer_client(self, **kw: Any) -> PeerClient:
        kw.setdefault("identity", self.sp2.identity)
        kw.setdefault("clock", self.sp2.clock)
        return PeerClient(self.sp1.url, peer_id=SP1_ID, anchors_pem=self.sp1.root_pem, **kw)

    def export(self, ids: list[str]) -> tuple[str, bytes]:
        now = self.sp1.clock.now()
        tid, token = self.sp1svc.export(
            ids, peer_id=SP2_ID, peer_certificate=self.sp2.identity.certificate,
            not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(days=7),
            version=lambda d: VersionInfo(1, "https://sp1.example/suit/1"),
        )  # fmt: skip
        publish_update_info(self.sp1.dep.root, tid, token)  # `transfer export --serve`
        return tid, token

    def accept(self, uil: bytes) -> tuple[str, bytes]:
        now = self.sp2.clock.now()
        return self.sp2svc.accept(
            uil, peer_id=SP1_ID, peer_certificate=self.sp1.identity.certificate,
            reset_not_before=now - dt.timedelta(minutes=1), reset_not_after=now + dt.timedelta(days=2),
            fallback_uri="https://sp2.example/unused", trust_anchors=[self.sp2.dep.ca_certificate("root")],
        )  # fmt: skip

    def enrolled_at_ca2(self, tid: str, ids: list[str]) -> None:
        """What CA2 records when the devices re-enroll (another helper's part of the network)."""
        per = {d: {"certificate": hashlib.sha256(d.encode()).hexdigest()} for d in ids}
        self.sp2svc.devices.set(tid, ids, st.ENROLLED, per_device=per)


async def provision(side: Side, device_id: str) -> tuple[PrivateKey, x509.Certificate]:
    """A factory certificate (pm's path) and an operational one from CA1 (EST through SP1's cm)."""
    fkey = generate_key(Algorithm.P256)
    pm = await side.client(f"pm-{DTYPE}")
    out = await pm.issue(device_id, "factory", csr=make_csr(fkey, device_id))
    factory = x509.load_der_x509_certificate(out.certificate)
    key = generate_key(Algorithm.P256)
    async with EstClient(
        side.url, trust_anchor_pem=side.root_pem, client_cert_pem=certs_to_pem([factory]),
        client_key_pem=private_key_to_pem(fkey, None),
    ) as est:  # fmt: skip
        op = await est.simpleenroll(make_csr(key, device_id))
    return key, op


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    clock = ShiftClock()
    async with (
        open_side(tmp_path / "sp1", "SP1", SP1_ID, clock) as sp1,
        open_side(tmp_path / "sp2", "SP2", SP2_ID, clock) as sp2,
    ):
        registrar = FactoryRegistry(sp2.store, clock, enroll_uri=f"{sp2.url}/.well-known/est")
        registrar.register_cas([sp1.dep.ca_certificate("root"), sp1.dep.ca_certificate("factory")], actor="sp2-op")
        devices = {d: await provision(sp1, d) for d in ("dev-1", "dev-2", "dev-3")}
        yield Pair(
            sp1,
            sp2,
            Sp1Service(store=sp1.store, identity=sp1.identity, clock=clock, fallback_uri=SP1_FALLBACK),
            Sp2Service(store=sp2.store, identity=sp2.identity, clock=clock, registrar=registrar),
            devices,
        )


def refusals(store: Store) -> list[dict[str, Any]]:
    return [json.loads(r.data_json) for r in store.list_audit(kind=fmt.REFUSED, limit=1000)]


async def test_sp2_fetches_posts_and_confirms_and_sp1_revokes(pair: Pair) -> None:
    ids = sorted(pair.devices)
    tid, token = pair.export(ids)
    async with pair.peer_client() as sp1_cm:
        uil = await sp1_cm.fetch_update_info(tid)
        assert uil == token
        tid2, tm = pair.accept(uil)
        assert tid2 == tid
        said = await sp1_cm.send_transfer_message(tid, tm)
        assert "accepted" in said
        # SP1 took it: it makes the per-device messages now
        msgs, skipped = pair.sp1svc.device_messages(tid)
        assert sorted(msgs) == ids
        assert not skipped
        pair.enrolled_at_ca2(tid, ids)
        # the other km workers hear of the revocations (they drop their cached OCSP answers)
        heard: list[dict[str, str]] = []
        admin = await pair.sp1.nats.connect("admin")
        pair.sp1.buses.append(admin)

        async def on_revoked(m: Message) -> None:
            heard.append(json.loads(m.data))

        await admin.subscribe(subjects.KM_REVOKED_EVENT, on_revoked)
        said = await sp1_cm.send_confirmation(tid, pair.sp2svc.confirm(tid))
    assert said == "3 device(s) revoked-at-CA1"
    for _ in range(100):
        if len(heard) == 3:
            break
        await asyncio.sleep(0.05)
    olds = sorted((format(op.serial_number, "x") for _k, op in pair.devices.values()))
    assert sorted(e["serial"] for e in heard) == olds
    assert {e["issuer"] for e in heard} == {"operational"}
    assert {r.status for r in pair.sp1svc.status(tid).values()} == {st.REVOKED_AT_CA1}
    for _key, op in pair.devices.values():
        rec = pair.sp1.store.get_certificate("operational", op.serial_number)
        assert rec is not None
        assert rec.status == "revoked"
    assert refusals(pair.sp1.store) == []


async def _status(url: str, method: str, root_pem: bytes, **kw: Any) -> tuple[int, str]:
    import ssl

    ctx = ssl.create_default_context(cadata=root_pem.decode())
    async with aiohttp.ClientSession() as s, s.request(method, url, ssl=ctx, **kw) as resp:
        return resp.status, await resp.text()


async def test_fetch_refused_and_audited(pair: Pair) -> None:
    tid, _token = pair.export(sorted(pair.devices))
    # an unknown provider: a real transfer identity, not the one pinned for this transfer
    async with pair.peer_client(identity=pair.sp1.identity) as c:
        with pytest.raises(UntrustedError, match=r"403.*agreed for this transfer"):
            await c.fetch_update_info(tid)
    # the wrong signer: SP2's certificate named, another key signing
    impostor = dataclasses.replace(pair.sp2.identity, key=generate_key(Algorithm.P256))
    async with pair.peer_client(identity=impostor) as c:
        with pytest.raises(UntrustedError, match=r"403.*does not verify"):
            await c.fetch_update_info(tid)
    # a replayed request (the same cti), and a stale one
    async with pair.peer_client(entropy=lambda n: b"\x01" * n) as c:
        await c.fetch_update_info(tid)
        with pytest.raises(UntrustedError, match=r"403.*already used"):
            await c.fetch_update_info(tid)
    late = ShiftClock()
    late.offset = dt.timedelta(minutes=10)
    async with pair.peer_client(clock=late) as c:
        with pytest.raises(UntrustedError, match=r"403.*more than 120 s"):
            await c.fetch_update_info(tid)
    async with pair.peer_client() as c:
        with pytest.raises(NotFoundError, match=r"404.*no transfer"):
            await c.fetch_update_info("0" * 32)
    whats = [r["what"] for r in refusals(pair.sp1.store)]
    assert whats == ["update-info request"] * 5
    # no signed request at all, a path that is no transfer id
    status, text = await _status(f"{pair.sp1.url}/transfer/{tid}/update-info", "GET", pair.sp1.root_pem)
    assert (status, peer.FETCH_HEADER in text) == (403, True)
    status, text = await _status(f"{pair.sp1.url}/transfer/NOT-AN-ID/update-info", "GET", pair.sp1.root_pem)
    assert (status, text.strip()) == (400, "a transfer id is 32 lower-case hex digits")


async def test_transfer_message_and_confirmation_refused_and_audited(pair: Pair) -> None:
    ids = sorted(pair.devices)
    tid, token = pair.export(ids)
    _, tm = pair.accept(token)
    url = f"{pair.sp1.url}/transfer/{tid}/transfer-message"
    altered = tm[:-1] + bytes([tm[-1] ^ 1])
    status, text = await _status(
        url, "POST", pair.sp1.root_pem, data=altered, headers={"Content-Type": "application/cwt"}
    )
    assert (status, "does not verify" in text) == (403, True)
    status, _ = await _status(url, "POST", pair.sp1.root_pem, data=tm, headers={"Content-Type": "text/plain"})
    assert status == 415
    other = "f" * 32
    async with pair.peer_client() as c:
        with pytest.raises(UntrustedError, match=rf"403.*not {other}"):
            await c.send_transfer_message(other, tm)
        await c.send_transfer_message(tid, tm)
        with pytest.raises(UntrustedError, match=r"403.*received before"):
            await c.send_transfer_message(tid, tm)
        pair.enrolled_at_ca2(tid, ids[:1])
        conf = pair.sp2svc.confirm(tid)
        assert (await c.send_confirmation(tid, conf)) == "1 device(s) revoked-at-CA1"
        with pytest.raises(UntrustedError, match=r"403.*received before"):
            await c.send_confirmation(tid, conf)
        with pytest.raises(BadRequestError, match="400"):
            await c.send_confirmation(tid, b"not a cwt")
    whats = [r["what"] for r in refusals(pair.sp1.store)]
    assert sorted(whats) == sorted(["TransferMessage"] * 3 + ["confirmation"] * 2)
    assert pair.sp1svc.status(tid)[ids[0]].status == st.REVOKED_AT_CA1
    assert {pair.sp1svc.status(tid)[d].status for d in ids[1:]} == {st.PENDING}


async def test_the_cli_over_the_network(pair: Pair, tmp_path: Path) -> None:
    """`transfer export --serve`, `accept --from ... --send`, `confirm --send`, as an operator runs them."""
    sp1_dir, sp2_dir = pair.sp1.dep.root, pair.sp2.dep.root
    sp1_cert = sp1_dir / "transfer" / "identity" / "certificate.pem"
    sp2_cert = sp2_dir / "transfer" / "identity" / "certificate.pem"
    sp1_cert.write_bytes(certs_to_pem([pair.sp1.identity.certificate]))
    sp2_cert.write_bytes(certs_to_pem([pair.sp2.identity.certificate]))
    root = tmp_path / "sp1-root.pem"
    root.write_bytes(pair.sp1.root_pem)

    def invoke(*args: str) -> str:
        out = CliRunner().invoke(transfer, list(args), catch_exceptions=False)
        assert out.exit_code == 0, out.output
        return out.output

    said = await asyncio.to_thread(
        invoke, "export", "--data", str(sp1_dir), "--peer-id", SP2_ID, "--peer-cert", str(sp2_cert),
        "--device", "dev-1", "--device", "dev-2", "--serve",
    )  # fmt: skip
    tid = said.split("transfer ")[1].split(":")[0].strip()
    assert peer.TID_RE.fullmatch(tid), said
    said = await asyncio.to_thread(
        invoke, "accept", "--data", str(sp2_dir), "--from", pair.sp1.url, "--transfer", tid,
        "--cacert", str(root), "--peer-id", SP1_ID, "--peer-cert", str(sp1_cert), "--send",
    )  # fmt: skip
    assert "TransferMessage accepted" in said
    pair.enrolled_at_ca2(tid, ["dev-1", "dev-2"])
    said = await asyncio.to_thread(
        invoke, "confirm", "--data", str(sp2_dir), "--transfer", tid, "--send", pair.sp1.url,
        "--cacert", str(root),
    )  # fmt: skip
    assert "2 device(s) revoked-at-CA1" in said
    assert {r.status for r in pair.sp1svc.status(tid).values()} == {st.REVOKED_AT_CA1}


async def test_not_in_software_management(pair: Pair) -> None:
    """Table 1: km is off in software-management, so SP1's cm does not take the peer's messages."""
    tid, _token = pair.export(sorted(pair.devices))
    await set_mode(pair.sp1.buses[1], "software-management", pair.sp1.dep)
    assert isinstance(pair.sp1.cm.app.mode, ModeGuard)
    await pair.sp1.cm.app.mode.wait_for("software-management")
    async with pair.peer_client() as c:
        with pytest.raises(UnavailableError, match="503"):
            await c.fetch_update_info(tid)
