"""``iotdlm cm``: run the communication module, and re-issue its HTTPS certificate offline.

``cm certificate`` needs the CA keys, which cm itself never holds: it lives here, not in cm/.
Also runnable on its own: ``python -m iotdlm.cli.cm serve --data DIR``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click
from rich.table import Table

from iotdlm import cm_https
from iotdlm.cli.common import console, data_option, handle_errors, run
from iotdlm.clock import SystemClock
from iotdlm.cm.config import CmConfig, CmFile, CoapConfig, EgressConfig, limits_from, load_cm_file
from iotdlm.cm.egress import parse_origin
from iotdlm.deployment import Deployment, issue_cm_https_certificate
from iotdlm.errors import BadRequestError, IotdlmError
from iotdlm.pki.keys import Algorithm

if TYPE_CHECKING:
    from iotdlm.store import Store


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cm() -> None:
    """cm: the only door to the outside -- EST, OCSP and CRLs in, sm's downloads out."""


@cm.command("serve")
@data_option
@click.option("--host", default=None, help="Address of the HTTPS and HTTP listeners.  [default: 127.0.0.1]")
@click.option("--https-port", type=int, default=None, help="EST, OCSP and CRLs over HTTPS.  [default: 8443]")
@click.option("--http-port", type=int, default=None, help="OCSP and CRLs over plain HTTP.  [default: 8080]")
@click.option("--no-http", is_flag=True, default=None, help="No plain-HTTP listener (OCSP and CRLs over HTTPS only).")
@click.option("--egress-host", default=None, help="Address of sm's egress proxy.  [default: 127.0.0.1]")
@click.option("--egress-port", type=int, default=None, help="Port of sm's egress proxy.  [default: 3128]")
@click.option(
    "--allow-origin",
    "allow_origins",
    multiple=True,
    metavar="URL",
    help="A repository origin sm may reach, e.g. https://repo.example.com. Repeatable; none: no egress proxy.",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="HTTPS certificate chain (PEM, cm's certificate first), e.g. from a public CA; with --tls-key. "
    "[default: DIR/modules/cm/https.pem, from `iotdlm init` / `iotdlm cm certificate`]",
)
@click.option(
    "--tls-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Unencrypted PEM private key of --tls-cert.",
)
@handle_errors
def serve(
    data: Path,
    host: str | None,
    https_port: int | None,
    http_port: int | None,
    no_http: bool | None,
    egress_host: str | None,
    egress_port: int | None,
    allow_origins: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Run cm in the foreground until interrupted (SIGINT/SIGTERM).

    Settings come from the flags, else from DIR/cm.toml (the supervisor starts cm with --data
    only), else from the defaults shown. cm refuses an HTTPS certificate whose key does not match,
    that lacks serverAuth, or that has expired.
    """
    file = load_cm_file(data)
    origins = tuple(allow_origins) or tuple(file.allow_origins)
    for origin in origins:
        try:
            parse_origin(origin)
        except ValueError as exc:
            raise BadRequestError(str(exc), field="allow-origin") from None
    dep = Deployment.load(data)
    egress = (
        EgressConfig(
            origins,
            host=_first(egress_host, file.egress_host, "127.0.0.1"),
            port=_first(egress_port, file.egress_port, 3128),
        )
        if origins
        else None
    )
    http_on = not no_http if no_http is not None else file.http
    if tls_cert is None and tls_key is None:
        tls_cert = data / file.tls_cert if file.tls_cert is not None else None  # absolute paths stay absolute
        tls_key = data / file.tls_key if file.tls_key is not None else None
    config = CmConfig(
        host=_first(host, file.host, "127.0.0.1"),
        https_port=_first(https_port, file.https_port, 8443),
        http_port=_first(http_port, file.http_port, 8080) if http_on else None,
        limits=limits_from(file.limits),
        egress=egress,
        csr_algorithm=Algorithm(dep.config.algorithm),
        tls_cert=tls_cert,
        tls_key=tls_key,
        coap=_coap_from(file, data, host),
    )
    run(_serve(dep, config))


def _coap_from(file: CmFile, data: Path, host: str | None) -> CoapConfig | None:
    """The CoAP door from cm.toml's ``coap_port`` (absent: off)."""
    if file.coap_port is None:
        return None
    key = data / file.coap_edhoc_key if file.coap_edhoc_key is not None else None
    return CoapConfig(host=_first(host, file.host, "127.0.0.1"), port=file.coap_port, edhoc_key=key)


_T = TypeVar("_T")


def _first(flag: _T | None, from_file: _T | None, default: _T) -> _T:
    if flag is not None:
        return flag
    return from_file if from_file is not None else default


async def _serve(dep: Deployment, config: CmConfig) -> None:
    from iotdlm.cm.service import CmService

    service = await CmService.from_deployment(dep, config)
    try:
        await service.start()
    except OSError as exc:  # a port in use, an address not on this machine
        raise IotdlmError(f"cm cannot listen: {exc.strerror or exc} (ports {_ports(config)})") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    urls = service.urls()
    console.print(f"cm serving EST, OCSP and CRLs on {urls['https']}")
    if "http" in urls:
        console.print(f"cm serving OCSP and CRLs on {urls['http']}")
    if "egress" in urls:
        console.print(f"cm egress proxy for sm on {urls['egress']}")
    else:
        console.print("cm egress: off (no --allow-origin)")
    try:
        await stop.wait()
    finally:
        await service.stop()


def _ports(config: CmConfig) -> str:
    ports = [f"https {config.https_port}"]
    if config.http_port is not None:
        ports.append(f"http {config.http_port}")
    if config.egress is not None:
        ports.append(f"egress {config.egress.port}")
    return ", ".join(ports)


def record_https_certificate(dep: Deployment, store: Store, now: dt.datetime, *, actor: str) -> bool:
    """Record cm's issued HTTPS certificate in the store (so ``ca list`` shows it, OCSP knows it
    and ``ca revoke`` can revoke it); False if it is already there or there is none."""
    from iotdlm.km.cert_views import record_for

    path = dep.root / cm_https.HTTPS_CERT
    if not path.is_file():
        return False
    chain, _key = cm_https.load_issued_pair(dep.root, now=now)
    cert = chain[0]
    profile = cm_https.https_profile(dep.profiles())
    if store.get_certificate(profile.issuer, cert.serial_number) is not None:
        return False
    store.add_certificates([record_for(cert, profile.issuer, profile.name, None, actor, now)])
    return True


@cm.command("certificate")
@data_option
@click.option(
    "--name",
    "names",
    multiple=True,
    metavar="NAME",
    help="A further DNS name or IP address devices reach cm by. Repeatable.",
)
@handle_errors
def certificate(data: Path, names: tuple[str, ...]) -> None:
    """Issue a new HTTPS certificate for cm with the service CA (offline: needs the CA passphrase).

    It names the host of the deployment's public URL, localhost, 127.0.0.1 and every --name, and
    replaces DIR/modules/cm/https.pem and https.key.pem. Names from an earlier certificate are not
    carried over: give them all again. Restart cm to serve it.
    """
    from iotdlm.runtime import open_store

    dep = Deployment.load(data)
    cm_https.https_names(dep.config.public_url, names)  # a bad name: refused before the CA keys are opened
    now = SystemClock().now()
    cas = list(dep.load_cas().values())
    cert = issue_cm_https_certificate(dep, cas, names=names, now=now)
    store = open_store(dep)
    try:
        record_https_certificate(dep, store, now, actor="admin")
    finally:
        store.close()
    dns, ips = cm_https.names_of(cert)
    table = Table("cm HTTPS certificate", "")
    table.add_row("names", ", ".join([*dns, *(str(ip) for ip in ips)]))
    table.add_row("serial", format(cert.serial_number, "x"))
    table.add_row("not after", cert.not_valid_after_utc.isoformat())
    table.add_row("files", f"{data / cm_https.HTTPS_CERT}, {data / cm_https.HTTPS_KEY}")
    console.print(table)
    console.print("Restart cm (`iotdlm cm serve`, or the supervisor) to serve it.")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cm()
