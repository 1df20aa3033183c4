"""The backup archive of ``iotdlm backup`` / ``iotdlm restore``: a gzip'd tar whose first member,
``MANIFEST.json``, lists every other member with its size, SHA-256 and file mode.

Members: ``data/<path>`` -- the files of the data folder (the database file, logs, the NATS
server's live JetStream folder and pid file left out) -- and ``database/iotdlm.db``, a consistent
snapshot of an SQLite store (:mod:`iotdlm.store.backup`), absent when the store is PostgreSQL.

Restoring reads the manifest with :func:`parse_manifest` (bounded, every path checked: relative,
no ``..``, no link or device member) and accepts only an archive whose members are exactly the
manifest's, byte for byte (:func:`extract_verified`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import msgspec

from iotdlm.errors import BadRequestError

FORMAT = "iotdlm-backup"
VERSION = 1
MANIFEST = "MANIFEST.json"
DATABASE_MEMBER = "database/iotdlm.db"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: what the data folder holds that is not copied: the live database (copied as a snapshot), logs,
#: and the embedded NATS server's live state
SKIPPED = ("db/iotdlm.db", "db/iotdlm.db-wal", "db/iotdlm.db-shm", "db/iotdlm.db-journal", "db/iotdlm.db-write.lock")
SKIPPED_FOLDERS = ("logs", "nats/jetstream")
SKIPPED_FILES = ("nats/nats-server.pid",)
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PART = re.compile(r"[A-Za-z0-9._@+=,-][A-Za-z0-9._@+=, -]{0,254}")


class Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str
    size: int
    sha256: str
    mode: int = 0o600


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    version: int
    created_at: str
    iotdlm_version: str
    #: "sqlite" (the snapshot is in the archive) or "postgresql" (back it up with pg_dump)
    database: str
    files: list[Entry]

    def to_bytes(self) -> bytes:
        return msgspec.json.encode(self)


def check_member_path(path: str) -> str:
    """A member name a restore may write: ``data/...`` or the database, relative, without ``..``."""
    parts = PurePosixPath(path).parts
    if (
        not path
        or path != str(PurePosixPath(*parts))
        or len(parts) < 2
        or not all(_PART.fullmatch(p) and p not in (".", "..") for p in parts)
        or (parts[0] != "data" and path != DATABASE_MEMBER)
    ):
        raise BadRequestError(f"the archive names a file {path!r} that a restore does not write", field="archive")
    return path


def parse_manifest(raw: bytes) -> Manifest:
    """The manifest of a backup archive, checked; :class:`BadRequestError` for anything else."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BadRequestError("the archive's manifest is too large", field="archive")
    try:
        manifest = msgspec.json.decode(raw, type=Manifest)
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"the archive's manifest is unreadable: {exc}", field="archive") from None
    if manifest.format != FORMAT:
        raise BadRequestError("this is not an iotdlm backup (made by `iotdlm backup`)", field="archive")
    if manifest.version != VERSION:
        raise BadRequestError(
            f"backup format version {manifest.version}: this iotdlm reads version {VERSION}", field="archive"
        )
    if manifest.database not in ("sqlite", "postgresql"):
        raise BadRequestError(f"unknown database kind {manifest.database!r} in the manifest", field="archive")
    seen: set[str] = set()
    for entry in manifest.files:
        check_member_path(entry.path)
        if entry.path in seen:
            raise BadRequestError(f"the manifest lists {entry.path} twice", field="archive")
        seen.add(entry.path)
        if entry.size < 0 or not _SHA256.fullmatch(entry.sha256) or not 0 <= entry.mode <= 0o777:
            raise BadRequestError(f"the manifest's entry for {entry.path} is malformed", field="archive")
    if (DATABASE_MEMBER in seen) != (manifest.database == "sqlite"):
        raise BadRequestError("the manifest and the database snapshot disagree", field="archive")
    if "data/iotdlm.toml" not in seen:
        raise BadRequestError("the archive holds no iotdlm.toml: it is not a deployment's backup", field="archive")
    return manifest


def data_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(member name, file) for every regular file of the data folder a backup copies, sorted."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if (
            path.is_symlink()
            or not path.is_file()
            or rel in SKIPPED
            or rel in SKIPPED_FILES
            or any(rel == f or rel.startswith(f + "/") for f in SKIPPED_FOLDERS)
        ):
            continue
        yield f"data/{rel}", path


def entry_for(name: str, data: bytes, mode: int) -> Entry:
    return Entry(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest(), mode=mode & 0o777)


def file_entry(name: str, path: Path) -> Entry:
    """The manifest entry of a (large, unchanging) file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return Entry(path=name, size=size, sha256=digest.hexdigest(), mode=0o600)


def write_archive(out: BinaryIO, manifest: Manifest, contents: dict[str, bytes], files: dict[str, Path]) -> None:
    """The manifest first, then each member in the manifest's order: from ``contents`` (bytes
    read once, when their entry was made) or streamed from ``files``."""
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        _add(tar, MANIFEST, len(raw := manifest.to_bytes()), io.BytesIO(raw))
        for e in manifest.files:
            if e.path in contents:
                _add(tar, e.path, e.size, io.BytesIO(contents[e.path]))
            else:
                with files[e.path].open("rb") as f:
                    _add(tar, e.path, e.size, f)


def _add(tar: tarfile.TarFile, name: str, size: int, data: BinaryIO) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, 0
    tar.addfile(info, data)


def extract_verified(archive: Path, dest: Path) -> Manifest:
    """Write every member of ``archive`` under the new, empty folder ``dest`` (``data/...``,
    ``database/...``), each checked against the manifest as it is written; raise
    :class:`BadRequestError` at the first member that is not exactly what the manifest lists
    (what was written stays in ``dest``, for the caller to remove)."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                raise BadRequestError(
                    f"{archive} does not start with a manifest: not an iotdlm backup", field="archive"
                )
            manifest = parse_manifest(_read_small(tar, first))
            wanted = {e.path: e for e in manifest.files}
            done: set[str] = set()
            while (member := tar.next()) is not None:
                entry = wanted.get(member.name)
                if entry is None or not member.isfile() or member.name in done or member.size != entry.size:
                    raise BadRequestError(
                        f"{archive}: member {member.name!r} is not what the manifest lists", field="archive"
                    )
                _extract(tar, member, entry, dest)
                done.add(member.name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise BadRequestError(f"{archive} is not a readable backup archive ({exc})", field="archive") from None
    missing = sorted(set(wanted) - done)
    if missing:
        raise BadRequestError(f"{archive} lacks {len(missing)} file(s) it lists, e.g. {missing[0]}", field="archive")
    return manifest


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_MANIFEST_BYTES:
        raise BadRequestError("the archive's manifest is too large", field="archive")
    f = tar.extractfile(member)
    assert f is not None  # a regular file member
    return f.read()


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, entry: Entry, dest: Path) -> None:
    target = dest.joinpath(*PurePosixPath(entry.path).parts)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    source = tar.extractfile(member)
    assert source is not None  # a regular file member
    digest = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, entry.mode | 0o600)
    with os.fdopen(fd, "wb") as f:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != entry.sha256:
        raise BadRequestError(f"{entry.path} in the archive does not match the manifest", field="archive")
