"""Issue 17: a constrained device enrolls, then re-enrolls, over CoAP with EDHOC and OSCORE.

Real parts: a deployment, nats-server with the deployment's users, km over SQLite, cm's CoAP door
(aiocoap, UDP on loopback) relaying to km over the bus as cm; the device runs EDHOC with lakers.
km checks the device's own proof over its nonce (ADR 0008), so cm relaying is not enough to get a
certificate: the attacks below show it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import edhoc, oscore
from aiocoap.optiontypes import BlockOption
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.c509 import decode_c509
from iotdlm.clock import FixedClock, SystemClock
from iotdlm.cm.coap import CoapDoor
from iotdlm.cm.config import CoapConfig
from iotdlm.device.coap_client import CoapEstClient
from iotdlm.device.runner import DeviceRunner
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import NotAuthorizedError, RejectedError, UntrustedError
from iotdlm.pki import est_proof
from iotdlm.pki.keys import Algorithm, check_public_key, generate_key
from iotdlm.pki.names import device_id_of
from iotdlm.wire import coap_est as wire
from tests.helpers import make_csr
from tests.integration.test_cm import DTYPE, Site, open_site

pytestmark = [pytest.mark.nats, pytest.mark.filterwarnings("ignore:Setting a block1 option:DeprecationWarning")]


@contextlib.asynccontextmanager
async def coap_door(site: Site) -> AsyncIterator[CoapDoor]:
    app = site.cm.app
    door = CoapDoor(
        CoapConfig(port=0),
        km=app.km,
        cacerts=app.cacerts_source,
        key=ec.generate_private_key(ec.SECP256R1()),
        mode=app.mode,
    )
    await door.start()
    try:
        yield door
    finally:
        await door.stop()


@pytest.fixture
async def door_site(tmp_path: Path) -> AsyncIterator[tuple[Site, CoapDoor]]:
    async with open_site(tmp_path) as s, coap_door(s) as door:
        yield s, door


def _client(
    door: CoapDoor, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, *, c509: bool = False
) -> CoapEstClient:
    return CoapEstClient(
        f"coap://127.0.0.1:{door.port}", responder_credential=door.credential_bytes, key=key, certificate=cert,
        c509=c509,
    )  # fmt: skip


async def test_enroll_then_reenroll_over_coap_edhoc_oscore(door_site: tuple[Site, CoapDoor]) -> None:
    site, door = door_site
    fkey, factory = await site.factory("dev-c1")
    assert isinstance(fkey, ec.EllipticCurvePrivateKey)
    # crts: plain CoAP, the same CA certificates as over HTTPS
    async with _client(door, fkey, factory) as c:
        cas = await c.crts()
        assert {ca.subject for ca in cas} >= {factory.issuer}
        okey = generate_key(Algorithm.P256)
        op1 = await c.simpleenroll(make_csr(okey, "dev-c1"))
    assert device_id_of(op1) == "dev-c1"
    assert op1.public_key().public_numbers() == okey.public_key().public_numbers()  # type: ignore[union-attr]
    assert op1.issuer != factory.issuer  # the operational CA issued it
    # re-enroll: a new EDHOC session with the operational key, a new key pair certified
    assert isinstance(okey, ec.EllipticCurvePrivateKey)
    async with _client(door, okey, op1) as c:
        key2 = generate_key(Algorithm.P256)
        op2 = await c.simplereenroll(make_csr(key2, "dev-c1"))
    assert device_id_of(op2) == "dev-c1"
    assert op2.serial_number != op1.serial_number
    # a factory credential cannot re-enroll, an operational one cannot enroll again
    async with _client(door, fkey, factory) as c:
        with pytest.raises(RejectedError):
            await c.simplereenroll(make_csr(generate_key(Algorithm.P256), "dev-c1"))


async def test_cm_cannot_mint_and_a_foreign_certificate_is_refused(door_site: tuple[Site, CoapDoor]) -> None:
    """cm vouches only that the certificate holds the EDHOC key; km still wants the device's proof."""
    site, door = door_site
    fkey, factory = await site.factory("dev-c2")
    _, other = await site.factory("dev-c3")
    assert isinstance(fkey, ec.EllipticCurvePrivateKey)
    csr = make_csr(generate_key(Algorithm.P256), "dev-c2")
    factory_der = factory.public_bytes(serialization.Encoding.DER)
    # what a stolen cm can send km: the device's certificate and a CSR, but no device signature
    with pytest.raises((UntrustedError, NotAuthorizedError, RejectedError)):
        await site.cm.app.km.est("simpleenroll", factory_der, csr, proof=None)
    async with _client(door, fkey, factory) as c:
        await c.nonce()  # the EDHOC session runs
        other_der = other.public_bytes(serialization.Encoding.DER)
        # a certificate that is not the EDHOC key's: cm refuses before km
        bad = await _oscore_post(c, "sen", wire.encode_enroll(csr, other_der, "x y"), wire.MULTIPART_CORE)
        assert bad.code == aiocoap.FORBIDDEN
        assert b"untrusted" in bad.payload
        # the right certificate with a forged proof: km refuses
        nonce = await c.nonce()
        forged = f"{nonce} {'A' * 96}"
        bad = await _oscore_post(c, "sen", wire.encode_enroll(csr, factory_der, forged), wire.MULTIPART_CORE)
        assert bad.code == aiocoap.FORBIDDEN
        # garbage and wrong formats: 4.00 / 4.15 in words
        bad = await _oscore_post(c, "sen", b"\xff\x00", wire.MULTIPART_CORE)
        assert bad.code == aiocoap.BAD_REQUEST
        assert b"bad_request" in bad.payload
        bad = await _oscore_post(c, "sren", b"", wire.PKCS10)
        assert bad.code == aiocoap.UNSUPPORTED_CONTENT_FORMAT
        # a request beyond the largest one cm takes: refused while its blocks arrive (4.13)
        bad = await _oscore_post(c, "sen", b"\x00" * (wire.MAX_ENROLL_BYTES + 2048), wire.MULTIPART_CORE)
        assert bad.code == aiocoap.REQUEST_ENTITY_TOO_LARGE


