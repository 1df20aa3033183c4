"""The device agent on a simulated device: what it writes to flash, rollback, and resuming after a
restart (the machine's state is persisted; a step is repeated, never skipped)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509

from iotdlm.clock import FixedClock
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import NotAuthorizedError, UnavailableError
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_subject, device_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.transfer.agent import DeviceAgent
from iotdlm.transfer.device import Phase
from tests.helpers import NOW, ORG
from tests.unit.test_transfer_device import device_message
from tests.unit.test_transfer_messages import P

DEV = "d1"


class FakeCa2:
    """CA2 as the device's enroller sees it: issues for the CSR's key, or fails as told."""

    def __init__(self, failures: Sequence[Exception] = ()) -> None:
        self.failures = list(failures)
        self.calls = 0
        self.fetches = 0
        self.cacerts_down = False

    async def enroll(
        self,
        enroll_uri: str,
        *,
        anchors: Sequence[x509.Certificate],
        client_cert_pem: bytes,
        client_key_pem: bytes,
        csr: bytes,
    ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        self.calls += 1
        assert [a.subject for a in anchors] == [P.pki2.root.subject]  # SP2's anchor from the message
        if self.failures:
            raise self.failures.pop(0)
        req = x509.load_der_x509_csr(csr)
        cert = P.pki2.cas["operational"].issue(
            DEFAULT_PROFILES["operational"],
            req.public_key(),  # type: ignore[arg-type]
            device_subject(DEV, ORG, "sensor"),
            now=NOW,
            serial=x509.random_serial_number(),
            uris=[device_uri(DEV, enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
        )
        return cert, [P.pki2.cas["operational"].certificate, P.pki2.root]

    async def cacerts(self, enroll_uri: str) -> list[x509.Certificate]:
        """/cacerts at the enrollURI (bootstrap: the device checks what it gets against the hashes)."""
        self.fetches += 1
        if self.cacerts_down:
            raise UnavailableError("CA2 is down")
        return [P.pki2.cas["operational"].certificate, P.pki2.root, P.pki1.root]


class Fallback:
    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.reports: list[tuple[str, str, str]] = []

    async def report(self, fallback_uri: str, *, transfer_id: str, device_id: str, reason: str) -> None:
        if not self.up:
            raise UnavailableError("SP1 is down")
        self.reports.append((fallback_uri, device_id, reason))


def make_device(tmp_path: Path, truststore_format: str = "pem") -> SimulatedDevice:
    dev = SimulatedDevice.manufacture(tmp_path / DEV, DEV, "sensor", truststore_format=truststore_format)
    dev.generate_key()
    factory = P.pki1.cas["factory"].issue(
        DEFAULT_PROFILES["factory"],
        dev.public_key(),
        device_subject(DEV, ORG, "sensor"),
        now=NOW,
        serial=x509.random_serial_number(),
        uris=[device_uri(DEV, enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )
    op = P.pki1.cas["operational"].issue(
        DEFAULT_PROFILES["operational"],
        dev.public_key(),
        device_subject(DEV, ORG, "sensor"),
        now=NOW,
        serial=x509.random_serial_number(),
        uris=[device_uri(DEV, enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )
    dev.write_certificate("factory", factory)
    dev.write_certificate("operational", op)
    dev.write_truststore([P.pki1.root, *P.sp1.chain])  # SP1's root, its transfer certificate and CA
    dev.write_config({"device_id": DEV, "dtype": "sensor", "enroll_uri": "https://ca1/.well-known/est", "x": 1})
    return dev


def agent(dev: SimulatedDevice, ca2: FakeCa2, fallback: Fallback | None = None) -> DeviceAgent:
    return DeviceAgent(dev, clock=FixedClock(NOW), enroller=ca2, fallback=fallback or Fallback(), retry_delay=0.0)


TOKEN = device_message(ra_uri=None, update_first=False)


async def test_commit_writes_the_new_identity_and_drops_the_backup(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    receipt = await agent(dev, FakeCa2()).handle(TOKEN)
    assert receipt.accepted
    assert receipt.phase == "committed"
    op = dev.certificate("operational")
    assert op is not None
    assert op.issuer == P.pki2.cas["operational"].certificate.subject
    assert {c.subject for c in dev.truststore()} == {P.pki2.root.subject, P.pki2.cas["operational"].certificate.subject}
    assert "x" not in dev.config()
    assert dev.config()["dtype"] == "sensor"
    assert not (dev.path / "flash" / "transfer" / "backup.json").exists()
    events = [e["event"] for e in dev.events()]
    assert events[-1] == "transfer_committed"


async def test_trust_anchors_are_fetched_once_and_only_what_the_hash_names_is_installed(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    ca2 = FakeCa2([NotAuthorizedError("stop before the commit")])
    await agent(dev, ca2).handle(device_message(ra_uri=None, update_first=False, cti=b"k" * 16))
    assert ca2.fetches == 1
    # rolled back, but the anchor the message named (SP2's root) was the one offered to CA2's TLS,
    # not the other certificates /cacerts returned (FakeCa2.enroll asserts it)
    assert ca2.calls == 1


async def test_anchors_unreachable_are_retried_then_fall_back(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    before = (dev.truststore(), dev.config(), dev.certificate("operational"))
    ca2 = FakeCa2()
    ca2.cacerts_down = True
    fb = Fallback()
    receipt = await agent(dev, ca2, fb).handle(TOKEN)
    assert receipt.accepted
    assert receipt.phase == "idle"  # fell back and told SP1
    assert ca2.fetches == 3
    assert ca2.calls == 0  # never got to enroll
    assert "anchors" in fb.reports[0][2]
    assert (dev.truststore(), dev.config(), dev.certificate("operational")) == before


async def test_permanent_refusal_rolls_back_exactly(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    before = (dev.truststore(), dev.config(), dev.certificate("operational"))
    fb = Fallback()
    receipt = await agent(dev, FakeCa2([NotAuthorizedError("not registered")]), fb).handle(TOKEN)
    assert receipt.phase == "idle"
    assert (dev.truststore(), dev.config(), dev.certificate("operational")) == before
    assert fb.reports[0][1] == DEV
    assert "refused" in fb.reports[0][2]


async def test_resume_after_a_restart_and_a_late_fallback_report(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    first = agent(dev, FakeCa2())
    state, nxt = first._receive(TOKEN)  # the device restarts right after the reset
    assert state.phase is Phase.RESET
    assert nxt is not None
    final = await agent(dev, FakeCa2()).resume()  # a new agent process reads the persisted state
    assert final.phase is Phase.COMMITTED
    # fallback with SP1 unreachable: reported on a later resume
    dev2 = make_device(tmp_path / "two")
    down = Fallback(up=False)
    ca2 = FakeCa2([UnavailableError("no route")] * 3)
    receipt = await agent(dev2, ca2, down).handle(TOKEN)
    assert ca2.calls == 3
    assert receipt.phase == "fallback"
    up = Fallback()
    final = await agent(dev2, FakeCa2(), up).resume()
    assert final.phase is Phase.IDLE
    assert len(up.reports) == 1


@pytest.mark.parametrize("days", [2])
async def test_a_message_for_a_closed_window_leaves_the_device_alone(tmp_path: Path, days: int) -> None:
    dev = make_device(tmp_path)
    late = DeviceAgent(
        dev,
        clock=FixedClock(NOW + dt.timedelta(days=days)),
        enroller=FakeCa2(),
        fallback=Fallback(),
        retry_delay=0.0,
    )
    receipt = await late.handle(TOKEN)
    assert not receipt.accepted
    assert dev.certificate("operational") is not None
    assert dev.config()["x"] == 1


def _spki(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined,no-any-return]


async def test_fr3_ca2_certifies_a_new_key_installed_at_commit(tmp_path: Path) -> None:
    """FR3: CA2's certificate certifies a key pair made on the device for it -- neither the key of
    the factory certificate nor that of SP1's operational certificate -- and that key is the
    device's operational key after the commit; the device key still answers for the factory one."""
    dev = make_device(tmp_path)
    sp1_era = {_spki(c.public_key()) for c in (dev.certificate("factory"), dev.certificate("operational")) if c}
    receipt = await agent(dev, FakeCa2()).handle(TOKEN)
    assert receipt.phase == "committed"
    new = dev.certificate("operational")
    assert new is not None
    assert _spki(new.public_key()) not in sp1_era
    assert _spki(dev.public_key("operational")) == _spki(new.public_key())
    assert _spki(dev.public_key("device")) in sp1_era
    assert not dev.has_key("pending")
    _cert_pem, key_pem = dev.tls_identity("operational")
    from iotdlm.pki.keys import load_private_key_pem

    assert _spki(load_private_key_pem(key_pem, None).public_key()) == _spki(new.public_key())


