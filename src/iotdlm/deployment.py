"""A deployment: one data folder holding configuration, CA material, module identities and data.

Layout (``iotdlm init --data DIR`` creates it)::

    DIR/                            the data folder: mode 0700, like every folder init creates
    DIR/iotdlm.toml                 configuration (validated on load)
    DIR/ca/<name>.pem               CA certificates: root, factory, operational, service
    DIR/ca/<name>.key.pem           CA private keys, encrypted at rest (PKCS#8, passphrase); none when
                                    the CA keys are in an HSM ([hsm] ca_keys: PKCS#11 URIs, ADR 0025)
    DIR/ca/generations.json         after `ca rotate`: each issuing CA's generations (operational,
                                    operational-2, ...) and their overlap (iotdlm.pki.rotation)
    DIR/modules/<name>/cert.pem     service certificate of a module (km, sm, cm, admin, pm-<dtype>)
    DIR/modules/<name>/key.pem      its private key (mode 0600)
    DIR/modules/<name>/nats.json    its NATS credentials (mode 0600)
    DIR/modules/cm/https.pem        cm's HTTPS certificate + chain, and https.key.pem (iotdlm.cm_https)
    DIR/secrets/ca-passphrase       only when init generated the passphrase: move it offline (0600)
    DIR/db/iotdlm.db                SQLite store, 0600 (default; PostgreSQL by URL instead)
    DIR/nats/                       embedded NATS server config and JetStream data
    DIR/nats/server.pem             with --nats-tls: its server certificate (profile tls-server)
    DIR/logs/                       one log per service

The operator's IANA Private Enterprise Number (``enterprise_number``, default 32473: RFC 5612's
documentation number -- replace it with your own) roots the certificate policies and the device
and module URNs (:mod:`iotdlm.pki.names`). A configuration written before it existed loads with
the default.

The CA passphrase comes from ``$IOTDLM_CA_PASSPHRASE``, else from the file named by
``passphrase_file`` in the config, else from ``DIR/secrets/ca-passphrase``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import tomli_w
from cryptography import x509

from iotdlm import cm_https
from iotdlm.bus.cluster import check_replicas, server_urls
from iotdlm.bus.urls import check_nats_url
from iotdlm.errors import BadRequestError, NotFoundError
from iotdlm.files import atomic_write
from iotdlm.hsm.settings import HsmSettings, settings_for_init
from iotdlm.pki import ca as pki_ca
from iotdlm.pki import profile_config
from iotdlm.pki import rotation as pki_rotation
from iotdlm.pki.chain import certs_to_pem, load_certificate
from iotdlm.pki.keys import (
    Algorithm,
    KeySigner,
    PrivateKey,
    Signer,
    generate_key,
    load_private_key_pem,
    private_key_to_pem,
)
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, check_enterprise_number, check_id, module_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES, Profile, ca_policies, profiles_for

if TYPE_CHECKING:
    from iotdlm.hsm import ca_keys

PASSPHRASE_ENV = "IOTDLM_CA_PASSPHRASE"  # noqa: S105 -- the name of a variable, not a secret
CONFIG_FILE = "iotdlm.toml"
#: embedded NATS listens here by default (not 4222, which a system NATS may hold)
DEFAULT_NATS_PORT = 14222
#: the supervisor's /metrics listens here by default (loopback only)
DEFAULT_METRICS_PORT = 14290
#: the operator console listens here by default (loopback only unless [console] host says otherwise)
DEFAULT_CONSOLE_PORT = 8444
ISSUING_CAS = ("factory", "operational", "service")
GENERATIONS_FILE = "generations.json"
CA_NAMES = ("root", *ISSUING_CAS)
BASE_MODULES = ("km", "sm", "cm", "admin", "modes")
#: folders and secrets are the owner's alone
#: EST serverkeygen settings (ADR 0009): refused, key encrypted to the device, key in the clear
SERVERKEYGEN_MODES = ("off", "encrypted", "cleartext")
DIR_MODE = 0o700


class NatsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    #: an existing NATS server to use instead of the embedded one; a cluster: its nodes' URLs,
    #: separated by commas (ADR 0027)
    url: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_NATS_PORT
    tls: bool = False
    #: plain nats:// to a host that is not loopback (ADR 0007): only on a network you trust; every
    #: module logs a warning at each start
    allow_plain: bool = False
    #: over TLS, start with the TLS handshake (the embedded server expects it): an active attacker
    #: cannot strip TLS. ``false`` only for an external server without ``handshake_first`` in its
    #: tls block; every module logs a warning at each start
    tls_handshake_first: bool = True
    #: replicas of what the deployment keeps in JetStream (the mode bucket, the audit heads
    #: stream) when they are first made: 0 = 3 on a cluster of 3 or more nodes, else 1 (ADR 0027)
    jetstream_replicas: int = 0


class ConsoleSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    #: the operator console (HTTPS, the admin client certificate logs in; docs/adr/0030): the
    #: supervisor starts it in every mode unless this is false
    enabled: bool = True
    #: where it listens: loopback by default (reach it over an SSH tunnel); another address only on
    #: a network you trust -- the admin certificate is still required
    host: str = "127.0.0.1"
    #: its HTTPS port (`iotdlm console url` prints the address)
    port: int = DEFAULT_CONSOLE_PORT

    @property
    def url(self) -> str:
        """Where the console answers: ``https://127.0.0.1:8444/`` by default (a wildcard host: on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104 -- compared, not bound
        return f"https://{f'[{host}]' if ':' in host else host}:{self.port}/"


class ProfileSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    validity_days: int | None = None
    #: EST with a credential of this profile (factory: enroll, operational: re-enroll): "required"
    #: (default) -- the device proves it holds the credential's key (ADR 0008) -- or "optional":
    #: a request without the proof (plain curl) is accepted too; one with a bad proof never is
    est_proof: str = "required"
    #: RFC 5280 names (digitalSignature, keyEncipherment, keyAgreement); default: the built-in profile's
    key_usage: list[str] | None = None
    #: clientAuth, serverAuth, OCSPSigning; default: the built-in profile's
    extended_key_usage: list[str] | None = None
    #: let a profile other than tls-server carry serverAuth (refused unless set)
    allow_server_auth: bool = False
    #: a regular expression every device id of the profile must match in full (checked by the RA)
    device_id_pattern: str | None = None


class DeploymentConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    organization: str
    algorithm: str
    public_url: str
    dtypes: list[str]
    #: the operator's IANA Private Enterprise Number (policy OIDs, device URNs); 32473 is RFC 5612's
    #: documentation number: replace it with your own
    enterprise_number: int = DEFAULT_ENTERPRISE_NUMBER
    database_url: str | None = None
    passphrase_file: str | None = None
    request_window_seconds: int = 300
    #: CRLs per issuing CA; fixed for the life of the deployment (certificates name their partition)
    crl_partitions: int = 64
    #: how long a certificate superseded at re-enrollment stays good before OCSP and CRLs say
    #: revoked (reason superseded); docs/operations.md says why
    superseded_grace_seconds: int = 3600
    #: an absolute folder outside the data folder (and outside the database writer's reach) where km
    #: keeps a copy of every signed audit tree head; `audit verify` reads it (docs/operations.md)
    audit_anchor_dir: str | None = None
    nats: NatsSettings = NatsSettings()
    profiles: dict[str, ProfileSettings] = {}
    #: EST serverkeygen: "encrypted" (default: km encrypts the new private key to the key of the
    #: certificate the device presented, so cm relays only ciphertext; ADR 0009), "off", or
    #: "cleartext" (km sends the key back through cm unencrypted, so cm sees it; ADR 0008)
    est_serverkeygen: str = "encrypted"
    #: the supervisor's Prometheus /metrics, on 127.0.0.1 only (docs/adr/0018); 0 turns it off
    metrics_port: int = DEFAULT_METRICS_PORT
    #: CA keys in an HSM over PKCS#11 (ADR 0025; docs/operations.md, "CA keys in an HSM"): absent,
    #: the CA keys are the encrypted files under ca/
    hsm: HsmSettings | None = None
    #: the `[console]` table below
    console: ConsoleSettings = ConsoleSettings()

    def validate(self) -> None:
        try:
            Algorithm(self.algorithm)
        except ValueError:
            raise BadRequestError(
                f"algorithm {self.algorithm!r} is not one of {[a.value for a in Algorithm]}", field="algorithm"
            ) from None
        for d in self.dtypes:
            check_id(d, "dtype")
        check_enterprise_number(self.enterprise_number)
        if not 1 <= self.crl_partitions <= 4096:
            raise BadRequestError("crl_partitions must be between 1 and 4096", field="crl_partitions")
        if not 0 <= self.superseded_grace_seconds <= 30 * 86400:
            raise BadRequestError(
                "superseded_grace_seconds must be between 0 and 2592000 (30 days)", field="superseded_grace_seconds"
            )
        if self.audit_anchor_dir is not None and not Path(self.audit_anchor_dir).is_absolute():
            raise BadRequestError("audit_anchor_dir must be an absolute folder", field="audit_anchor_dir")
        if not self.public_url.startswith(("http://", "https://")):
            raise BadRequestError("public_url must start with http:// or https://", field="public_url")
        host = self.nats.host
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise BadRequestError("embedded NATS must listen on a loopback address", field="nats.host")
        except ValueError:
            if host != "localhost":
                raise BadRequestError(f"nats.host {host!r} is not an IP address", field="nats.host") from None
        if self.nats.url is not None:
            for url in server_urls(self.nats.url):
                check_nats_url(url, allow_plain=self.nats.allow_plain)
        check_replicas(self.nats.jetstream_replicas)
        for name, p in self.profiles.items():
            if name not in DEFAULT_PROFILES:
                known = ", ".join(DEFAULT_PROFILES)
                raise BadRequestError(f"profiles.{name}: unknown profile; use {known}", field=f"profiles.{name}")
            _configured_profile(DEFAULT_PROFILES[name], p)
            if p.device_id_pattern is not None:
                profile_config.device_id_rule(name, p.device_id_pattern)
            if p.est_proof not in ("required", "optional"):
                raise BadRequestError(
                    f"profiles.{name}.est_proof must be 'required' or 'optional'", field=f"profiles.{name}.est_proof"
                )
        if not 0 <= self.metrics_port <= 65535:
            raise BadRequestError("metrics_port must be between 0 (off) and 65535", field="metrics_port")
        if not 1 <= self.console.port <= 65535:
            raise BadRequestError("console.port must be between 1 and 65535", field="console.port")
        try:
            ipaddress.ip_address(self.console.host)
        except ValueError:
            shown = self.console.host[:80]
            raise BadRequestError(f"console.host {shown!r} is not an IP address", field="console.host") from None
        if self.est_serverkeygen not in SERVERKEYGEN_MODES:
            raise BadRequestError(
                "est_serverkeygen must be 'off', 'encrypted' or 'cleartext'", field="est_serverkeygen"
            )
        if self.hsm is not None:
            if self.algorithm == Algorithm.ED25519.value:
                raise BadRequestError("CA keys in an HSM: use ecdsa-p256, ecdsa-p384 or rsa-3072", field="algorithm")
            self.hsm.validate(CA_NAMES)


