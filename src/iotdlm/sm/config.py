"""sm's configuration in a deployment folder, and wiring sm from it.

::

    DIR/sm/config.toml          repository URL, managed dtypes, CA bundle, poll interval, limits
    DIR/sm/_trust/root.json     the repository's root metadata sm was set up with (pk_repo)
    DIR/secrets/sm-pm.key       32 random bytes (0600): encrypts metadata at rest, shared with pm only

Everything else in ``DIR/sm`` is the local repository (:mod:`iotdlm.sm.local`) and ngclient's
metadata cache (``_tuf/``).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import msgspec
import tomli_w

from iotdlm import software
from iotdlm.clock import Clock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, NotFoundError
from iotdlm.sm.fetcher import Fetcher, HttpFetcher
from iotdlm.sm.updater import TUF_DIR, SoftwareManager
from iotdlm.wire import software as sw
from iotdlm.wire.envelope import Sealer

SM_DIR = "sm"
CONFIG = "config.toml"
TRUST = "_trust"
ROOT_FILE = "root.json"
KEY_FILE = ("secrets", "sm-pm.key")
RESERVED = {CONFIG}


class SmConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    repository_url: str
    dtypes: list[str]
    ca_bundle: str | None = None
    #: cm's egress proxy (http://127.0.0.1:3128 by default in cm); None: sm connects directly
    egress_proxy: str | None = None
    poll_interval_seconds: int = 3600
    max_image_bytes: int | None = None

    def validate(self) -> None:
        if not self.repository_url.startswith(("http://", "https://")):
            raise BadRequestError("repository_url must start with http:// or https://", field="repository_url")
        for d in self.dtypes:
            sw.check_dtype(d)
            if d in RESERVED:
                raise BadRequestError(f"dtype {d!r} is a reserved name in the sm folder", field="dtype")
        if self.egress_proxy is not None and not self.egress_proxy.startswith("http://"):
            raise BadRequestError("egress_proxy must be an http:// URL (cm's egress proxy)", field="egress_proxy")
        if self.poll_interval_seconds < 1:
            raise BadRequestError("poll_interval_seconds must be at least 1", field="poll_interval_seconds")
        if self.max_image_bytes is not None and self.max_image_bytes < 1:
            raise BadRequestError("max_image_bytes must be positive", field="max_image_bytes")


def sm_dir(data: Path) -> Path:
    return Path(data) / SM_DIR


def key_path(data: Path) -> Path:
    return Path(data).joinpath(*KEY_FILE)


def trusted_root_path(data: Path) -> Path:
    return sm_dir(data) / TRUST / ROOT_FILE


def load_config(data: Path) -> SmConfig:
    path = sm_dir(data) / CONFIG
    if not path.is_file():
        raise NotFoundError(
            f"sm is not set up in {data}: run `iotdlm sm setup --data {data} --repository URL --root FILE`"
        )
    try:
        config = msgspec.toml.decode(path.read_bytes(), type=SmConfig)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequestError(f"{path}: {exc}") from exc
    config.validate()
    return config


def load_meta_key(data: Path) -> bytes:
    """The sm-pm key (pm reads it with this function too)."""
    path = key_path(data)
    if not path.is_file():
        raise NotFoundError(f"no sm-pm key at {path}: run `iotdlm sm setup` first")
    key = path.read_bytes()
    if len(key) != software.KEY_BYTES:
        raise BadRequestError(f"{path} must hold exactly {software.KEY_BYTES} bytes", field="sm-pm key")
    return key


def load_trusted_root(data: Path) -> bytes:
    path = trusted_root_path(data)
    if not path.is_file():
        raise NotFoundError(f"no trusted repository root at {path}: run `iotdlm sm setup` first")
    return path.read_bytes()


def setup(
    data: Path,
    *,
    repository_url: str,
    root: bytes,
    dtypes: list[str],
    ca_bundle: Path | None = None,
    egress_proxy: str | None = None,
    poll_interval_seconds: int = 3600,
    max_image_bytes: int | None = None,
) -> SmConfig:
    """Write ``DIR/sm/config.toml`` and the pinned root; create the sm-pm key if there is none.

    Running it again updates the configuration; a different root also clears ngclient's metadata
    cache (it was verified from the old anchor). The sm-pm key is never replaced.
    """
    software.load_trusted_root(root, field="root")  # parses, and is signed by its own keys
    config = SmConfig(
        repository_url=repository_url.rstrip("/"),
        dtypes=sorted(set(dtypes)),
        ca_bundle=str(Path(ca_bundle).resolve()) if ca_bundle is not None else None,
        egress_proxy=egress_proxy,
        poll_interval_seconds=poll_interval_seconds,
        max_image_bytes=max_image_bytes,
    )
    config.validate()
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        raise NotFoundError(f"CA bundle {ca_bundle} does not exist", field="ca_bundle")
    d = sm_dir(data)
    (d / TRUST).mkdir(parents=True, exist_ok=True)
    pinned = trusted_root_path(data)
    if pinned.is_file() and pinned.read_bytes() != root:
        shutil.rmtree(d / TUF_DIR, ignore_errors=True)
    pinned.write_bytes(root)
    (d / CONFIG).write_bytes(tomli_w.dumps(msgspec.to_builtins(config)).encode())
    kp = key_path(data)
    if not kp.exists():
        kp.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(software.KEY_BYTES))
    return config


def fetcher_for(config: SmConfig) -> HttpFetcher:
    """The HTTP egress the configuration names: through cm's egress proxy, or direct."""
    return HttpFetcher(ca_bundle=Path(config.ca_bundle) if config.ca_bundle else None, proxy_url=config.egress_proxy)


def build(data: Path, *, fetcher: Fetcher, clock: Clock, config: SmConfig | None = None) -> SoftwareManager:
    """sm's core for the deployment at ``data``, with its identity (sig_sm and report signatures)."""
    config = config if config is not None else load_config(data)
    ident = Deployment.load(data).identity("sm")
    return SoftwareManager(
        sm_dir(data),
        repository_url=config.repository_url,
        trusted_root=load_trusted_root(data),
        fetcher=fetcher,
        key=ident.key,
        sealer=Sealer(ident.key, ident.certificate),
        meta_key=load_meta_key(data),
        clock=clock,
        max_image_bytes=config.max_image_bytes,
    )
