"""``iotdlm console``: the operator console in a browser (serve it, say where it is, its certificate)."""

from __future__ import annotations

from pathlib import Path

import click

from iotdlm.cli.common import console as out
from iotdlm.cli.common import data_option, handle_errors, run
from iotdlm.cli.output import json_option, print_json
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment


@click.group("console")
def console() -> None:
    """The operator console in a browser: where it is, its HTTPS certificate, and the process itself."""


@console.command("url")
@data_option
@json_option
@handle_errors
def console_url(data: Path, as_json: bool) -> None:
    """Print where the console answers and which certificate logs in."""
    from iotdlm.console.service import url_of
    from iotdlm.console.tls import HTTPS_CERT

    dep = Deployment.load(data)
    admin = dep.root / "modules" / "admin"
    info = {
        "url": url_of(dep),
        "enabled": dep.config.console.enabled,
        "client_certificate": str(admin / "cert.pem"),
        "client_key": str(admin / "key.pem"),
        "server_ca": str(dep.root / "ca" / "root.pem"),
        "server_certificate": str(dep.root / HTTPS_CERT),
    }
    if as_json:
        print_json(info)
        return
    out.print(info["url"], soft_wrap=True)
    if not dep.config.console.enabled:
        out.print("the console is turned off ([console] enabled = false in iotdlm.toml)")
    out.print(
        f"log in with the admin client certificate {info['client_certificate']} and its key {info['client_key']} "
        f"(for a browser: openssl pkcs12 -export -in {info['client_certificate']} -inkey {info['client_key']} "
        f"-out admin.p12); the console's certificate is issued under {info['server_ca']}; "
        "`iotdlm up` starts the console",
        soft_wrap=True,
    )


@console.command("certificate")
@data_option
@handle_errors
def console_certificate(data: Path) -> None:
    """Issue the console's HTTPS certificate again from the service CA (needs the CA passphrase)."""
    from iotdlm.console.tls import HTTPS_CERT, issue_server_pair

    dep = Deployment.load(data)
    cert = issue_server_pair(dep, SystemClock().now())
    out.print(f"issued {dep.root / HTTPS_CERT} (serial {cert.serial_number:x}); restart the console to serve it")


@console.command("serve")
@data_option
@handle_errors
def console_serve(data: Path) -> None:
    """Serve the console (the supervisor runs this in every mode; run it by hand only for a test)."""
    from iotdlm.console.service import serve

    run(serve(Deployment.load(data), SystemClock()))
