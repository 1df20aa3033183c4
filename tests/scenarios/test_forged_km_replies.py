"""Attack: someone who can answer on a module's inbox forges km's reply (issue 11, section 4).

The threat model: one module's credentials are stolen. With km's NATS login (or an impostor on
the in-memory bus) the attacker can serve km's subjects and answer a revoke or an issue request
first; with another module's private key it can even sign. km signs every reply (ADR 0006), and
:class:`~iotdlm.client.km.KmClient` with a :class:`~iotdlm.client.km.KmTrust` believes only a reply
signed by a km certificate of this deployment's service CA, valid now, bound to its own request.

Each test runs on the in-memory bus and over a real nats-server (the production permission
table: the stolen login is km's own, which may serve km's subjects and answer on inboxes).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
from cryptography import x509

from iotdlm.bus import Bus, Message, Subscription
from iotdlm.bus import subjects as s
from iotdlm.bus.memory import MemoryHub
from iotdlm.client.km import KmClient, KmTrust
from iotdlm.clock import FixedClock
from iotdlm.errors import NotAuthorizedError, NotFoundError, UnavailableError, UntrustedError
from iotdlm.km import Km, KmService, KmSettings
from iotdlm.km.va import Va, VaSettings
from iotdlm.pki.chain import der
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.store import Store
from iotdlm.wire import km as msg
from tests.fixtures_nats import RunningNats, start_nats
from tests.helpers import NOW, ORG, URLS, make_csr, make_pki

PKI = make_pki()
OTHER = make_pki()  # another deployment, with its own km

Handler = Callable[[Message], Awaitable[bytes]]


@dataclasses.dataclass
class World:
    clock: FixedClock
    store: Store
    km: KmService
    buses: dict[str, Bus]
    connect: Callable[[str], Awaitable[Bus]]  # a further connection as a module (a stolen login)

    def client(self, module: str, identity: str | None = None) -> KmClient:
        ident = PKI.module(*(identity or module).split("-", 1))
        return KmClient(self.buses[module], ident.sealer, self.clock, trust=KmTrust(PKI.cas["service"].certificate))

    async def rogue(self, subject: str, handler: Handler) -> Subscription:
        """km stops; an impostor with km's login answers ``subject`` instead."""
        await self.km.stop()
        bus = await self.connect("km")
        return await bus.serve(subject, handler)

    async def issue(self, device_id: str = "dev-1") -> msg.IssuedCertificate:
        return await self.client("pm", "pm-boardA").issue(
            device_id, "operational", csr=make_csr(generate_key(Algorithm.P256), device_id)
        )


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    clock = FixedClock(NOW)
    store = Store.open(f"sqlite:///{tmp_path / 'km.db'}")
    core = Km(
        cas=PKI.cas,
        profiles=DEFAULT_PROFILES,
        store=store,
        clock=clock,
        settings=KmSettings(organization=ORG, urls=URLS),
        va=Va(cas=PKI.cas, profiles=DEFAULT_PROFILES, store=store, clock=clock, settings=VaSettings(urls=URLS)),
    )
    for ident in ("pm-boardA", "cm", "admin", "km"):
        PKI.module(*ident.split("-", 1))
    modules = ("km", "pm", "cm", "admin")
    server: RunningNats | None = None
    extra: list[Bus] = []
    if request.param == "memory":
        hub = MemoryHub()
        buses: dict[str, Bus] = {m: hub.bus(m) for m in modules}

        async def connect(module: str) -> Bus:
            return hub.bus(module)
    else:
        server = start_nats(tmp_path)
        buses = {m: await server.connect(m) for m in modules}

        async def connect(module: str) -> Bus:
            assert server is not None
            bus = await server.connect(module)
            extra.append(bus)
            return bus

    km_ident = PKI.module("km")
    service = KmService(core, buses["km"], identity=(km_ident.key, km_ident.cert))
    await service.start()
    try:
        yield World(clock, store, service, buses, connect)
    finally:
        await service.stop()
        for b in (*buses.values(), *extra):
            await b.close()
        if server is not None:
            server.server.stop()


def _ack(serial: str) -> bytes:
    """A plausible revocation acknowledgement for ``serial``."""
    info = msg.CertificateInfo(
        serial=serial,
        issuer="operational",
        subject="CN=dev-1",
        device_id="dev-1",
        profile="operational",
        status="revoked",
        not_before=NOW.isoformat(),
        not_after=NOW.isoformat(),
        certificate=b"",
        revoked_at=NOW.isoformat(),
        revocation_reason="keyCompromise",
    )
    return msg.encode(msg.RevokeResponse(revoked=[info]))


async def test_signed_km_replies_are_believed(world: World) -> None:
    """The honest path: km's signed results and signed refusals reach the client as before."""
    issued = await world.issue()
    admin = world.client("admin")
    assert (await admin.get(issued.serial, issued.issuer)).status == "valid"
    assert "operational" in (await admin.chain()).chains
    revoked = await admin.revoke(serial=issued.serial, issuer=issued.issuer, reason="keyCompromise")
    assert [r.serial for r in revoked] == [issued.serial]
    # CRLs travel as the CA signed them, without km's envelope (cm serves the bytes as they are)
    crl = x509.load_der_x509_crl(await world.client("cm").crl("operational", 0))
    assert crl.issuer == PKI.cas["operational"].certificate.subject
    with pytest.raises(NotFoundError):  # km's own "not found", signed: believed
        await admin.get("0abc", "operational")
    with pytest.raises(NotAuthorizedError):  # a cm-signed request for a device certificate: km refuses, signed
        await world.client("admin", "cm").issue(
            "dev-2", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-2")
        )


