"""Issue 17, the trust transfer in constrained form: devices provisioned by SP1 fetch their
per-device transfer message from SP1's cm over CoAP/EDHOC/OSCORE (``/transfer/tm``, with their
operational credential), then move to CA2, re-enrolling with SP2 over CoAP/EDHOC/OSCORE (SP2's
cm CoAP door, ``sen`` with the factory credential) instead of EST over HTTPS.

The world of ``test_trust_transfer.py`` (two deployments, km on each, SP1's and SP2's transfer
services); SP2's registrar names a ``coap://`` enrollURI, which the TransferMessage carries; the
device agent's enroller is :class:`iotdlm.device.coap_client.CoapEnroller`, holding SP2's cm
EDHOC credential. Attestation and the update stay in-process. Certificates are DER, except for the
constrained device of the C509 test, which keeps C509 and speaks C509 on the wire. The last tests
run the whole transfer with no HTTPS at all: attestation, the update and its report at SP2's CoAP
door, the fallback and refusal reports at SP1's (:class:`iotdlm.transfer.coap_clients.DeviceCoap`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.c509 import decode_c509
from iotdlm.cli.fleet import runner_for
from iotdlm.client.transfer_device import TransferDeviceClient
from iotdlm.cm.cacerts import CaCerts
from iotdlm.cm.coap import CoapDoor
from iotdlm.cm.config import CoapConfig
from iotdlm.device.coap_client import CoapEnroller, CoapEstClient, CoapMessages
from iotdlm.device.runner import TickReport
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import NotFoundError, UntrustedError
from iotdlm.km.transfer_device_handlers import keep_messages, publish_update
from iotdlm.transfer import status as st
from iotdlm.transfer.coap_clients import DeviceCoap
from iotdlm.transfer.http_clients import DeviceHttps
from tests.scenarios import test_trust_transfer as tt
from tests.scenarios.test_trust_transfer import World, provision

#: the two-provider world of test_trust_transfer.py, as a fixture of this module too
world = tt.world

# the device client passes its 512-byte Block1 size the way aiocoap deprecates (ADR 0029)
pytestmark = pytest.mark.filterwarnings("ignore:Setting a block1 option:DeprecationWarning")


@contextlib.asynccontextmanager
async def door(w: World, provider: tt.Provider, *, transfer: bool) -> AsyncIterator[CoapDoor]:
    cm, clock = provider.client("cm"), w.clock
    d = CoapDoor(
        CoapConfig(port=0),
        km=cm,
        # the provider's own CAs, and the CA of its transfer certificate (devices trust it: x5t)
        cacerts=CaCerts(
            [provider.ca("operational"), *provider.identity.chain, provider.ca("root")], fetch=None, clock=clock
        ),
        key=ec.generate_private_key(ec.SECP256R1()),
        transfer=TransferDeviceClient.like(cm) if transfer else None,
    )
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


async def _fetch_over_coap(w: World, sp1_door: CoapDoor, device_id: str) -> bytes:
    """The device asks SP1's cm for its transfer message, with its operational credential."""
    cert_pem, key_pem = w.devices[device_id].tls_identity("operational")
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    client = CoapEstClient(
        f"coap://127.0.0.1:{sp1_door.port}",
        responder_credential=sp1_door.credential_bytes,
        key=key,
        certificate=x509.load_pem_x509_certificate(cert_pem),
    )
    async with client as c:
        return await c.transfer_message()


