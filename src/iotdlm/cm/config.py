"""cm's configuration: where it listens, and the limits it holds every client to."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import msgspec

from iotdlm.errors import BadRequestError
from iotdlm.pki.keys import Algorithm


@dataclass(frozen=True)
class Limits:
    """What one client may cost cm. Every refusal is logged and answered with a one-line text body."""

    #: largest request body (EST requests); bigger -> 413, without reading it
    max_body_bytes: int = 64 * 1024
    #: largest OCSP request (RFC 5019 requests are about 100 bytes)
    max_ocsp_request_bytes: int = 8 * 1024
    #: largest TransferMessage or confirmation a peer provider posts (one NATS message to km;
    #: SP2 confirms a large fleet in parts below it, docs/adr/0019)
    max_transfer_body_bytes: int = 512 * 1024
    #: a connection must send a complete request head within this many seconds of opening (or of
    #: its previous response), else it is closed: the slowloris guard. Also the keep-alive timeout.
    idle_timeout: float = 15.0
    #: the whole request body must arrive within this many seconds of its head (else 408, closed)
    body_timeout: float = 10.0
    #: the TLS handshake must finish within this many seconds
    handshake_timeout: float = 10.0
    #: after a refusal, how long cm reads (and discards) what is left of a request before closing
    lingering_time: float = 1.0
    #: Retry-After (seconds) on 503 answers
    retry_after: int = 30
    #: how long cm waits for km's answer over NATS (then 503)
    km_timeout: float = 10.0
    #: largest request head line / header field aiohttp accepts
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes", "max_ocsp_request_bytes", "max_transfer_body_bytes", "max_line_size",
            "max_field_size", "max_headers",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive")
        for name in ("idle_timeout", "body_timeout", "handshake_timeout", "km_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive")
        if self.lingering_time < 0 or self.retry_after < 0:
            raise ValueError("Limits.lingering_time and Limits.retry_after must not be negative")


@dataclass(frozen=True)
class EgressConfig:
    """The forward proxy sm reaches the remote repository through (paper 4.4.1: via cm).

    ``allow_origins`` are ``scheme://host[:port]`` (http or https); everything else is refused
    with 403. The proxy listens on loopback only by default: it serves sm, not the world.
    """

    allow_origins: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 3128
    #: opening the connection to the origin
    connect_timeout: float = 10.0
    #: the client must send its request head within this many seconds
    head_timeout: float = 10.0
    #: a tunnel or forwarded exchange with no byte either way for this long is closed
    idle_timeout: float = 120.0
    max_head_bytes: int = 16 * 1024
    #: connections served at once; more are answered 503
    max_connections: int = 128

    def __post_init__(self) -> None:
        if self.max_head_bytes <= 0 or self.max_connections <= 0:
            raise ValueError("EgressConfig limits must be positive")
        if min(self.connect_timeout, self.head_timeout, self.idle_timeout) <= 0:
            raise ValueError("EgressConfig timeouts must be positive")


@dataclass(frozen=True)
class CoapConfig:
    """cm's CoAP door (UDP; enrollment with EDHOC and OSCORE, ADR 0029). Port 0 picks a free port."""

    host: str = "127.0.0.1"
    port: int = 5683
    #: cm's EDHOC key (PEM, P-256); None: DIR/modules/cm/coap-edhoc-key.pem, made at the first start
    edhoc_key: Path | None = None
    #: EDHOC sessions kept at once; the oldest is dropped (aiocoap has 48 one-byte identifiers)
    max_sessions: int = 32

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise BadRequestError(f"coap_port {self.port} is not a UDP port", field="coap_port")
        if not 1 <= self.max_sessions <= 40:
            raise BadRequestError("coap max_sessions must be between 1 and 40", field="coap_max_sessions")


@dataclass(frozen=True)
class CmConfig:
    """cm's listeners. ``https_port`` serves EST, OCSP and CRLs; ``http_port`` (optional, None:
    off) serves OCSP and CRLs only, for relying parties that use the http:// URLs written into
    certificates; ``egress`` (optional) is sm's way out. Port 0 picks a free port (tests)."""

    host: str = "127.0.0.1"
    https_port: int = 8443
    http_port: int | None = 8080
    limits: Limits = field(default_factory=Limits)
    egress: EgressConfig | None = None
    #: what /csrattrs asks devices to use (None: an empty CsrAttrs)
    csr_algorithm: Algorithm | None = Algorithm.P256
    #: how long the CA certificates of /cacerts are served before cm asks km again
    cacerts_ttl: float = 300.0
    #: an operator-supplied HTTPS chain (leaf first) and key, PEM (both or neither); None: the
    #: certificate iotdlm issued (DIR/modules/cm/https.pem)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: the CoAP door for constrained devices (None: off)
    coap: CoapConfig | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise BadRequestError("give both --tls-cert and --tls-key, or neither", field="tls-cert")


#: cm's own settings file in the deployment folder (optional). The supervisor starts cm with
#: ``--data`` only, so what an operator would otherwise pass as flags lives here.
CM_FILE = "cm.toml"


class CmFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``DIR/cm.toml``; every field optional, command-line flags win. Example::

    https_port = 8443
    http_port = 8080          # http = false: no plain-HTTP listener
    allow_origins = ["https://repo.vendor.example"]
    tls_cert = "/etc/iotdlm/cm-fullchain.pem"   # with tls_key: instead of modules/cm/https.pem
    tls_key = "/etc/iotdlm/cm-key.pem"
    [limits]
    idle_timeout = 15.0
    """

    host: str | None = None
    https_port: int | None = None
    http_port: int | None = None
    http: bool = True
    egress_host: str | None = None
    egress_port: int | None = None
    allow_origins: list[str] = []
    #: an operator-supplied HTTPS chain and key (PEM files; relative to the deployment folder)
    tls_cert: str | None = None
    tls_key: str | None = None
    #: the CoAP door (UDP) for constrained devices, EDHOC + OSCORE enrollment (ADR 0029); absent: off
    coap_port: int | None = None
    #: cm's EDHOC key (PEM, P-256; relative to the deployment folder); absent:
    #: modules/cm/coap-edhoc-key.pem, made at the first start
    coap_edhoc_key: str | None = None
    limits: dict[str, float] = {}


def load_cm_file(root: Path) -> CmFile:
    """``root/cm.toml`` if it exists (an empty :class:`CmFile` otherwise); BadRequestError if it
    does not parse or names an unknown setting or limit."""
    path = root / CM_FILE
    if not path.is_file():
        return CmFile()
    try:
        out = msgspec.toml.decode(path.read_bytes(), type=CmFile)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequestError(f"{path}: {exc}") from exc
    known = {f.name for f in fields(Limits)}
    unknown = sorted(set(out.limits) - known)
    if unknown:
        raise BadRequestError(f"{path}: unknown limits {unknown}; known: {sorted(known)}", field="limits")
    return out


def limits_from(values: dict[str, float]) -> Limits:
    """:class:`Limits` with ``values`` replacing the defaults (integers where the field is one)."""
    kinds = {f.name: f.type for f in fields(Limits)}
    cast: dict[str, Any] = {k: int(v) if kinds[k] in (int, "int") else float(v) for k, v in values.items()}
    try:
        return replace(Limits(), **cast)
    except ValueError as exc:
        raise BadRequestError(str(exc), field="limits") from exc
