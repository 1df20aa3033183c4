"""TLS on the routes between NATS cluster nodes (ADR 0027): ``ClusterConfig``'s ``tls`` block makes
nats-server verify both sides of every route, so a node whose route certificate does not chain to
the cluster's CA is kept out even though it knows the route password."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotdlm.bus.server import ClusterConfig, EmbeddedNatsServer, NatsServerConfig, free_port
from iotdlm.cli.main import main
from iotdlm.cli.nats_server import issue_route_certificate
from iotdlm.clock import SystemClock
from iotdlm.deployment import PASSPHRASE_ENV, init_deployment
from iotdlm.errors import UnavailableError
from iotdlm.pki.keys import Algorithm
from iotdlm.runtime import open_store

pytestmark = [pytest.mark.nats, pytest.mark.real_clock]  # nats-server checks validity on the real clock

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    host: str | None = None,
) -> x509.Certificate:  # fmt: skip
    now = SystemClock().now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if host is None:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    else:
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(*objs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in objs)


def _routes(node: EmbeddedNatsServer) -> set[str]:
    """The names of the nodes ``node`` holds a route to (its /routez)."""
    cfg = node.config
    with urllib.request.urlopen(f"http://{cfg.host}:{cfg.http_port}/routez", timeout=5) as r:
        routez = msgspec.json.decode(r.read())
    return {str(route.get("remote_name")) for route in routez.get("routes") or []}


def _until(check: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not (check() if callable(check) else check):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _n2_kept_out(tmp_path: Path, pairs: list[tuple[Path, Path]], ca: Path) -> None:
    """Three nodes on HOSTS, node i routing with the certificate and key ``pairs[i]``, each checking the
    others against ``ca``: n0 and n1 hold a route to each other, n2's route handshake fails and no
    node holds a route to it."""
    port, cluster_port = free_port(), free_port()
    nodes = []
    for i, host in enumerate(HOSTS):
        cluster = ClusterConfig(
            name="t", node=f"n{i}", host=host, port=cluster_port, route_password="known-to-all",
            routes=[f"{other}:{cluster_port}" for other in HOSTS if other != host],
            tls_cert=pairs[i][0], tls_key=pairs[i][1], tls_ca=ca,
        )  # fmt: skip
        cfg = NatsServerConfig(port=port, host=host, http_port=free_port(), cluster=cluster)
        nodes.append(EmbeddedNatsServer(cfg, tmp_path / f"n{i}.conf"))
    try:
        for node in nodes:
            node.start()
        _until(lambda: "n1" in _routes(nodes[0]) and "n0" in _routes(nodes[1]), 30, "the route between n0 and n1")
        _until(lambda: "handshake error" in nodes[2].stderr_tail(), 30, "n2's TLS route handshake to fail")
        assert _routes(nodes[2]) == set(), nodes[2].stderr_tail()
        assert "n2" not in _routes(nodes[0]) | _routes(nodes[1])
    finally:
        for node in nodes:
            node.stop()


def test_routes_verify_both_sides_and_keep_out_a_node_of_another_ca(tmp_path: Path) -> None:
    ca_key, foreign_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("route CA", ca_key, None)
    foreign = _cert("foreign CA", foreign_key, None)
    (tmp_path / "ca.pem").write_bytes(_pem(ca))
    for i, host in enumerate(HOSTS):
        issuer_cert, issuer_key = (foreign, foreign_key) if i == 2 else (ca, ca_key)
        key = ec.generate_private_key(ec.SECP256R1())
        (tmp_path / f"n{i}.pem").write_bytes(_pem(_cert(f"n{i}", key, (issuer_cert.subject, issuer_key), host)))
        (tmp_path / f"n{i}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    pairs = [(tmp_path / f"n{i}.pem", tmp_path / f"n{i}.key") for i in range(len(HOSTS))]
    _n2_kept_out(tmp_path, pairs, tmp_path / "ca.pem")


def test_route_certificates_issued_by_the_cli_join_a_cluster_and_a_foreign_ones_do_not(tmp_path: Path) -> None:
    """`iotdlm nats route-certificate` for each node: two nodes of the deployment route to each other
    over TLS; a node with a route certificate from another deployment's service CA is kept out."""
    deps = [
        init_deployment(
            tmp_path / name, organization="T", algorithm=Algorithm.P256, dtypes=["board-a"], passphrase=b"pw",
            nats_port=free_port(), now=SystemClock().now(),
        )[0]
        for name in ("site", "other")
    ]  # fmt: skip
    runner = CliRunner(env={PASSPHRASE_ENV: "pw"})
    issued = []
    for i, host in enumerate(HOSTS):
        root = deps[1 if i == 2 else 0].root
        r = runner.invoke(main, ["nats", "route-certificate", "--data", str(root), "--node", f"n{i}", "--name", host,
                                 "--name", f"n{i}.cluster.example", "--json"])  # fmt: skip
        assert r.exit_code == 0, r.output
        issued.append(json.loads(r.stdout))
    facts = issued[0]
    assert Path(facts["key_file"]).stat().st_mode & 0o777 == 0o600
    chain = x509.load_pem_x509_certificates(Path(facts["cert_file"]).read_bytes())
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(HOSTS[0])]
    assert san.get_values_for_type(x509.DNSName) == ["n0.cluster.example"]
    eku = chain[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    for purpose in ("sslserver", "sslclient"):  # a tool we did not write agrees
        out = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", str(deps[0].root / "ca" / "root.pem"),
             "-untrusted", facts["cert_file"], facts["cert_file"]],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
    store = open_store(deps[0])
    try:
        (rec,) = store.find_by_serial(int(facts["serial"], 16))
    finally:
        store.close()
    assert rec.requested_by == "admin (nats route-certificate)"  # who issued what, for the auditor
    assert rec.fingerprint == hashlib.sha256(chain[0].public_bytes(serialization.Encoding.DER)).hexdigest()

    pairs = [(Path(f["cert_file"]), Path(f["key_file"])) for f in issued]
    _n2_kept_out(tmp_path, pairs, Path(issued[0]["ca_file"]))  # every node checks against the deployment's CA


