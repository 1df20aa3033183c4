"""Simulated devices and the two flasher plug-ins (simulated, and a command-template flasher
driving a fake vendor tool)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import ConflictError, UnavailableError, UnsupportedError
from iotdlm.pki.csr import parse_csr
from iotdlm.pki.keys import Algorithm
from iotdlm.pm.flasher import CommandFlasher, SimulatedFlasher
from tests.helpers import make_pki

TOOL = str(Path(__file__).parent.parent / "fake_vendor_tool.py")


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    b = tmp_path / "bench"
    SimulatedDevice.manufacture(b / "dev-1", "dev-1", "boardA")
    SimulatedDevice.manufacture(b / "dev-2", "dev-2", "boardA", can_make_csr=False)
    SimulatedDevice.manufacture(b / "dev-3", "dev-3", "boardB")
    return b


def command_flasher(bench: Path) -> CommandFlasher:
    py = [sys.executable, TOOL, str(bench)]
    return CommandFlasher(
        "boardA",
        {
            "discover": [*py, "list"],
            "flash_image": [*py, "program", "{device}", "{image}", "{file}"],
            "flash_file": [*py, "write", "{device}", "{kind}", "{file}"],
            "public_key": [*py, "pubkey", "{device}"],
            "csr": [*py, "csr", "{device}"],
            "image_sha256": [*py, "sha256", "{device}"],
        },
    )


def test_device_keeps_its_key(bench: Path) -> None:
    dev = SimulatedDevice(bench / "dev-1")
    pub = dev.generate_key()
    assert dev.public_key() == pub
    with pytest.raises(ConflictError):
        dev.generate_key()
    assert (bench / "dev-1" / "secure" / "key.pem").stat().st_mode & 0o077 == 0
    assert parse_csr(dev.make_csr()).public_key == pub


def test_device_without_csr_capability(bench: Path) -> None:
    dev = SimulatedDevice(bench / "dev-2")
    dev.generate_key()
    with pytest.raises(UnsupportedError, match="cannot generate a CSR"):
        dev.make_csr()


@pytest.mark.parametrize("kind", ["simulated", "command"])
def test_flashers_do_the_same_thing(bench: Path, tmp_path: Path, kind: str) -> None:
    flasher = SimulatedFlasher(bench, "boardA") if kind == "simulated" else command_flasher(bench)
    found = flasher.discover()
    ids = sorted(d.device_id for d in found)
    assert ids == (["dev-1", "dev-2"] if kind == "simulated" else ["dev-1", "dev-2", "dev-3"])
    ref = next(d.ref for d in found if d.device_id == "dev-1")
    image = tmp_path / "fw.bin"
    image.write_bytes(b"firmware" * 1000)
    flasher.flash_image(ref, image, {"release_counter": 3})
    pki = make_pki()
    flasher.flash_truststore(ref, [pki.root, pki.cas["operational"].certificate])
    flasher.flash_config(ref, {"device_id": "dev-1", "enroll_uri": "https://127.0.0.1:8443/.well-known/est"})
    pub = flasher.device_public_key(ref)
    csr = flasher.device_csr(ref)
    assert csr is not None
    assert parse_csr(csr).public_key == pub
    dev = SimulatedDevice(bench / "dev-1")
    assert flasher.read_image_sha256(ref) == dev.image_sha256()
    assert dev.image_info()["release_counter"] == 3
    assert [c.subject for c in dev.truststore()] == [pki.root.subject, pki.cas["operational"].certificate.subject]
    assert dev.config()["enroll_uri"].endswith("/est")
    ref2 = next(d.ref for d in found if d.device_id == "dev-2")
    assert flasher.device_csr(ref2) is None
    flasher.device_public_key(ref2)


def test_command_flasher_reports_tool_failures(bench: Path) -> None:
    f = command_flasher(bench)
    f.commands["public_key"] = [sys.executable, TOOL, str(bench), "fail", "{device}"]
    with pytest.raises(UnavailableError, match="JTAG chain broken"):
        f.device_public_key("dev-1")
    f.commands["public_key"] = ["/nonexistent/vendor-tool", "{device}"]
    with pytest.raises(UnavailableError, match="not installed"):
        f.device_public_key("dev-1")


def test_algorithms(tmp_path: Path) -> None:
    dev = SimulatedDevice.manufacture(tmp_path / "d", "d-ed", "boardA", algorithm=Algorithm.ED25519)
    dev.generate_key()
    assert parse_csr(dev.make_csr()).subject.rfc4514_string() == "CN=d-ed"