@dataclass(frozen=True)
class NatsCredentials:
    user: str
    password: str


@dataclass(frozen=True)
class ModuleIdentity:
    name: str  # directory name: km, sm, cm, admin, pm-<dtype>
    module: str  # role: km, sm, cm, admin, pm
    dtype: str | None
    key: PrivateKey
    certificate: x509.Certificate
    nats: NatsCredentials


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def identity_name(module: str, dtype: str | None = None) -> str:
    return f"{module}-{dtype}" if dtype else module


class Deployment:
    def __init__(self, root: Path, config: DeploymentConfig) -> None:
        self.root = root
        self.config = config
        self._key_ring: ca_keys.CaKeyRing | None = None

    # --- loading --------------------------------------------------------------------------
    @classmethod
    def load(cls, root: Path | str) -> Deployment:
        root = Path(root)
        path = root / CONFIG_FILE
        if not path.is_file():
            raise NotFoundError(f"no deployment at {root}: run `iotdlm init --data {root}` first")
        try:
            config = msgspec.toml.decode(path.read_bytes(), type=DeploymentConfig)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise BadRequestError(f"{path}: {exc}") from exc
        config.validate()
        return cls(root, config)

    @property
    def algorithm(self) -> Algorithm:
        return Algorithm(self.config.algorithm)

    @property
    def database_url(self) -> str:
        return self.config.database_url or f"sqlite:///{self.root / 'db' / 'iotdlm.db'}"

    @property
    def nats_url(self) -> str:
        n = self.config.nats
        if n.url:
            return n.url
        scheme = "tls" if n.tls else "nats"
        return f"{scheme}://{n.host}:{n.port}"

    @property
    def public_urls(self) -> pki_ca.PublicUrls:
        return pki_ca.PublicUrls(self.config.public_url, crl_partitions=self.config.crl_partitions)

    @property
    def audit_anchor_dir(self) -> Path | None:
        d = self.config.audit_anchor_dir
        return None if d is None else Path(d)

    @property
    def request_window(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.config.request_window_seconds)

    def profiles(self) -> dict[str, Profile]:
        """The built-in profiles under the operator's PEN, with the settings of ``[profiles.*]``."""
        out = profiles_for(self.config.enterprise_number)
        for name, p in self.config.profiles.items():
            out[name] = _configured_profile(out[name], p)
        return out

    def name_rules(self) -> dict[str, re.Pattern[str]]:
        """Per profile, the pattern its device ids must match (``device_id_pattern``), for the RA."""
        return {
            name: profile_config.device_id_rule(name, p.device_id_pattern)
            for name, p in self.config.profiles.items()
            if p.device_id_pattern is not None
        }

    def est_proof_optional(self) -> frozenset[str]:
        """Profiles whose EST requests may come without the device's proof (ADR 0008)."""
        return frozenset(name for name, p in self.config.profiles.items() if p.est_proof == "optional")

    def passphrase(self) -> bytes:
        env = os.environ.get(PASSPHRASE_ENV)
        if env:
            return env.encode()
        candidates = []
        if self.config.passphrase_file:
            candidates.append(Path(self.config.passphrase_file))
        candidates.append(self.root / "secrets" / "ca-passphrase")
        for c in candidates:
            if c.is_file():
                return c.read_bytes().strip()
        raise NotFoundError(
            f"no CA passphrase: set ${PASSPHRASE_ENV} or put it in the file named by passphrase_file in "
            f"{self.root / CONFIG_FILE}"
        )

    def ca_certificate(self, name: str) -> x509.Certificate:
        path = self.root / "ca" / f"{name}.pem"
        if not path.is_file():
            raise NotFoundError(f"CA certificate {path} is missing")
        return load_certificate(path.read_bytes())

    @property
    def key_ring(self) -> ca_keys.CaKeyRing | None:
        """The CA keys in an HSM (tokens opened once per Deployment object), or None: files."""
        if self.config.hsm is not None and self._key_ring is None:
            from iotdlm.hsm.ca_keys import CaKeyRing  # python-pkcs11: only where a CA key is used

            self._key_ring = CaKeyRing(self.config.hsm)
        return self._key_ring

    def ca_signer(self, name: str, passphrase: bytes | None = None) -> Signer:
        """CA ``name``'s signer: its key in the HSM, or its file decrypted with the passphrase
        (``passphrase`` or :meth:`passphrase`)."""
        ring = self.key_ring
        if ring is not None:
            return ring.signer(name)
        pw = passphrase if passphrase is not None else self.passphrase()
        return KeySigner(load_private_key_pem((self.root / "ca" / f"{name}.key.pem").read_bytes(), pw))

    def load_cas(self, passphrase: bytes | None = None) -> dict[str, pki_ca.IssuingCA]:
        """The issuing CAs with their signers (decrypts the CA keys, or finds them in the HSM)."""
        if passphrase is None and self.key_ring is None:
            passphrase = self.passphrase()
        root = self.ca_certificate("root")
        out: dict[str, pki_ca.IssuingCA] = {}
        for gen in self.ca_generations():
            name = gen.name
            cert = self.ca_certificate(name)
            signer = self.ca_signer(name, passphrase)
            out[name] = pki_ca.IssuingCA(name=name, certificate=cert, signer=signer, chain=(cert, root), generation=gen)
        return out

    def ca_generations(self) -> list[pki_rotation.Generation]:
        """Every generation of every issuing CA (one each until a rotation), from ``ca/generations.json``."""
        path = self.root / "ca" / GENERATIONS_FILE
        if not path.is_file():
            return pki_rotation.complete([], ISSUING_CAS)
        try:
            return pki_rotation.decode_generations(path.read_bytes(), ISSUING_CAS)
        except BadRequestError as exc:
            raise BadRequestError(f"{path}: {exc.message}; restore it from a backup") from exc

    def write_ca_generations(self, generations: Sequence[pki_rotation.Generation]) -> None:
        atomic_write(self.root / "ca" / GENERATIONS_FILE, pki_rotation.encode_generations(generations), mode=0o644)

    def issuing_ca_certificates(self, now: dt.datetime | None = None) -> dict[str, x509.Certificate]:
        """Issuing CA certificates by name, every generation (or, given ``now``, those /cacerts lists)."""
        return {g.name: self.ca_certificate(g.name) for g in self.ca_generations() if now is None or g.in_cacerts(now)}

    def identity_names(self) -> list[str]:
        d = self.root / "modules"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def identity(self, name: str) -> ModuleIdentity:
        d = self.root / "modules" / name
        if not d.is_dir():
            raise NotFoundError(f"no module identity {name!r} in {self.root}; known: {self.identity_names()}")
        key = load_private_key_pem((d / "key.pem").read_bytes(), None)
        cert = load_certificate((d / "cert.pem").read_bytes())
        creds = json.loads((d / "nats.json").read_text())
        module, _, dtype = name.partition("-")
        return ModuleIdentity(
            name=name,
            module=module,
            dtype=dtype or None,
            key=key,
            certificate=cert,
            nats=NatsCredentials(user=creds["user"], password=creds["password"]),
        )

    def nats_users(self) -> list[tuple[str, NatsCredentials]]:
        """(module role, credentials) for every identity, for the embedded server's config."""
        out = []
        for name in self.identity_names():
            creds = json.loads((self.root / "modules" / name / "nats.json").read_text())
            out.append((name.partition("-")[0], NatsCredentials(creds["user"], creds["password"])))
        return out

    # --- NATS over TLS (optional) ------------------------------------------------------------
    @property
    def nats_tls_files(self) -> tuple[Path, Path, Path]:
        """(server certificate, server key, client CA bundle) of the embedded NATS server."""
        d = self.root / "nats"
        return d / "server.pem", d / "server.key.pem", d / "client-ca.pem"

    def issue_nats_server_certificate(
        self, service_ca: pki_ca.IssuingCA, *, now: dt.datetime, addresses: Sequence[str] = ()
    ) -> x509.Certificate:
        """A loopback server certificate for NATS (profile ``tls-server``); clients must present
        their module certificates. ``addresses``: more IP addresses it names (the nodes of a
        cluster on loopback addresses, ADR 0027)."""
        key = generate_key(self.algorithm)
        cert = service_ca.issue(
            self.profiles()["tls-server"],
            key.public_key(),
            pki_ca.ca_name("nats", self.config.organization),
            now=now,
            serial=x509.random_serial_number(),
            uris=[module_uri("nats", enterprise_number=self.config.enterprise_number)],
            dns_names=["localhost"],
            ip_addresses=[ipaddress.ip_address(a) for a in ("127.0.0.1", *addresses)],
            urls=self.public_urls,
        )
        cert_path, key_path, ca_path = self.nats_tls_files
        _write_secret(key_path, private_key_to_pem(key, None))
        cert_path.write_bytes(certs_to_pem([cert, service_ca.certificate]))
        ca_path.write_bytes(certs_to_pem([service_ca.certificate, service_ca.root]))
        return cert

    def client_tls(self, ident: ModuleIdentity) -> ssl.SSLContext:
        """TLS context of a module connecting to NATS: trusts our root, presents the module certificate."""
        ctx = ssl.create_default_context(cafile=str(self.root / "ca" / "root.pem"))
        d = self.root / "modules" / ident.name
        ctx.load_cert_chain(str(d / "cert.pem"), str(d / "key.pem"))
        return ctx

    # --- adding identities ----------------------------------------------------------------
    def add_identity(
        self, module: str, dtype: str | None, *, service_ca: pki_ca.IssuingCA, now: dt.datetime
    ) -> ModuleIdentity:
        """A module identity: key, certificate (profile ``service``: TLS client authentication and
        request signing, with revocation pointers) and NATS credentials."""
        name = identity_name(module, dtype)
        key = generate_key(self.algorithm)
        cert = service_ca.issue(
            self.profiles()["service"],
            key.public_key(),
            pki_ca.ca_name(name, self.config.organization),
            now=now,
            serial=x509.random_serial_number(),
            uris=[module_uri(module, dtype, enterprise_number=self.config.enterprise_number)],
            urls=self.public_urls,
        )
        d = self.root / "modules" / name
        _write_secret(d / "key.pem", private_key_to_pem(key, None))
        (d / "cert.pem").write_bytes(certs_to_pem([cert]))
        creds = NatsCredentials(user=name, password=secrets.token_urlsafe(24))
        _write_secret(d / "nats.json", json.dumps({"user": creds.user, "password": creds.password}).encode())
        return ModuleIdentity(name=name, module=module, dtype=dtype, key=key, certificate=cert, nats=creds)


