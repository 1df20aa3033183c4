"""The parts of the multi-host scenario (tests/scenarios/test_multihost.py): a 3-node NATS cluster
with JetStream, a PostgreSQL the test starts itself, and one deployment copied to three "hosts"
(distinct loopback addresses), each running ``iotdlm up --services ...`` as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import tomli_w

from iotdlm.bus import subjects
from iotdlm.bus.server import ClusterConfig, EmbeddedNatsServer, NatsServerConfig, NatsUser, free_port
from iotdlm.clock import SystemClock
from iotdlm.cm.config import CM_FILE
from iotdlm.deployment import CONFIG_FILE, PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.pki.keys import Algorithm
from iotdlm.runtime import open_store, record_identities

PG_BIN = Path("/usr/lib/postgresql/15/bin")
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
PW = "multihost-pw"


def _run_as_postgres(*argv: str) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=60, check=False)


class Postgres:
    """A PostgreSQL of the test's own (initdb, pg_ctl), on a free port of 127.0.0.1 -- never the
    machine's on 5432. As root it runs as the postgres user (runuser)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").is_file():
            pytest.skip(f"PostgreSQL 15 is not installed ({PG_BIN}): the multi-host test needs initdb/pg_ctl")
        self.dir = Path(tempfile.mkdtemp(prefix="iotdlm-pg-"))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        out = _run_as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")
        if out.returncode != 0:
            pytest.skip(f"initdb failed here: {out.stderr.strip()[-300:]}")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        out = _run_as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "pg.log"), "-w", "-o", opts, *args
        )
        assert out.returncode == 0, out.stdout + out.stderr + (self.dir / "pg.log").read_text()[-2000:]

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(AssertionError):
            self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class Cluster:
    """Three nats-server nodes, one per host address, routed to each other, JetStream on each in
    its own store folder, every module's login and permissions rendered as for the embedded one,
    and the deployment's TLS on the client port: the server certificate names the three addresses,
    clients present their module certificates, TLS handshake first (routes between the nodes are
    plain, on loopback, with a route password)."""

    def __init__(self, root: Path, dep: Deployment) -> None:
        users = [NatsUser(module=module, user=c.user, password=c.password) for module, c in dep.nats_users()]
        cert, key, client_ca = dep.nats_tls_files
        self.port = free_port()
        cluster_port = free_port()
        self.http = [free_port() for _ in HOSTS]
        password = os.urandom(12).hex()
        self.nodes: list[EmbeddedNatsServer] = []
        for i, host in enumerate(HOSTS):
            cfg = NatsServerConfig(
                port=self.port, host=host, users=users, jetstream_dir=root / f"node{i}" / "jetstream",
                http_port=self.http[i], tls_cert=cert, tls_key=key, tls_ca=client_ca, verify_clients=True,
                cluster=ClusterConfig(
                    name="iotdlm", node=f"node{i}", host=host, port=cluster_port,
                    routes=[f"{other}:{cluster_port}" for other in HOSTS if other != host], route_password=password,
                ),
            )  # fmt: skip
            tls = dep.client_tls(dep.identity(subjects.SUPERVISOR))
            self.nodes.append(EmbeddedNatsServer(cfg, root / f"node{i}" / "nats.conf", client_tls=tls))

    @property
    def url(self) -> str:
        return ",".join(f"tls://{host}:{self.port}" for host in HOSTS)

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + timeout
        while not all(self.healthy(i) for i in range(len(HOSTS))):
            assert time.monotonic() < deadline, "the NATS cluster's JetStream did not become healthy"
            time.sleep(0.2)

    def healthy(self, i: int) -> bool:
        """The node answers /healthz with JetStream current (a meta leader is known)."""
        try:
            with urllib.request.urlopen(f"http://{HOSTS[i]}:{self.http[i]}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass
class Site:
    dep: Deployment
    hosts: list[Path]
    cm_http: str


def make_site(tmp: Path, pg: Postgres) -> Site:
    """One deployment on PostgreSQL with NATS over TLS (the server certificate names the three
    host addresses); cm listens on the third host's address."""
    clock = SystemClock()
    http_port = free_port()
    cm_http = f"http://{HOSTS[2]}:{http_port}"
    dep, _ = init_deployment(
        tmp / "site", organization="Multi", algorithm=Algorithm.P256, dtypes=["board"], passphrase=PW.encode(),
        database_url=pg.url, public_url=cm_http, metrics_port=0, nats_tls=True, now=clock.now(),
    )  # fmt: skip
    service_ca = dep.load_cas(PW.encode())["service"]
    dep.issue_nats_server_certificate(service_ca, now=clock.now(), addresses=HOSTS)
    store = open_store(dep)
    try:
        record_identities(dep, store, clock.now())
    finally:
        store.close()
    return Site(dep, [], cm_http)


def place_hosts(site: Site, cluster_url: str) -> None:
    """Point the deployment at the cluster (``[nats] url``), then copy it to each host's folder, as
    an operator copies the folder to each machine (CA keys included: file keys; with the HSM signer
    the copies would hold a ``pkcs11:`` URI instead)."""
    root = site.dep.root
    raw = msgspec.toml.decode((root / CONFIG_FILE).read_bytes())
    raw.setdefault("nats", {})["url"] = cluster_url
    (root / CONFIG_FILE).write_bytes(tomli_w.dumps(raw).encode())
    https_port, http_port = free_port(), int(site.cm_http.rsplit(":", 1)[1])
    for i, host in enumerate(HOSTS):
        folder = root.parent / f"host{i}"
        shutil.copytree(root, folder, symlinks=True)
        site.hosts.append(folder)
        # each host's console on a port of its own (all three on the default 127.0.0.1:8444 collide)
        raw.setdefault("console", {})["port"] = free_port()
        (folder / CONFIG_FILE).write_bytes(tomli_w.dumps(raw).encode())
        if i == 2:
            cm = {"host": host, "https_port": https_port, "http_port": http_port, "egress_port": free_port()}
            (folder / CM_FILE).write_bytes(tomli_w.dumps(cm).encode())


def up(folder: Path, services: str) -> subprocess.Popen[bytes]:
    """``iotdlm up --services SERVICES`` for one host, as its own process (its own session)."""
    with (folder / "up.out").open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "iotdlm.cli.main", "up", "--data", str(folder), "--mode", "certificate-management",
             "--services", services],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, PASSPHRASE_ENV: PW}, start_new_session=True,
        )  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += [int(child), *descendants(int(child))]
    return out


def kill_host(proc: subprocess.Popen[bytes]) -> None:
    """The host is gone: SIGKILL its supervisor and every process below it at once."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def stop_host(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_host(proc)


@contextlib.contextmanager
def running(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in reversed(procs):
            stop_host(proc)


async def until(check: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        ok = check() if callable(check) else check
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.25)
