"""A deployment's store connection: one copy, shared by :mod:`iotdlm.runtime` (the wiring of km,
the CLI and the demo) and :mod:`iotdlm.pm.config` (pm's wiring, which may not import runtime:
runtime pulls in km). NATS connections as a module identity are :mod:`iotdlm.client.connect`.
"""

from __future__ import annotations

from iotdlm.deployment import Deployment
from iotdlm.store import Store


def open_store(dep: Deployment, *, migrate: bool = True) -> Store:
    """The deployment's store (its database URL), migrated to the current schema unless told not to."""
    return Store.open(dep.database_url, migrate=migrate)
