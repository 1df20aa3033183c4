"""cm's HTTPS certificate: the names it must carry, issuing it from the service CA, and checking an
operator-supplied one.

A device or operator that checks the host name (RFC 6125, RFC 7030 3.6.1, curl without ``-k``)
talks to cm at the deployment's public name, so cm's HTTPS certificate names that host (from the
deployment's ``public_url``), ``localhost`` and ``127.0.0.1`` (local tools), and any further names
the operator gives (``iotdlm init --cm-name``, ``iotdlm cm certificate --name``). It is a
certificate of its own, not cm's module identity (that one authenticates cm on the bus):

    DIR/modules/cm/https.pem        the certificate, then the issuing CA (the chain cm sends)
    DIR/modules/cm/https.key.pem    its private key (mode 0600)

``iotdlm init`` issues it with the service CA; ``iotdlm cm certificate`` re-issues it offline (the CA
passphrase is needed, as for ``ca issue``). ``cm serve --tls-cert/--tls-key`` takes a chain and key
from elsewhere (a public CA, say) instead; :func:`load_server_pair` refuses a pair cm could not
serve: key not matching, no serverAuth, expired or not yet valid.

Deliberately free of :mod:`iotdlm.deployment` at import time (deployment calls it at init).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotdlm.errors import BadRequestError, NotFoundError
from iotdlm.files import atomic_write
from iotdlm.pki.chain import load_certificates_pem
from iotdlm.pki.keys import PrivateKey, load_private_key_pem
from iotdlm.pki.profiles import Profile

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: where cm's issued HTTPS pair lives, under the deployment folder
HTTPS_CERT = Path("modules") / "cm" / "https.pem"
HTTPS_KEY = Path("modules") / "cm" / "https.key.pem"

#: always in the certificate: what local tools and the supervisor use
LOCAL_NAMES = ("localhost", "127.0.0.1")

#: the largest chain or key file cm reads (a chain of a few certificates is a few kB)
MAX_PEM_BYTES = 256 * 1024

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class ServerCertificateError(BadRequestError):
    """A server certificate or key cm cannot serve (wrong key, no serverAuth, expired, bad names)."""

    code = "server_certificate"


def parse_name(text: str, *, what: str = "name") -> str | IPAddress:
    """A host name for a subjectAltName: an IP address (v4 or v6, no zone) or a DNS name of
    letter-digit-hyphen labels (lowercased, one trailing dot dropped; internationalized names in
    their ``xn--`` form). ServerCertificateError otherwise, naming ``what``."""
    if not isinstance(text, str) or not text or len(text) > 253 + 1:
        raise ServerCertificateError(f"{what} must be a DNS name or an IP address of at most 253 characters")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise ServerCertificateError(f"{what} {text!r}: an IPv6 address with a zone cannot be in a certificate")
        return ip
    name = text[:-1] if text.endswith(".") else text
    labels = name.lower().split(".")
    if not name.isascii() or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        shown = text[:80].encode("unicode_escape").decode("ascii")
        raise ServerCertificateError(
            f"{what} {shown!r} is not a DNS name (letters, digits and hyphens in dot-separated labels; "
            "internationalized names in their xn-- form) nor an IP address"
        )
    if all(label.isdigit() for label in labels):
        raise ServerCertificateError(f"{what} {text[:80]!r} looks like an IP address but is not one")
    return name.lower()


def public_host(public_url: str) -> str | IPAddress:
    """The host of the deployment's public URL (where devices reach cm)."""
    try:
        host = urlsplit(public_url).hostname
    except ValueError as exc:
        raise ServerCertificateError(f"public URL {public_url[:200]!r} does not parse: {exc}") from None
    if not host:
        raise ServerCertificateError(f"public URL {public_url[:200]!r} names no host")
    return parse_name(host, what="the public URL's host")


def https_names(public_url: str, extra: Sequence[str] = ()) -> tuple[list[str], list[IPAddress]]:
    """(DNS names, IP addresses) of cm's HTTPS certificate: the public URL's host first, then
    ``localhost`` and ``127.0.0.1``, then ``extra``; each once."""
    wanted = [public_host(public_url), *(parse_name(n) for n in LOCAL_NAMES)]
    wanted += [parse_name(n, what="--cm-name / --name") for n in extra]
    dns: list[str] = []
    ips: list[IPAddress] = []
    for n in wanted:
        if isinstance(n, str):
            if n not in dns:
                dns.append(n)
        elif n not in ips:
            ips.append(n)
    return dns, ips


