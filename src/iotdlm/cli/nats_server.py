"""``iotdlm nats``: the deployment's embedded NATS server, in the foreground, and the route
certificates of a NATS cluster's nodes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import click
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotdlm import cm_https
from iotdlm.cli.common import console, data_option, handle_errors
from iotdlm.cli.output import print_json
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError
from iotdlm.files import atomic_write
from iotdlm.pki.ca import IssuingCA, ca_name
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.keys import generate_key, private_key_to_pem


@click.group()
def nats() -> None:
    """The embedded NATS server (loopback only, one user per module), and a NATS cluster's route certificates."""


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


# --- route certificates for a NATS cluster (ADR 0027) ------------------------------------------------
#: what a node name may be (JetStream names its peers by it): as a device id
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def route_names(node: str, names: Sequence[str]) -> list[str | cm_https.IPAddress]:
    """``names`` parsed (DNS names, IP addresses), after ``node`` is checked: refused with a
    BadRequestError before any CA key is opened."""
    if not _NODE.fullmatch(node):
        raise BadRequestError(
            f"node {node[:80]!r} is not a node name: 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
            field="node",
        )
    try:
        parsed = [cm_https.parse_name(n, what="--name") for n in names]
    except cm_https.ServerCertificateError as exc:
        raise BadRequestError(exc.message, field="name") from None
    if not parsed:
        raise BadRequestError("give the address the other nodes dial this node by: --name", field="name")
    return parsed


def issue_route_certificate(
    dep: Deployment,
    issuer: IssuingCA,
    node: str,
    names: Sequence[str],
    *,
    now: dt.datetime,
    record: Callable[[x509.Certificate], None] | None = None,
) -> tuple[x509.Certificate, Path, Path]:
    """A route certificate for the cluster node ``node`` from the service CA ``issuer``: the names the
    other nodes dial it by (DNS names or IP addresses, in its subjectAltName), serverAuth (it answers
    their routes) and clientAuth (it dials them, and they verify it). Written with its chain to
    ``DIR/nats/route-NODE.pem`` and its new key to ``route-NODE.key.pem`` (0600), after ``record``
    (the store) took it: no file of a certificate the store does not know. Returns the certificate
    and the two paths."""
    parsed = route_names(node, names)
    profile = dataclasses.replace(
        dep.profiles()["tls-server"], eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    key = generate_key(dep.algorithm)
    cert = issuer.issue(
        profile, key.public_key(), ca_name(f"nats-route-{node}", dep.config.organization), now=now,
        serial=x509.random_serial_number(), dns_names=[n for n in parsed if isinstance(n, str)],
        ip_addresses=[n for n in parsed if not isinstance(n, str)], urls=dep.public_urls,
    )  # fmt: skip
    if record is not None:
        record(cert)
    folder = dep.root / "nats"
    cert_path, key_path = folder / f"route-{node}.pem", folder / f"route-{node}.key.pem"
    atomic_write(key_path, private_key_to_pem(key, None), mode=0o600)
    atomic_write(cert_path, certs_to_pem([cert, issuer.certificate]), mode=0o644)
    return cert, cert_path, key_path


@nats.command("route-certificate")
@data_option
@click.option("--node", required=True, help="The node's name in the cluster (its file names; JetStream's peer name).")
@click.option(
    "--name",
    "names",
    multiple=True,
    required=True,
    metavar="ADDRESS",
    help="A DNS name or IP address the other nodes dial this node's route port by. Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the files and the certificate's facts as JSON.")
@handle_errors
def route_certificate(data: Path, node: str, names: tuple[str, ...], as_json: bool) -> None:
    """Issue a route certificate for one node of a NATS cluster with the service CA (offline: needs
    the CA passphrase, or the HSM's PIN).

    The routes between the nodes carry every module's messages: each node presents this certificate
    and checks the others' against DIR/nats/route-ca.pem (the service CA and the root, written too).
    It is recorded like every certificate the CAs issue (`ca list`, `ca revoke`). Run it once per
    node, then copy the node's two files to it; docs/operations.md, "TLS on the cluster routes",
    shows the `cluster { tls {...} }` block they go in.
    """
    from iotdlm.km.cert_views import record_for
    from iotdlm.runtime import open_store

    dep = Deployment.load(data)
    route_names(node, names)  # a bad node or name: refused before the CA keys are opened
    now = SystemClock().now()
    store = open_store(dep)  # an unreachable database: refused before anything is issued
    try:
        issuer = dep.load_cas()[dep.profiles()["tls-server"].issuer]
        actor = "admin (nats route-certificate)"
        cert, cert_path, key_path = issue_route_certificate(
            dep, issuer, node, names, now=now,
            record=lambda c: store.add_certificates([record_for(c, issuer.name, "tls-server", None, actor, now)]),
        )  # fmt: skip
    finally:
        store.close()
    ca_path = dep.root / "nats" / "route-ca.pem"
    atomic_write(ca_path, certs_to_pem([issuer.certificate, dep.ca_certificate("root")]), mode=0o644)
    facts = {
        "node": node, "serial": format(cert.serial_number, "x"), "not_after": cert.not_valid_after_utc.isoformat(),
        "names": list(names), "cert_file": str(cert_path), "key_file": str(key_path), "ca_file": str(ca_path),
    }  # fmt: skip
    if as_json:
        print_json(facts)
        return
    console.print(
        f"route certificate for node {node} ({', '.join(names)}), serial {facts['serial']}, until {facts['not_after']}"
    )
    console.print(
        f'in node {node}\'s nats.conf: cluster {{ tls {{ cert_file: "{cert_path}"  key_file: "{key_path}"  '
        f'ca_file: "{ca_path}"  verify: true }} }}'
    )
