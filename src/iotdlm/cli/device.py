"""``iotdlm device``: revoke all of a device's certificates, or decommission it (End-of-Life)."""

from __future__ import annotations

from pathlib import Path

import click

from iotdlm.cli.common import console, data_option, handle_errors
from iotdlm.cli.revoke import REASONS_HELP, print_revoked, revoke
from iotdlm.deployment import Deployment


@click.group()
def device() -> None:
    """Device lifecycle: revoke all of a device's certificates, or decommission it (End-of-Life)."""


@device.command("revoke")
@data_option
@click.argument("device_id")
@click.option("--reason", default=None, help=REASONS_HELP)
@handle_errors
def device_revoke(data: Path, device_id: str, reason: str | None) -> None:
    """Revoke every certificate the device holds (it may still be provisioned again)."""
    revoked, how = revoke(Deployment.load(data), device_id=device_id, reason=reason)
    print_revoked(revoked, how)


@device.command("decommission")
@data_option
@click.argument("device_id")
@click.option("--reason", default="cessationOfOperation", show_default=True, help=REASONS_HELP)
@handle_errors
def device_decommission(data: Path, device_id: str, reason: str) -> None:
    """End-of-Life: revoke everything the device holds and retire it; km refuses it from then on."""
    revoked, how = revoke(Deployment.load(data), device_id=device_id, reason=reason, decommission=True)
    print_revoked(revoked, how)
    console.print(f"device {device_id} is retired")