def _configured_profile(base: Profile, p: ProfileSettings) -> Profile:
    return profile_config.configure(
        base,
        validity_days=p.validity_days,
        key_usage_names=p.key_usage,
        extended_key_usage_names=p.extended_key_usage,
        allow_server_auth=p.allow_server_auth,
    )


def _make_folders(root: Path, passphrase: bytes | None, *, hsm: bool = False) -> bytes:
    """The deployment's private folders; the CA passphrase (a new one is written to
    ``secrets/ca-passphrase`` unless the operator gave one, or the CA keys go into an HSM)."""
    root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    root.chmod(DIR_MODE)  # also when the folder existed: it holds keys and the database
    for sub in ("ca", "modules", "db", "nats", "logs"):
        (root / sub).mkdir(exist_ok=True, mode=DIR_MODE)
        (root / sub).chmod(DIR_MODE)
    if hsm:
        return b""
    if passphrase is None:
        passphrase = secrets.token_urlsafe(32).encode()
        _write_secret(root / "secrets" / "ca-passphrase", passphrase + b"\n")
    return passphrase


def _new_ca_key(dep: Deployment, name: str, algorithm: Algorithm, passphrase: bytes) -> Signer:
    """A new key for CA ``name``: made in the HSM, or in memory and written encrypted to ``ca/``."""
    ring = dep.key_ring
    if ring is not None:
        return ring.generate(name, algorithm)
    key = generate_key(algorithm)
    _write_secret(dep.root / "ca" / f"{name}.key.pem", private_key_to_pem(key, passphrase))
    return KeySigner(key)


