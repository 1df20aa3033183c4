"""Issuing-CA rotation with km on the in-memory bus (issue 16, ADR 0026): a deployment, km over
SQLite, the operator's ``rotate_ca`` on an injected clock, km restarted as ``ca rotate`` asks.
New certificates come from the new CA; the old CA's certificates stay checkable (OCSP, its own
CRL partitions, km's check of a presented certificate); /cacerts (km's chain) lists both during
the overlap, then only the new one; the old CA is retired once its last certificate expired."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from iotdlm.bus.memory import MemoryHub
from iotdlm.cli.ca_rotate import ca_states, rotate_ca
from iotdlm.cli.main import main
from iotdlm.client.connect import km_trust, sealer_for
from iotdlm.client.km import KmClient
from iotdlm.clock import FixedClock, SystemClock
from iotdlm.cm.cacerts import CaCerts
from iotdlm.deployment import PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.errors import ConflictError
from iotdlm.km import KmService
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.rotation import DEFAULT_OVERLAP
from iotdlm.runtime import build_km, km_identity, open_store, record_identities
from iotdlm.store import Store
from iotdlm.wire import audit as fmt
from tests.helpers import make_csr

DTYPE = "boardA"
PASSPHRASE = b"pw"
DAY = DEFAULT_OVERLAP / 30


@dataclass
class Site:
    dep: Deployment
    store: Store
    clock: FixedClock
    hub: MemoryHub = field(default_factory=MemoryHub)
    km: KmService | None = None

    async def start_km(self) -> None:
        """km as a process starts it: the CAs loaded from the data folder (again after a rotation)."""
        if self.km is not None:
            await self.km.stop()
        self.km = KmService(
            build_km(self.dep, self.store, self.clock, passphrase=PASSPHRASE),
            self.hub.bus("km"),
            identity=km_identity(self.dep),
        )
        await self.km.start()

    def admin(self) -> KmClient:
        bus = self.hub.bus("admin")
        return KmClient(bus, sealer_for(self.dep.identity("admin")), self.clock, trust=km_trust(self.dep))

    async def issue(self, device_id: str) -> x509.Certificate:
        out = await self.admin().issue(device_id, "operational", csr=make_csr(generate_key(Algorithm.P256), device_id))
        return x509.load_der_x509_certificate(out.certificate)

    def rotate(self) -> None:
        rotate_ca(
            self.dep, self.store, "operational", overlap=30 * DAY, clock=self.clock, passphrase=PASSPHRASE,
            actor="admin (test)",
        )  # fmt: skip


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    clock = FixedClock(SystemClock().now())
    dep, _ = init_deployment(
        tmp_path / "d", organization="T", algorithm=Algorithm.P256, dtypes=[DTYPE], passphrase=PASSPHRASE,
        now=clock.now(),
    )  # fmt: skip
    store = open_store(dep)
    record_identities(dep, store, clock.now())
    s = Site(dep=dep, store=store, clock=clock)
    await s.start_km()
    try:
        yield s
    finally:
        if s.km is not None:
            await s.km.stop()
        store.close()


def _ocsp_status(site: Site, cert: x509.Certificate, issuer: x509.Certificate) -> ocsp.OCSPCertStatus:
    assert site.km is not None
    assert site.km.km.va is not None
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256()).build()
    resp = ocsp.load_der_ocsp_response(site.km.km.va.ocsp(req.public_bytes(serialization.Encoding.DER)))
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return resp.certificate_status


def _state(site: Site, name: str) -> str:
    return str(next(r for r in ca_states(site.dep, site.store, site.clock.now()) if r["name"] == name)["state"])


async def test_rotation_new_issuance_from_the_new_ca_the_old_one_checkable_until_retired(site: Site) -> None:
    old_ca = site.dep.ca_certificate("operational")
    before = await site.issue("dev-old")
    other_old = await site.issue("dev-old-2")
    before.verify_directly_issued_by(old_ca)

    site.rotate()
    await site.start_km()  # as `ca rotate` tells the operator
    new_ca = site.dep.ca_certificate("operational-2")
    assert new_ca.subject != old_ca.subject
    assert new_ca.issuer == site.dep.ca_certificate("root").subject
    after = await site.issue("dev-new")
    after.verify_directly_issued_by(new_ca)
    rec = site.store.get_certificate("operational-2", after.serial_number)
    assert rec is not None
    # the new CA's certificate names its own CRL partitions and AIA
    cdp = after.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert "/crl/operational-2/" in str(cdp[0].full_name[0].value)  # type: ignore[index]

    # both CAs in /cacerts during the overlap
    chain = await site.admin().chain()
    assert {"operational", "operational-2"} <= set(chain.chains)
    assert chain.not_in_cacerts == []
    listed = CaCerts.from_chain(chain)
    assert old_ca in listed
    assert new_ca in listed

    # the old CA's certificates: km still accepts one presented at the TLS edge, OCSP answers for it,
    # and a revocation during the overlap lands on the OLD CA's CRL partition
    assert site.km is not None
    assert site.km.km.presented(other_old.public_bytes(serialization.Encoding.DER)).status == "valid"
    assert _ocsp_status(site, before, old_ca) == ocsp.OCSPCertStatus.GOOD
    await site.admin().revoke(serial=format(before.serial_number, "x"), issuer="operational", reason="keyCompromise")
    assert _ocsp_status(site, before, old_ca) == ocsp.OCSPCertStatus.REVOKED
    assert _ocsp_status(site, after, new_ca) == ocsp.OCSPCertStatus.GOOD
    partition = before.serial_number % site.dep.config.crl_partitions
    crl = x509.load_der_x509_crl(await site.admin().crl("operational", partition))
    assert crl.issuer == old_ca.subject
    assert crl.is_signature_valid(old_ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(before.serial_number) is not None
    new_crl = x509.load_der_x509_crl(await site.admin().crl("operational-2", partition))
    assert new_crl.is_signature_valid(new_ca.public_key())  # type: ignore[arg-type]
    assert new_crl.get_revoked_certificate_by_serial_number(before.serial_number) is None

    # the state on the clock: rotated-out, out of /cacerts after the overlap, retired after the last expiry
    assert _state(site, "operational") == "rotated-out"
    assert _state(site, "operational-2") == "active"
    site.clock.advance(30 * DAY)
    chain = await site.admin().chain()
    assert chain.not_in_cacerts == ["operational"]
    listed = CaCerts.from_chain(chain)
    assert old_ca not in listed
    assert new_ca in listed
    assert "operational" in CaCerts.named_from_chain(chain)  # still served by name (AIA caIssuers)
    assert _state(site, "operational") == "rotated-out"  # its certificates have not expired yet
    assert site.km.km.va is not None
    assert "operational" in {issuer for issuer, _p in site.km.km.va._crl_scopes()}  # CRLs still refreshed
    site.clock.advance(other_old.not_valid_after_utc - site.clock.now())
    assert _state(site, "operational") == "retired"
    scopes = {issuer for issuer, _p in site.km.km.va._crl_scopes()}
    assert "operational" not in scopes  # no one needs its CRLs any more
    assert "operational-2" in scopes

    # audited, in the hash chain
    (audit,) = site.store.list_audit(kind=fmt.CA_ROTATION)
    assert max(c.seq for c in site.store.list_audit_checkpoints()) >= audit.seq  # under a signed tree head at once
    assert audit.data["new"] == "operational-2"
    assert audit.data["old"] == "operational"


async def test_a_renewal_after_the_rotation_comes_from_the_new_ca(site: Site) -> None:
    old = await site.issue("dev-r")
    site.rotate()
    await site.start_km()
    assert site.km is not None
    rec = site.store.get_certificate("operational", old.serial_number)
    assert rec is not None
    from iotdlm.cli.ca_extra import _admin

    grant, new_rec, _ = site.km.km.prepare_renewal(_admin(site.dep), rec, None)
    (new_rec,) = site.km.km.commit([(grant, new_rec)])
    assert new_rec.issuer == "operational-2"
    x509.load_der_x509_certificate(new_rec.der).verify_directly_issued_by(site.dep.ca_certificate("operational-2"))


def test_a_second_rotation_during_the_overlap_is_refused_and_changes_nothing(site: Site) -> None:
    site.rotate()
    files = sorted(p.name for p in (site.dep.root / "ca").iterdir())
    with pytest.raises(ConflictError, match="overlap"):
        site.rotate()
    assert sorted(p.name for p in (site.dep.root / "ca").iterdir()) == files


def test_the_cli_rotates_and_shows_the_state(site: Site) -> None:
    runner = CliRunner(env={PASSPHRASE_ENV: PASSPHRASE.decode()})
    data = str(site.dep.root)
    out = runner.invoke(main, ["ca", "rotate", "--data", data, "operational", "--overlap-days", "7", "--json"])
    assert out.exit_code == 0, out.output
    assert '"new": "operational-2"' in out.output
    shown = runner.invoke(main, ["ca", "list", "--data", data, "--cas", "--json"])
    assert shown.exit_code == 0, shown.output
    assert '"state": "rotated-out"' in shown.output
    one = runner.invoke(main, ["ca", "show", "--data", data, "operational-2"])
    assert one.exit_code == 0, one.output
    assert "active" in one.output
    verified = runner.invoke(main, ["audit", "verify", "--data", data, "--no-bus"])
    assert verified.exit_code == 0, verified.output
    refused = runner.invoke(main, ["ca", "rotate", "--data", data, "operational"])
    assert refused.exit_code == 4
    assert "still in its overlap" in refused.output
    assert "Traceback" not in refused.output


async def test_pkilint_finds_no_error_in_the_new_ca_and_what_it_issues(site: Site) -> None:
    from tests.unit.test_pkilint_certs import _allowed, _findings

    site.rotate()
    await site.start_km()
    for cert in (site.dep.ca_certificate("operational-2"), await site.issue("dev-lint")):
        real = [f for f in _findings(cert) if not _allowed(f[1], f[2])]
        assert real == [], f"{cert.subject.rfc4514_string()}: {real}"
