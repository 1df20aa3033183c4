"""``iotdlm fleet run``: many simulated devices in one process, each with its own keys and state on
disk, each speaking HTTPS to cm (EST enrollment, re-enrollment on schedule, trust transfer).

Also the pieces ``iotdlm device run`` shares: making a device ready (manufactured, a factory
certificate from the deployment's factory CA when it has none, its CA-URI), wiring its loop
(:class:`iotdlm.device.runner.DeviceRunner` with the transfer agent), and the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from iotdlm.cli.common import console, handle_errors, run
from iotdlm.clock import Clock, SystemClock
from iotdlm.device.runner import DEFAULT_RENEW_AT, DeviceRunner, TickReport, run_fleet
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import BadRequestError, NotFoundError
from iotdlm.pki.names import check_id

EXIT_FAILED = 4


# --- a device made ready ----------------------------------------------------------------------------------
def ready_devices(
    paths: Sequence[Path],
    *,
    dtype: str | None,
    data: Path | None,
    cm: str | None,
    clock: Clock,
    truststore_format: str = "pem",
) -> list[SimulatedDevice]:
    """Each folder a device: manufactured (id = folder name, keeping its certificates and
    truststore in ``truststore_format``) if blank, a key made on it, a factory certificate from the
    deployment ``data`` when it has none, ``cm`` as its CA-URI when given."""
    devices = []
    for path in paths:
        if not (path / "hardware.json").is_file():
            if dtype is None:
                raise BadRequestError(f"{path} holds no device: give --dtype to manufacture one there")
            check_id(path.name)
            SimulatedDevice.manufacture(path, path.name, dtype, truststore_format=truststore_format)
        dev = SimulatedDevice(path)
        if not dev.has_key():
            dev.generate_key()
        devices.append(dev)
    blank = [d for d in devices if d.certificate("factory") is None]
    if blank:
        if data is None:
            raise NotFoundError(
                f"device {blank[0].device_id} has no factory certificate: give --data DIR to have the "
                "deployment's factory CA issue one (the factory line), or provision it with pm"
            )
        factory_line(data, blank, clock)
    for dev in devices:
        if cm is not None:
            if not cm.startswith(("https://", "coap://")):
                raise BadRequestError(f"--cm {cm!r}: cm's URL must start with https:// (or coap:// for CoAP)")
            uri = cm.rstrip("/") if cm.startswith("coap://") else cm.rstrip("/") + "/.well-known/est"
            config = dev.config()
            config.update({"device_id": dev.device_id, "dtype": dev.dtype, "enroll_uri": uri})
            dev.write_config(config)
    return devices


def cm_credentials_from(path: Path | None, enroll_uri: object) -> dict[str, bytes] | None:
    """{cm's coap:// URI: its EDHOC credential} for constrained devices, or None (HTTPS)."""
    if path is None:
        return None
    import cbor2

    from iotdlm.wire.coap_est import ccs_public_key

    if not isinstance(enroll_uri, str) or not enroll_uri.startswith("coap://"):
        raise BadRequestError("--cm-credential is for devices that enroll over CoAP: give --cm coap://HOST:PORT")
    data = path.read_bytes()
    try:
        ccs_public_key(cbor2.loads(data))
    except (ValueError, cbor2.CBORDecodeError) as exc:
        raise BadRequestError(
            f"{path} is not cm's EDHOC credential (DIR/modules/cm/coap-edhoc-cred.cbor)", field="cm-credential"
        ) from exc
    return {enroll_uri.rstrip("/"): data}


def factory_line(data: Path, devices: Sequence[SimulatedDevice], clock: Clock) -> None:
    """The factory: each device's CSR (its device key, made on it) gets a factory certificate from
    the deployment's factory CA (RA rule ``operator``, as ``iotdlm ca issue``), all in one
    transaction; the truststore (root and issuing CAs, and the deployment's transfer certificate
    and its CA once ``transfer init`` made them) is flashed beside it."""
    from iotdlm.deployment import Deployment
    from iotdlm.km.ra import ModulePrincipal
    from iotdlm.pki.ca import fingerprint
    from iotdlm.pki.chain import load_certificate, load_certificates_pem
    from iotdlm.runtime import build_km, open_store
    from iotdlm.wire import km as msg

    dep = Deployment.load(data)
    # the issuing CAs /cacerts lists now (after a rotation: both during the overlap; ADR 0026)
    truststore = [dep.ca_certificate("root"), *dep.issuing_ca_certificates(clock.now()).values()]
    transfer_chain = data / "transfer" / "identity" / "chain.pem"
    if transfer_chain.is_file():  # `transfer init` made one: the per-device messages name it by x5t
        truststore += [c for c in load_certificates_pem(transfer_chain.read_bytes()) if c not in truststore]
    store = open_store(dep)
    try:
        km = build_km(dep, store, clock)
        principal = ModulePrincipal("admin", None, fingerprint(dep.identity("admin").certificate))
        pairs = []
        for dev in devices:
            item = msg.IssueItem(device_id=dev.device_id, profile="factory", csr=dev.make_csr())
            grant, rec, _left_out = km.prepare(principal, item, "issue")
            pairs.append((dataclasses.replace(grant, dtype=dev.dtype), rec))
        records = km.commit(pairs)
    finally:
        store.close()
    for dev, rec in zip(devices, records, strict=True):
        dev.write_certificate("factory", load_certificate(rec.der))
        dev.write_truststore(truststore)


# --- the loop, wired ---------------------------------------------------------------------------------------
def runner_for(
    dev: SimulatedDevice,
    clock: Clock,
    *,
    renew_at: float,
    timeout: float = 30.0,
    cm_credentials: Mapping[str, bytes] | None = None,
) -> DeviceRunner:
    """The device's loop with its transfer agent, every step over HTTPS: the transfer message and
    the fallback report at SP1's cm, attestation and the update at SP2's cm (raURI, updateURI),
    SP2's anchors (/cacerts) and EST with CA2 at the enrollURI -- all on the device's own
    :class:`~iotdlm.transfer.http_clients.DeviceHttps` (its TLS contexts and keep-alive connections
    of the pass, closed at the pass's end). With ``cm_credentials`` (a constrained device, ADR
    0029) enrollment, the transfer message and re-enrollment with CA2 go over CoAP/EDHOC/OSCORE to
    the cms whose EDHOC credential it holds, and so do the other transfer steps whose URI is
    ``coap://`` (attestation, the update, the fallback and refusal reports); others stay on HTTPS."""
    from iotdlm.device.coap_client import CoapEnroller, CoapMessages
    from iotdlm.device.runner import MessageSource
    from iotdlm.transfer.agent import DeviceAgent, Enroller
    from iotdlm.transfer.coap_clients import DeviceCoap
    from iotdlm.transfer.http_clients import DeviceHttps, DeviceMessages

    https = DeviceHttps(dev, timeout=timeout)
    enroller: Enroller = https
    messages: MessageSource = DeviceMessages(timeout=timeout, https=https)
    c509 = False
    if cm_credentials:
        c509 = dev.hardware.truststore_format == "c509"  # a constrained device: C509 on the wire
        enroller = CoapEnroller(cm_credentials, timeout=timeout, c509=c509)
        messages = CoapMessages(cm_credentials, timeout=timeout, c509=c509)
    steps: DeviceHttps | DeviceCoap = https
    if cm_credentials:  # coap:// URIs over CoAP with the cm credentials it holds, others on HTTPS
        steps = DeviceCoap(dev, cm_credentials, https=https, timeout=timeout, c509=c509)
    agent = DeviceAgent(
        dev,
        clock=clock,
        enroller=enroller,
        fallback=steps,
        attestation_client=steps,
        updates=steps,
        refusals=steps,
    )
    return DeviceRunner(
        dev, clock=clock, transfers=agent, messages=messages, renew_at=renew_at, timeout=timeout,
        connections=https, cm_credentials=cm_credentials,
    )  # fmt: skip


@dataclasses.dataclass
class Summary:
    devices: dict[str, TickReport] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, r: TickReport) -> None:
        self.devices[r.device_id] = r
        for a in r.actions:
            self.counts[a] = self.counts.get(a, 0) + 1
        if r.errors:
            self.counts["failed"] = self.counts.get("failed", 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": len(self.devices),
            "with_operational_certificate": sum(1 for r in self.devices.values() if r.serial),
            "counts": dict(sorted(self.counts.items())),
            "failed": {d: r.errors for d, r in sorted(self.devices.items()) if r.errors},
            "certificates": {
                d: {"serial": r.serial, "not_after": r.not_after, "issuer": r.issuer}
                for d, r in sorted(self.devices.items())
            },
        }


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Ctrl-C and SIGTERM call ``stop`` (the loops finish the passes under way) while inside."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