async def test_fleet_moves_to_ca2_over_coap_edhoc_oscore(world: World) -> None:
    w = world
    async with door(w, w.sp1, transfer=True) as sp1_door, door(w, w.sp2, transfer=False) as sp2_door:
        uri = f"coap://127.0.0.1:{sp2_door.port}"
        w.registrar.enroll_uri = uri  # what SP2 puts in the TransferMessage (enrollURI)
        ids = await provision(w, 3, prefix="cdev")
        _tid, uil = w.export(ids)
        tid, tm = w.accept(uil)
        w.sp1svc.accept(tm)
        msgs, skipped = w.sp1svc.device_messages(tid)
        assert not skipped
        with pytest.raises(NotFoundError, match="no transfer message waits"):  # not delivered yet: 4.04
            await _fetch_over_coap(w, sp1_door, ids[0])
        keep_messages(w.sp1.store, tid, msgs, w.clock.now())  # SP1 `transfer deliver`: kept for the devices
        enroller = CoapEnroller({uri: sp2_door.credential_bytes}, timeout=10.0)
        for d in ids:
            token = await _fetch_over_coap(w, sp1_door, d)
            assert token == msgs[d]
            receipt = await w.agent(d, enroller=enroller).handle(token)
            assert receipt.phase == "committed", receipt
            op = w.devices[d].certificate("operational")
            assert op.issuer == w.sp2.ca("operational").subject
            assert w.devices[d].config()["enroll_uri"] == uri
            assert op.serial_number != w.old_operational[d].serial_number
        # a moved device's credential is CA2's: SP1's cm door and km do not take it
        with pytest.raises(UntrustedError, match="not from this deployment"):
            await _fetch_over_coap(w, sp1_door, ids[0])


async def test_without_sp2s_cm_credential_the_device_falls_back(world: World) -> None:
    w = world
    async with door(w, w.sp2, transfer=False) as sp2_door:
        w.registrar.enroll_uri = f"coap://127.0.0.1:{sp2_door.port}"
        [late] = await provision(w, 1, prefix="cfall")
        _tid, receipts = await w.run_transfer([late], enroller=CoapEnroller({}, timeout=5.0))
    assert receipts[late].phase != "committed"
    assert w.devices[late].certificate("operational").issuer == w.sp1.ca("operational").subject


async def test_c509_device_enrolls_reenrolls_and_moves_to_ca2_over_coap(world: World) -> None:
    """A constrained device keeping C509 (truststore and certificates) enrolls and re-enrolls with
    SP1 over CoAP/EDHOC/OSCORE with C509 on the wire (the compact sen/sren: the certificate goes to
    pn only), then moves to CA2 the same way; its flash holds C509 certificates, never PEM."""
    w = world
    async with door(w, w.sp1, transfer=True) as sp1_door, door(w, w.sp2, transfer=False) as sp2_door:
        uri1, uri2 = f"coap://127.0.0.1:{sp1_door.port}", f"coap://127.0.0.1:{sp2_door.port}"
        w.registrar.enroll_uri = uri2
        creds = {uri1: sp1_door.credential_bytes, uri2: sp2_door.credential_bytes}
        folder = w.tmp / "devices" / "c509-000"
        dev = SimulatedDevice.manufacture(folder, "c509-000", tt.DTYPE, truststore_format="c509")
        dev.generate_key()
        factory = await w.sp1.client(f"pm-{tt.DTYPE}").issue(dev.device_id, "factory", csr=dev.make_csr())
        dev.write_certificate("factory", x509.load_der_x509_certificate(factory.certificate))
        dev.write_truststore([w.sp1.ca("root"), *w.sp1.identity.chain])
        img = w.tmp / "fw-c509.bin"
        img.write_bytes(tt.FIRMWARE)
        dev.write_image("slot-a", img, {"version": "1"})
        dev.write_config({"device_id": dev.device_id, "dtype": tt.DTYPE, "enroll_uri": uri1})
        certs = dev.path / "flash" / "certs"
        runner = runner_for(dev, w.clock, renew_at=0.5, timeout=10.0, cm_credentials=creds)
        report = TickReport(dev.device_id)
        await runner.enroll("simpleenroll", report)
        first = dev.certificate("operational")
        await runner.enroll("simplereenroll", report)
        op = dev.certificate("operational")
        assert report.actions[:1] == ["enrolled"], report
        assert "reenrolled" in report.actions, report
        assert first is not None
        assert op is not None
        assert op.serial_number != first.serial_number
        assert op.issuer == w.sp1.ca("operational").subject
        assert (certs / "operational.c509").is_file()
        assert not (certs / "operational.pem").exists()
        assert decode_c509((certs / "operational.c509").read_bytes()) == op.public_bytes(serialization.Encoding.DER)
        # the rotation check (ADR 0026) over CoAP: crts as a C509 bag, the truststore kept in C509
        await runner.refresh_truststore(report)
        assert not report.errors, report
        assert (dev.path / "flash" / "truststore" / "truststore.c509").is_file()
        assert w.sp1.ca("root") in dev.truststore()
        w.devices[dev.device_id], w.old_operational[dev.device_id] = dev, op
        _tid, uil = w.export([dev.device_id])
        tid, tm = w.accept(uil)
        w.sp1svc.accept(tm)
        msgs, _skipped = w.sp1svc.device_messages(tid)
        keep_messages(w.sp1.store, tid, msgs, w.clock.now())
        token = await CoapMessages(creds, timeout=10.0, c509=True).fetch(dev, uri1)
        assert token == msgs[dev.device_id]
        receipt = await w.agent(dev.device_id, enroller=CoapEnroller(creds, timeout=10.0, c509=True)).handle(token)
        assert receipt.phase == "committed", receipt
        moved = dev.certificate("operational")
        assert moved is not None
        assert moved.issuer == w.sp2.ca("operational").subject
        assert (certs / "operational.c509").is_file()
        assert not (certs / "operational.pem").exists()
        assert dev.config()["enroll_uri"] == uri2