async def test_enrollment_needs_oscore(door_site: tuple[Site, CoapDoor]) -> None:
    _, door = door_site
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for name in ("pn", "sen", "sren"):
            req = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{door.port}/.well-known/est/{name}")
            answer = await ctx.request(req).response
            assert answer.code == aiocoap.UNAUTHORIZED, name
            assert b"oscore_required" in answer.payload
        # an EDHOC message 1 that does not parse: refused
        uri = f"coap://127.0.0.1:{door.port}/.well-known/edhoc"
        req = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=cbor2.dumps(True) + b"\x00")
        answer = await ctx.request(req).response
        assert not answer.code.is_successful()
    finally:
        await ctx.shutdown()


async def test_edhoc_credential_by_reference_is_refused(door_site: tuple[Site, CoapDoor]) -> None:
    """cm knows no device by kid: a credential sent by reference ends EDHOC at message 3."""
    _, door = door_site
    key = ec.generate_private_key(ec.SECP256R1())
    d = key.private_numbers().private_value.to_bytes(32, "big")
    ctx = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    base = f"coap://127.0.0.1:{door.port}"
    ctx.client_credentials[base + "/*"] = edhoc.EdhocCredentials(
        suite=2,
        method=3,
        own_cred_style="by-key-id",
        own_cred={14: wire.ccs_for(key.public_key(), "dev-x", b"\x07")},
        private_key={1: 2, -1: 1, -4: d},
        peer_cred={14: door.credential},
    )
    try:
        req = aiocoap.Message(code=aiocoap.POST, uri=f"{base}/.well-known/est/pn", payload=b"x")
        with pytest.raises(oscore.NotAProtectedMessage) as refused:  # cm cannot protect: no context
            await ctx.request(req).response
        assert refused.value.plain_message.code == aiocoap.BAD_REQUEST
    finally:
        await ctx.shutdown()


async def test_wrong_pinned_credential_fails_edhoc(door_site: tuple[Site, CoapDoor]) -> None:
    site, door = door_site
    fkey, factory = await site.factory("dev-c4")
    assert isinstance(fkey, ec.EllipticCurvePrivateKey)
    app = site.cm.app
    impostor = CoapDoor(
        CoapConfig(port=0), km=app.km, cacerts=app.cacerts_source, key=ec.generate_private_key(ec.SECP256R1())
    )
    client = CoapEstClient(
        f"coap://127.0.0.1:{door.port}", responder_credential=impostor.credential_bytes, key=fkey, certificate=factory
    )
    async with client as c:
        with pytest.raises(UntrustedError, match="pins for cm"):
            await c.nonce()