@contextlib.contextmanager
def progress_bar(shown: bool, total: int, label: str) -> Iterator[Callable[[], None]]:
    """A bar of devices through their first pass; yields what advances it by one."""
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=not shown, transient=False,
    )  # fmt: skip
    with bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


async def drive(
    runners: Sequence[DeviceRunner], *, once: bool, interval: float, progress: bool, concurrency: int = 32,
    label: str = "devices on the network",
) -> Summary:  # fmt: skip
    """Run the loops in this process (until Ctrl-C / SIGTERM unless ``once``), with a progress bar
    of first passes."""
    summary = Summary()
    stop = asyncio.Event()
    seen: set[str] = set()
    with stop_on_signals(stop.set), progress_bar(progress, len(runners), label) as advance:

        def on_tick(r: TickReport) -> None:
            summary.add(r)
            if r.device_id not in seen:
                seen.add(r.device_id)
                advance()

        await run_fleet(runners, once=once, interval=interval, stop=stop, on_tick=on_tick, concurrency=concurrency)
    return summary


def finish(summary: Summary, *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2, sort_keys=True))
    else:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items())) or "nothing to do"
        console.print(f"{len(summary.devices)} device(s): {counts}")
        for device_id, r in sorted(summary.devices.items()):
            for e in r.errors:
                console.print(f"[red]{device_id}[/red]: {e}", soft_wrap=True)
    if any(r.errors for r in summary.devices.values()):
        raise SystemExit(EXIT_FAILED)


