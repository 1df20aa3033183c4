"""A module's connection to its deployment's bus: its NATS login, its request signer, and what
km's signed replies must chain to. Only the deployment folder, the bus and the clients: no km, no
store, so cm (which decides nothing) can connect without importing either."""

from __future__ import annotations

from iotdlm.bus import Bus
from iotdlm.client.km import KmTrust
from iotdlm.deployment import Deployment, ModuleIdentity
from iotdlm.pki.revocation import ServiceCrls
from iotdlm.wire.envelope import Sealer


async def connect_identity(dep: Deployment, name: str) -> tuple[Bus, ModuleIdentity]:
    """Connect to the deployment's NATS as identity ``name`` (its login, over TLS when configured)."""
    from iotdlm.bus.nats import connect  # nats-py only when a connection is made

    ident = dep.identity(name)
    bus = await connect(
        dep.nats_url,
        module=ident.module,
        user=ident.nats.user,
        password=ident.nats.password,
        name=f"iotdlm-{name}",
        tls=dep.client_tls(ident) if dep.config.nats.tls else None,
        allow_plain=dep.config.nats.allow_plain,
        tls_handshake_first=dep.config.nats.tls_handshake_first,
        jetstream_replicas=dep.config.nats.jetstream_replicas,
    )
    return bus, ident


def sealer_for(ident: ModuleIdentity) -> Sealer:
    return Sealer(ident.key, ident.certificate)


def km_trust(dep: Deployment) -> KmTrust:
    """What km's signed replies must chain to (ADR 0006): the deployment's service CA; and km's
    certificate must not be on that CA's CRL (fetched from km's VA, cached until its nextUpdate)."""
    ca = dep.ca_certificate("service")
    return KmTrust(ca, crls=ServiceCrls(ca, partitions=dep.config.crl_partitions))