async def test_forged_revocation_acknowledgement_is_refused(world: World) -> None:
    """A rogue with km's stolen NATS login acknowledges a revocation km never made: the admin's
    client refuses the unsigned acknowledgement, and the certificate is still good in km's store."""
    issued = await world.issue()

    async def forged(m: Message) -> bytes:
        return _ack(issued.serial)

    await world.rogue(s.KM_REVOKE, forged)
    with pytest.raises(UntrustedError, match="km reply is not valid"):
        await world.client("admin").revoke(serial=issued.serial, issuer=issued.issuer, reason="keyCompromise")
    rec = world.store.get_certificate("operational", int(issued.serial, 16))
    assert rec is not None
    assert rec.revoked_at is None


async def test_forged_error_reply_is_refused(world: World) -> None:
    """A rogue answers a revoke with an (unsigned) "not found" error: it is reported as not from km,
    so the operator is not told the certificate does not exist."""
    issued = await world.issue()

    async def forged(m: Message) -> bytes:
        raise NotFoundError(f"no certificate {issued.serial} of issuer operational")

    await world.rogue(s.KM_REVOKE, forged)
    with pytest.raises(UntrustedError, match=r"unsigned error reply .*did not come from km"):
        await world.client("admin").revoke(serial=issued.serial, issuer=issued.issuer)


async def test_reply_signed_by_a_stolen_module_key_is_refused(world: World) -> None:
    """With cm's stolen private key the rogue signs a reply perfectly bound to the request: the
    signer chains to the service CA but names module cm, not km -- refused, for issue and revoke."""
    cm = PKI.module("cm")

    async def forged_issue(m: Message) -> bytes:
        body = msg.encode(
            msg.IssuedCertificate(
                serial="01",
                issuer="operational",
                profile="operational",
                device_id="dev-9",
                not_after=NOW.isoformat(),
                certificate=der(cm.cert),
            )
        )
        return cm.sealer.seal_reply(m.subject, m.data, body, error=False, now=world.clock.now())

    await world.rogue(s.KM_ISSUE, forged_issue)
    with pytest.raises(UntrustedError, match="names module cm, not km"):
        await world.issue("dev-9")

    async def forged_error(m: Message) -> bytes:
        body = msgspec.json.encode(NotFoundError("no such certificate").to_wire())
        return cm.sealer.seal_reply(m.subject, m.data, body, error=True, now=world.clock.now())

    await world.rogue(s.KM_REVOKE, forged_error)
    with pytest.raises(UntrustedError, match="names module cm, not km"):
        await world.client("admin").revoke(serial="0abc", issuer="operational")


async def test_km_of_another_deployment_is_refused(world: World) -> None:
    """A km certificate of another deployment (another service CA) signs the forged
    acknowledgement: it names module km, but does not chain to this deployment's service CA."""
    other_km = OTHER.module("km")

    async def forged(m: Message) -> bytes:
        return other_km.sealer.seal_reply(m.subject, m.data, _ack("0abc"), error=False, now=world.clock.now())

    await world.rogue(s.KM_REVOKE, forged)
    with pytest.raises(
        UntrustedError, match=r"km reply is not valid: certificate CN=km.* has a bad signature from CN=Test service CA"
    ):
        await world.client("admin").revoke(serial="0abc", issuer="operational")


async def test_replayed_km_reply_is_refused(world: World) -> None:
    """A genuine km reply (recorded off the wire) is replayed as the answer to another request:
    it is bound to the request it answered, so the client refuses it."""
    issued = await world.issue()
    recorded = await world.buses["admin"].request(
        s.KM_GET, msg.encode(msg.GetRequest(serial=issued.serial, issuer=issued.issuer, nonce="recorded-1"))
    )

    async def replay(m: Message) -> bytes:
        return recorded

    await world.rogue(s.KM_GET, replay)
    with pytest.raises(UntrustedError, match="answers another request"):
        await world.client("admin").get(issued.serial, issued.issuer)


async def test_km_certificate_out_of_validity_is_refused(world: World) -> None:
    """Years later km still signs with its expired certificate: the client's clock says it is not
    valid now, and the reply is not believed."""
    km_cert = PKI.module("km").cert
    world.clock.advance(km_cert.not_valid_after_utc - world.clock.now() + dt.timedelta(days=1))
    with pytest.raises(UntrustedError, match=r"km reply is not valid: .*is not valid at"):
        await world.client("admin").chain()


async def test_no_answer_is_unavailable_not_untrusted(world: World) -> None:
    """With km gone and nobody answering, the bus's own error says what it is: km is unavailable."""
    await world.km.stop()
    client = world.client("admin")
    client.timeout = 1.0
    with pytest.raises(UnavailableError):
        await client.revoke(serial="0abc", issuer="operational")