async def test_fr3_rollback_destroys_the_key_meant_for_ca2(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    receipt = await agent(dev, FakeCa2([NotAuthorizedError("not registered")])).handle(TOKEN)
    assert receipt.phase == "idle"
    assert not dev.has_key("pending")
    assert not dev.has_key("operational")  # SP1's operational certificate keeps the key it certifies
    assert "key_destroyed" in [e["event"] for e in dev.events()]


class WrongKeyCa2(FakeCa2):
    """A CA2 (or whoever answers for it) that certifies another key than the one asked for."""

    async def enroll(self, enroll_uri: str, **kwargs: object) -> tuple[x509.Certificate, list[x509.Certificate]]:  # type: ignore[override]
        from iotdlm.pki.keys import Algorithm, generate_key
        from tests.helpers import make_csr

        kwargs["csr"] = make_csr(generate_key(Algorithm.P256), DEV)
        return await super().enroll(enroll_uri, **kwargs)  # type: ignore[arg-type]


async def test_fr3_a_certificate_for_another_key_is_refused_and_rolled_back(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    before = dev.certificate("operational")
    fb = Fallback()
    receipt = await agent(dev, WrongKeyCa2(), fb).handle(TOKEN)
    assert receipt.phase == "idle"
    assert dev.certificate("operational") == before
    assert "new key pair" in fb.reports[0][2]
    assert not dev.has_key("pending")


class Refusals:
    """The device's provider's cm as the agent's RefusalReporter sees it (up or down)."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.reports: list[tuple[str, str, str, str]] = []

    async def report_refusal(self, cm_url: str, *, reason: str, detail: str, message: str) -> None:
        if not self.up:
            raise UnavailableError("SP1's cm is down")
        self.reports.append((cm_url, reason, detail, message))


async def test_refused_messages_are_reported_to_the_current_providers_cm(tmp_path: Path) -> None:
    import hashlib

    dev = make_device(tmp_path)
    seen = Refusals()
    a = DeviceAgent(dev, clock=FixedClock(NOW), enroller=FakeCa2(), fallback=Fallback(), retry_delay=0.0,
                    refusals=seen)  # fmt: skip
    fresh = device_message(ra_uri=None, update_first=False, cti=b"r" * 16)
    altered = fresh[:-1] + bytes([fresh[-1] ^ 1])
    other = device_message(ra_uri=None, update_first=False, cti=b"o" * 16, aud="d2")
    for token in (altered, other):
        assert not (await a.handle(token)).accepted
    late = DeviceAgent(dev, clock=FixedClock(NOW + dt.timedelta(days=2)), enroller=FakeCa2(), fallback=Fallback(),
                       retry_delay=0.0, refusals=seen)  # fmt: skip
    assert not (await late.handle(fresh)).accepted
    assert [(u, r, m) for u, r, _d, m in seen.reports] == [
        ("https://ca1", "altered", hashlib.sha256(altered).hexdigest()),
        ("https://ca1", "wrong-device", hashlib.sha256(other).hexdigest()),
        ("https://ca1", "expired", hashlib.sha256(fresh).hexdigest()),
    ]
    assert seen.reports[0][2] == "the signature of the transfer message does not verify"
    # cm unreachable: the refusal stands, the failed report is logged on the device, nothing raised
    down = DeviceAgent(dev, clock=FixedClock(NOW), enroller=FakeCa2(), fallback=Fallback(), retry_delay=0.0,
                       refusals=Refusals(up=False))  # fmt: skip
    assert not (await down.handle(altered)).accepted
    failed = [e for e in dev.events() if e.get("event") == "refusal_report_failed"]
    assert [(e["reason"], e["code"]) for e in failed] == [("altered", "unavailable")]
    assert dev.certificate("operational") is not None
    assert dev.config()["x"] == 1
