"""SP2's trust anchors by reference, over real HTTPS: the device agent's bootstrap fetch of
``/cacerts`` at the enrollURI (RFC 7030 4.1.1: the server is not authenticated), against a real
cm on a real nats-server and km; what comes back is only taken where the signed hash names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotdlm.errors import UnavailableError
from iotdlm.pki.chain import der
from iotdlm.transfer import cose, device
from iotdlm.transfer.agent import bootstrap_cacerts
from iotdlm.transfer.device import Phase, Step, StepResult
from tests.helpers import NOW
from tests.integration.test_cm import open_site
from tests.unit.test_transfer_device import device_message, receive


async def test_bootstrap_cacerts_over_https_and_the_hash_picks_the_anchor(tmp_path: Path) -> None:
    async with open_site(tmp_path) as site:
        root = site.dep.ca_certificate("root")
        for uri in (f"{site.https}/.well-known/est", site.https):
            fetched = await bootstrap_cacerts(uri, seconds=20)
            assert der(root) in {der(c) for c in fetched}
    served = StepResult(Step.ANCHORS, ok=True, ca_certificates=tuple(der(c) for c in fetched))
    # the device takes the anchor its signed message names, from what cm served
    state, effects = receive(device_message(trust_anchors=(cose.cert_hash(der(root)),), ra_uri=None))
    assert isinstance(effects[-1], device.FetchAnchors)
    state, effects = device.step_done(state, served, NOW)
    assert state.phase is Phase.RESET
    (add,) = [e for e in effects if isinstance(e, device.AddTrustAnchors)]
    assert add.certificates == (der(root),)
    # a hash of nothing cm serves: the device falls back to SP1
    other, _ = receive(device_message(trust_anchors=(cose.cert_hash(b"elsewhere"),), cti=b"z" * 16))
    other, _ = device.step_done(other, served, NOW)
    assert other.phase is Phase.FALLBACK


async def test_bootstrap_cacerts_unreachable_is_unavailable() -> None:
    with pytest.raises(UnavailableError, match="cannot fetch"):
        await bootstrap_cacerts("https://127.0.0.1:9/.well-known/est", seconds=5)