def https_profile(profiles: Mapping[str, Profile]) -> Profile:
    """The profile of cm's HTTPS certificate: ``tls-server`` (serverAuth only)."""
    return profiles["tls-server"]


def write_pair(root: Path, chain_pem: bytes, key_pem: bytes) -> None:
    """Write the pair under ``root`` (key 0600); each file replaced whole, key first."""
    for rel, data, mode in ((HTTPS_KEY, key_pem, 0o600), (HTTPS_CERT, chain_pem, 0o644)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, mode=mode)


def load_server_pair(
    chain_pem: bytes, key_pem: bytes, *, now: dt.datetime, source: str
) -> tuple[list[x509.Certificate], PrivateKey]:
    """Check a server chain (leaf first, PEM) and its unencrypted PEM key, as cm will serve them:
    the key matches the leaf, the leaf says serverAuth (extendedKeyUsage), and the leaf is valid
    at ``now``. ServerCertificateError naming ``source`` and what to do otherwise."""
    if len(chain_pem) > MAX_PEM_BYTES or len(key_pem) > MAX_PEM_BYTES:
        raise ServerCertificateError(f"{source}: certificate or key file larger than {MAX_PEM_BYTES} bytes")
    try:
        chain = load_certificates_pem(chain_pem)
    except BadRequestError as exc:
        raise ServerCertificateError(f"{source}: no PEM certificate in the certificate file") from exc
    try:
        key = load_private_key_pem(key_pem, None)
    except BadRequestError as exc:
        raise ServerCertificateError(
            f"{source}: the key file is not an unencrypted PEM private key ({exc.message})"
        ) from exc
    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if leaf.public_key().public_bytes(pem, spki) != key.public_key().public_bytes(pem, spki):
        raise ServerCertificateError(
            f"{source}: the private key does not belong to the certificate {leaf.subject.rfc4514_string()!r} "
            "(the first certificate of the file must be the server's own)"
        )
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    except ValueError as exc:
        raise ServerCertificateError(f"{source}: the certificate's extensions do not parse: {exc}") from exc
    if eku is None or ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise ServerCertificateError(
            f"{source}: the certificate {leaf.subject.rfc4514_string()!r} is not for TLS servers "
            "(its extendedKeyUsage lacks serverAuth)"
        )
    if now > leaf.not_valid_after_utc:
        raise ServerCertificateError(
            f"{source}: the certificate expired on {leaf.not_valid_after_utc.isoformat()}; "
            "renew it (`iotdlm cm certificate` for the one iotdlm issues)"
        )
    if now < leaf.not_valid_before_utc:
        raise ServerCertificateError(
            f"{source}: the certificate is not valid before {leaf.not_valid_before_utc.isoformat()}"
        )
    return chain, key


def load_issued_pair(root: Path, *, now: dt.datetime) -> tuple[list[x509.Certificate], PrivateKey]:
    """cm's HTTPS pair from ``root/modules/cm/`` (as :func:`load_server_pair` checks it)."""
    cert_path, key_path = root / HTTPS_CERT, root / HTTPS_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise NotFoundError(
            f"cm has no HTTPS certificate ({cert_path}): issue one with `iotdlm cm certificate --data {root}`, "
            "or serve an operator-supplied one with --tls-cert and --tls-key"
        )
    return load_server_pair(cert_path.read_bytes(), key_path.read_bytes(), now=now, source=str(cert_path))


def names_of(cert: x509.Certificate) -> tuple[list[str], list[IPAddress]]:
    """(DNS names, IP addresses) of a certificate's subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return [], []
    ips = [ip for ip in san.get_values_for_type(x509.IPAddress) if isinstance(ip, IPAddress)]
    return [n.lower() for n in san.get_values_for_type(x509.DNSName)], ips


def missing_public_host(cert: x509.Certificate, public_url: str) -> str | None:
    """The public URL's host if ``cert`` does not name it (exactly; wildcards are not matched), else None."""
    host = public_host(public_url)
    dns, ips = names_of(cert)
    if host in ips or host in dns:
        return None
    if isinstance(host, str) and "." in host and f"*.{host.split('.', 1)[1]}" in dns:
        return None
    return str(host)
