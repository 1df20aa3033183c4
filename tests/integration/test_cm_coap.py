"""cm's CoAP door as the deployment starts it (``CmConfig.coap``), judged by libcoap's
``coap-client-notls`` (Debian libcoap3-bin) for the plain resources, and by the operation mode."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from iotdlm.c509 import decode_c509_bag
from iotdlm.cm.coap import CREDENTIAL_FILE, DEFAULT_KEY_FILE
from iotdlm.cm.config import CoapConfig
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.wire import coap_est as wire
from tests.integration.test_cm import DTYPE, Site, open_site, set_mode
from tests.integration.test_device_runner import cli

pytestmark = [pytest.mark.nats, pytest.mark.filterwarnings("ignore:Setting a block1 option:DeprecationWarning")]
COAP_CLIENT = shutil.which("coap-client-notls")
needs_libcoap = pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap3-bin (coap-client-notls) not installed")


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path, coap=CoapConfig(port=0)) as s:
        yield s


async def _coap_client(*argv: str) -> subprocess.CompletedProcess[bytes]:
    assert COAP_CLIENT is not None
    return await asyncio.to_thread(
        subprocess.run, [COAP_CLIENT, "-B", "10", *argv], capture_output=True, timeout=30, check=False
    )


def _uri(site: Site, path: str) -> str:
    assert site.cm.coap is not None
    return f"coap://127.0.0.1:{site.cm.coap.port}{path}"


@needs_libcoap
async def test_libcoap_reads_core_and_crts(site: Site, tmp_path: Path) -> None:
    r = await _coap_client("-m", "get", _uri(site, "/.well-known/core"))
    assert r.returncode == 0, r.stderr
    links = r.stdout.decode()
    for name in ("crts", "pn", "sen", "sren"):
        assert f"</.well-known/est/{name}>" in links
    out = tmp_path / "crts.p7"
    r = await _coap_client("-m", "get", "-o", str(out), _uri(site, "/.well-known/est/crts"))
    assert r.returncode == 0, r.stderr
    certs = pkcs7.load_der_pkcs7_certificates(out.read_bytes())
    assert x509.load_pem_x509_certificate(site.root_pem) in certs
    # Accept: the C509 bag (COSE_C509), the same certificates decoded back to DER
    bag = tmp_path / "crts.c509"
    r = await _coap_client("-m", "get", "-A", str(wire.C509_BAG), "-o", str(bag), _uri(site, "/.well-known/est/crts"))
    assert r.returncode == 0, r.stderr
    ders = decode_c509_bag(bag.read_bytes())
    assert [x509.load_der_x509_certificate(d) for d in ders] == certs
    r = await _coap_client("-m", "get", "-A", "50", _uri(site, "/.well-known/est/crts"))  # JSON: not offered
    assert b"4.06" in r.stdout + r.stderr


@needs_libcoap
async def test_libcoap_without_oscore_is_told_to_run_edhoc(site: Site) -> None:
    r = await _coap_client("-m", "post", _uri(site, "/.well-known/est/sen"))
    assert b"oscore_required" in r.stdout + r.stderr
    assert b"4.01" in r.stdout + r.stderr


async def test_deployment_keeps_the_edhoc_key_and_publishes_the_credential(site: Site) -> None:
    folder = site.dep.root / "modules" / "cm"
    assert (folder / DEFAULT_KEY_FILE).stat().st_mode & 0o077 == 0
    assert site.cm.coap is not None
    published = (folder / CREDENTIAL_FILE).read_bytes()
    assert published == site.cm.coap.credential_bytes
    wire.ccs_public_key(cbor2.loads(published))
    assert site.cm.urls()["coap"].startswith("coap://127.0.0.1:")


async def test_crts_refused_outside_cm_modes(site: Site) -> None:
    bus = await site.nats.connect("modes")
    site.buses.append(bus)
    await set_mode(bus, "provisioning-certificate", site.dep)
    assert site.cm.app.mode is not None
    await site.cm.app.mode.wait_for("provisioning-certificate")  # type: ignore[attr-defined]
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        req = aiocoap.Message(code=aiocoap.GET, uri=_uri(site, "/.well-known/est/crts"))
        answer = await ctx.request(req).response
    finally:
        await ctx.shutdown()
    assert answer.code == aiocoap.SERVICE_UNAVAILABLE
    assert b"wrong_mode" in answer.payload
    assert answer.opt.max_age is not None


async def test_device_run_as_a_constrained_device(site: Site, tmp_path: Path) -> None:
    """``iotdlm device run --cm coap://... --cm-credential FILE``: the device enrolls over CoAP."""
    assert site.cm.coap is not None
    cred = site.dep.root / "modules" / "cm" / CREDENTIAL_FILE
    folder = tmp_path / "dev-c"
    uri = _uri(site, "")
    out = await cli(
        "device", "run", "--device", str(folder), "--dtype", DTYPE, "--data", str(site.dep.root),
        "--cm", uri, "--cm-credential", str(cred), "--once", "--json",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert summary["counts"].get("enrolled") == 1, summary
    op = SimulatedDevice(folder).certificate("operational")
    assert op is not None
    assert op.issuer == site.dep.ca_certificate("operational").subject
    # a file that is not cm's credential is refused in words
    bogus = tmp_path / "bogus.cbor"
    bogus.write_bytes(b"\xa0")
    out = await cli("device", "run", "--device", str(folder), "--cm", uri, "--cm-credential", str(bogus), "--once")
    assert out.exit_code != 0
    assert "EDHOC credential" in out.output
    assert "Traceback" not in out.output


async def test_fleet_run_as_constrained_c509_devices(site: Site, tmp_path: Path) -> None:
    """``iotdlm fleet run --c509 --cm coap://... --cm-credential FILE``: three constrained devices
    (C509 certificates and truststore) enroll over CoAP/EDHOC/OSCORE, in one worker process."""
    cred = site.dep.root / "modules" / "cm" / CREDENTIAL_FILE
    fleet = tmp_path / "cfleet"
    out = await cli(
        "fleet", "run", "--count", "3", "--fleet", str(fleet), "--prefix", "cf", "--workers", "1", "--c509",
        "--data", str(site.dep.root), "--cm", _uri(site, ""), "--cm-credential", str(cred), "--once", "--json",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert summary["counts"] == {"enrolled": 3}, summary
    for i in range(3):
        dev = SimulatedDevice(fleet / f"cf-{i:04d}")
        op = dev.certificate("operational")
        assert op is not None
        assert op.issuer == site.dep.ca_certificate("operational").subject
        assert (dev.path / "flash" / "certs" / "operational.c509").is_file()
        assert not (dev.path / "flash" / "certs" / "operational.pem").exists()
    # --cm-credential without a coap:// cm: said in words
    out = await cli("fleet", "run", "--count", "1", "--fleet", str(fleet), "--prefix", "cf", "--workers", "1",
                    "--cm", "https://127.0.0.1:1", "--cm-credential", str(cred), "--once")  # fmt: skip
    assert out.exit_code != 0
    assert "coap://" in out.output
    assert "Traceback" not in out.output
