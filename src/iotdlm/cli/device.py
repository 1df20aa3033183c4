"""``iotdlm device``: revoke all of a device's certificates, decommission it (End-of-Life), or run a
simulated device on the network (``device run``)."""

from __future__ import annotations

from pathlib import Path

import click

from iotdlm.cli.common import console, data_option, handle_errors, run
from iotdlm.cli.fleet import cm_credentials_from, drive, finish, loop_options, ready_devices, runner_for
from iotdlm.cli.output import Column, iso_utc, json_option, print_json, print_table
from iotdlm.cli.revoke import REASONS_HELP, print_revoked, revoke
from iotdlm.deployment import Deployment
from iotdlm.errors import ConflictError, NotFoundError


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
    dep = Deployment.load(data)
    revoked, how = revoke(dep, device_id=device_id, reason=reason)
    if not revoked:
        _nothing_revoked(dep, device_id, "revoke")
        return
    print_revoked(revoked, how)


def _nothing_revoked(dep: Deployment, device_id: str, what: str) -> None:
    """Say why nothing was revoked: a retired device (exit 4), an unknown one (exit 4), or a device
    that holds no valid certificate (said, exit 0)."""
    from iotdlm.runtime import open_store

    store = open_store(dep)
    try:
        rec = store.get_device(device_id)
    finally:
        store.close()
    if rec is None:
        raise NotFoundError(
            f"no device {device_id!r} here (`iotdlm device list` lists them); nothing revoked", device_id=device_id
        )
    if rec.status == "retired":
        raise ConflictError(
            f"device {device_id} is retired (decommissioned {iso_utc(rec.updated_at)}): its certificates were "
            f"revoked then, nothing is left to {what}; `iotdlm ca list --device-id {device_id}` lists them",
            device_id=device_id,
        )
    console.print(f"device {device_id} holds no valid certificate: nothing to revoke")


@device.command("decommission")
@data_option
@click.argument("device_id")
@click.option("--reason", default="cessationOfOperation", show_default=True, help=REASONS_HELP)
@handle_errors
def device_decommission(data: Path, device_id: str, reason: str) -> None:
    """End-of-Life: revoke everything the device holds and retire it; km refuses it from then on."""
    dep = Deployment.load(data)
    revoked, how = revoke(dep, device_id=device_id, reason=reason, decommission=True)
    if revoked:
        print_revoked(revoked, how)
    console.print(f"device {device_id} is retired")


@device.command("list")
@data_option
@click.option("--dtype", default=None, help="Only this device type.")
@click.option("--status", type=click.Choice(["active", "retired"]), default=None, help="Only active or retired ones.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@json_option
@handle_errors
def device_list(data: Path, dtype: str | None, status: str | None, limit: int, offset: int, as_json: bool) -> None:
    """List the devices km knows (registered when first certified), by id."""
    from iotdlm.runtime import open_store

    store = open_store(Deployment.load(data))
    try:
        recs = store.list_devices(dtype=dtype, status=status, limit=limit, offset=offset)
    finally:
        store.close()
    if as_json:
        devices = [
            {"device_id": r.device_id, "dtype": r.dtype, "status": r.status, "registered_at": iso_utc(r.created_at),
             "updated_at": iso_utc(r.updated_at)}
            for r in recs
        ]  # fmt: skip
        print_json({"devices": devices, "offset": offset})
        return
    columns = (
        Column("device", whole=True), Column("dtype"), Column("status"),
        Column("registered", whole=True, drop=2), Column("last change", whole=True, drop=1),
    )  # fmt: skip
    rows = [[r.device_id, r.dtype, r.status, iso_utc(r.created_at) or "", iso_utc(r.updated_at) or ""] for r in recs]
    print_table(console, columns, rows)
    console.print(f"{len(recs)} device(s) shown")


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
    device_dir: Path, cm_credential: Path | None, cm: str | None, data: Path | None, dtype: str | None, once: bool,
    interval: float, renew_at: float, as_json: bool,
) -> None:  # fmt: skip
    """Run one simulated device on the network: enroll over EST, re-enroll on schedule, transfer.

    Without an operational certificate the device enrolls with its factory certificate; it
    re-enrolls once --renew-at of its certificate's lifetime has passed, each time for a new key
    pair made on it; it asks its cm for a transfer message (GET /transfer/message) and takes part
    in the transfer. Runs until Ctrl-C / SIGTERM, or one pass with --once. With a coap:// --cm and
    --cm-credential the device is a constrained one: CoAP with EDHOC and OSCORE instead of HTTPS.
    """
    from iotdlm.clock import SystemClock

    clock = SystemClock()
    if dtype is None and data is not None and not (device_dir / "hardware.json").is_file():
        dtype = Deployment.load(data).config.dtypes[0]
    (dev,) = ready_devices([device_dir], dtype=dtype, data=data, cm=cm, clock=clock)
    creds = cm_credentials_from(cm_credential, dev.config().get("enroll_uri"))
    runner = runner_for(dev, clock, renew_at=renew_at, cm_credentials=creds)
    summary = run(drive([runner], once=once, interval=interval, progress=False))
    finish(summary, as_json=as_json)
