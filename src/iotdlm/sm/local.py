"""The local repository: software sm verified and stored, shared on disk with pm (Fig. 8).

Layout under sm's folder (``DIR/sm``)::

    <dtype>/<release_counter>/image       the software, as the repository signed it
    <dtype>/<release_counter>/meta.enc    meta_repo (the bundle, iotdlm.software), AES-256-GCM
    <dtype>/<release_counter>/sig_sm      sm's signature over meta and image (iotdlm.software.sig_sm)
    <dtype>/<release_counter>/info.json   unencrypted: dtype, release_counter, target_path, length,
                                          sha256, stored_at (what pm lists)
    _tmp/                                 staging: a version is written here, then renamed into place
    _state.json                           per dtype: the greatest release counter ever seen in
                                          verified metadata (rollback detection), reports to retry

Names starting with ``_`` are never dtypes (a dtype starts with a letter or digit). A version
appears all at once (a staging folder renamed into place after every file was fsynced) or not at
all; pm never sees half a version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from iotdlm.errors import BadRequestError, ConflictError, IotdlmError, NotFoundError
from iotdlm.files import atomic_write
from iotdlm.wire import software as sw
from iotdlm.wire.report import ReportBody

log = logging.getLogger(__name__)

IMAGE = "image"
META_ENC = "meta.enc"
SIG_SM = "sig_sm"
INFO = "info.json"
TMP = "_tmp"
STATE = "_state.json"
MAX_INFO_BYTES = 64 * 1024


class DtypeState(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    #: greatest release counter seen in verified repository metadata
    seen_latest: int | None = None
    checked_at: str | None = None


class SmState(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    dtypes: dict[str, DtypeState] = {}
    #: verified downloads not yet acknowledged by the repository (retried on every check)
    pending_reports: list[ReportBody] = []


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoredPaths:
    """The files of one stored version."""

    folder: Path

    @property
    def image(self) -> Path:
        return self.folder / IMAGE

    @property
    def meta_enc(self) -> Path:
        return self.folder / META_ENC

    @property
    def sig_sm(self) -> Path:
        return self.folder / SIG_SM

    @property
    def info(self) -> Path:
        return self.folder / INFO


class Staging:
    """A version being written (``_tmp/<random>``); :meth:`commit` renames it into place."""

    def __init__(self, repo: LocalRepository, dtype: str, release_counter: int) -> None:
        self.repo = repo
        self.dtype = dtype
        self.release_counter = release_counter
        tmp = repo.root / TMP
        tmp.mkdir(parents=True, exist_ok=True)
        self.paths = StoredPaths(tmp / f"{dtype}-{release_counter}-{secrets.token_hex(6)}")
        self.paths.folder.mkdir(mode=0o750)
        self.committed = False

    def write(self, name: str, data: bytes) -> None:
        with open(self.paths.folder / name, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def commit(self, info: sw.StoredSoftware) -> StoredPaths:
        self.write(INFO, sw.encode(info))
        fsync_dir(self.paths.folder)
        parent = self.repo.root / self.dtype
        parent.mkdir(exist_ok=True)
        final = parent / str(self.release_counter)
        if final.exists():
            raise ConflictError(f"{self.dtype} release {self.release_counter} is already stored at {final}")
        os.rename(self.paths.folder, final)
        fsync_dir(parent)
        self.committed = True
        return StoredPaths(final)

    def discard(self) -> None:
        if not self.committed:
            shutil.rmtree(self.paths.folder, ignore_errors=True)


class LocalRepository:
    """Reads and writes the local repository under ``root`` (``DIR/sm``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- staging ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, dtype: str, release_counter: int) -> Iterator[Staging]:
        """Write a version; unless committed, everything written is removed whatever happens."""
        sw.check_dtype(dtype)
        stage = Staging(self, dtype, release_counter)
        try:
            yield stage
        finally:
            stage.discard()

    def clean_staging(self) -> None:
        """Remove leftovers of an interrupted download (call with the sm lock held)."""
        tmp = self.root / TMP
        if tmp.is_dir():
            for child in tmp.iterdir():
                shutil.rmtree(child, ignore_errors=True)

    # --- reading ------------------------------------------------------------------------------
    def dtypes(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and not p.name.startswith(("_", ".")):
                with contextlib.suppress(IotdlmError):
                    out.append(sw.check_dtype(p.name))
        return sorted(out)

    def counters(self, dtype: str) -> list[int]:
        """Release counters stored for ``dtype`` (complete versions only), ascending."""
        sw.check_dtype(dtype)
        folder = self.root / dtype
        if not folder.is_dir():
            return []
        out = []
        for p in folder.iterdir():
            if p.name.isdigit() and str(int(p.name)) == p.name and (p / INFO).is_file():
                out.append(int(p.name))
        return sorted(out)

    def current(self, dtype: str) -> int | None:
        """The greatest release counter stored for ``dtype`` (sw_j of Algorithm 2), or None."""
        counters = self.counters(dtype)
        return counters[-1] if counters else None

    def paths(self, dtype: str, release_counter: int | None = None) -> StoredPaths:
        """The files of one stored version (default: the latest); NotFoundError if there is none."""
        sw.check_dtype(dtype)
        if release_counter is None:
            release_counter = self.current(dtype)
            if release_counter is None:
                raise NotFoundError(f"no software stored for dtype {dtype!r}", field="dtype")
        sw.check_release_counter(release_counter)
        paths = StoredPaths(self.root / dtype / str(release_counter))
        if not paths.info.is_file():
            raise NotFoundError(f"release {release_counter} of {dtype!r} is not stored", field="release_counter")
        return paths

    def info(self, dtype: str, release_counter: int | None = None) -> sw.StoredSoftware:
        paths = self.paths(dtype, release_counter)
        data = paths.info.read_bytes()
        if len(data) > MAX_INFO_BYTES:
            raise BadRequestError(f"{paths.info} is too large to be an info.json", field="info")
        info = sw.decode(data, sw.StoredSoftware, what=str(paths.info))
        if (info.dtype, str(info.release_counter)) != (dtype, paths.folder.name):
            raise BadRequestError(f"{paths.info} describes {info.dtype}/{info.release_counter}", field="info")
        return info

    def list(self, dtype: str | None = None) -> list[sw.StoredSoftware]:
        """info.json of every stored version (of ``dtype``, or of all), by dtype then counter."""
        out = []
        for d in [dtype] if dtype is not None else self.dtypes():
            for c in self.counters(d):
                try:
                    out.append(self.info(d, c))
                except IotdlmError as exc:
                    log.warning("skipping %s/%s: %s", d, c, exc)
        return out

    # --- state --------------------------------------------------------------------------------
    def load_state(self) -> SmState:
        path = self.root / STATE
        if not path.is_file():
            return SmState()
        try:
            return msgspec.json.decode(path.read_bytes(), type=SmState)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadRequestError(f"{path} is damaged ({exc}); restore it from a backup", field="state") from exc

    def save_state(self, state: SmState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / STATE, msgspec.json.encode(state), mode=0o600)
