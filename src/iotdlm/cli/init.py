"""``iotdlm init``: create a deployment (root and issuing CAs, module identities, NATS credentials)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from iotdlm.cli.common import console, data_option, handle_errors
from iotdlm.clock import SystemClock
from iotdlm.deployment import PASSPHRASE_ENV, init_deployment
from iotdlm.errors import BadRequestError
from iotdlm.pki.keys import Algorithm
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER


@click.command()
@data_option
@click.option("--organization", default="iotdlm", show_default=True, help="Organization (O=) in every name.")
@click.option(
    "--algorithm",
    type=click.Choice([a.value for a in Algorithm]),
    default=Algorithm.P256.value,
    show_default=True,
    help="Key algorithm of the CAs and module identities.",
)
@click.option("--dtype", "dtypes", multiple=True, help="A device type to provision (one pm identity each). Repeatable.")
@click.option(
    "--public-url",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="Base URL where cm serves OCSP and CRLs (written into certificates).",
)
@click.option("--database-url", default=None, help="SQLAlchemy URL; default: SQLite under the data folder.")
@click.option(
    "--passphrase-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help=f"File holding the CA key passphrase (else ${PASSPHRASE_ENV}, else one is generated).",
)
@click.option("--nats-port", type=int, default=14222, show_default=True, help="Port of the embedded NATS server.")
@click.option("--nats-tls", is_flag=True, help="Embedded NATS over TLS; modules also present their certificates.")
@click.option(
    "--cm-name",
    "cm_names",
    multiple=True,
    metavar="NAME",
    help="A DNS name or IP address devices reach cm by, besides the --public-url host. Repeatable.",
)
@click.option(
    "--enterprise-number",
    type=int,
    default=DEFAULT_ENTERPRISE_NUMBER,
    show_default=True,
    help="Your IANA Private Enterprise Number: roots certificate policy OIDs and device URNs "
    "(urn:dev:org:<PEN>-<id>). The default is RFC 5612's documentation number: replace it with your own.",
)
@click.option(
    "--ca-key",
    metavar="PKCS11-URI",
    default=None,
    help="Make the CA keys in an HSM token instead of encrypted files: an RFC 7512 URI such as "
    "'pkcs11:token=iotdlm;object=site1' (object= prefixes the key labels). The PIN comes from "
    "$IOTDLM_HSM_PIN or a file (--hsm-pin-file, or ?pin-source=FILE in the URI), never from the command line.",
)
@click.option(
    "--hsm-module",
    default=None,
    metavar="PATH",
    help="The HSM's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so (or module-path= in the URI).",
)
@click.option(
    "--hsm-pin-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="File holding the HSM token's user PIN (else $IOTDLM_HSM_PIN).",
)
@handle_errors
def init(
    data: Path,
    organization: str,
    algorithm: str,
    dtypes: tuple[str, ...],
    public_url: str,
    database_url: str | None,
    passphrase_file: Path | None,
    nats_port: int,
    nats_tls: bool,
    cm_names: tuple[str, ...],
    enterprise_number: int,
    ca_key: str | None,
    hsm_module: str | None,
    hsm_pin_file: Path | None,
) -> None:
    """Create a deployment: root and issuing CAs, module identities, NATS credentials."""
    import os

    from iotdlm.deployment import hsm_settings

    hsm = None
    if ca_key is not None:
        if passphrase_file is not None:
            raise BadRequestError("--passphrase-file has no use with --ca-key: the CA keys are in the HSM")
        pin_file = str(hsm_pin_file.resolve()) if hsm_pin_file is not None else None
        hsm = hsm_settings(ca_key, module_path=hsm_module, pin_file=pin_file)
    elif hsm_module is not None or hsm_pin_file is not None:
        raise BadRequestError("--hsm-module and --hsm-pin-file go with --ca-key pkcs11:...")
    passphrase: bytes | None = None
    if passphrase_file is not None:
        passphrase = passphrase_file.read_bytes().strip()
    elif os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    clock = SystemClock()
    with console.status("creating deployment") as status:
        dep, _cas = init_deployment(
            data,
            organization=organization,
            algorithm=Algorithm(algorithm),
            dtypes=list(dtypes),
            public_url=public_url,
            passphrase=passphrase,
            database_url=database_url,
            nats_port=nats_port,
            nats_tls=nats_tls,
            cm_names=cm_names,
            enterprise_number=enterprise_number,
            hsm=hsm,
            now=clock.now(),
            progress=lambda m: status.update(f"creating {m}"),
        )
        from iotdlm.runtime import open_store, record_identities

        status.update("creating database")
        store = open_store(dep)
        record_identities(dep, store, clock.now())
        from iotdlm.cli.cm import record_https_certificate

        record_https_certificate(dep, store, clock.now(), actor="init")
        store.close()
    console.print(f"[green]deployment created[/green] in {data}")
    table = Table("identity", "certificate subject", "expires")
    for name in dep.identity_names():
        ident = dep.identity(name)
        table.add_row(
            name, ident.certificate.subject.rfc4514_string(), ident.certificate.not_valid_after_utc.date().isoformat()
        )
    console.print(table)
    if hsm is not None:
        console.print(f"The CA keys are in the HSM token: {', '.join(hsm.ca_keys.values())}")
    elif passphrase is None:
        console.print(
            f"[yellow]The CA passphrase was generated into {data / 'secrets' / 'ca-passphrase'}.[/yellow] "
            f"Move it offline and supply it through ${PASSPHRASE_ENV} when you run `iotdlm up`."
        )
    console.print(next_step(data))


def next_step(data: Path) -> str:
    """What to run after ``init``: the README's next step (the supervisor, in a mode)."""
    return (
        f"Next: `iotdlm up --data {data} --mode provisioning-certificate` starts NATS and the services "
        f"that mode runs; `iotdlm status --data {data}` shows them, `iotdlm down --data {data}` stops them."
    )
