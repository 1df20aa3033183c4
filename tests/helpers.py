"""Test helpers: an in-memory CA hierarchy and module identities, built with iotdlm.pki itself."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from iotdlm.client.km import KmTrust
from iotdlm.km import Km
from iotdlm.pki import ca as pki_ca
from iotdlm.pki import est_proof
from iotdlm.pki.keys import Algorithm, KeySigner, PrivateKey, check_public_key, generate_key, hash_for
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, module_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES, ca_policies
from iotdlm.wire import km as msg
from iotdlm.wire.envelope import Sealer
from iotdlm.wire.km import AUDIENCE, OP_EST, OP_EST_NONCE

NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
ORG = "Test Factory"
#: the public URLs the test CAs name (cm's paths)
URLS = pki_ca.PublicUrls("http://127.0.0.1:8080")


@dataclass
class Identity:
    name: str
    key: PrivateKey
    cert: x509.Certificate
    sealer: Sealer


@dataclass
class Pki:
    root: x509.Certificate
    cas: dict[str, pki_ca.IssuingCA]
    identities: dict[str, Identity] = field(default_factory=dict)

    def module(self, module: str, dtype: str | None = None, *, now: dt.datetime = NOW) -> Identity:
        name = f"{module}-{dtype}" if dtype else module
        if name not in self.identities:
            key = generate_key(Algorithm.P256)
            cert = self.cas["service"].issue(
                DEFAULT_PROFILES["service"],
                key.public_key(),
                pki_ca.ca_name(name, ORG),
                now=now,
                serial=x509.random_serial_number(),
                uris=[module_uri(module, dtype, enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
                ip_addresses=[ipaddress.ip_address("127.0.0.1")],
            )
            self.identities[name] = Identity(name, key, cert, Sealer(key, cert))
        return self.identities[name]

    def km_identity(self) -> tuple[PrivateKey, x509.Certificate]:
        """km's key and certificate: what signs its replies (ADR 0006), as ``iotdlm`` runs km."""
        km = self.module("km")
        return km.key, km.cert

    def km_trust(self) -> KmTrust:
        """What km's signed replies must chain to: this PKI's service CA."""
        return KmTrust(self.cas["service"].certificate)

    def tls_server(self, name: str, *, now: dt.datetime = NOW) -> Identity:
        """A TLS server certificate (profile ``tls-server``: serverAuth only) for localhost / 127.0.0.1."""
        key = generate_key(Algorithm.P256)
        cert = self.cas["service"].issue(
            DEFAULT_PROFILES["tls-server"],
            key.public_key(),
            pki_ca.ca_name(name, ORG),
            now=now,
            serial=x509.random_serial_number(),
            uris=[module_uri(name, enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
            dns_names=["localhost"],
            ip_addresses=[ipaddress.ip_address("127.0.0.1")],
            urls=URLS,
        )
        return Identity(name, key, cert, Sealer(key, cert))


def make_pki(alg: Algorithm = Algorithm.P256, *, now: dt.datetime = NOW) -> Pki:
    root_key = generate_key(alg)
    root_signer = KeySigner(root_key)
    root = pki_ca.make_root(root_signer, pki_ca.ca_name("Test Root CA", ORG), now=now, validity=dt.timedelta(days=3650))
    cas = {}
    for name in ("factory", "operational", "service"):
        key = generate_key(alg)
        cert = pki_ca.make_intermediate(
            root_signer,
            root,
            key.public_key(),
            pki_ca.ca_name(f"Test {name} CA", ORG),
            now=now,
            validity=dt.timedelta(days=3000),
            urls=URLS,
            policies=ca_policies(DEFAULT_PROFILES, name),
        )
        cas[name] = pki_ca.IssuingCA(name=name, certificate=cert, signer=KeySigner(key), chain=(cert, root))
    return Pki(root=root, cas=cas)


def make_csr(key: PrivateKey, cn: str | None) -> bytes:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(key, hash_for(key))
    return csr.public_bytes(serialization.Encoding.DER)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


__all__ = ["NOW", "ORG", "Identity", "Pki", "hashes", "make_csr", "make_pki", "pem", "proven_est"]


def proven_est(
    km: Km, cm_sealer: Sealer, now: dt.datetime, operation: str, key: PrivateKey, certificate: bytes, csr: bytes
) -> msg.EstResponse:
    """An EST request as cm relays it, called on km directly: a nonce for ``certificate``, then the
    request with the device's proof (ADR 0008) made with ``key`` (the certificate's key)."""
    asked = msg.EstNonceRequest(client_certificate=certificate)
    nonce = km.est_nonce(cm_sealer.seal(OP_EST_NONCE, asked, aud=AUDIENCE, now=now)).nonce
    new_key = check_public_key(x509.load_der_x509_csr(csr).public_key())
    proof = est_proof.make(key, operation, nonce, new_key)
    body = msg.EstRequest(operation=operation, client_certificate=certificate, csr=csr, proof=proof)
    return km.est(cm_sealer.seal(OP_EST, body, aud=AUDIENCE, now=now))