def _make_cas(
    dep: Deployment,
    algorithm: Algorithm,
    passphrase: bytes,
    *,
    now: dt.datetime,
    progress: Callable[[str], None],
) -> list[pki_ca.IssuingCA]:
    """The root CA and the issuing CAs (in ISSUING_CAS order), their keys written encrypted."""
    root = dep.root
    organization = dep.config.organization
    urls = dep.public_urls
    progress("root CA")
    root_signer = _new_ca_key(dep, "root", algorithm, passphrase)
    root_cert = pki_ca.make_root(
        root_signer,
        pki_ca.ca_name(f"{organization} Root CA", organization),
        now=now,
        validity=dt.timedelta(days=365 * 30),
        urls=urls,
    )
    (root / "ca" / "root.pem").write_bytes(certs_to_pem([root_cert]))

    cas: list[pki_ca.IssuingCA] = []
    lifetimes = {"factory": 365 * 25, "operational": 365 * 10, "service": 365 * 10}
    for name in ISSUING_CAS:
        progress(f"{name} CA")
        first = pki_rotation.Generation(name, 1)
        life = dt.timedelta(days=lifetimes[name])
        cas.append(new_issuing_ca(dep, name, first, root_signer, root_cert, passphrase, now=now, validity=life))
    return cas


def new_issuing_ca(
    dep: Deployment,
    role: str,
    generation: pki_rotation.Generation,
    root_signer: Signer,
    root_cert: x509.Certificate,
    passphrase: bytes,
    *,
    now: dt.datetime,
    validity: dt.timedelta,
) -> pki_ca.IssuingCA:
    """A new issuing CA of ``role`` (``init``, ``ca rotate``): a new key, its certificate signed by
    the root, both written to ``ca/<generation name>``. The one place CA keys are made."""
    organization = dep.config.organization
    name = generation.name
    suffix = "" if generation.number == 1 else f" {generation.number}"
    ring = dep.key_ring
    if ring is not None and name not in ring.settings.ca_keys:
        raise BadRequestError(
            f"the {name} CA's key goes into the HSM: add its PKCS#11 URI as [hsm] ca_keys.{name} in "
            f"iotdlm.toml (for example the {role} key's URI with another object=), then run this again",
            field=f"hsm.ca_keys.{name}",
        )
    signer = _new_ca_key(dep, name, dep.algorithm, passphrase)
    cert = pki_ca.make_intermediate(
        root_signer,
        root_cert,
        signer.public_key,
        pki_ca.ca_name(f"{organization} {role.capitalize()} CA{suffix}", organization),
        now=now,
        validity=validity,
        urls=dep.public_urls,
        policies=ca_policies(dep.profiles(), role),
    )
    (dep.root / "ca" / f"{name}.pem").write_bytes(certs_to_pem([cert]))
    return pki_ca.IssuingCA(name=name, certificate=cert, signer=signer, chain=(cert, root_cert), generation=generation)


