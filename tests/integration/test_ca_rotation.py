"""Issuing-CA rotation end to end (issue 16, ADR 0026): a real nats-server, km over SQLite, cm on
loopback HTTPS (the fixtures of ``test_cm.py``), a simulated device on the network.

A device enrolled under the old operational CA; the operator rotates it and restarts km and cm
(as ``ca rotate`` says); the device re-enrolls, gets the new CA's certificate, fetches /cacerts
and its truststore takes the new CA; ``openssl verify`` accepts the new certificate with that
truststore (and not with the one before). The old CA's certificates stay checkable: ``openssl
ocsp`` through cm answers for them, and one revoked during the overlap is on the OLD CA's CRL
partition that cm serves. A second re-enrollment presents the new CA's certificate to cm."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from iotdlm.cli.ca_rotate import rotate_ca
from iotdlm.clock import FixedClock
from iotdlm.cm import CmService
from iotdlm.device.runner import DeviceRunner
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.km import KmService
from iotdlm.modes import ModeGuard
from iotdlm.pki.chain import certs_to_pem
from iotdlm.runtime import build_km, km_identity
from tests.integration.test_cm import DTYPE, PASSPHRASE, Site, open_site
from tests.integration.test_device_runner import cli

pytestmark = [
    pytest.mark.nats,
    pytest.mark.real_clock,  # openssl verify and TLS judge our certificates on the real clock
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed"),
]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path, http_port=0) as s:
        yield s


async def restart_km_and_cm(site: Site) -> None:
    """What the operator does after `ca rotate`: km and cm start again and load the new CA (cm on
    the same ports: the devices know its URL)."""
    ports = {"https_port": site.cm.https_port, "http_port": site.cm.http_port}
    await site.cm.stop()
    await site.km.stop()
    km_bus = await site.nats.connect("km")
    site.buses.append(km_bus)
    site.km = KmService(build_km(site.dep, site.store, site.clock, passphrase=PASSPHRASE), km_bus,
                        identity=km_identity(site.dep))  # fmt: skip
    await site.km.start()
    config = dataclasses.replace(site.cm.config, **ports)
    site.cm = await CmService.from_deployment(site.dep, config, clock=site.clock)
    await site.cm.start()
    assert isinstance(site.cm.app.mode, ModeGuard)
    await site.cm.app.mode.wait_for("certificate-management")


async def enroll(site: Site, folder: Path) -> SimulatedDevice:
    out = await cli(
        "device", "run", "--device", str(folder), "--dtype", DTYPE, "--data", str(site.dep.root),
        "--cm", site.https, "--once",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    return SimulatedDevice(folder)


async def reenroll(dev: SimulatedDevice) -> list[str]:
    """One pass of the device's loop at the time its operational certificate is due."""
    op = dev.certificate("operational")
    assert op is not None
    runner = DeviceRunner(dev, clock=FixedClock(op.not_valid_before_utc), renew_at=0.5)
    runner.clock = FixedClock(runner.renewal_due(op))
    report = await runner.tick()
    assert not report.errors, report
    return report.actions


async def openssl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "openssl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=os.environ.copy()
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def verify(files: Path, cert: x509.Certificate, truststore: list[x509.Certificate], name: str) -> tuple[int, str]:
    """``openssl verify`` with the truststore as the device holds it: its roots as anchors, its
    issuing CAs as the intermediates it may use."""
    roots = [c for c in truststore if c.issuer == c.subject]
    issuing = [c for c in truststore if c.issuer != c.subject]
    (files / f"{name}-roots.pem").write_bytes(certs_to_pem(roots))
    (files / f"{name}-issuing.pem").write_bytes(certs_to_pem(issuing))
    (files / f"{name}-leaf.pem").write_bytes(certs_to_pem([cert]))
    return await openssl(
        "verify", "-x509_strict", "-CAfile", str(files / f"{name}-roots.pem"),
        "-untrusted", str(files / f"{name}-issuing.pem"), str(files / f"{name}-leaf.pem"),
    )  # fmt: skip


async def test_a_device_moves_to_the_new_ca_and_the_old_one_stays_checkable(site: Site, tmp_path: Path) -> None:
    dev = await enroll(site, tmp_path / "dev-a")
    other = await enroll(site, tmp_path / "dev-b")
    old_ca = site.dep.ca_certificate("operational")
    old_cert, other_cert = dev.certificate("operational"), other.certificate("operational")
    assert old_cert is not None
    assert other_cert is not None
    assert old_cert.issuer == old_ca.subject
    before = dev.truststore()

    rotate_ca(site.dep, site.store, "operational", overlap=dt.timedelta(days=30), clock=site.clock,
              passphrase=PASSPHRASE, actor="admin (test)")  # fmt: skip
    await restart_km_and_cm(site)
    new_ca = site.dep.ca_certificate("operational-2")

    # the device re-enrolls with its old-CA certificate, gets the new CA's, and learns the new CA
    actions = await reenroll(dev)
    assert actions == ["reenrolled", "truststore-updated"]
    new_cert = dev.certificate("operational")
    assert new_cert is not None
    assert new_cert.issuer == new_ca.subject
    after = dev.truststore()
    assert new_ca in after
    assert old_ca in after  # both during the overlap
    code, out = await verify(site.files, new_cert, after, "after")
    assert code == 0, out
    code, out = await verify(site.files, new_cert, before, "before")
    assert code != 0, out  # the truststore before the rotation did not know the new CA

    # the old CA's certificates stay checkable: OCSP through cm (the superseded one is good for
    # its grace), and a revocation during the overlap lands on the old CA's CRL partition
    old_pem, ca_pem = site.write("old.pem", certs_to_pem([old_cert])), site.write("old-ca.pem", certs_to_pem([old_ca]))
    chain = site.write("chain.pem", certs_to_pem([old_ca, site.dep.ca_certificate("root")]))
    code, out = await openssl("ocsp", "-issuer", str(ca_pem), "-cert", str(old_pem), "-url", f"{site.http}/ocsp",
                              "-CAfile", str(chain))  # fmt: skip
    assert code == 0, out
    assert "Response verify OK" in out, out
    assert f"{old_pem}: good" in out, out
    admin = await site.client("admin")
    await admin.revoke(serial=format(other_cert.serial_number, "x"), issuer="operational", reason="keyCompromise")
    partition = other_cert.serial_number % site.dep.config.crl_partitions
    async with aiohttp.ClientSession() as http, http.get(f"{site.http}/crl/operational/{partition}.crl") as resp:
        assert resp.status == 200
        crl = x509.load_der_x509_crl(await resp.read())
    assert crl.issuer == old_ca.subject
    assert crl.is_signature_valid(old_ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(other_cert.serial_number) is not None

    # cm, restarted, takes the new CA's certificates as client credentials: a second re-enrollment
    assert await reenroll(dev) == ["reenrolled"]
    third = dev.certificate("operational")
    assert third is not None
    assert third.issuer == new_ca.subject
    assert third.serial_number != new_cert.serial_number
