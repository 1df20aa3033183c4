"""Issue 17, the trust transfer in constrained form: devices provisioned by SP1 move to CA2,
re-enrolling with SP2 over CoAP/EDHOC/OSCORE (SP2's cm CoAP door) instead of EST over HTTPS.

The world of ``test_trust_transfer.py`` (two deployments, km on each, SP1's and SP2's transfer
services); SP2's registrar names a ``coap://`` enrollURI, which the TransferMessage carries; the
device agent's enroller is :class:`iotdlm.device.coap_client.CoapEnroller`, holding SP2's cm
EDHOC credential. Transfer messages still reach the device in-process (DirectDelivery), and
certificates are DER (C509 not plugged in)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.cm.coap import CoapDoor
from iotdlm.cm.config import CoapConfig
from iotdlm.device.coap_client import CoapEnroller
from tests.scenarios import test_trust_transfer as tt
from tests.scenarios.test_trust_transfer import World, provision

#: the two-provider world of test_trust_transfer.py, as a fixture of this module too
world = tt.world


# the device client passes its 512-byte Block1 size the way aiocoap deprecates (ADR 0029)
pytestmark = pytest.mark.filterwarnings("ignore:Setting a block1 option:DeprecationWarning")


async def test_fleet_moves_to_ca2_over_coap_edhoc_oscore(world: World) -> None:
    w = world
    door = CoapDoor(
        CoapConfig(port=0),
        km=w.sp2.client("cm"),
        cacerts=w.cm2.app.cacerts_source,
        key=ec.generate_private_key(ec.SECP256R1()),
    )
    await door.start()
    try:
        uri = f"coap://127.0.0.1:{door.port}"
        w.registrar.enroll_uri = uri  # what SP2 puts in the TransferMessage (enrollURI)
        ids = await provision(w, 3, prefix="cdev")
        _tid, receipts = await w.run_transfer(ids, enroller=CoapEnroller({uri: door.credential_bytes}, timeout=10.0))
        assert {r.phase for r in receipts.values()} == {"committed"}, [r for r in receipts.values() if not r.accepted]
        ca2 = w.sp2.ca("operational")
        for d in ids:
            dev = w.devices[d]
            op = dev.certificate("operational")
            assert op.issuer == ca2.subject
            assert dev.config()["enroll_uri"] == uri
            assert op.serial_number != w.old_operational[d].serial_number
        # a device that does not hold SP2's cm credential cannot re-enroll there: it falls back
        [late] = await provision(w, 1, prefix="cfall")
        _tid, receipts = await w.run_transfer([late], enroller=CoapEnroller({}, timeout=5.0))
        assert receipts[late].phase != "committed"
        assert w.devices[late].certificate("operational").issuer == w.sp1.ca("operational").subject
    finally:
        await door.stop()