def issue_cm_https_certificate(
    dep: Deployment, cas: Sequence[pki_ca.IssuingCA], *, names: Sequence[str] = (), now: dt.datetime
) -> x509.Certificate:
    """Issue cm's HTTPS certificate for ``dep`` (names: :func:`https_names`) with the issuing CA of
    the HTTPS profile, and write it with its chain and a new key to ``DIR/modules/cm/``."""
    dns, ips = cm_https.https_names(dep.config.public_url, names)
    profile = cm_https.https_profile(dep.profiles())
    issuer = next((ca for ca in cas if ca.name == profile.issuer), None)
    if issuer is None:
        raise NotFoundError(f"the {profile.issuer} CA is needed to issue cm's HTTPS certificate")
    key = generate_key(dep.algorithm)
    cn = dns[0] if dns and len(dns[0]) <= 64 else "cm"
    cert = issuer.issue(
        profile,
        key.public_key(),
        pki_ca.ca_name(cn, dep.config.organization),
        now=now,
        serial=x509.random_serial_number(),
        dns_names=dns,
        ip_addresses=ips,
        urls=dep.public_urls,
    )
    cm_https.write_pair(dep.root, certs_to_pem([cert, issuer.certificate]), private_key_to_pem(key, None))
    return cert


def init_deployment(
    root: Path | str,
    *,
    organization: str,
    algorithm: Algorithm,
    dtypes: list[str],
    public_url: str = "http://127.0.0.1:8080",
    passphrase: bytes | None = None,
    database_url: str | None = None,
    nats_port: int = DEFAULT_NATS_PORT,
    nats_tls: bool = False,
    cm_names: Sequence[str] = (),
    enterprise_number: int = DEFAULT_ENTERPRISE_NUMBER,
    metrics_port: int = DEFAULT_METRICS_PORT,
    hsm: HsmSettings | None = None,
    now: dt.datetime,
    progress: Callable[[str], None] = lambda _msg: None,
) -> tuple[Deployment, list[pki_ca.IssuingCA]]:
    """Create a deployment: root + issuing CAs, module identities, configuration.

    Returns the deployment and the issuing CAs (so the caller can record the service
    certificates it just issued). Refuses to overwrite an existing deployment. With ``hsm``
    (:func:`hsm_settings`) the CA keys are made in the token, and no passphrase is used.
    """
    root = Path(root)
    if (root / CONFIG_FILE).exists():
        raise BadRequestError(f"{root} already holds a deployment; choose an empty folder")
    config = DeploymentConfig(
        organization=organization,
        algorithm=algorithm.value,
        public_url=public_url,
        dtypes=list(dtypes),
        enterprise_number=enterprise_number,
        database_url=database_url,
        nats=NatsSettings(port=nats_port, tls=nats_tls),
        metrics_port=metrics_port,
        hsm=hsm,
    )
    config.validate()
    cm_https.https_names(public_url, cm_names)  # cm's HTTPS names, refused before anything is made
    passphrase = _make_folders(root, passphrase, hsm=hsm is not None)
    dep = Deployment(root, config)
    cas = _make_cas(dep, algorithm, passphrase, now=now, progress=progress)
    service_ca = cas[ISSUING_CAS.index("service")]

    for module in BASE_MODULES:
        progress(f"{module} identity")
        dep.add_identity(module, None, service_ca=service_ca, now=now)
    for dtype in dtypes:
        progress(f"pm identity for {dtype}")
        dep.add_identity("pm", dtype, service_ca=service_ca, now=now)

    progress("cm HTTPS certificate")
    issue_cm_https_certificate(dep, cas, names=cm_names, now=now)

    if nats_tls:
        progress("NATS server certificate")
        dep.issue_nats_server_certificate(service_ca, now=now)

    written = msgspec.to_builtins(config)
    written["enterprise_number"] = config.enterprise_number  # spelled out even when it is the default
    (root / CONFIG_FILE).write_bytes(tomli_w.dumps(written).encode())
    return dep, cas


def hsm_settings(ca_key: str, *, module_path: str | None = None, pin_file: str | None = None) -> HsmSettings:
    """``[hsm]`` for :func:`init_deployment` from ``iotdlm init --ca-key URI`` (ADR 0025)."""
    return settings_for_init(ca_key, CA_NAMES, module_path=module_path, pin_file=pin_file)
