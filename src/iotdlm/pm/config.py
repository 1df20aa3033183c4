"""pm's configuration in a deployment folder, and wiring a :class:`Provisioner` from it.

::

    DIR/pm/<dtype>/config.toml   optional (`iotdlm pm setup`): certificate policy, URIs, flasher
    DIR/pm/<dtype>/staging/      the staged image of a run (0700; emptied after each run)

What pm trusts comes from the deployment, never from the modules it checks: pk_sm from
``DIR/modules/sm/cert.pem`` (checked to be sm's certificate from the deployment's service CA),
pk_repo from sm's pinned root (``DIR/sm/_trust/root.json``), the sm-pm key from
``DIR/secrets/sm-pm.key``, the root CA from ``DIR/ca/root.pem``. pm's own identity signs its
requests to km; sm's private key is never read.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import msgspec
import tomli_w

from iotdlm.bus import Bus
from iotdlm.client.connect import connect_identity, km_trust
from iotdlm.client.km import KmClient
from iotdlm.client.sm import SmClient
from iotdlm.clock import Clock
from iotdlm.connections import open_store as open_store  # pm's wiring, as the CLI and the benches call it
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, NotFoundError, UntrustedError
from iotdlm.modes.guard import ModeGuard
from iotdlm.pki.chain import load_certificate, verify_issued_by
from iotdlm.pki.keys import PublicKey, check_public_key
from iotdlm.pki.names import check_id, module_of
from iotdlm.pki.profiles import DEVICE_PROFILES
from iotdlm.pm.flasher import CommandFlasher, Flasher, SimulatedFlasher
from iotdlm.pm.provisioner import Provisioner
from iotdlm.pm.settings import Anchors, PmSettings
from iotdlm.sm import config as smconfig
from iotdlm.store import Store
from iotdlm.wire.envelope import Sealer

PM_DIR = "pm"
CONFIG = "config.toml"
STAGING = "staging"
#: cm's default HTTPS port (``iotdlm cm serve``), where it serves EST
CM_HTTPS_PORT = 8443


class PmConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """``DIR/pm/<dtype>/config.toml``. Every field is optional."""

    #: which device certificates to issue (seed 003 VI-B): factory, operational, or both
    profiles: list[str] = msgspec.field(default_factory=lambda: ["factory", "operational"])
    #: the CA-URI flashed into devices: cm's EST URL (default: https://<public_url host>:8443/.well-known/est)
    enroll_uri: str | None = None
    #: where devices ask for updates (default: none written)
    update_uri: str | None = None
    #: the simulated bench (folders made by `iotdlm pm bench make`)
    bench: str | None = None
    #: a command-flasher config (JSON templates for the vendor tool); exclusive with bench
    flasher_config: str | None = None
    #: flash this release (default: the latest sm stores)
    release_counter: int | None = None
    batch_size: int = 100
    concurrency: int = 8

    def validate(self) -> None:
        if not self.profiles:
            raise BadRequestError("profiles must name factory, operational or both", field="profiles")
        for p in self.profiles:
            if p not in DEVICE_PROFILES:
                raise BadRequestError(
                    f"profile {p!r} is not a device profile ({', '.join(DEVICE_PROFILES)})", field="profiles"
                )
        if len(set(self.profiles)) != len(self.profiles):
            raise BadRequestError("profiles repeats a profile", field="profiles")
        for name, uri in (("enroll_uri", self.enroll_uri), ("update_uri", self.update_uri)):
            if uri is not None and not uri.startswith(("https://", "http://", "coaps://")):
                raise BadRequestError(f"{name} must be an https://, http:// or coaps:// URL", field=name)
        if self.bench is not None and self.flasher_config is not None:
            raise BadRequestError("give bench or flasher_config, not both", field="bench")
        if not 1 <= self.batch_size <= 1000:
            raise BadRequestError("batch_size must be 1..1000", field="batch_size")
        if not 1 <= self.concurrency <= 256:
            raise BadRequestError("concurrency must be 1..256", field="concurrency")


def pm_dir(data: Path, dtype: str) -> Path:
    return Path(data) / PM_DIR / check_id(dtype, "dtype")


def config_path(data: Path, dtype: str) -> Path:
    return pm_dir(data, dtype) / CONFIG


def load_config(data: Path, dtype: str) -> PmConfig:
    """The dtype's pm config; the defaults when there is no file."""
    path = config_path(data, dtype)
    if not path.is_file():
        return PmConfig()
    try:
        config = msgspec.toml.decode(path.read_bytes(), type=PmConfig)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequestError(f"{path}: {exc}") from exc
    config.validate()
    return config


def save_config(data: Path, dtype: str, config: PmConfig) -> Path:
    config.validate()
    path = config_path(data, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(msgspec.to_builtins(config)).encode())
    return path


def default_enroll_uri(dep: Deployment) -> str:
    """cm's EST URL on the host of the deployment's public URL (cm serves EST on HTTPS 8443)."""
    host = urlsplit(dep.config.public_url).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{CM_HTTPS_PORT}/.well-known/est"