def test_a_bad_node_or_name_is_refused_before_the_ca_keys_are_opened(tmp_path: Path) -> None:
    dep, _ = init_deployment(
        tmp_path / "site", organization="T", algorithm=Algorithm.P256, dtypes=["board-a"], passphrase=b"pw",
        nats_port=free_port(), now=SystemClock().now(),
    )  # fmt: skip
    runner = CliRunner(env={PASSPHRASE_ENV: ""})  # no passphrase: opening the CA keys would fail otherwise
    for args, why in (
        (["--node", "../n0", "--name", "10.0.0.1"], "is not a node name"),
        (["--node", "n0", "--name", "fe80::1%eth0"], "an IPv6 address with a zone"),
        (["--node", "n0", "--name", "not a name"], "is not a DNS name"),
    ):
        r = runner.invoke(main, ["nats", "route-certificate", "--data", str(dep.root), *args])
        assert r.exit_code == 4, r.output
        assert why in " ".join(r.output.split())
    assert not list((dep.root / "nats").glob("route-*"))


def test_no_route_certificate_file_without_its_record(tmp_path: Path) -> None:
    """The store takes the certificate before its files are written: when recording fails (the
    database is gone), no certificate of the service CA is left on disk unrecorded."""
    dep, _ = init_deployment(
        tmp_path / "site", organization="T", algorithm=Algorithm.P256, dtypes=["board-a"], passphrase=b"pw",
        nats_port=free_port(), now=SystemClock().now(),
    )  # fmt: skip
    issuer = dep.load_cas(b"pw")["service"]

    def database_gone(_cert: x509.Certificate) -> None:
        raise UnavailableError("the database does not answer")

    with pytest.raises(UnavailableError):
        issue_route_certificate(dep, issuer, "n0", ["10.0.0.1"], now=SystemClock().now(), record=database_gone)
    assert not list((dep.root / "nats").glob("route-*"))