def loop_options(f: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--cm",
                default=None,
                help="cm's HTTPS URL (https://host:port), or its CoAP door (coap://host:port, with "
                "--cm-credential): where the devices enroll.",
            ),
            click.option(
                "--cm-credential",
                type=click.Path(path_type=Path, dir_okay=False, exists=True),
                default=None,
                help="For a coap:// --cm: cm's EDHOC credential (its coap-edhoc-cred.cbor); the devices then "
                "enroll, re-enroll and fetch transfer messages over CoAP with EDHOC and OSCORE.",
            ),
            click.option(
                "--data",
                type=click.Path(path_type=Path, file_okay=False),
                default=None,
                help="A deployment folder: its factory CA issues factory certificates to devices that have none.",
            ),
            click.option("--dtype", default=None, help="Device type of devices manufactured here."),
            click.option("--once", is_flag=True, help="One pass per device, then a summary (else until Ctrl-C)."),
            click.option(
                "--interval",
                type=click.FloatRange(min=0.1),
                default=60.0,
                show_default=True,
                help="Seconds between passes.",
            ),
            click.option(
                "--renew-at",
                type=click.FloatRange(0.01, 0.99),
                default=DEFAULT_RENEW_AT,
                show_default="2/3",
                help="Re-enroll once this fraction of the operational certificate's lifetime has passed.",
            ),
            click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        ]
    ):
        f = option(f)
    return f


@click.group("fleet", context_settings={"help_option_names": ["-h", "--help"]})
def fleet() -> None:
    """A fleet of simulated devices on the network: enrollment, re-enrollment, trust transfer."""


@fleet.command("run")
@click.option("--count", type=click.IntRange(1, 100_000), required=True, help="How many devices.")
@click.option(
    "--fleet",
    "fleet_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("fleet"),
    show_default=True,
    help="Folder of the devices (one sub-folder each, made when missing).",
)
@click.option("--prefix", default="sim", show_default=True, help="Device ids are PREFIX-0000, PREFIX-0001, ...")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Processes the devices run in, each with its own share of them (default: one per 100 devices, "
    "at most one per CPU core; 1 runs them all in this process).",
)
@click.option(
    "--c509",
    is_flag=True,
    help="Manufacture constrained devices that keep their certificates and truststore in C509 (over "
    "coap:// they also send and ask for C509 certificates).",
)
@loop_options
@handle_errors
def fleet_run(
    count: int, fleet_dir: Path, prefix: str, workers: int | None, c509: bool, cm: str | None,
    cm_credential: Path | None, data: Path | None, dtype: str | None, once: bool, interval: float, renew_at: float,
    as_json: bool,
) -> None:  # fmt: skip
    """Run COUNT simulated devices, each speaking HTTPS to cm (spread over worker processes); with a
    coap:// --cm and --cm-credential, constrained devices speaking CoAP with EDHOC and OSCORE."""
    from iotdlm.cli.fleet_workers import FleetPlan, default_workers, run_devices

    clock = SystemClock()
    if dtype is None and data is not None:
        from iotdlm.deployment import Deployment

        dtype = Deployment.load(data).config.dtypes[0]
    paths = [fleet_dir / f"{prefix}-{i:04d}" for i in range(count)]
    fmt = "c509" if c509 else "pem"
    devices = ready_devices(paths, dtype=dtype, data=data, cm=cm, clock=clock, truststore_format=fmt)
    creds = cm_credentials_from(cm_credential, devices[0].config().get("enroll_uri"))
    plan = FleetPlan(renew_at=renew_at, once=once, interval=interval, cm_credentials=tuple((creds or {}).items()))
    n = workers if workers is not None else default_workers(count)
    summary = run(run_devices(paths, plan, workers=n, progress=not as_json))
    finish(summary, as_json=as_json)


__all__ = [
    "Summary",
    "cm_credentials_from",
    "drive",
    "finish",
    "fleet",
    "loop_options",
    "progress_bar",
    "ready_devices",
    "runner_for",
    "stop_on_signals",
]