async def _accept_over_coap(w: World, ids: list[str], uri1: str, uri2: str) -> str:
    """SP2 accepts with its CoAP door's raURI and updateURI (and enrollURI), SP1 with its door's
    fallbackURI; SP2 publishes the update its cm serves; SP1 keeps the device messages."""
    now = w.clock.now()
    w.registrar.enroll_uri = uri2
    w.sp1svc.fallback_uri = f"{uri1}/transfer/fallback"
    _tid, uil = w.export(ids)
    tid, tm = w.sp2svc.accept(
        uil, peer_id=tt.SP1_ID, peer_certificate=w.sp1.identity.certificate,
        reset_not_before=now - dt.timedelta(minutes=1), reset_not_after=now + dt.timedelta(days=2),
        fallback_uri="coap://unused.invalid", ra_uri=f"{uri2}/transfer/attestation",
        update_uri=f"{uri2}/transfer/update", update_first=True, trust_anchors=[w.sp2_root],
    )  # fmt: skip
    w.sp2.km_service.transfer_device.updates_dir = w.tmp / "updates"
    publish_update(w.tmp / "updates", tid, IMAGE, "2")
    w.sp1svc.accept(tm)
    msgs, skipped = w.sp1svc.device_messages(tid)
    assert not skipped
    keep_messages(w.sp1.store, tid, msgs, w.clock.now())
    return tid


#: SP2's update image, over 1 KiB: served block-wise (Block2)
IMAGE = b"firmware v2 for constrained devices " * 100


