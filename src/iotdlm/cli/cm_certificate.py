"""``iotdlm cm certificate``: re-issue cm's HTTPS certificate offline (registered on the ``cm`` group
by :mod:`iotdlm.cli.main`; it needs the CA keys, which cm itself never holds)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from rich.table import Table

from iotdlm import cm_https
from iotdlm.cli.common import console, data_option, handle_errors
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.store import Store


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


@click.command("certificate")
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
    cert = cm_https.issue_https_certificate(dep, cas, names=names, now=now)
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
