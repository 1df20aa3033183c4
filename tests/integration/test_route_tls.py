"""TLS on the routes between NATS cluster nodes (ADR 0027): ``ClusterConfig``'s ``tls`` block makes
nats-server verify both sides of every route, so a node whose route certificate does not chain to
the cluster's CA is kept out even though it knows the route password."""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotdlm.bus.server import ClusterConfig, EmbeddedNatsServer, NatsServerConfig, free_port
from iotdlm.clock import SystemClock

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


def test_routes_verify_both_sides_and_keep_out_a_node_of_another_ca(tmp_path: Path) -> None:
    ca_key, foreign_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("route CA", ca_key, None)
    foreign = _cert("foreign CA", foreign_key, None)
    (tmp_path / "ca.pem").write_bytes(_pem(ca))
    port, cluster_port = free_port(), free_port()
    nodes = []
    for i, host in enumerate(HOSTS):
        issuer_cert, issuer_key = (foreign, foreign_key) if i == 2 else (ca, ca_key)
        key = ec.generate_private_key(ec.SECP256R1())
        (tmp_path / f"n{i}.pem").write_bytes(_pem(_cert(f"n{i}", key, (issuer_cert.subject, issuer_key), host)))
        (tmp_path / f"n{i}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        cluster = ClusterConfig(
            name="t", node=f"n{i}", host=host, port=cluster_port, route_password="known-to-all",
            routes=[f"{other}:{cluster_port}" for other in HOSTS if other != host],
            tls_cert=tmp_path / f"n{i}.pem", tls_key=tmp_path / f"n{i}.key", tls_ca=tmp_path / "ca.pem",
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