@pytest.mark.parametrize("c509", [False, True], ids=["der", "c509"])
async def test_whole_transfer_over_coap_no_https(world: World, c509: bool) -> None:
    """Every device step over CoAP/EDHOC/OSCORE: the message (SP1), attestation, the update and its
    report (SP2), re-enrollment with CA2; a device with other firmware than SP1's reference falls
    back and reports it to SP1's door; the message it fell back from, served again, is refused
    (replayed) and the refusal reported to SP1's door. Checked at SP1 and SP2 as over HTTPS. With
    ``c509`` the devices send their certificates as C509 on every step."""
    w = world
    async with door(w, w.sp1, transfer=True) as d1, door(w, w.sp2, transfer=True) as d2:
        uri1, uri2 = f"coap://127.0.0.1:{d1.port}", f"coap://127.0.0.1:{d2.port}"
        creds = {uri1: d1.credential_bytes, uri2: d2.credential_bytes}
        good, bad = await provision(w, 2, prefix="call")
        tampered = w.tmp / "tampered.bin"
        tampered.write_bytes(b"not the agreed firmware")
        w.devices[bad].write_image("slot-a", tampered, {"version": "1"})
        for d in (good, bad):
            w.devices[d].write_config({**w.devices[d].config(), "enroll_uri": uri1})
        tid = await _accept_over_coap(w, [good, bad], uri1, uri2)

        class NoHttps(DeviceHttps):  # the device has no HTTPS at all: any HTTPS use fails the test
            def _client(self, kind: str) -> object:  # type: ignore[override]
                raise AssertionError("a constrained device used HTTPS")

        receipts = {}
        for d in (good, bad):
            dev = w.devices[d]
            coap = DeviceCoap(dev, creds, https=NoHttps(dev), timeout=10.0, c509=c509)
            agent = w.agent(
                d, enroller=CoapEnroller(creds, timeout=10.0, c509=c509), fallback=coap, attestation_client=coap,
                updates=coap, refusals=coap,
            )  # fmt: skip
            token = await CoapMessages(creds, timeout=10.0, c509=c509).fetch(dev, uri1)
            assert token is not None
            receipts[d] = await agent.handle(token)
            if d == bad:  # the message it fell back from, served again: refused, reported to SP1
                again = await agent.handle(token)
                assert not again.accepted
                assert "received before" in again.detail
        assert receipts[good].phase == "committed", receipts
        assert receipts[bad].phase == "idle", receipts
        assert "fallback" in receipts[bad].detail
        op = w.devices[good].certificate("operational")
        assert op is not None
        assert op.issuer == w.sp2.ca("operational").subject
        assert w.devices[good].config()["enroll_uri"] == uri2
        assert w.devices[good].image_info("slot-b") is not None  # SP2's update, before enrolling
        sp2 = w.sp2svc.status(tid)
        assert sp2[good].status == st.UPDATED  # attested, then updated (reported over CoAP)
        assert json.loads(w.sp2.store.get_transfer_devices("sp2", tid, [good])[good].detail)["update"] == "2"
        assert sp2[bad].status == st.FAILED_FALLBACK
        assert w.sp1svc.status(tid)[bad].status == st.FAILED_FALLBACK  # the fallback report reached SP1
        assert w.devices[bad].certificate("operational") == w.old_operational[bad]
        events = [e["event"] for e in w.devices[bad].events()]
        assert "fallback_reported" in events
        assert "refusal_reported" in events
        audited = [r.data["reason"] for r in w.sp1.store.list_audit(kind="device_refusal", limit=20)
                   if r.subject == bad]  # fmt: skip
        assert audited == ["replayed"]
        assert json.loads(w.sp1.store.get_transfer_devices("sp1", tid, [bad])[bad].detail)["refused"] == 1


async def test_transfer_routes_over_coap_refuse_as_over_https(world: World) -> None:
    """Without OSCORE: 4.01; a report the HTTPS route's parser refuses: 4.00 in its words; refusal
    reports limited per device certificate as over HTTPS (the sixth in the window: 4.29)."""
    import aiocoap

    from iotdlm.cm.transfer_routes import REFUSALS_PER_WINDOW
    from iotdlm.errors import RejectedError

    w = world
    async with door(w, w.sp1, transfer=True) as d1:
        uri1 = f"coap://127.0.0.1:{d1.port}"
        [dev_id] = await provision(w, 1, prefix="crate")
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            plain = aiocoap.Message(code=aiocoap.POST, uri=f"{uri1}/transfer/fallback", payload=b"{}")
            answer = await ctx.request(plain).response
        finally:
            await ctx.shutdown()
        assert answer.code == aiocoap.UNAUTHORIZED
        assert answer.payload.startswith(b"oscore_required: ")
        dev = w.devices[dev_id]
        coap = DeviceCoap(dev, {uri1: d1.credential_bytes}, timeout=10.0)
        cert_pem, key_pem = dev.tls_identity("operational")
        from iotdlm.device.coap_client import coap_client_for

        async with coap_client_for(uri1, d1.credential_bytes, cert_pem, key_pem, timeout=10.0) as c:
            with pytest.raises(RejectedError, match="must be exactly"):  # the HTTPS route's parser
                await c.transfer(f"{uri1}/transfer/fallback", b'{"transfer": "ab"}', expect=50)
        for _ in range(REFUSALS_PER_WINDOW):  # km takes them (audited)
            await coap.report_refusal(uri1, reason="replayed", detail="seen", message="")
        reports = [r for r in w.sp1.store.list_audit(kind="device_refusal", limit=20) if r.subject == dev_id]
        assert len(reports) == REFUSALS_PER_WINDOW
        with pytest.raises(RejectedError, match=r"4\.29 .*report again later"):
            await coap.report_refusal(uri1, reason="replayed", detail="seen", message="")
