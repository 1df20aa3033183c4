"""The console's HTTPS: a server certificate of its own, and who may log in.

Only the deployment's admin client certificate (``DIR/modules/admin/cert.pem``, the identity the
CLI signs with) logs in: TLS checks that the browser's certificate chains to the deployment's root
through the service CA (anything else fails at the handshake), and :func:`check_admin` that it is
that very certificate, still valid -- so a module's stolen certificate (cm's, km's), which chains
just as well, is refused. A browser without a certificate gets a page saying what to import.

    DIR/console/https.pem       the console's certificate (profile tls-server), then the service CA
    DIR/console/https.key.pem   its private key (mode 0600)

The console issues its pair from the service CA the first time it starts (the CA passphrase is
needed once, as for km) and again when it has expired; `iotdlm console certificate` does it offline.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from iotdlm.cm_https import ServerCertificateError, https_profile, load_server_pair
from iotdlm.deployment import Deployment
from iotdlm.errors import RejectedError
from iotdlm.files import atomic_write
from iotdlm.pki import ca as pki_ca
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.keys import generate_key, private_key_to_pem

HTTPS_CERT = Path("console") / "https.pem"
HTTPS_KEY = Path("console") / "https.key.pem"


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER, lower-case hex (as the store keeps it)."""
    return hashlib.sha256(der).hexdigest()


def server_pair_ok(root: Path, now: dt.datetime) -> bool:
    """Whether ``root`` holds a console pair that can be served at ``now``."""
    cert, key = root / HTTPS_CERT, root / HTTPS_KEY
    if not cert.is_file() or not key.is_file():
        return False
    try:
        load_server_pair(cert.read_bytes(), key.read_bytes(), now=now, source=str(cert))
    except ServerCertificateError:
        return False
    return True


def issue_server_pair(dep: Deployment, now: dt.datetime) -> x509.Certificate:
    """Issue the console's HTTPS certificate from the service CA (needs the CA passphrase): it
    names ``localhost``, ``127.0.0.1`` and the configured ``[console] host``."""
    service = dep.load_cas()["service"]
    key = generate_key(dep.algorithm)
    ips = [ipaddress.ip_address("127.0.0.1")]
    host = ipaddress.ip_address(dep.config.console.host)
    if host not in ips and not host.is_unspecified:
        ips.append(host)
    cert = service.issue(
        https_profile(dep.profiles()),
        key.public_key(),
        pki_ca.ca_name("console", dep.config.organization),
        now=now,
        serial=x509.random_serial_number(),
        dns_names=["localhost"],
        ip_addresses=ips,
        urls=dep.public_urls,
    )
    (dep.root / HTTPS_CERT).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(dep.root / HTTPS_KEY, private_key_to_pem(key, None), mode=0o600)
    atomic_write(dep.root / HTTPS_CERT, certs_to_pem([cert, service.certificate]), mode=0o644)
    return cert


def server_context(dep: Deployment) -> ssl.SSLContext:
    """The console's TLS server side: its own pair; a client certificate is asked for and, when
    given, must chain to the deployment's root through the service CA (else the handshake fails)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(dep.root / HTTPS_CERT), str(dep.root / HTTPS_KEY))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # no certificate: a page that says what to do (check_admin)
    ctx.load_verify_locations(cadata=certs_to_pem([dep.ca_certificate("service"), dep.ca_certificate("root")]).decode())
    return ctx


class NotAdminError(RejectedError):
    """The browser gave no certificate, or one that is not the deployment's admin certificate."""

    code = "not_admin"


def check_admin(peer_der: bytes | None, admin: x509.Certificate, now: dt.datetime) -> None:
    """Raise :class:`NotAdminError` unless ``peer_der`` is the admin certificate, valid at ``now``."""
    if not peer_der:
        raise NotAdminError(
            "your browser sent no client certificate: import the deployment's admin certificate "
            "(`iotdlm console url --data DIR` says which files) and open the console again"
        )
    admin_der = admin.public_bytes(Encoding.DER)
    if fingerprint(peer_der) != fingerprint(admin_der):
        raise NotAdminError(
            "this client certificate is not the deployment's admin certificate: only the admin "
            "identity (DIR/modules/admin/cert.pem) may use the console"
        )
    if not admin.not_valid_before_utc <= now <= admin.not_valid_after_utc:
        raise NotAdminError(
            f"the admin certificate is not valid now (valid {admin.not_valid_before_utc:%Y-%m-%d} to "
            f"{admin.not_valid_after_utc:%Y-%m-%d}): renew it with `iotdlm ca renew`"
        )
