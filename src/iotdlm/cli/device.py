"""``iotdlm device``: revoke all of a device's certificates, decommission it (End-of-Life), or run a
simulated device on the network (``device run``)."""

from __future__ import annotations

from pathlib import Path

import click

from iotdlm.cli.common import console, data_option, handle_errors, run
from iotdlm.cli.fleet import drive, finish, loop_options, ready_devices, runner_for
from iotdlm.cli.revoke import REASONS_HELP, print_revoked, revoke
from iotdlm.deployment import Deployment


@click.group()
def device() -> None:
    """Device lifecycle: revoke a device's certificates, decommission it, or run a simulated device."""


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


@device.command("run")
@click.option(
    "--device",
    "device_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The device's folder (its flash); a blank device of --dtype is manufactured there when it holds none.",
)
@loop_options
@handle_errors
def device_run(
    device_dir: Path, cm: str | None, data: Path | None, dtype: str | None, once: bool, interval: float,
    renew_at: float, as_json: bool,
) -> None:  # fmt: skip
    """Run one simulated device on the network: enroll over EST, re-enroll on schedule, transfer.

    Without an operational certificate the device enrolls with its factory certificate; it
    re-enrolls once --renew-at of its certificate's lifetime has passed, each time for a new key
    pair made on it; it asks its cm for a transfer message (GET /transfer/message) and takes part
    in the transfer. Runs until Ctrl-C / SIGTERM, or one pass with --once.
    """
    from iotdlm.clock import SystemClock

    clock = SystemClock()
    if dtype is None and data is not None and not (device_dir / "hardware.json").is_file():
        dtype = Deployment.load(data).config.dtypes[0]
    (dev,) = ready_devices([device_dir], dtype=dtype, data=data, cm=cm, clock=clock)
    summary = run(drive([runner_for(dev, clock, renew_at=renew_at)], once=once, interval=interval, progress=False))
    finish(summary, as_json=as_json)
