"""A deployment's connections: its store, and NATS as one of its module identities.

One copy, shared by :mod:`iotdlm.runtime` (the wiring of km, the CLI and the demo) and
:mod:`iotdlm.pm.config` (pm's wiring, which may not import runtime: runtime pulls in km).
"""

from __future__ import annotations

from iotdlm.bus import Bus
from iotdlm.deployment import Deployment, ModuleIdentity
from iotdlm.store import Store


def open_store(dep: Deployment, *, migrate: bool = True) -> Store:
    """The deployment's store (its database URL), migrated to the current schema unless told not to."""
    return Store.open(dep.database_url, migrate=migrate)


async def connect_identity(dep: Deployment, name: str) -> tuple[Bus, ModuleIdentity]:
    """A NATS connection as the deployment's identity ``name`` (``km``, ``pm-<dtype>``, ``admin``
    ...), with its credentials and, when the deployment runs NATS over TLS, its client certificate."""
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
    )
    return bus, ident
