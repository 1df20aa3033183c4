"""Issue 17, the trust transfer in constrained form: devices provisioned by SP1 fetch their
per-device transfer message from SP1's cm over CoAP/EDHOC/OSCORE (``/transfer/tm``, with their
operational credential), then move to CA2, re-enrolling with SP2 over CoAP/EDHOC/OSCORE (SP2's
cm CoAP door, ``sen`` with the factory credential) instead of EST over HTTPS.

The world of ``test_trust_transfer.py`` (two deployments, km on each, SP1's and SP2's transfer
services); SP2's registrar names a ``coap://`` enrollURI, which the TransferMessage carries; the
device agent's enroller is :class:`iotdlm.device.coap_client.CoapEnroller`, holding SP2's cm
EDHOC credential. Attestation and the update stay in-process, and certificates are DER (C509 not
plugged in)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.client.transfer_device import TransferDeviceClient
from iotdlm.cm.coap import CoapDoor
from iotdlm.cm.config import CoapConfig
from iotdlm.device.coap_client import CoapEnroller, CoapEstClient
from iotdlm.errors import NotFoundError, UntrustedError
from iotdlm.km.transfer_device_handlers import keep_messages
from tests.scenarios import test_trust_transfer as tt
from tests.scenarios.test_trust_transfer import World, provision

#: the two-provider world of test_trust_transfer.py, as a fixture of this module too
world = tt.world

# the device client passes its 512-byte Block1 size the way aiocoap deprecates (ADR 0029)
pytestmark = pytest.mark.filterwarnings("ignore:Setting a block1 option:DeprecationWarning")


@contextlib.asynccontextmanager
async def door(w: World, provider: tt.Provider, *, transfer: bool) -> AsyncIterator[CoapDoor]:
    cm = provider.client("cm")
    d = CoapDoor(
        CoapConfig(port=0),
        km=cm,
        cacerts=w.cm2.app.cacerts_source,
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
