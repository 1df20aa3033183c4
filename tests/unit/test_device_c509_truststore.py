"""A constrained device keeps its truststore in C509 (one COSE_C509 bag on its flash) and uses it as
the PEM one: the transfer agent verifies SP1's message against it, installs SP2's anchors in C509,
and a rollback puts the same C509 truststore back."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from iotdlm.c509 import decode_c509, decode_c509_bag
from iotdlm.device.runner import truststore_pem
from iotdlm.device.simulated import C509_TRUSTSTORE, SimulatedDevice
from iotdlm.errors import BadRequestError, NotAuthorizedError
from iotdlm.pki.chain import load_certificates_pem
from tests.unit.test_transfer_agent import DEV, TOKEN, FakeCa2, Fallback, agent, make_device
from tests.unit.test_transfer_messages import P


def _store(dev: SimulatedDevice) -> Path:
    return dev.path / "flash" / "truststore"


def test_a_c509_device_writes_one_bag_and_reads_it_back_as_certificates(tmp_path: Path) -> None:
    dev = make_device(tmp_path, "c509")
    files = sorted(p.name for p in _store(dev).iterdir())
    assert files == [C509_TRUSTSTORE], "no PEM beside the C509 bag"
    certs = [P.pki1.root, *P.sp1.chain]
    assert dev.truststore() == certs
    bag = decode_c509_bag((_store(dev) / C509_TRUSTSTORE).read_bytes())
    assert [x509.load_der_x509_certificate(d) for d in bag] == certs
    assert load_certificates_pem(truststore_pem(dev)) == certs, "the EST client gets the same anchors"


def test_a_c509_truststore_is_smaller_than_the_pem_one(tmp_path: Path) -> None:
    c509 = make_device(tmp_path / "c", "c509")
    pem = make_device(tmp_path / "p")
    size = {d: sum(p.stat().st_size for p in _store(d).iterdir()) for d in (c509, pem)}
    assert size[c509] < size[pem] / 2


async def test_the_agent_verifies_against_the_c509_truststore_and_installs_sp2_anchors_in_c509(tmp_path: Path) -> None:
    dev = make_device(tmp_path, "c509")
    receipt = await agent(dev, FakeCa2()).handle(TOKEN)
    assert receipt.phase == "committed"
    assert sorted(p.name for p in _store(dev).iterdir()) == [C509_TRUSTSTORE]
    assert {c.subject for c in dev.truststore()} == {P.pki2.root.subject, P.pki2.cas["operational"].certificate.subject}


async def test_without_sp1_in_the_c509_truststore_the_message_is_refused(tmp_path: Path) -> None:
    dev = make_device(tmp_path, "c509")
    dev.write_truststore([P.pki1.root])  # SP1's transfer certificate and CA missing
    ca2 = FakeCa2()
    receipt = await agent(dev, ca2).handle(TOKEN)
    assert not receipt.accepted
    assert ca2.calls == 0
    assert dev.truststore() == [P.pki1.root]


async def test_rollback_restores_the_c509_truststore_byte_for_byte(tmp_path: Path) -> None:
    dev = make_device(tmp_path, "c509")
    before = (_store(dev) / C509_TRUSTSTORE).read_bytes()
    receipt = await agent(dev, FakeCa2([NotAuthorizedError("not registered")]), Fallback()).handle(TOKEN)
    assert receipt.phase == "idle"
    assert (_store(dev) / C509_TRUSTSTORE).read_bytes() == before


def test_an_unknown_truststore_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadRequestError, match="truststore format"):
        SimulatedDevice.manufacture(tmp_path / DEV, DEV, "sensor", truststore_format="der")


def test_a_c509_device_keeps_its_certificates_in_c509_and_hands_its_tls_stack_pem_from_ram(tmp_path: Path) -> None:
    dev = make_device(tmp_path, "c509")
    certs = dev.path / "flash" / "certs"
    assert sorted(p.name for p in certs.iterdir()) == ["factory.c509", "operational.c509"], "no PEM in flash"
    op = dev.certificate("operational")
    assert op is not None
    assert decode_c509((certs / "operational.c509").read_bytes()) == op.public_bytes(Encoding.DER)
    cert_path, _key_path = dev.tls_identity_files("operational")
    assert cert_path == dev.path / "ram" / "operational.pem"
    assert load_certificates_pem(cert_path.read_bytes()) == [op]
    assert dev.tls_identity("operational")[0] == cert_path.read_bytes()
    pem_dev = make_device(tmp_path / "pem")
    assert sorted(p.name for p in (pem_dev.path / "flash" / "certs").iterdir()) == ["factory.pem", "operational.pem"]
