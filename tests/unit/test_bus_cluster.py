"""A NATS cluster as the bus sees it (ADR 0027): the server list, the replicas, a node's config."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.bus import cluster
from iotdlm.bus.server import ClusterConfig, NatsServerConfig, render_config
from iotdlm.cli.modes import parse_services
from iotdlm.clock import SystemClock
from iotdlm.deployment import init_deployment
from iotdlm.errors import BadRequestError
from iotdlm.pki.keys import Algorithm


def test_server_urls_split_a_cluster_and_check_each() -> None:
    assert cluster.server_urls("tls://a:4222, tls://b:4222,tls://c:4222") == [
        "tls://a:4222",
        "tls://b:4222",
        "tls://c:4222",
    ]
    assert cluster.server_urls("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]
    with pytest.raises(BadRequestError, match="empty entry"):
        cluster.server_urls("tls://a:4222,,tls://b:4222")
    with pytest.raises(BadRequestError, match="scheme 'http'"):
        cluster.server_urls("tls://a:4222,http://b")


@given(st.text(max_size=80))
def test_server_urls_refuse_anything_else_in_words(text: str) -> None:
    out: list[str] = []
    message = "ok"
    try:
        out = cluster.server_urls(text)
    except BadRequestError as exc:
        message = exc.message
    assert message
    assert all(out)


@pytest.mark.parametrize(
    ("configured", "nodes", "want"), [(0, 1, 1), (0, 2, 1), (0, 3, 3), (0, 5, 3), (1, 5, 1), (5, 1, 5)]
)
def test_replicas_three_on_a_cluster_of_three_or_more_unless_configured(configured: int, nodes: int, want: int) -> None:
    assert cluster.replicas_for(configured, nodes) == want


def test_replicas_out_of_range_are_refused() -> None:
    for bad in (-1, 6):
        with pytest.raises(BadRequestError, match="jetstream_replicas"):
            cluster.check_replicas(bad)


def test_a_cluster_node_has_a_stable_name_and_authenticated_routes(tmp_path: Path) -> None:
    node = ClusterConfig(
        name="iotdlm", node="node1", host="127.0.0.3", port=6222, routes=["127.0.0.2:6222"], route_password="s3cret"
    )
    text = render_config(NatsServerConfig(port=4222, host="127.0.0.3", jetstream_dir=tmp_path, cluster=node))
    assert 'listen: "127.0.0.3:6222"' in text
    assert 'routes: ["nats-route://route:s3cret@127.0.0.2:6222"]' in text
    assert 'authorization { user: "route", password: "s3cret" }' in text
    with pytest.raises(ValueError, match="route password"):
        render_config(NatsServerConfig(port=4222, cluster=ClusterConfig(name="c", node="n", host="h", port=1)))
    with pytest.raises(ValueError, match="node name"):
        ClusterConfig(name="c", node="n 1", host="h", port=1, route_password="x").render()


def test_a_cluster_node_speaks_tls_on_its_routes_and_verifies_the_other_side(tmp_path: Path) -> None:
    """Route TLS: this node's certificate and key, the CA the other nodes chain to, and verify on
    (nats-server then requires and checks the dialing node's certificate as well as the answering
    one's); only all three files together."""
    cert, key, ca = tmp_path / "route.pem", tmp_path / "route.key.pem", tmp_path / "ca.pem"
    node = ClusterConfig(
        name="iotdlm", node="node0", host="127.0.0.2", port=6222, routes=["127.0.0.3:6222"], route_password="pw",
        tls_cert=cert, tls_key=key, tls_ca=ca,
    )  # fmt: skip
    text = render_config(NatsServerConfig(port=4222, host="127.0.0.2", cluster=node))
    cluster_block = text[text.index("cluster {") :]
    tls_block = cluster_block[cluster_block.index("  tls {") : cluster_block.index("  }") + 3]
    assert f'cert_file: "{cert}"' in tls_block
    assert f'key_file: "{key}"' in tls_block
    assert f'ca_file: "{ca}"' in tls_block
    assert "verify: true" in tls_block
    assert 'routes: ["nats-route://route:pw@127.0.0.3:6222"]' in cluster_block  # the password stays
    plain = render_config(
        NatsServerConfig(port=4222, host="127.0.0.2", cluster=replace(node, tls_cert=None, tls_key=None, tls_ca=None))
    )
    assert "tls {" not in plain
    for missing in ("tls_cert", "tls_key", "tls_ca"):
        with pytest.raises(ValueError, match="route TLS needs"):
            replace(node, **{missing: None}).render()


def test_services_name_known_modules_and_need_a_shared_nats(tmp_path: Path) -> None:
    dep, _ = init_deployment(
        tmp_path / "site", organization="T", algorithm=Algorithm.P256, dtypes=["b"], passphrase=b"pw",
        now=SystemClock().now(),
    )  # fmt: skip
    with pytest.raises(BadRequestError, match=r"set \[nats\] url"):
        parse_services("km", dep)
    with pytest.raises(BadRequestError, match="unknown module"):
        parse_services("km,va", dep)


def test_up_with_services_but_no_shared_nats_refuses_in_words(tmp_path: Path) -> None:
    dep, _ = init_deployment(
        tmp_path / "site", organization="T", algorithm=Algorithm.P256, dtypes=["b"], passphrase=b"pw",
        now=SystemClock().now(),
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", "up", "--data", str(dep.root), "--mode", "certificate-management",
         "--services", "km"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip
    assert done.returncode == 4, done.stdout + done.stderr
    assert "set [nats] url" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert not (dep.root / "logs" / "km.log").exists()  # nothing was started
