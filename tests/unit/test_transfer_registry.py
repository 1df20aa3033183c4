"""km's registry of external factory certificates (CA2's side of seed 003 VII-C), the change to
``Km.presented`` (CA2 enrolls ONLY registered devices), and the trust-transfer store tables."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from iotdlm.clock import FixedClock
from iotdlm.errors import BadRequestError, NotAuthorizedError, UntrustedError
from iotdlm.km import Km, KmSettings
from iotdlm.km.registry import EXTERNAL_ISSUER, FactoryRegistry
from iotdlm.km.va import Va, VaSettings
from iotdlm.pki.ca import PublicUrls
from iotdlm.pki.chain import der
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import device_subject
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.store import Store
from iotdlm.store.transfer import TransferDeviceRecord, TransferRecord
from iotdlm.transfer import messages as m
from iotdlm.wire import km as msg
from iotdlm.wire.km import AUDIENCE
from tests.helpers import NOW, ORG, make_csr, make_pki, proven_est
from tests.unit.test_transfer_messages import P

CA2 = make_pki()
URLS = PublicUrls("http://127.0.0.1:8080", crl_partitions=4)
URI = "https://ca2.example:8443/.well-known/est"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(f"sqlite:///{tmp_path / 'ca2.db'}")
    yield s  # type: ignore[misc]
    s.close()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


@pytest.fixture
def registry(store: Store, clock: FixedClock) -> FactoryRegistry:
    reg = FactoryRegistry(store, clock, enroll_uri=URI)
    reg.register_cas([P.pki1.root, P.pki1.cas["factory"].certificate], actor="op")
    return reg


def bag(*device_ids: str) -> tuple[bytes, dict[str, tuple[object, x509.Certificate]]]:
    made = {d: P.factory(d) for d in device_ids}
    return m.encode_x5bag([der(c) for _k, c in made.values()]), made  # type: ignore[misc]


def test_register_returns_the_enroll_uri_and_knows_the_devices(registry: FactoryRegistry, store: Store) -> None:
    x5bag, made = bag("e1", "e2")
    reg = registry.register(x5bag, actor="sp2", batch="t1", windows={"e1": (NOW, NOW + dt.timedelta(days=1))})
    assert reg.enroll_uri == URI
    assert reg.devices == ("e1", "e2")
    assert store.get_device("e1").dtype == "sensor"  # type: ignore[union-attr]
    cred = registry.presented(made["e1"][1], NOW)
    assert (cred.profile, cred.device_id, cred.status, cred.issuer) == ("factory", "e1", "valid", EXTERNAL_ISSUER)
    assert {c.subject for c in registry.client_cas()} == {
        P.pki1.root.subject,
        P.pki1.cas["factory"].certificate.subject,
    }


def test_only_registered_certificates_pass(registry: FactoryRegistry) -> None:
    x5bag, _ = bag("e1")
    registry.register(x5bag, actor="sp2", batch="t1")
    _k, outsider = P.factory("e9")  # same permanent CA, never shared
    with pytest.raises(UntrustedError, match="registered"):
        registry.presented(outsider, NOW)


def test_enrollment_window_and_withdrawal(registry: FactoryRegistry) -> None:
    x5bag, made = bag("e1")
    registry.register(
        x5bag, actor="sp2", batch="t1", windows={"e1": (NOW + dt.timedelta(hours=1), NOW + dt.timedelta(days=1))}
    )
    with pytest.raises(NotAuthorizedError, match="may enroll from"):
        registry.presented(made["e1"][1], NOW)
    with pytest.raises(NotAuthorizedError, match="closed"):
        registry.presented(made["e1"][1], NOW + dt.timedelta(days=2))
    assert registry.withdraw("t1") == 1
    cred = registry.presented(made["e1"][1], NOW + dt.timedelta(hours=2))
    assert cred.status == "revoked"


@pytest.mark.parametrize(
    ("name", "certs", "match"),
    [
        ("issued by an unregistered CA", lambda: [der(P.factory("x", pki=CA2)[1])], "registered factory CA"),
        ("a device twice", lambda: [der(P.factory("x")[1]), der(P.factory("x")[1])], "twice"),
        ("only CA certificates", lambda: [der(P.pki1.cas["factory"].certificate)], "no factory"),
        ("not a certificate", lambda: [b"junk"], "x5bag certificate"),
    ],
)
def test_register_refusals(registry: FactoryRegistry, name: str, certs: object, match: str) -> None:
    with pytest.raises((BadRequestError, UntrustedError), match=match):
        registry.register(m.encode_x5bag(certs()), actor="sp2", batch="t1")  # type: ignore[operator]


def test_register_needs_a_registered_permanent_ca(store: Store, clock: FixedClock) -> None:
    reg = FactoryRegistry(store, clock, enroll_uri=URI)
    with pytest.raises(NotAuthorizedError, match="permanent CA"):
        reg.register(bag("e1")[0], actor="sp2", batch="t1")
    with pytest.raises(UntrustedError):
        reg.register_cas([P.pki1.cas["factory"].certificate], actor="op")  # its root is not registered


def test_device_id_from_serial_number_when_no_device_uri(registry: FactoryRegistry) -> None:
    key = generate_key(Algorithm.P256)
    cert = P.pki1.cas["factory"].issue(
        DEFAULT_PROFILES["factory"],
        key.public_key(),
        device_subject("sn-77", ORG, "sensor"),
        now=NOW,
        serial=x509.random_serial_number(),
    )
    reg = registry.register(m.encode_x5bag([der(cert)]), actor="sp2", batch="t2")
    assert reg.devices == ("sn-77",)


# --- Km.presented / EST at CA2 ------------------------------------------------------------------------------
def _km(store: Store, clock: FixedClock) -> Km:
    va = Va(cas=CA2.cas, profiles=DEFAULT_PROFILES, store=store, clock=clock, settings=VaSettings(urls=URLS))
    return Km(
        cas=CA2.cas,
        profiles=DEFAULT_PROFILES,
        store=store,
        clock=clock,
        settings=KmSettings(organization=ORG, urls=URLS),
        va=va,
    )


def _est(km: Km, factory: x509.Certificate, key: object, device_id: str) -> msg.EstResponse:
    csr = make_csr(key, device_id)  # type: ignore[arg-type]
    return proven_est(km, CA2.module("cm").sealer, NOW, "simpleenroll", key, der(factory), csr)  # type: ignore[arg-type]


def test_ca2_enrolls_registered_devices_and_only_them(
    registry: FactoryRegistry, store: Store, clock: FixedClock
) -> None:
    km = _km(store, clock)
    x5bag, made = bag("e1")
    registry.register(x5bag, actor="sp2", batch="t1")
    key, factory = made["e1"]
    out = _est(km, factory, key, "e1")
    cert = x509.load_der_x509_certificate(out.certificate.certificate)
    cert.verify_directly_issued_by(CA2.cas["operational"].certificate)
    assert out.certificate.device_id == "e1"
    key9, outsider = P.factory("e9")  # (our test CAs share names: refused as a bad signature, or unregistered)
    with pytest.raises(UntrustedError):
        _est(km, outsider, key9, "e9")
    # a factory certificate of a registered device, but the CSR names another device
    with pytest.raises(BadRequestError, match="does not match"):
        _est(km, factory, key, "e2")
    registry.withdraw("t1")
    with pytest.raises(NotAuthorizedError, match="revoked"):
        _est(km, factory, key, "e1")


# --- store tables ---------------------------------------------------------------------------------------------
def test_transfer_store_rows_and_bulk_revocation(store: Store, clock: FixedClock) -> None:
    tables = store
    tables.save_transfer(TransferRecord("sp1", "t" * 32, "{}", NOW, NOW))
    tables.save_transfer(TransferRecord("sp1", "t" * 32, '{"a":1}', NOW, NOW + dt.timedelta(seconds=1)))
    (rec,) = tables.list_transfers("sp1")
    assert rec.state == '{"a":1}'
    assert tables.get_transfer("sp2", "t" * 32) is None
    rows = [TransferDeviceRecord("sp1", "t" * 32, f"d{i}", "pending", "{}", NOW) for i in range(1200)]
    tables.put_transfer_devices(rows)
    tables.put_transfer_devices([TransferDeviceRecord("sp1", "t" * 32, "d1", "reset", '{"x":1}', NOW)])
    assert tables.count_transfer_devices("sp1", "t" * 32) == {"pending": 1199, "reset": 1}
    assert tables.get_transfer_devices("sp1", "t" * 32, ["d1", "nope"])["d1"].detail == '{"x":1}'
    km = _km(store, clock)
    issued = []
    for d in ("r1", "r2"):
        body = msg.IssueItem(device_id=d, profile="operational", csr=make_csr(generate_key(Algorithm.P256), d))
        issued.append(km.issue(CA2.module("pm", "sensor").sealer.seal("km.issue", body, aud=AUDIENCE, now=NOW)))
    revoked = tables.revoke_for_devices(
        ["r1", "r2", "r3"], profile="operational", issuer="operational", reason="affiliationChanged", at=NOW, actor="t"
    )
    assert sorted(r.device_id for r in revoked) == ["r1", "r2"]  # type: ignore[type-var]
    assert all(r.status == "revoked" for r in revoked)
    assert store.count_audit() >= 2
    again = tables.revoke_for_devices(
        ["r1"], profile="operational", issuer="operational", reason=None, at=NOW, actor="t"
    )
    assert again == []
