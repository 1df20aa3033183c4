"""A device's loop (``iotdlm device run``) takes part in a trust transfer and carries on under SP2:
two deployments (SP2's cm on loopback HTTPS, EST at CA2 for real), the transfer message handed
out as SP1's cm would (a stand-in for ``GET /transfer/message``), then re-enrollment with CA2 on
the runner's schedule -- a new key pair at each step (FR3)."""

from __future__ import annotations

import datetime as dt

import pytest

from iotdlm.clock import FixedClock
from iotdlm.device.runner import DeviceRunner
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.pki.est_proof import spki_sha256
from iotdlm.pki.keys import check_public_key
from tests.scenarios import test_trust_transfer as tt

world = tt.world  # the fixture: SP1 and SP2, SP2's cm on HTTPS


class Sp1Messages:
    """SP1's cm as the device sees it: its per-device message, once SP1 has prepared it."""

    def __init__(self) -> None:
        self.messages: dict[str, bytes] = {}
        self.asked: list[str] = []

    async def fetch(self, dev: SimulatedDevice, base_url: str) -> bytes | None:
        self.asked.append(base_url)
        return self.messages.get(dev.device_id)


def key_of(dev: SimulatedDevice, kind: str) -> str:
    cert = dev.certificate(kind)
    assert cert is not None
    return spki_sha256(check_public_key(cert.public_key()))


@pytest.mark.real_clock
async def test_the_device_loop_moves_to_ca2_and_reenrolls_there_with_new_keys(world: tt.World) -> None:
    w = world
    (d,) = await tt.provision(w, 1)
    dev = w.devices[d]
    sp1_keys = {key_of(dev, "factory"), key_of(dev, "operational")}
    source = Sp1Messages()
    clock = FixedClock(w.clock.now())
    runner = DeviceRunner(dev, clock=clock, transfers=w.agent(d), messages=source, renew_at=0.5)

    assert (await runner.tick()).actions == []  # nothing prepared yet, SP1's certificate not due
    _tid, uil = w.export([d])
    tid, tm = w.accept(uil)
    w.sp1svc.accept(tm)
    msgs, _ = w.sp1svc.device_messages(tid)
    source.messages[d] = msgs[d]
    report = await runner.tick()
    assert report.actions == ["transfer-committed"], report
    assert report.issuer == w.sp2.ca("operational").subject.rfc4514_string()
    ca2_key = key_of(dev, "operational")
    assert ca2_key not in sp1_keys  # FR3
    assert (await runner.tick()).actions == []  # the same message again: not handed over twice

    # under SP2 now: its cm is the device's CA-URI; re-enrollment with CA2 when due, a new key again
    assert runner.base_url() == w.enroll_uri.removesuffix("/.well-known/est")
    first = dev.certificate("operational")
    assert first is not None
    clock.advance(runner.renewal_due(first) - clock.now() + dt.timedelta(seconds=1))
    report = await runner.tick()
    assert report.actions == ["reenrolled"], report
    second = dev.certificate("operational")
    assert second is not None
    assert second.issuer == w.sp2.ca("operational").subject
    assert key_of(dev, "operational") not in {ca2_key, *sp1_keys}
    assert source.asked[-1] == runner.base_url()
    rec = w.sp2.store.get_certificate("operational", first.serial_number)
    assert rec is not None
    assert rec.superseded_by == second.serial_number
