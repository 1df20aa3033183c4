"""The parts of the multi-host scenario (tests/scenarios/test_multihost.py): a 3-node NATS cluster
with JetStream and TLS on its routes, a PostgreSQL the test starts itself, and one deployment whose
CA keys are in a SoftHSM2 token, copied to three "hosts" (distinct loopback addresses), each
running ``iotdlm up --services ...`` as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
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
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from iotdlm.bus import subjects
from iotdlm.bus.server import ClusterConfig, EmbeddedNatsServer, NatsServerConfig, NatsUser, free_port
from iotdlm.cli.nats_server import issue_route_certificate
from iotdlm.clock import SystemClock
from iotdlm.cm.config import CM_FILE
from iotdlm.deployment import CONFIG_FILE, PASSPHRASE_ENV, Deployment, hsm_settings, init_deployment
from iotdlm.hsm.token import PIN_ENV
from iotdlm.pki import ca as pki_ca
from iotdlm.pki.keys import Algorithm
from iotdlm.runtime import open_store, record_identities
from tests.fixtures_hsm import PIN, SoftHsm

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
    clients present their module certificates, TLS handshake first. The routes between the nodes
    speak TLS too (each node its own route certificate from the service CA, verified both ways),
    and ask for the route password."""

    def __init__(self, root: Path, site: Site) -> None:
        dep = site.dep
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
                    tls_cert=site.routes[i][0], tls_key=site.routes[i][1], tls_ca=client_ca,
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

    def _monitor(self, i: int, endpoint: str) -> dict[str, object]:
        with urllib.request.urlopen(f"http://{HOSTS[i]}:{self.http[i]}/{endpoint}", timeout=5) as r:
            out: dict[str, object] = msgspec.json.decode(r.read())
            return out

    def route_tls(self, i: int) -> tuple[bool, int]:
        """Whether node ``i``'s routes require TLS and verify the other side (its /varz), and how
        many routes it holds (its /routez)."""
        cluster = self._monitor(i, "varz").get("cluster")
        assert isinstance(cluster, dict)
        routes = self._monitor(i, "routez").get("num_routes")
        assert isinstance(routes, int)
        return bool(cluster.get("tls_required")) and bool(cluster.get("tls_verify")), routes

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass
class Site:
    dep: Deployment
    hosts: list[Path]
    cm_http: str
    #: each NATS node's route certificate chain and key
    routes: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)
    #: what each host's ``iotdlm up`` gets in its environment (the CA passphrase, or an HSM PIN)
    envs: list[dict[str, str]] = dataclasses.field(default_factory=list)

    @property
    def hsm(self) -> bool:
        return self.dep.config.hsm is not None


def make_site(tmp: Path, pg: Postgres, hsm: SoftHsm | None = None) -> Site:
    """One deployment on PostgreSQL with NATS over TLS (the server certificate names the three
    host addresses); cm listens on the third host's address. With ``hsm`` its CA keys are made in
    that token (labels with a fresh prefix), as ``iotdlm init --ca-key pkcs11:...`` makes them."""
    clock = SystemClock()
    http_port = free_port()
    cm_http = f"http://{HOSTS[2]}:{http_port}"
    settings = None
    if hsm is not None:
        prefix = f"mh{secrets.token_hex(4)}"
        settings = hsm_settings(hsm.uri(prefix), pin_file=str(hsm.pin_file))
    dep, _ = init_deployment(
        tmp / "site", organization="Multi", algorithm=Algorithm.P256, dtypes=["board"],
        passphrase=None if hsm else PW.encode(), database_url=pg.url, public_url=cm_http, metrics_port=0,
        nats_tls=True, hsm=settings, now=clock.now(),
    )  # fmt: skip
    service_ca = dep.load_cas(None if hsm else PW.encode())["service"]
    dep.issue_nats_server_certificate(service_ca, now=clock.now(), addresses=HOSTS)
    routes = issue_route_certificates(dep, service_ca)
    store = open_store(dep)
    try:
        record_identities(dep, store, clock.now())
    finally:
        store.close()
    return Site(dep, [], cm_http, routes=routes)


