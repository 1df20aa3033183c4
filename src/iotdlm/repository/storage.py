"""The repository folder on disk: roles and names, ``repo.toml``, ``published.jsonl``, the writers' lock.

Files other processes read are replaced whole (:func:`iotdlm.files.atomic_write`); the JSON-lines
logs are only appended to, and a reader skips a line still being written (:func:`complete_lines`).
Writers take an exclusive lock (:func:`file_lock`) between threads and between processes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from iotdlm.errors import BadRequestError
from iotdlm.pki.names import check_id

TOP_LEVEL_ROLES: Final = ("root", "targets", "snapshot", "timestamp")
RELEASES: Final = "releases"
#: roles that own keys: the four top-level roles and "releases" (signs every dtype-<D> role)
KEY_ROLES: Final = (*TOP_LEVEL_ROLES, RELEASES)
ALGORITHMS: Final = ("ecdsa-p256", "ed25519")
DEFAULT_EXPIRY: Final[dict[str, dt.timedelta]] = {
    "root": dt.timedelta(days=365),
    "targets": dt.timedelta(days=90),
    "snapshot": dt.timedelta(days=7),
    "timestamp": dt.timedelta(days=1),
    RELEASES: dt.timedelta(days=90),
}
CHUNK: Final = 1024 * 1024
DTYPE_ROLE_PREFIX: Final = "dtype-"


def dtype_role(dtype: str) -> str:
    """The delegated targets role that signs the releases of device type ``dtype``."""
    return DTYPE_ROLE_PREFIX + check_id(dtype, "dtype")


def target_path(dtype: str, name: str) -> str:
    """The TUF target path of image ``name`` of device type ``dtype``: ``<dtype>/<name>``."""
    return f"{check_id(dtype, 'dtype')}/{check_id(name, 'target name')}"


# --- records and persisted formats ----------------------------------------------------------------
@dataclass(frozen=True)
class PublishedTarget:
    """One image as the repository signed it (paper: ``data_repo`` = version, hash, size)."""

    dtype: str
    release_counter: int
    path: str  # TUF target path "<dtype>/<name>"
    length: int
    sha256: str
    published_at: dt.datetime

    @property
    def url_path(self) -> str:
        """Path of the image below the targets base URL: ``<dtype>/<sha256>.<name>``."""
        parent, _, name = self.path.rpartition("/")
        return f"{parent}/{self.sha256}.{name}"


class Settings(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    format: int = 1
    algorithm: str
    thresholds: dict[str, int]
    keys_per_role: dict[str, int]
    expiry_seconds: dict[str, int]
    report_ca: str | None = None  # file name inside REPO


class PublishedLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    release_counter: int
    path: str
    length: int
    sha256: str
    published_at: dt.datetime


published_decoder = msgspec.json.Decoder(PublishedLine)
json_encoder = msgspec.json.Encoder()


# --- file helpers -----------------------------------------------------------------------------------
def utc(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(dt.UTC)


def complete_lines(path: Path) -> list[bytes]:
    """The non-empty, newline-terminated lines of an append-only file (a line being appended is skipped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [line for line in data[: data.rfind(b"\n") + 1].splitlines() if line.strip()]


def append_line(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, tlock: threading.Lock) -> Iterator[None]:
    """Exclusive between threads of this process (tlock) and between processes (flock)."""
    with tlock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def stream_copy(image: Path, folder: Path, name: str, progress: Callable[[int], None] | None) -> tuple[int, str]:
    """Hash and copy ``image`` into ``folder/<sha256>.<name>`` one chunk at a time; (length, sha256)."""
    digest = hashlib.sha256()
    length = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    tmp = folder / f".tmp-{secrets.token_hex(8)}"
    try:
        with image.open("rb") as src, open(tmp, "xb") as dst:
            while n := src.readinto(buf):
                digest.update(view[:n])
                dst.write(view[:n])
                length += n
                if progress is not None:
                    progress(n)
            dst.flush()
            os.fsync(dst.fileno())
        sha256 = digest.hexdigest()
        os.replace(tmp, folder / f"{sha256}.{name}")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return length, sha256


# --- settings checks --------------------------------------------------------------------------------
def check_key_role(role: str) -> str:
    if role not in KEY_ROLES:
        raise BadRequestError(f"unknown role {role!r}: use one of {list(KEY_ROLES)}", field="role")
    return role


def role_ints(values: dict[str, int], what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for role, n in values.items():
        check_key_role(role)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise BadRequestError(f"{what} of role {role} must be an integer >= 1, got {n!r}", field=what)
        out[role] = n
    return out


__all__ = [
    "ALGORITHMS",
    "CHUNK",
    "DEFAULT_EXPIRY",
    "DTYPE_ROLE_PREFIX",
    "KEY_ROLES",
    "RELEASES",
    "TOP_LEVEL_ROLES",
    "PublishedLine",
    "PublishedTarget",
    "Settings",
    "append_line",
    "check_key_role",
    "complete_lines",
    "dtype_role",
    "file_lock",
    "json_encoder",
    "published_decoder",
    "role_ints",
    "stream_copy",
    "target_path",
    "utc",
]