async def test_c509_on_the_wire_and_the_compact_request(door_site: tuple[Site, CoapDoor]) -> None:
    """A constrained device sends its certificate as C509 once (to pn), sends the compact sen (no
    certificate), and gets C509 back (Accept); km's proof check is unchanged: a forged proof in the
    compact form is refused, and a compact sen before any pn has no certificate to go on."""
    site, door = door_site
    fkey, factory = await site.factory("dev-c5")
    assert isinstance(fkey, ec.EllipticCurvePrivateKey)
    async with _client(door, fkey, factory, c509=True) as c:
        cas = await c.crts()  # a COSE_C509 bag, decoded to DER
        assert {ca.subject for ca in cas} >= {factory.issuer}
        okey = generate_key(Algorithm.P256)
        csr = make_csr(okey, "dev-c5")
        await c._session()  # EDHOC, but no pn yet
        bad = await _oscore_post(c, "sen", wire.encode_enroll_compact(csr, "x y"), wire.MULTIPART_CORE)
        assert bad.code == aiocoap.BAD_REQUEST
        assert b"ask pn first" in bad.payload
        nonce = await c.nonce()  # binds the C509 certificate to this EDHOC key
        forged = f"{nonce} {'A' * 96}"
        bad = await _oscore_post(c, "sen", wire.encode_enroll_compact(csr, forged), wire.MULTIPART_CORE)
        assert bad.code == aiocoap.FORBIDDEN  # km: the proof is not the device's
        nonce = await c.nonce()
        proof = est_proof.make(fkey, "simpleenroll", nonce, check_public_key(okey.public_key()))
        refused = await _oscore_post(c, "sen", wire.encode_enroll_compact(csr, proof), wire.MULTIPART_CORE, accept=50)
        assert refused.code == aiocoap.NOT_ACCEPTABLE
        nonce = await c.nonce()
        proof = est_proof.make(fkey, "simpleenroll", nonce, check_public_key(okey.public_key()))
        answer = await _oscore_post(
            c, "sen", wire.encode_enroll_compact(csr, proof), wire.MULTIPART_CORE, accept=wire.C509_CERT
        )
        assert answer.code == aiocoap.CHANGED
        assert answer.opt.content_format == wire.C509_CERT
        op1 = x509.load_der_x509_certificate(decode_c509(answer.payload))
        assert len(answer.payload) < len(op1.public_bytes(serialization.Encoding.DER))
        assert device_id_of(op1) == "dev-c5"
        bad = await _oscore_post(c, "pn", b"\x01\x02", wire.C509_CERT)  # not a C509 certificate
        assert bad.code == aiocoap.BAD_REQUEST
    assert isinstance(okey, ec.EllipticCurvePrivateKey)
    async with _client(door, okey, op1, c509=True) as c:  # re-enrollment, C509 both ways
        op2 = await c.simplereenroll(make_csr(generate_key(Algorithm.P256), "dev-c5"))
    assert device_id_of(op2) == "dev-c5"
    assert op2.serial_number != op1.serial_number


async def _oscore_post(
    c: CoapEstClient, name: str, payload: bytes, fmt: int, *, accept: int | None = None
) -> aiocoap.Message:
    ctx = c._ctx()
    req = aiocoap.Message(code=aiocoap.POST, uri=f"{c.base_uri}/.well-known/est/{name}", payload=payload)
    req.opt.content_format = fmt
    if accept is not None:
        req.opt.accept = accept
    if len(payload) > 512:
        req.opt.block1 = BlockOption.BlockwiseTuple(0, False, 5)
    answer: aiocoap.Message = await ctx.request(req).response
    return answer


async def test_device_runner_enrolls_and_reenrolls_over_coap(door_site: tuple[Site, CoapDoor], tmp_path: Path) -> None:
    """The device loop (``DeviceRunner``) as a constrained device: its enroll_uri is cm's CoAP door."""
    site, door = door_site
    uri = f"coap://127.0.0.1:{door.port}"
    dev = SimulatedDevice.manufacture(tmp_path / "dev", "dev-run-c", DTYPE)
    dev.generate_key()
    pm = await site.client(f"pm-{DTYPE}")
    out = await pm.issue("dev-run-c", "factory", csr=dev.make_csr())
    dev.write_certificate("factory", x509.load_der_x509_certificate(out.certificate))
    dev.write_config({"device_id": "dev-run-c", "dtype": DTYPE, "enroll_uri": uri})
    clock = FixedClock(SystemClock().now())
    runner = DeviceRunner(dev, clock=clock, renew_at=0.5, cm_credentials={uri: door.credential_bytes})
    report = await runner.tick()
    assert report.actions == ["enrolled"], report
    first = dev.certificate("operational")
    assert first is not None
    clock.advance(runner.renewal_due(first) - clock.now())
    report = await runner.tick()
    assert report.actions == ["reenrolled"], report
    second = dev.certificate("operational")
    assert second is not None
    assert second.serial_number != first.serial_number
    assert not dev.has_key("pending")
    # without cm's EDHOC credential the device says what it lacks
    bare = DeviceRunner(dev, clock=FixedClock(second.not_valid_after_utc))
    report = await bare.tick()
    assert any("no EDHOC credential" in e for e in report.errors), report