def issue_route_certificates(dep: Deployment, service_ca: pki_ca.IssuingCA) -> list[tuple[Path, Path]]:
    """One route certificate per NATS node from the service CA, naming the node's address, as
    `iotdlm nats route-certificate --node I --name ADDRESS` issues it (with the CA key in the HSM too)."""
    now = SystemClock().now()
    return [issue_route_certificate(dep, service_ca, str(i), [host], now=now)[1:] for i, host in enumerate(HOSTS)]


def place_hosts(site: Site, cluster_url: str, *, console: bool = True) -> None:
    """Point the deployment at the cluster (``[nats] url``), then copy it to each host's folder, as
    an operator copies the folder to each machine (file CA keys included; with the CA keys in the
    token the copies hold only their ``pkcs11:`` URIs). With the token, km host 0 reads the PIN from
    a file of its own (``[hsm] pin_file``), km host 1 from ``$IOTDLM_HSM_PIN``, and the cm host has
    no PIN at all. ``console=False`` turns each host's operator console off (bench/multihost.py:
    not what it measures, and ~2 CPU-seconds per host to start)."""
    root = site.dep.root
    raw = msgspec.toml.decode((root / CONFIG_FILE).read_bytes())
    raw.setdefault("nats", {})["url"] = cluster_url
    (root / CONFIG_FILE).write_bytes(tomli_w.dumps(raw).encode())
    https_port, http_port = free_port(), int(site.cm_http.rsplit(":", 1)[1])
    for i, host in enumerate(HOSTS):
        folder = root.parent / f"host{i}"
        shutil.copytree(root, folder, symlinks=True)
        site.hosts.append(folder)
        site.envs.append(_host_setup(site, i, folder, console))
        if i == 2:
            cm = {"host": host, "https_port": https_port, "http_port": http_port, "egress_port": free_port()}
            (folder / CM_FILE).write_bytes(tomli_w.dumps(cm).encode())


def _host_setup(site: Site, i: int, folder: Path, console: bool) -> dict[str, str]:
    """Host ``i``'s PIN (or passphrase) source; returns what its ``iotdlm up`` gets in its environment."""
    raw = msgspec.toml.decode((folder / CONFIG_FILE).read_bytes())
    # each host's console on a port of its own (all three on the default 127.0.0.1:8444 collide)
    raw.setdefault("console", {})["port"] = free_port()
    if not console:
        raw["console"]["enabled"] = False
    if not site.hsm:
        (folder / CONFIG_FILE).write_bytes(tomli_w.dumps(raw).encode())
        return {PASSPHRASE_ENV: PW}
    raw["hsm"].pop("pin_file", None)
    if i == 0:
        pin_file = folder / "secrets" / "hsm-pin"
        pin_file.parent.mkdir(mode=0o700, exist_ok=True)
        pin_file.write_text(PIN + "\n")
        pin_file.chmod(0o600)
        raw["hsm"]["pin_file"] = str(pin_file)
    (folder / CONFIG_FILE).write_bytes(tomli_w.dumps(raw).encode())
    return {PIN_ENV: PIN} if i == 1 else {}


def ca_key_files(folders: list[Path], ca_certs: list[x509.Certificate]) -> list[Path]:
    """Every file under ``folders`` that is a CA key: named like one (``ca/*.key*``, the CA
    passphrase file), or a private key (PEM, readable without a passphrase, or encrypted) whose
    public half is a CA certificate's."""
    ca_publics = {
        c.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for c in ca_certs
    }
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if not path.is_file():
                continue
            if (path.parent.name == "ca" and ".key" in path.name) or path.name == "ca-passphrase":
                found.append(path)
                continue
            data = path.read_bytes()
            if b"ENCRYPTED PRIVATE KEY" in data:
                found.append(path)  # nothing in a host folder with the token is encrypted
            elif b"PRIVATE KEY" in data:
                with contextlib.suppress(ValueError, TypeError):
                    key = serialization.load_pem_private_key(data, None)
                    spki = key.public_key().public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                    if spki in ca_publics:
                        found.append(path)
    return found


def up(site: Site, i: int, services: str) -> subprocess.Popen[bytes]:
    """``iotdlm up --services SERVICES`` for host ``i``, as its own process (its own session)."""
    folder = site.hosts[i]
    env = {k: v for k, v in os.environ.items() if k not in (PASSPHRASE_ENV, PIN_ENV)} | site.envs[i]
    with (folder / "up.out").open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "iotdlm.cli.main", "up", "--data", str(folder), "--mode", "certificate-management",
             "--services", services],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
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
