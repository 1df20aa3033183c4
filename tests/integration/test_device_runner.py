"""Simulated devices on the network (``iotdlm device run``, ``iotdlm fleet run``) against one
deployment: real nats-server, km over SQLite, cm on loopback HTTPS (the fixtures of
``test_cm.py``). Enrollment with the factory certificate over EST, re-enrollment on schedule (the
runner's clock is injected; TLS and km check on theirs), and a new key pair each time."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from iotdlm.cli.main import main
from iotdlm.clock import FixedClock, SystemClock
from iotdlm.deployment import PASSPHRASE_ENV
from iotdlm.device.runner import DeviceRunner
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.pki.est_proof import spki_sha256
from iotdlm.pki.keys import check_public_key
from iotdlm.transfer.http_clients import DeviceMessages
from tests.integration.test_cm import DTYPE, PASSPHRASE, Site, open_site

pytestmark = [pytest.mark.nats, pytest.mark.real_clock]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path) as s:
        yield s


def spki(cert: x509.Certificate) -> str:
    return spki_sha256(check_public_key(cert.public_key()))


async def cli(*args: str) -> Result:
    """The command line in a thread of its own (cm answers on this event loop meanwhile)."""
    runner = CliRunner(env={PASSPHRASE_ENV: PASSPHRASE.decode()})
    return await asyncio.to_thread(runner.invoke, main, list(args), catch_exceptions=False)


async def test_device_run_enrolls_over_est_with_a_key_of_its_own(site: Site, tmp_path: Path) -> None:
    folder = tmp_path / "dev-run-1"
    out = await cli(
        "device", "run", "--device", str(folder), "--dtype", DTYPE, "--data", str(site.dep.root),
        "--cm", site.https, "--once", "--json",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert summary["counts"] == {"enrolled": 1}
    dev = SimulatedDevice(folder)
    factory, op = dev.certificate("factory"), dev.certificate("operational")
    assert factory is not None
    assert op is not None
    assert op.issuer == site.dep.ca_certificate("operational").subject
    assert summary["certificates"]["dev-run-1"]["serial"] == format(op.serial_number, "x")
    # the operational key is made on the device for this certificate, apart from the factory key
    assert spki(op) != spki(factory)
    assert spki_sha256(dev.public_key("operational")) == spki(op)
    rec = site.store.get_certificate("operational", op.serial_number)
    assert rec is not None
    assert rec.device_id == "dev-run-1"
    # cm has no transfer route here: the step is skipped, said once in the device log
    assert "transfer_message_none" in [e["event"] for e in dev.events()]
    # a second pass has nothing to do: the certificate is far from its renewal
    again = await cli("device", "run", "--device", str(folder), "--once", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["counts"] == {}
    assert dev.certificate("operational") == op


async def test_device_run_without_a_factory_certificate_says_how_to_get_one(site: Site, tmp_path: Path) -> None:
    out = await cli("device", "run", "--device", str(tmp_path / "d"), "--dtype", DTYPE, "--cm", site.https, "--once")
    assert out.exit_code == 4  # refused
    assert "no factory certificate" in out.output
    assert "--data" in out.output
    assert "Traceback" not in out.output


async def test_fleet_run_enrolls_five_devices(site: Site, tmp_path: Path) -> None:
    out = await cli(
        "fleet", "run", "--count", "5", "--fleet", str(tmp_path / "fleet"), "--data", str(site.dep.root),
        "--cm", site.https, "--once", "--json",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert summary["devices"] == 5
    assert summary["with_operational_certificate"] == 5
    assert summary["counts"] == {"enrolled": 5}
    keys = set()
    for i in range(5):
        dev = SimulatedDevice(tmp_path / "fleet" / f"sim-{i:04d}")
        op, factory = dev.certificate("operational"), dev.certificate("factory")
        assert op is not None
        assert factory is not None
        assert dev.device_id in op.subject.rfc4514_string()
        keys |= {spki(op), spki(factory)}
        assert site.store.get_certificate("operational", op.serial_number) is not None
    assert len(keys) == 10  # every device its own keys, none shared between certificates


async def test_reenrollment_on_schedule_on_an_injected_clock(site: Site, tmp_path: Path) -> None:
    folder = tmp_path / "sched"
    out = await cli(
        "device", "run", "--device", str(folder), "--dtype", DTYPE, "--data", str(site.dep.root),
        "--cm", site.https, "--once",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    dev = SimulatedDevice(folder)
    first = dev.certificate("operational")
    assert first is not None
    clock = FixedClock(SystemClock().now())
    runner = DeviceRunner(dev, clock=clock, messages=DeviceMessages(timeout=10.0), renew_at=0.5)
    due = runner.renewal_due(first)
    assert due == first.not_valid_before_utc + (first.not_valid_after_utc - first.not_valid_before_utc) / 2
    assert (await runner.tick()).actions == []  # not due yet
    clock.advance(due - clock.now() - dt.timedelta(seconds=1))
    assert (await runner.tick()).actions == []
    clock.advance(dt.timedelta(seconds=1))
    report = await runner.tick()
    assert report.actions == ["reenrolled"], report
    second = dev.certificate("operational")
    assert second is not None
    assert second.serial_number != first.serial_number
    assert spki(second) != spki(first)  # a new key pair at each re-enrollment
    assert spki_sha256(dev.public_key("operational")) == spki(second)
    assert not dev.has_key("pending")
    old = site.store.get_certificate("operational", first.serial_number)
    assert old is not None
    assert old.superseded_by == second.serial_number  # km superseded it


async def test_a_refused_reenrollment_destroys_the_new_key_and_keeps_the_old_credential(
    site: Site, tmp_path: Path
) -> None:
    folder = tmp_path / "refused"
    out = await cli(
        "device", "run", "--device", str(folder), "--dtype", DTYPE, "--data", str(site.dep.root),
        "--cm", site.https, "--once",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    dev = SimulatedDevice(folder)
    op = dev.certificate("operational")
    assert op is not None
    admin = await site.client("admin")
    await admin.revoke(serial=format(op.serial_number, "x"), reason="keyCompromise")
    clock = FixedClock(runner_time := op.not_valid_after_utc - dt.timedelta(seconds=1))
    runner = DeviceRunner(dev, clock=clock)
    assert runner.needs(runner_time) == "simplereenroll"
    report = await runner.tick()
    assert report.actions == []
    assert report.errors
    assert "simplereenroll" in report.errors[0]
    assert dev.certificate("operational") == op
    assert not dev.has_key("pending")
    assert "key_destroyed" in [e["event"] for e in dev.events()]


async def test_device_run_keeps_running_until_sigterm_then_sums_up(site: Site, tmp_path: Path) -> None:
    """Without --once the device lives on the network until the operator stops it (its own process)."""
    folder = tmp_path / "daemon"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iotdlm.cli.main", "device", "run", "--device", str(folder), "--dtype", DTYPE,
        "--data", str(site.dep.root), "--cm", site.https, "--interval", "0.2", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, PASSPHRASE_ENV: PASSPHRASE.decode()},
    )  # fmt: skip
    try:
        for _ in range(600):  # the first pass enrolls; later passes have nothing to do
            if (folder / "flash" / "certs" / "operational.pem").is_file() or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert proc.returncode is None, "device run stopped by itself"
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["counts"] == {"enrolled": 1}
    assert summary["with_operational_certificate"] == 1
