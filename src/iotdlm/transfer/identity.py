"""A provider's transfer identity and settings, kept in its deployment folder (I/O shell).

Layout::

    DIR/transfer/transfer.toml      provider_id, fallback_uri, enroll_uri (validated on load)
    DIR/transfer/identity/key.pem   the transfer signing key (0600)
    DIR/transfer/identity/chain.pem its certificate (URI SAN urn:dev:org:<PEN>-module:transfer, issued by
                                    the deployment's service CA) followed by the service CA

The transfer identity signs everything this provider sends in a transfer: the UpdateInfoList (SP1),
the per-device messages (SP1; devices check the chain up to their truststore), the
TransferMessage and confirmations (SP2). It is NOT a NATS module identity (no bus user): it only
signs documents. Its certificate is what the peer provider pins in the agreement.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec
import tomli_w
from cryptography import x509

from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, ConflictError, NotFoundError
from iotdlm.pki import ca as pki_ca
from iotdlm.pki.chain import certs_to_pem, load_certificates_pem
from iotdlm.pki.keys import PrivateKey, generate_key, load_private_key_pem, private_key_to_pem
from iotdlm.pki.names import module_uri
from iotdlm.transfer import cose
from iotdlm.transfer.messages import check_uri
from iotdlm.transfer.trust import TRANSFER_MODULE, check_transfer_signer

SETTINGS_FILE = "transfer.toml"


class TransferSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    #: this provider's name in transfer messages (iss / aud), agreed with the peer
    provider_id: str
    #: SP1: where a device that fell back reports (its update server); also SP2's default fallback
    fallback_uri: str | None = None
    #: SP2: CA2's EST base (the CA-URI handed out at registration)
    enroll_uri: str | None = None

    def validate(self) -> None:
        if not self.provider_id or len(self.provider_id) > 255:
            raise BadRequestError("provider_id must be 1 to 255 characters", field="provider_id")
        for name in ("fallback_uri", "enroll_uri"):
            value = getattr(self, name)
            if value is not None:
                check_uri(value, name)


@dataclass(frozen=True)
class TransferIdentity:
    provider_id: str
    key: PrivateKey
    #: [transfer certificate, issuing CA, ...] up to (not including) the root
    chain: tuple[x509.Certificate, ...]

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    def signer(self, *, with_chain: bool) -> cose.CoseSigner:
        return cose.CoseSigner(self.key, self.chain, with_chain=with_chain)


def transfer_dir(root: Path) -> Path:
    return Path(root) / "transfer"


def load_settings(root: Path) -> TransferSettings:
    path = transfer_dir(root) / SETTINGS_FILE
    if not path.is_file():
        raise NotFoundError(f"no transfer settings at {path}: run `iotdlm transfer init --data {root}` first")
    try:
        settings = msgspec.toml.decode(path.read_bytes(), type=TransferSettings)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequestError(f"{path}: {exc}") from exc
    settings.validate()
    return settings


def save_settings(root: Path, settings: TransferSettings) -> Path:
    settings.validate()
    path = transfer_dir(root) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(msgspec.to_builtins(settings)).encode())
    return path


def load_identity(root: Path) -> TransferIdentity:
    settings = load_settings(root)
    d = transfer_dir(root) / "identity"
    if not (d / "key.pem").is_file():
        raise NotFoundError(f"no transfer identity in {d}: run `iotdlm transfer init --data {root}`")
    key = load_private_key_pem((d / "key.pem").read_bytes(), None)
    chain = tuple(load_certificates_pem((d / "chain.pem").read_bytes()))
    if not chain:
        raise BadRequestError(f"{d / 'chain.pem'} holds no certificate")
    check_transfer_signer(chain[0])
    return TransferIdentity(provider_id=settings.provider_id, key=key, chain=chain)


def create_identity(
    dep: Deployment,
    settings: TransferSettings,
    *,
    now: dt.datetime,
    passphrase: bytes | None = None,
    service_ca: pki_ca.IssuingCA | None = None,
) -> TransferIdentity:
    """Make the transfer signing key and its certificate (service CA, URI SAN
    ``urn:dev:org:<PEN>-module:transfer``) and write the settings. Refuses to replace an identity."""
    d = transfer_dir(dep.root) / "identity"
    if (d / "key.pem").exists():
        raise ConflictError(f"{d} already holds a transfer identity")
    ca = service_ca if service_ca is not None else dep.load_cas(passphrase)["service"]
    key = generate_key(dep.algorithm)
    cert = ca.issue(
        dep.profiles()["service"],
        key.public_key(),
        pki_ca.ca_name(f"{settings.provider_id} transfer", dep.config.organization),
        now=now,
        serial=x509.random_serial_number(),
        uris=[module_uri(TRANSFER_MODULE, enterprise_number=dep.config.enterprise_number)],
        urls=dep.public_urls,
    )
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_to_pem(key, None))
    chain = (cert, *ca.chain[:-1])
    (d / "chain.pem").write_bytes(certs_to_pem(chain))
    save_settings(dep.root, settings)
    return TransferIdentity(provider_id=settings.provider_id, key=key, chain=chain)
