"""IssuingCA.issue builds the certificate in one call with extensions it keeps per profile and CRL
partition (issue 15): the certificate must be what cryptography's step-by-step builder makes."""

from __future__ import annotations

import datetime as dt
import functools

import pytest
from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID

from iotdlm.pki import ca as ca_mod
from iotdlm.pki.ca import BACKDATE, PublicUrls, crl_partition
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_subject, device_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES, key_usage_for
from tests.helpers import NOW, ORG, make_pki

URLS = PublicUrls("http://127.0.0.1:8080", crl_partitions=4)


@functools.cache
def _pki():
    return make_pki(Algorithm.P256)


@functools.cache
def _keys(alg: Algorithm) -> list:
    return [generate_key(alg).public_key() for _ in range(3)]


def _step_by_step(ca, profile, public_key, subject, *, serial, uris, urls) -> x509.CertificateBuilder:
    """How the certificate was built before: one setter and one add_extension at a time."""
    not_after = min(NOW + profile.validity, ca.certificate.not_valid_after_utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(NOW - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage_for(profile.key_usage, public_key).extension(), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(profile.eku)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.signer.public_key), critical=False)
        .add_extension(x509.CertificatePolicies([x509.PolicyInformation(profile.policy_oid, None)]), critical=False)
    )
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False)
    if urls is not None and profile.with_revocation_pointers:
        part = crl_partition(serial, urls.crl_partitions)

        def dp(url: str) -> x509.CRLDistributionPoints:
            return x509.CRLDistributionPoints(
                [x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)]
            )

        aia = x509.AuthorityInformationAccess(
            [
                x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(urls.ocsp())),
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(urls.ca_issuers(ca.name))
                ),
            ]
        )
        b = b.add_extension(aia, False).add_extension(dp(urls.crl(ca.name, part)), False)
        b = b.add_extension(x509.FreshestCRL(dp(urls.crl(ca.name, part, delta=True))), False)
    if profile.ocsp_no_check:
        b = b.add_extension(x509.OCSPNoCheck(), critical=False)
    return b


@pytest.mark.parametrize("alg", [Algorithm.P256, Algorithm.RSA3072, Algorithm.ED25519], ids=lambda a: a.value)
@pytest.mark.parametrize("profile_name", sorted(DEFAULT_PROFILES))
@pytest.mark.parametrize("urls", [URLS, None], ids=["urls", "no-urls"])
def test_one_call_build_equals_the_step_by_step_build(alg: Algorithm, profile_name: str, urls) -> None:
    profile = DEFAULT_PROFILES[profile_name]
    ca = _pki().cas[profile.issuer]
    for n in range(6):  # several serials: several CRL partitions, and the kept extensions used again
        key = _keys(alg)[n % 3]
        subject = device_subject(f"dev-{n}", ORG, "boardA")
        serial = x509.random_serial_number()
        uris = [device_uri(f"dev-{n}", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)] if n % 2 else []
        got = ca.issue(profile, key, subject, now=NOW, serial=serial, uris=uris, urls=urls)
        want = ca.signer.sign_certificate(_step_by_step(ca, profile, key, subject, serial=serial, uris=uris, urls=urls))
        assert got.tbs_certificate_bytes == want.tbs_certificate_bytes


def test_an_expired_ca_and_a_bad_serial_are_refused_as_the_step_by_step_builder_did() -> None:
    pki = make_pki(Algorithm.P256)
    profile = DEFAULT_PROFILES["factory"]
    ca = pki.cas[profile.issuer]
    key = generate_key(Algorithm.P256).public_key()
    subject = device_subject("dev-1", ORG, "boardA")
    later = ca.certificate.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(ValueError, match="expired"):
        ca.issue(profile, key, subject, now=later, serial=5)
    for bad in (0, -1, 1 << 159):
        with pytest.raises(ValueError, match="serial"):
            ca.issue(profile, key, subject, now=NOW, serial=bad)


def test_the_kept_extensions_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ca_mod, "_EXTENSIONS_CACHE_MAX", 3)
    pki = make_pki(Algorithm.P256)
    profile = DEFAULT_PROFILES["factory"]
    ca = pki.cas[profile.issuer]
    key = generate_key(Algorithm.P256).public_key()
    for serial in range(1, 40):
        ca.issue(profile, key, device_subject("dev-1", ORG, "b"), now=NOW, serial=serial, urls=PublicUrls("http://x"))
        assert len(ca._extensions_cache) <= 3
