"""Certificate profiles: what a certificate of each kind looks like.

- **factory** -- the long-lived device identity (IEEE 802.1AR IDevID-like; seed 003 section VI-B):
  lives as long as the device, restricted usage: it only authenticates the device for enrollment.
  Subject serialNumber and an RFC 4108 hardwareModuleName in the SAN, beside the device URN.
- **operational** -- the device's day-to-day TLS client certificate: short-lived, renewable.
- **service** -- identities of our own modules (km, pm, sm, cm, admin, ...): TLS *client*
  authentication and request signing only.
- **tls-server** -- a TLS server certificate issued by the service CA (the embedded NATS server,
  cm's HTTPS): serverAuth only.
- **ocsp** -- the VA's delegated OCSP signing certificate (id-kp-OCSPSigning, ocsp-nocheck).

A profile sets validity, key usage, EKU, which issuing CA signs and its certificate policy; subject
and SAN come from the device id (or module name); AIA (OCSP, caIssuers) and CRL distribution points
from the deployment's public URL. Policies are ``1.3.6.1.4.1.<PEN>.1.<n>`` under the operator's
Private Enterprise Number (:mod:`iotdlm.pki.names`); the issuing CAs carry the policies of what they
issue, so ``openssl verify -explicit_policy`` holds.

Key usage follows the key type (:func:`key_usage_for`): RSA keys transport keys
(keyEncipherment), EC keys agree on them (keyAgreement), and Ed25519/Ed448 keys only sign
(RFC 8410 section 5 / RFC 9295 section 3).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from iotdlm.errors import UnsupportedError
from iotdlm.pki import names

#: the policy number of each profile under ``1.3.6.1.4.1.<PEN>.1``
PROFILE_POLICY_NUMBERS = {"factory": 1, "operational": 2, "service": 3, "ocsp": 4, "tls-server": 5}


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
    enterprise_number: int = names.DEFAULT_ENTERPRISE_NUMBER
    ocsp_no_check: bool = False
    with_revocation_pointers: bool = True
    #: an 802.1AR-style identity: RFC 4108 hardwareModuleName in the SAN
    hardware_module_name: bool = False

    def device_names(self, device_id: str, dtype: str | None = None) -> list[x509.GeneralName]:
        """The SAN of a device certificate of this profile (:func:`iotdlm.pki.names.device_names`)."""
        return names.device_names(
            device_id,
            enterprise_number=self.enterprise_number,
            dtype=dtype,
            hardware_module=self.hardware_module_name,
        )


def policy_oid(enterprise_number: int, profile: str) -> ObjectIdentifier:
    """The certificate policy of a profile: ``1.3.6.1.4.1.<PEN>.1.<n>``."""
    arc = names.enterprise_arc(enterprise_number)
    return ObjectIdentifier(f"{arc}.{names.POLICY_ARC}.{PROFILE_POLICY_NUMBERS[profile]}")


def profiles_for(enterprise_number: int) -> dict[str, Profile]:
    """The profiles of a deployment whose operator's PEN is ``enterprise_number``."""
    pen = names.check_enterprise_number(enterprise_number)

    return {
        "factory": Profile(
            name="factory",
            issuer="factory",
            validity=dt.timedelta(days=365 * 20),
            key_usage=KeyUsageSpec(digital_signature=True),
            eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            renewable=False,
            policy_oid=policy_oid(pen, "factory"),
            enterprise_number=pen,
            hardware_module_name=True,
        ),
        "operational": Profile(
            name="operational",
            issuer="operational",
            validity=dt.timedelta(days=90),
            key_usage=KeyUsageSpec(digital_signature=True, key_agreement=True),
            eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            renewable=True,
            policy_oid=policy_oid(pen, "operational"),
            enterprise_number=pen,
        ),
        "service": Profile(
            name="service",
            issuer="service",
            validity=dt.timedelta(days=365),
            key_usage=KeyUsageSpec(digital_signature=True),
            eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            renewable=True,
            policy_oid=policy_oid(pen, "service"),
            enterprise_number=pen,
        ),
        "tls-server": Profile(
            name="tls-server",
            issuer="service",
            validity=dt.timedelta(days=365),
            key_usage=KeyUsageSpec(digital_signature=True),
            eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
            renewable=True,
            policy_oid=policy_oid(pen, "tls-server"),
            enterprise_number=pen,
        ),
        "ocsp": Profile(
            name="ocsp",
            issuer="operational",
            validity=dt.timedelta(days=30),
            key_usage=KeyUsageSpec(digital_signature=True),
            eku=(ExtendedKeyUsageOID.OCSP_SIGNING,),
            renewable=True,
            policy_oid=policy_oid(pen, "ocsp"),
            enterprise_number=pen,
            ocsp_no_check=True,
            # RFC 6960 4.2.2.2.1: with ocsp-nocheck nobody checks its revocation
            with_revocation_pointers=False,
        ),
    }


#: the profiles under the default (documentation) PEN
DEFAULT_PROFILES: dict[str, Profile] = profiles_for(names.DEFAULT_ENTERPRISE_NUMBER)


def ca_policies(profiles: dict[str, Profile], ca: str) -> list[ObjectIdentifier]:
    """The certificate policies an issuing CA's certificate carries: those of the profiles it
    issues, and the OCSP responder's (every issuing CA has one)."""
    oids = {p.policy_oid for p in profiles.values() if p.issuer == ca or p.ocsp_no_check}
    return sorted(oids, key=lambda o: o.dotted_string)


#: profiles devices may hold
DEVICE_PROFILES = ("factory", "operational")


def get_profile(profiles: dict[str, Profile], name: str) -> Profile:
    try:
        return profiles[name]
    except KeyError:
        known = ", ".join(sorted(profiles))
        raise UnsupportedError(f"unknown profile {name!r}; known profiles: {known}", field="profile") from None


def key_usage_for(spec: KeyUsageSpec, public_key: object) -> KeyUsageSpec:
    """The key usage a profile's ``spec`` becomes for the certified key's type.

    - RSA: key transport, not key agreement (RFC 5280 4.2.1.3): keyAgreement becomes keyEncipherment.
    - EC (id-ecPublicKey): keyAgreement (ECDH) but never keyEncipherment (RFC 5480 section 3).
    - Ed25519 / Ed448: signature bits only -- digitalSignature, nonRepudiation, keyCertSign,
      cRLSign (RFC 8410 section 5, RFC 9295 section 3).
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        if spec.key_agreement:
            return dataclasses.replace(spec, key_agreement=False, key_encipherment=True)
        return spec
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return dataclasses.replace(spec, key_agreement=False, key_encipherment=False)
    return dataclasses.replace(spec, key_encipherment=False)
