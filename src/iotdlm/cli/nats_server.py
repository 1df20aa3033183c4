"""``iotdlm nats``: the deployment's embedded NATS server, in the foreground."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from iotdlm.cli.common import console, data_option, handle_errors
from iotdlm.deployment import Deployment


@click.group()
def nats() -> None:
    """The embedded NATS server (loopback only, one user per module)."""


@nats.command("serve")
@data_option
@handle_errors
def nats_serve(data: Path) -> None:
    """Run the deployment's embedded NATS server in the foreground until interrupted."""
    from iotdlm.runtime import nats_server

    dep = Deployment.load(data)
    server = nats_server(dep)
    server.start()
    console.print(f"NATS listening on {server.url} (pid {server.pid}); Ctrl-C stops it")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()
