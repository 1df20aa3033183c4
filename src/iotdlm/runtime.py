"""Wiring: from a deployment folder to running pieces (store, NATS server, bus connections, km).

The CLI and the demo call these; services get their seams (Clock, Bus, Store, Signer) here and
nowhere else. :func:`open_store` lives in :mod:`iotdlm.connections` and :func:`connect_identity`
in :mod:`iotdlm.client.connect` (one copy each, which pm's and cm's wiring share: neither may
import this module, it pulls in km).
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from iotdlm.bus.server import EmbeddedNatsServer, NatsServerConfig, NatsUser
from iotdlm.client.connect import connect_identity as connect_identity
from iotdlm.client.connect import km_trust as km_trust
from iotdlm.client.connect import sealer_for as sealer_for
from iotdlm.clock import Clock
from iotdlm.connections import open_store as open_store
from iotdlm.deployment import Deployment
from iotdlm.km import Km, KmSettings
from iotdlm.km.audit import Anchored, read_stream_heads
from iotdlm.km.cert_views import record_for
from iotdlm.km.ra import Authorizer
from iotdlm.km.va import ROOT, Va, VaSettings, ca_record
from iotdlm.pki.ca import IssuingCA, crl_partition
from iotdlm.pki.chain import load_certificate
from iotdlm.pki.keys import PrivateKey
from iotdlm.store import Store


def nats_server(dep: Deployment) -> EmbeddedNatsServer:
    """The embedded NATS server of a deployment: loopback only, one user per module identity."""
    users = [NatsUser(module=module, user=c.user, password=c.password) for module, c in dep.nats_users()]
    tls: dict[str, object] = {}
    if dep.config.nats.tls:
        cert, key, client_ca = dep.nats_tls_files
        tls = {"tls_cert": cert, "tls_key": key, "tls_ca": client_ca, "verify_clients": True}
    cfg = NatsServerConfig(
        port=dep.config.nats.port,
        host=dep.config.nats.host,
        users=users,
        jetstream_dir=dep.root / "nats" / "jetstream",
        **tls,  # type: ignore[arg-type]
    )
    # with TLS the server expects the handshake first and verifies clients: its greeting is read
    # with the supervisor's (modes) certificate
    client_tls = dep.client_tls(dep.identity("modes")) if dep.config.nats.tls else None
    return EmbeddedNatsServer(cfg, dep.root / "nats" / "nats.conf", client_tls=client_tls)


async def audit_stream_heads(dep: Deployment) -> tuple[list[Anchored], list[str]]:
    """The tree heads in the deployment's append-only audit stream, read as admin (``audit
    verify``), and what could not be read there. Raises :class:`~iotdlm.errors.UnavailableError`
    when NATS does not answer."""
    bus, _ident = await connect_identity(dep, "admin")
    try:
        return await read_stream_heads(bus)
    finally:
        await bus.close()


def km_identity(dep: Deployment) -> tuple[PrivateKey, x509.Certificate]:
    """km's service key and certificate: they sign its replies and audit checkpoints (ADR 0006)."""
    ident = dep.identity("km")
    return ident.key, ident.certificate


def load_root(dep: Deployment, passphrase: bytes | None) -> IssuingCA:
    """The root CA with its signer (decrypts ``ca/root.key.pem``, or finds it in the HSM): it signs
    the root's CRL."""
    cert = dep.ca_certificate("root")
    return IssuingCA(name=ROOT, certificate=cert, signer=dep.ca_signer(ROOT, passphrase), chain=(cert,))


def build_km(dep: Deployment, store: Store, clock: Clock, *, passphrase: bytes | None = None) -> Km:
    """km's core with its validation authority, from a deployment (decrypts the CA keys, the
    root's included: km signs the root's CRL of issuing-CA certificates)."""
    pw = passphrase if passphrase is not None or dep.key_ring is not None else dep.passphrase()
    cas = dep.load_cas(pw)
    profiles = dep.profiles()
    settings = VaSettings(
        urls=dep.public_urls, superseded_grace=dt.timedelta(seconds=dep.config.superseded_grace_seconds)
    )
    va = Va(cas=cas, profiles=profiles, store=store, clock=clock, settings=settings, root=load_root(dep, pw))
    return Km(
        cas=cas,
        profiles=profiles,
        store=store,
        clock=clock,
        settings=KmSettings(
            organization=dep.config.organization,
            urls=dep.public_urls,
            window=dep.request_window,
            est_proof_optional=dep.est_proof_optional(),
            serverkeygen=dep.config.est_serverkeygen,
        ),
        va=va,
        authorizer=Authorizer(name_rules=dep.name_rules()),
    )


def km_on_loop(dep: Deployment, store: Store) -> bool:
    """Whether ``km serve`` answers single requests on its event loop (ADR 0032): only when nothing
    they do can wait on the network -- the store a SQLite file, the CA keys in memory (no HSM)."""
    return store.backend == "sqlite" and dep.config.hsm is None


def record_identities(dep: Deployment, store: Store, now: dt.datetime) -> int:
    """Record the module service certificates init issued and the NATS server's (an auditor asks
    who issued what; revoking one puts it on the CRL partition its CRL distribution point names),
    and the issuing-CA certificates, as certificates of issuer ``root`` (so revoking one lists it on
    the root's CRL)."""
    certs = [(dep.identity(name).certificate, "service") for name in dep.identity_names()]
    nats_cert = dep.nats_tls_files[0]
    if nats_cert.is_file():
        certs.append((load_certificate(nats_cert.read_bytes()), "tls-server"))
    records = []
    for cert, profile in certs:
        if store.get_certificate("service", cert.serial_number) is None:
            partition = crl_partition(cert.serial_number, dep.config.crl_partitions) if _has_cdp(cert) else None
            records.append(record_for(cert, "service", profile, None, "init", now, crl_partition=partition))
    for cert in dep.issuing_ca_certificates().values():  # every generation (ADR 0026)
        if store.get_certificate(ROOT, cert.serial_number) is None:
            records.append(ca_record(cert, "init", now))
    store.add_certificates(records)
    return len(records)


def _has_cdp(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    except x509.ExtensionNotFound:
        return False
    return True
