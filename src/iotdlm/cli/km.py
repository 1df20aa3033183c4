"""``iotdlm km``: run a km worker (CA, RA and VA over NATS)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click

from iotdlm.cli.common import console, data_option, handle_errors, run
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment

if TYPE_CHECKING:
    from iotdlm.bus import Bus
    from iotdlm.bus.api import RequestHandler
    from iotdlm.km import Km
    from iotdlm.store import Store
    from iotdlm.transfer.peer_parts import PeerLimits


@click.group()
def km() -> None:
    """km: certificate, registration and validation authority (issue, refuse, revoke; CRLs and OCSP)."""


async def _serve_km(dep: Deployment) -> None:
    from iotdlm.km import KmService
    from iotdlm.km.service import Schedule
    from iotdlm.modes.guard import ModeGuard
    from iotdlm.modes.signed import ModeVerifier
    from iotdlm.observe import ModuleMetrics, Observer
    from iotdlm.observe.serve import InstrumentedBus
    from iotdlm.runtime import build_km, connect_identity, km_on_loop, open_store

    store = open_store(dep)
    kmcore = build_km(dep, store, SystemClock())
    metrics = ModuleMetrics("km")
    nats_bus, ident = await connect_identity(dep, "km")
    bus = InstrumentedBus(nats_bus, metrics)  # every request timed, refusals counted (docs/adr/0018)
    guard = ModeGuard(bus, ModeVerifier.for_deployment(dep))
    await guard.start()
    kmcore.mode = guard
    service = KmService(
        kmcore,
        bus,
        identity=(ident.key, ident.certificate),
        schedule=Schedule(),
        anchor_dir=dep.audit_anchor_dir,
        extra_routes=transfer_peer_routes(dep, store, kmcore, bus),
        transfer_updates=dep.root / "transfer" / "updates",
        metrics=metrics,
        on_loop=km_on_loop(dep, store),
    )
    await service.start()
    observer = Observer(bus, metrics, mode=guard)
    await observer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console.print(f"km serving on {dep.nats_url}")
    await stop.wait()
    await observer.stop()
    await service.stop()
    await guard.stop()
    await bus.drain()
    store.close()


def transfer_peer_routes(
    dep: Deployment, store: Store, kmcore: Km, bus: Bus, limits: PeerLimits | None = None
) -> dict[str, RequestHandler]:
    """SP1's provider-to-provider handlers (issue 13), when this deployment has a transfer identity;
    ``limits``: how much of an UpdateInfoList one reply carries (docs/adr/0019)."""
    from iotdlm.transfer.identity import load_identity, load_settings, transfer_dir
    from iotdlm.transfer.peer_handlers import PeerHandlers

    if not (transfer_dir(dep.root) / "identity" / "key.pem").is_file() or kmcore.va is None:
        return {}
    settings = load_settings(dep.root)
    return PeerHandlers(
        root=dep.root,
        store=store,
        identity=load_identity(dep.root),
        clock=kmcore.clock,
        va=kmcore.va,
        fallback_uri=settings.fallback_uri or "",
        publish=bus.publish,
        limits=limits,
    ).routes()


@km.command("serve")
@data_option
@handle_errors
def km_serve(data: Path) -> None:
    """Run a km worker. Start several: they share the work through a NATS queue group."""
    run(_serve_km(Deployment.load(data)))
