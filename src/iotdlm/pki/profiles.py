"""Certificate profiles: what a certificate of each kind looks like.

- **factory** -- the long-lived device identity (IEEE 802.1AR IDevID-like; seed 003 section VI-B):
  lives as long as the device, restricted usage: it only authenticates the device for enrollment.
- **operational** -- the device's day-to-day TLS client certificate: short-lived, renewable.
- **service** -- certificates of our own modules (km, pm, sm, cm) and their TLS endpoints.
- **ocsp** -- the VA's delegated OCSP signing certificate (id-kp-OCSPSigning, ocsp-nocheck).

A profile sets validity, key usage, EKU and which issuing CA signs; subject and SAN come from the
device id (or module name); AIA OCSP and CRL distribution points from the deployment's public URL.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from iotdlm.errors import UnsupportedError

#: iotdlm's private arc for certificate policies naming the profile (under a documentation OID
#: arc until an enterprise number is assigned; only used as an opaque marker).
POLICY_ARC = "1.3.6.1.4.1.55555.1."


@dataclass(frozen=True)
class KeyUsageSpec:
    digital_signature: bool = False
    key_encipherment: bool = False
    key_agreement: bool = False
    key_cert_sign: bool = False
    crl_sign: bool = False

    def extension(self) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=self.digital_signature,
            content_commitment=False,
            key_encipherment=self.key_encipherment,
            data_encipherment=False,
            key_agreement=self.key_agreement,
            key_cert_sign=self.key_cert_sign,
            crl_sign=self.crl_sign,
            encipher_only=False,
            decipher_only=False,
        )


@dataclass(frozen=True)
class Profile:
    name: str
    issuer: str  # name of the issuing CA that signs it
    validity: dt.timedelta
    key_usage: KeyUsageSpec
    eku: tuple[ObjectIdentifier, ...]
    renewable: bool
    policy_oid: ObjectIdentifier
    ocsp_no_check: bool = False
    with_revocation_pointers: bool = True


def _policy(n: int) -> ObjectIdentifier:
    return ObjectIdentifier(POLICY_ARC + str(n))


DEFAULT_PROFILES: dict[str, Profile] = {
    "factory": Profile(
        name="factory",
        issuer="factory",
        validity=dt.timedelta(days=365 * 20),
        key_usage=KeyUsageSpec(digital_signature=True),
        eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        renewable=False,
        policy_oid=_policy(1),
    ),
    "operational": Profile(
        name="operational",
        issuer="operational",
        validity=dt.timedelta(days=90),
        key_usage=KeyUsageSpec(digital_signature=True, key_agreement=True),
        eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        renewable=True,
        policy_oid=_policy(2),
    ),
    "service": Profile(
        name="service",
        issuer="service",
        validity=dt.timedelta(days=365),
        key_usage=KeyUsageSpec(digital_signature=True),
        eku=(ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH),
        renewable=True,
        policy_oid=_policy(3),
        with_revocation_pointers=False,
    ),
    "ocsp": Profile(
        name="ocsp",
        issuer="operational",
        validity=dt.timedelta(days=30),
        key_usage=KeyUsageSpec(digital_signature=True),
        eku=(ExtendedKeyUsageOID.OCSP_SIGNING,),
        renewable=True,
        policy_oid=_policy(4),
        ocsp_no_check=True,
        with_revocation_pointers=False,
    ),
}

#: profiles devices may hold
DEVICE_PROFILES = ("factory", "operational")


def get_profile(profiles: dict[str, Profile], name: str) -> Profile:
    try:
        return profiles[name]
    except KeyError:
        known = ", ".join(sorted(profiles))
        raise UnsupportedError(f"unknown profile {name!r}; known profiles: {known}", field="profile") from None


def key_usage_for_rsa(spec: KeyUsageSpec, is_rsa: bool) -> KeyUsageSpec:
    """RSA keys do key transport, not key agreement (RFC 5280 4.2.1.3)."""
    if is_rsa and spec.key_agreement:
        return KeyUsageSpec(
            digital_signature=spec.digital_signature,
            key_encipherment=True,
            key_cert_sign=spec.key_cert_sign,
            crl_sign=spec.crl_sign,
        )
    return spec
