"""What a km worker remembers between requests (issue 15) never hides a change: a request signer's
and a presented certificate's chain are checked once per certificate, but a revocation, a
decommissioned device and an operation-mode change are seen by the very next request."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from iotdlm.clock import FixedClock
from iotdlm.errors import ModeError, NotAuthorizedError, ReplayError, UntrustedError
from iotdlm.km import Km, KmSettings
from iotdlm.km import presented as presented_mod
from iotdlm.km import signers as signers_mod
from iotdlm.pki import est_proof
from iotdlm.pki.keys import Algorithm, PrivateKey, generate_key
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.store import Store
from iotdlm.wire import km as msg
from iotdlm.wire.envelope import Sealer
from tests.helpers import NOW, ORG, make_csr, make_pki, proven_est

PKI = make_pki()
PM = PKI.module("pm", "boardA")
CM = PKI.module("cm")
LATER = NOW + dt.timedelta(seconds=1)


class _Mode:
    """Stand-in for iotdlm.modes.guard.ModeGuard (its own tests cover it): the mode in force now."""

    def __init__(self, mode: str) -> None:
        self.current = mode

    def require(self, allowed_modes: Any, what: str) -> str:
        if self.current not in allowed_modes:
            raise ModeError(f"{what} is not allowed in mode {self.current}")
        return str(self.current)


@pytest.fixture
def km(tmp_path: Path) -> Iterator[Km]:
    store = Store.open(f"sqlite:///{tmp_path / 'km.db'}")
    yield Km(cas=PKI.cas, profiles=DEFAULT_PROFILES, store=store, clock=FixedClock(NOW), settings=KmSettings(ORG, None))
    store.close()


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[int]:
    """Count the chain checks ``module`` makes (its ``verify_issued_by``)."""
    calls: list[int] = []
    real: Callable[..., None] = module.verify_issued_by

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(module, "verify_issued_by", counted)
    return calls


def _certificate(km: Km, device_id: str, profile: str) -> tuple[PrivateKey, x509.Certificate]:
    key = generate_key(Algorithm.P256)
    item = msg.IssueItem(device_id=device_id, profile=profile, csr=make_csr(key, device_id))
    out = km.issue(PM.sealer.seal(msg.OP_ISSUE, item, aud="km", now=NOW))
    return key, x509.load_der_x509_certificate(out.certificate)


def _revoke(km: Km, cert: x509.Certificate, issuer: str) -> None:
    km.store.revoke_certificate(issuer, cert.serial_number, reason="keyCompromise", at=NOW, actor="admin")


def test_a_device_signer_revoked_after_its_first_request_is_refused_by_the_next(
    km: Km, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = _counting(monkeypatch, signers_mod)
    key, cert = _certificate(km, "dev-r", "operational")
    device = Sealer(key, cert)
    # the first request authenticates the device (its chain checked and remembered), then fails
    # for a reason of its own: the CSR names another device
    wrong = msg.RenewRequest(csr=make_csr(generate_key(Algorithm.P256), "dev-other"))
    with pytest.raises(Exception, match="does not match device id"):
        km.renew(device.seal(msg.OP_RENEW, wrong, aud="km", now=NOW))
    _revoke(km, cert, "operational")
    good = msg.RenewRequest(csr=make_csr(generate_key(Algorithm.P256), "dev-r"))
    with pytest.raises(NotAuthorizedError, match="is revoked; it cannot renew"):
        km.renew(device.seal(msg.OP_RENEW, good, aud="km", now=LATER))
    # the device's chain was checked once (pm's once more): the refusal came from the store, now
    assert len(checks) == 2


def test_a_presented_certificate_revoked_after_its_nonce_cannot_enroll(km: Km, monkeypatch: pytest.MonkeyPatch) -> None:
    checks = _counting(monkeypatch, presented_mod)
    fkey, factory = _certificate(km, "dev-p", "factory")
    der = factory.public_bytes(Encoding.DER)
    okey = generate_key(Algorithm.P256)
    out = proven_est(km, CM.sealer, NOW, "simpleenroll", fkey, der, make_csr(okey, "dev-p"))
    assert out.certificate.device_id == "dev-p"
    _revoke(km, factory, "factory")
    with pytest.raises(NotAuthorizedError, match="factory certificate of device dev-p is revoked"):
        proven_est(km, CM.sealer, LATER, "simpleenroll", fkey, der, make_csr(okey, "dev-p"))
    # checked once, although km looked at it four times (two nonces, two enrollments)
    assert len(checks) == 1


def test_a_decommissioned_device_cannot_enroll_with_its_remembered_certificate(km: Km) -> None:
    fkey, factory = _certificate(km, "dev-d", "factory")
    der = factory.public_bytes(Encoding.DER)
    proven_est(km, CM.sealer, NOW, "simpleenroll", fkey, der, make_csr(generate_key(Algorithm.P256), "dev-d"))
    km.store.set_device_status("dev-d", "retired", now=NOW)
    with pytest.raises(Exception, match="decommissioned"):
        proven_est(km, CM.sealer, LATER, "simpleenroll", fkey, der, make_csr(generate_key(Algorithm.P256), "dev-d"))


def test_an_expired_remembered_certificate_is_refused(km: Km) -> None:
    fkey, factory = _certificate(km, "dev-e", "factory")
    der = factory.public_bytes(Encoding.DER)
    proven_est(km, CM.sealer, NOW, "simpleenroll", fkey, der, make_csr(generate_key(Algorithm.P256), "dev-e"))
    after = factory.not_valid_after_utc + dt.timedelta(seconds=1)
    km.clock = FixedClock(after)
    with pytest.raises(UntrustedError, match="is not valid at"):
        km.presented(der)


def test_a_mode_change_is_seen_by_the_next_request_of_a_remembered_signer(km: Km) -> None:
    mode = _Mode("provisioning-certificate")
    km.mode = mode
    _certificate(km, "dev-m1", "factory")  # pm's signer checked and remembered
    fkey, factory = _certificate(km, "dev-m2", "factory")
    mode.current = "certificate-management"
    with pytest.raises(ModeError, match="certificate-management"):
        _certificate(km, "dev-m3", "factory")
    der = factory.public_bytes(Encoding.DER)
    csr = make_csr(generate_key(Algorithm.P256), "dev-m2")
    proven_est(km, CM.sealer, NOW, "simpleenroll", fkey, der, csr)  # cm's signer remembered now
    mode.current = "provisioning-certificate"
    with pytest.raises(ModeError, match="provisioning-certificate"):
        proven_est(km, CM.sealer, LATER, "simpleenroll", fkey, der, csr)


def test_a_replayed_proof_stores_nothing_names_the_device_and_spends_the_request(km: Km) -> None:
    """The proof's nonce is spent in the issuance's own transaction (issue 15): a replay of it
    fails that transaction, stores nothing, and the request's own nonce is still spent."""
    fkey, factory = _certificate(km, "dev-x", "factory")
    der = factory.public_bytes(Encoding.DER)
    okey = generate_key(Algorithm.P256)
    asked = msg.EstNonceRequest(client_certificate=der)
    nonce = km.est_nonce(CM.sealer.seal(msg.OP_EST_NONCE, asked, aud="km", now=NOW)).nonce
    proof = est_proof.make(fkey, "simpleenroll", nonce, okey.public_key())
    body = msg.EstRequest("simpleenroll", der, make_csr(okey, "dev-x"), proof=proof)
    km.est(CM.sealer.seal(msg.OP_EST, body, aud="km", now=NOW))
    stored = km.store.count_certificates()
    replay = CM.sealer.seal(msg.OP_EST, body, aud="km", now=LATER)  # a new request, the old proof
    with pytest.raises(ReplayError, match="already used") as info:
        km.est(replay)
    assert info.value.device_id == "dev-x"
    assert km.store.count_certificates() == stored
    _env, _who, spent = km.authenticate(replay, msg.OP_EST)
    with pytest.raises(ReplayError, match="already used"):  # the request's own nonce was spent
        km.store.consume_nonce(spent.sender, spent.nonce, expires_at=spent.expires_at)
