"""The fleet's speed-ups against a real deployment (real nats-server, km over SQLite, cm on loopback
HTTPS): ``fleet run --workers 2`` gives each device the result one process gives it, and a
device's kept-open connections present its own, current credential -- never another device's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from iotdlm.cli.main import main
from iotdlm.deployment import PASSPHRASE_ENV
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.km.transfer_device_handlers import keep_messages
from iotdlm.store.transfer import TransferDeviceRecord, TransferRecord
from iotdlm.transfer import status as st
from iotdlm.transfer.http_clients import DeviceHttps
from tests.integration.test_cm import DTYPE, PASSPHRASE, Site, open_site

pytestmark = [pytest.mark.nats, pytest.mark.real_clock]

TID = "cd" * 32


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path) as s:
        yield s


async def cli(*args: str) -> Result:
    runner = CliRunner(env={PASSPHRASE_ENV: PASSPHRASE.decode()})
    return await asyncio.to_thread(runner.invoke, main, list(args), catch_exceptions=False)


async def fleet(site: Site, folder: Path, workers: int) -> dict[str, object]:
    out = await cli(
        "fleet", "run", "--count", "5", "--fleet", str(folder), "--data", str(site.dep.root), "--cm", site.https,
        "--once", "--json", "--workers", str(workers),
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    summary: dict[str, object] = json.loads(out.output)
    return summary


async def test_workers_give_each_device_what_one_process_gives_it(site: Site, tmp_path: Path) -> None:
    one = await fleet(site, tmp_path / "one", workers=1)
    two = await fleet(site, tmp_path / "two", workers=2)
    for summary in (one, two):
        assert summary["devices"] == 5
        assert summary["with_operational_certificate"] == 5
        assert summary["counts"] == {"enrolled": 5}
        assert summary["failed"] == {}
    certs_two = two["certificates"]
    assert isinstance(certs_two, dict)
    assert sorted(certs_two) == sorted(one["certificates"])  # type: ignore[arg-type]
    serials = set()
    for device_id, seen in certs_two.items():
        dev = SimulatedDevice(tmp_path / "two" / device_id)
        op = dev.certificate("operational")
        assert op is not None
        # what the parent summed up is what the worker's device holds, issued by this deployment
        assert seen["serial"] == format(op.serial_number, "x")
        assert seen["issuer"] == site.dep.ca_certificate("operational").subject.rfc4514_string()
        assert site.store.get_certificate("operational", op.serial_number) is not None
        serials.add(op.serial_number)
    assert len(serials) == 5
    # a second pass in workers has nothing to do, as in one process
    again = await fleet(site, tmp_path / "two", workers=2)
    assert again["counts"] == {}
    assert again["certificates"] == certs_two


async def _device(site: Site, folder: Path, device_id: str) -> SimulatedDevice:
    """A device with a factory certificate issued through pm for the key made on it."""
    dev = SimulatedDevice.manufacture(folder, device_id, DTYPE)
    dev.generate_key()
    pm = await site.client(f"pm-{DTYPE}")
    out = await pm.issue(device_id, "factory", csr=dev.make_csr())
    dev.write_certificate("factory", x509.load_der_x509_certificate(out.certificate))
    dev.write_truststore([site.dep.ca_certificate("root")])
    return dev


async def test_kept_connections_present_the_device_s_own_current_credential(site: Site, tmp_path: Path) -> None:
    a = await _device(site, tmp_path / "a", "fleet-a")
    b = await _device(site, tmp_path / "b", "fleet-b")
    now = site.clock.now()
    site.store.save_transfer(TransferRecord("sp1", TID, "{}", now, now))
    site.store.put_transfer_devices(
        [TransferDeviceRecord("sp1", TID, d, st.PENDING, "{}", now) for d in ("fleet-a", "fleet-b")]
    )
    keep_messages(site.store, TID, {"fleet-a": b"\xd2message-of-a", "fleet-b": b"\xd2message-of-b"}, now)
    ha, hb = DeviceHttps(a, timeout=10.0), DeviceHttps(b, timeout=10.0)
    try:
        # interleaved on one event loop, each on its own kept-open connection
        for _ in range(2):
            assert await ha.messages(site.https) == b"\xd2message-of-a"
            assert await hb.messages(site.https) == b"\xd2message-of-b"
        # the device's credential changes in the middle of the pass (here: b's factory certificate and key
        # copied onto a): the next request presents the new one, not the connection of the old
        for name in ("flash/certs/factory.pem", "secure/key.pem"):
            (a.path / name).write_bytes((b.path / name).read_bytes())
        assert await ha.messages(site.https) == b"\xd2message-of-b"
    finally:
        await ha.close()
        await hb.close()