def settings_from(dep: Deployment, dtype: str, config: PmConfig) -> PmSettings:
    if dtype not in dep.config.dtypes:
        raise NotFoundError(
            f"dtype {dtype!r} is not one of this deployment's device types ({', '.join(dep.config.dtypes) or 'none'})",
            field="dtype",
        )
    return PmSettings(
        dtype=dtype,
        profiles=tuple(config.profiles),
        organization=dep.config.organization,
        enroll_uri=config.enroll_uri or default_enroll_uri(dep),
        update_uri=config.update_uri,
        staging_dir=pm_dir(dep.root, dtype) / STAGING,
        release_counter=config.release_counter,
        batch_size=config.batch_size,
        concurrency=config.concurrency,
    )


def load_pk_sm(dep: Deployment, now: dt.datetime) -> PublicKey:
    """pk_sm: from the deployment's ``modules/sm/cert.pem`` -- which must be sm's certificate,
    issued by the deployment's service CA -- never from sm's answers (nor sm's private key)."""
    path = dep.root / "modules" / "sm" / "cert.pem"
    if not path.is_file():
        raise NotFoundError(f"sm's certificate {path} is missing: pm cannot check sig_sm without pk_sm")
    cert = load_certificate(path.read_bytes())
    verify_issued_by(cert, dep.ca_certificate("service"), now=now, eku=None)
    if module_of(cert) != ("sm", None):
        raise UntrustedError(f"{path} is not sm's service certificate (it names {module_of(cert)})")
    return check_public_key(cert.public_key())


def load_anchors(dep: Deployment, now: dt.datetime) -> Anchors:
    """What pm trusts. Without sm's setup (no pinned root, no sm-pm key) pm can still provision
    certificates; it refuses to flash software, saying why."""
    trusted_root: bytes | None
    meta_key: bytes | None
    try:
        trusted_root = smconfig.load_trusted_root(dep.root)
        meta_key = smconfig.load_meta_key(dep.root)
    except NotFoundError:
        trusted_root, meta_key = None, None
    return Anchors(
        pk_sm=load_pk_sm(dep, now),
        trusted_root=trusted_root,
        meta_key=meta_key,
        root_ca=dep.ca_certificate("root"),
    )


class UnconfiguredFlasher:
    """Stands in when no flasher is configured, so ``pm serve`` (started by the supervisor) still
    runs and answers status; every provisioning request is refused with what to do."""

    def __init__(self, dtype: str, data: Path) -> None:
        self.dtype = dtype
        self._why = (
            f"no flasher is configured for {dtype}: `iotdlm pm setup --data {data} --dtype {dtype} --bench DIR` "
            "(simulated devices) or `--flasher-config FILE` (a vendor tool), then restart pm"
        )

    def _refuse(self, *_args: object) -> NoReturn:
        raise BadRequestError(self._why, field="flasher")

    discover = flash_image = flash_truststore = flash_certificate = flash_config = _refuse
    device_public_key = device_csr = read_image_sha256 = read_truststore = read_certificate = _refuse


def make_flasher(
    dep: Deployment, dtype: str, config: PmConfig, *, bench: Path | None = None, flasher_config: Path | None = None
) -> Flasher:
    """The dtype's flasher: ``bench`` (simulated devices) or ``flasher_config`` (a vendor tool),
    given here or in the pm config."""
    if bench is not None and flasher_config is not None:
        raise BadRequestError("give --bench or --flasher-config, not both")
    if bench is None and flasher_config is None:
        bench = Path(config.bench) if config.bench else None
        flasher_config = Path(config.flasher_config) if config.flasher_config else None
    if flasher_config is not None:
        return CommandFlasher.from_config(dtype, flasher_config)
    if bench is not None:
        if not bench.is_dir():
            raise NotFoundError(f"bench folder {bench} does not exist (`iotdlm pm bench make` makes one)")
        return SimulatedFlasher(bench, dtype)
    raise BadRequestError(
        f"no flasher for {dtype}: give --bench DIR (simulated devices) or --flasher-config FILE (a vendor tool), "
        f"or set one with `iotdlm pm setup --data {dep.root} --dtype {dtype} --bench DIR`"
    )


async def connect_as(dep: Deployment, name: str) -> Bus:
    """A NATS connection as identity ``name`` (:func:`iotdlm.connections.connect_identity`)."""
    bus, _ident = await connect_identity(dep, name)
    return bus


async def connect_pm(dep: Deployment, dtype: str) -> Bus:
    """A NATS connection as ``pm-<dtype>``."""
    return await connect_as(dep, f"pm-{check_id(dtype, 'dtype')}")


def build_provisioner(
    dep: Deployment,
    dtype: str,
    *,
    bus: Bus,
    store: Store,
    flasher: Flasher,
    clock: Clock,
    config: PmConfig | None = None,
    guard: ModeGuard | None = None,
    require_mode: bool = False,
    km_timeout: float = 30.0,
) -> Provisioner:
    """A Provisioner for ``dtype`` as the ``pm-<dtype>`` identity of the deployment at ``dep``
    (``bus`` must be that identity's connection)."""
    config = config if config is not None else load_config(dep.root, dtype)
    ident = dep.identity(f"pm-{dtype}")
    settings = settings_from(dep, dtype, config)
    return Provisioner(
        settings,
        km=KmClient(
            bus,
            Sealer(ident.key, ident.certificate),
            clock,
            timeout=km_timeout,
            trust=km_trust(dep),
        ),
        sm=SmClient(bus, timeout=km_timeout),
        flasher=flasher,
        store=store,
        clock=clock,
        bus=bus,
        anchors=load_anchors(dep, clock.now()),
        guard=guard,
        require_mode=require_mode,
    )
