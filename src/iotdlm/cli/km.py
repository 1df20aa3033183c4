"""``iotdlm km``: run a km worker (CA, RA and VA over NATS)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from iotdlm.cli.common import console, data_option, handle_errors, run
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment


@click.group()
def km() -> None:
    """km: certificate authority, registration authority and (later) validation authority."""


async def _serve_km(dep: Deployment) -> None:
    from iotdlm.km import KmService
    from iotdlm.km.service import Schedule
    from iotdlm.modes.guard import ModeGuard
    from iotdlm.modes.signed import ModeVerifier
    from iotdlm.runtime import build_km, connect_identity, open_store

    store = open_store(dep)
    kmcore = build_km(dep, store, SystemClock())
    bus, ident = await connect_identity(dep, "km")
    guard = ModeGuard(bus, ModeVerifier.for_deployment(dep))
    await guard.start()
    kmcore.mode = guard
    service = KmService(
        kmcore, bus, identity=(ident.key, ident.certificate), schedule=Schedule(), anchor_dir=dep.audit_anchor_dir,
        transfer_updates=dep.root / "transfer" / "updates",
    )  # fmt: skip
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console.print(f"km serving on {dep.nats_url}")
    await stop.wait()
    await service.stop()
    await guard.stop()
    await bus.drain()
    store.close()


@km.command("serve")
@data_option
@handle_errors
def km_serve(data: Path) -> None:
    """Run a km worker. Start several: they share the work through a NATS queue group."""
    run(_serve_km(Deployment.load(data)))
