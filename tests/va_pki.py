"""A CA hierarchy for the validation authority's tests: the root keeps its signer (it signs the
root's CRL), and the issuing-CA certificates carry the CRL distribution point of the root's CRL
(``PublicUrls.crl("root", 0)``), as relying parties need to check them; plus a :class:`Va` on a
SQLite store and a FixedClock, and helpers to issue and record certificates."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from iotdlm.clock import FixedClock
from iotdlm.km.cert_views import record_for
from iotdlm.km.va import ROOT, Va, VaSettings
from iotdlm.pki import ca as pki_ca
from iotdlm.pki.keys import Algorithm, KeySigner, generate_key
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.store import Store
from tests.helpers import NOW, ORG, Pki, make_csr

URLS = pki_ca.PublicUrls("http://127.0.0.1:8080", crl_partitions=4)


def make_va_pki(alg: Algorithm = Algorithm.P256, *, now: dt.datetime = NOW) -> tuple[Pki, pki_ca.IssuingCA]:
    """(the issuing CAs and module identities, the root CA with its signer)."""
    root_signer = KeySigner(generate_key(alg))
    root = pki_ca.make_root(
        root_signer, pki_ca.ca_name("VA Test Root CA", ORG), now=now, validity=dt.timedelta(days=3650)
    )
    cdp = x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(URLS.crl(ROOT, 0))],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )
    cas = {}
    for name in ("factory", "operational", "service"):
        key = generate_key(alg)
        builder = (
            x509.CertificateBuilder()
            .subject_name(pki_ca.ca_name(f"VA Test {name} CA", ORG))
            .issuer_name(root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=3000))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_signer.public_key),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(cdp, critical=False)
        )
        cert = root_signer.sign_certificate(builder)
        cas[name] = pki_ca.IssuingCA(name=name, certificate=cert, signer=KeySigner(key), chain=(cert, root))
    root_ca = pki_ca.IssuingCA(name=ROOT, certificate=root, signer=root_signer, chain=(root,))
    return Pki(root=root, cas=cas), root_ca


@dataclass
class World:
    pki: Pki
    root: pki_ca.IssuingCA
    store: Store
    clock: FixedClock
    va: Va

    def issue(self, issuer: str = "operational", device_id: str | None = "dev-1") -> x509.Certificate:
        """A certificate of ``issuer`` with AIA OCSP and its partition's CDP, recorded in the store."""
        profile = DEFAULT_PROFILES["service" if issuer == "service" else issuer]
        profile = dataclasses.replace(profile, with_revocation_pointers=True)
        ca = self.pki.cas[issuer]
        key = generate_key(Algorithm.P256)
        name = device_id or "module"
        cert = ca.issue(
            profile,
            key.public_key(),
            pki_ca.ca_name(name, ORG),
            now=self.clock.now(),
            serial=x509.random_serial_number(),
            urls=URLS,
        )
        part = pki_ca.crl_partition(cert.serial_number, URLS.crl_partitions)
        rec = record_for(cert, issuer, profile.name, device_id, "test", self.clock.now(), crl_partition=part)
        if device_id is not None and self.store.get_device(device_id) is None:
            self.store.upsert_device(device_id, "boardA", now=self.clock.now())
        self.store.add_certificates([rec])
        return cert

    def ocsp_request(self, cert: x509.Certificate, *, nonce: bool, issuer: str = "operational") -> bytes:
        builder = ocsp.OCSPRequestBuilder().add_certificate(cert, self.pki.cas[issuer].certificate, hashes.SHA1())  # noqa: S303 -- RFC 5019 CertID
        if nonce:
            builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
        return builder.build().public_bytes(serialization.Encoding.DER)

    def status(self, cert: x509.Certificate, *, nonce: bool = True, issuer: str = "operational") -> ocsp.OCSPResponse:
        resp = ocsp.load_der_ocsp_response(self.va.ocsp(self.ocsp_request(cert, nonce=nonce, issuer=issuer)))
        assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL, resp.response_status
        return resp


def make_world(
    tmp_path: Path, alg: Algorithm = Algorithm.P256, *, settings: VaSettings | None = None, url: str | None = None
) -> World:
    pki, root = make_va_pki(alg)
    clock = FixedClock(NOW + dt.timedelta(hours=1))
    store = Store.open(url or f"sqlite:///{tmp_path / 'va.db'}")
    va = Va(
        cas=pki.cas,
        profiles=DEFAULT_PROFILES,
        store=store,
        clock=clock,
        settings=settings or VaSettings(urls=URLS),
        root=root,
    )
    return World(pki=pki, root=root, store=store, clock=clock, va=va)


__all__ = ["URLS", "World", "make_csr", "make_va_pki", "make_world"]
