"""The software vendor's remote repository ``repo`` (paper 4.4), as a TUF repository on python-tuf.

What the paper asks of ``repo`` and how TUF gives it:

- the signed announcement ``sig = sign(sk_repo, ver, dtype)`` (4.4.2, Fig. 7) and the signed
  metadata ``meta_repo = {data_repo, sig_repo}`` with the version, hash and size of the software
  (4.4.3, Algorithm 2): one *delegated targets role per device type*, ``dtype-<D>``, trusted for the
  paths ``<D>/*`` and signed by the "releases" key(s). Each target carries the Uptane-style custom
  fields ``{"hardware_id": D, "release_counter": V}``, so the role's signature covers ver and dtype,
  and TUF's own fields carry the length and the SHA-256 of the image.
- freshness, rollback and mix-and-match protection (3.1.3: an outdated or tampered image): TUF's
  timestamp and snapshot roles, with consistent snapshots.
- key compromise recovery: every role may have several keys and a threshold, and every key can be
  rotated; clients follow root rotations through the root chain.
- the report of a verified download (4.4.5): :meth:`VendorRepository.record_report` checks sm's
  signed envelope (:mod:`iotdlm.wire.envelope`) and appends it to ``reports.jsonl``.

On disk (``REPO``)::

    repo.toml                          settings: algorithm, thresholds, keys per role, expiries, report CA
    metadata/N.root.json               every root version (the client's trust chain)
    metadata/timestamp.json            the only unversioned file: the commit point of every change
    metadata/N.snapshot.json  N.targets.json  N.dtype-<D>.json
    targets/<D>/<sha256>.<name>        images, under their consistent-snapshot names
    keys/<role>-<i>.pem                private keys (mode 0600) of root, targets, snapshot, timestamp, releases
    keys/retired/<role>-<i>.pem        keys replaced by a rotation
    report-ca.pem                      CAs whose certificates may sign download reports
    reports.jsonl                      verified download reports, append-only
    published.jsonl                    every image ever published (dtype, counter, path, hash, time)

Writers take an exclusive file lock on ``REPO/.lock`` (reports: ``REPO/.reports.lock``), so the CLI
may publish while ``iotdlm repo serve`` runs. Files are written whole and renamed into place, and
``timestamp.json`` is written last: a client never sees half an update.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import fcntl
import hashlib
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# securesystemslib.signer, tuf.api.metadata and tuf.repository re-export these names without __all__,
# which mypy --strict (no implicit re-export) does not see: the ignores below are for that alone.
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (  # type: ignore[attr-defined]
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository  # type: ignore[attr-defined]

from iotdlm.errors import (
    BadRequestError,
    ConflictError,
    IotdlmError,
    NotFoundError,
    ReplayError,
    UnsupportedError,
    UntrustedError,
)
from iotdlm.files import atomic_write
from iotdlm.pki.chain import load_certificate, load_certificates_pem, verify_issued_by
from iotdlm.pki.keys import algorithm_of, check_public_key
from iotdlm.pki.names import check_id
from iotdlm.wire import envelope
from iotdlm.wire.report import (
    MAX_REPORT_BYTES,
    OP_REPORT,
    REPORT_AUDIENCE,
    ReportBody,
    decode_report_body,
    verified_time,
)

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
MAX_CA_BUNDLE_BYTES: Final = 1024 * 1024
CHUNK: Final = 1024 * 1024
DTYPE_ROLE_PREFIX: Final = "dtype-"

_KEY_FILE_RE = re.compile(r"^(?P<role>[a-z]+)-(?P<index>[0-9]+)\.pem$")
_VERSIONED_RE = re.compile(r"^(?P<version>[1-9][0-9]*)\.(?P<role>.+)\.json$")
_SERIALIZER = JSONSerializer(compact=False)


def dtype_role(dtype: str) -> str:
    """The delegated targets role that signs the releases of device type ``dtype``."""
    return DTYPE_ROLE_PREFIX + check_id(dtype, "dtype")


def target_path(dtype: str, name: str) -> str:
    """The TUF target path of image ``name`` of device type ``dtype``: ``<dtype>/<name>``."""
    return f"{check_id(dtype, 'dtype')}/{check_id(name, 'target name')}"


# --- public records -----------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Report:
    """A verified download report from sm (paper 4.4.5)."""

    dtype: str
    release_counter: int
    target_path: str
    sha256: str
    reporter: str  # subject CN of the certificate that signed the report
    received_at: dt.datetime
    nonce: str
    verified_at: dt.datetime | None = None
    length: int | None = None


@dataclass(frozen=True)
class RoleInfo:
    """The current state of one role, for ``iotdlm repo status``."""

    role: str
    version: int
    expires: dt.datetime
    threshold: int
    keyids: tuple[str, ...]


# --- persisted formats --------------------------------------------------------------------------
class _Settings(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    format: int = 1
    algorithm: str
    thresholds: dict[str, int]
    keys_per_role: dict[str, int]
    expiry_seconds: dict[str, int]
    report_ca: str | None = None  # file name inside REPO


class _PublishedLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    release_counter: int
    path: str
    length: int
    sha256: str
    published_at: dt.datetime


class _ReportLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    release_counter: int
    target_path: str
    sha256: str
    length: int
    reporter: str
    received_at: dt.datetime
    verified_at: dt.datetime
    nonce: str
    serial: str


_published_decoder = msgspec.json.Decoder(_PublishedLine)
_report_line_decoder = msgspec.json.Decoder(_ReportLine)
_json = msgspec.json.Encoder()


# --- small file helpers -------------------------------------------------------------------------
def _utc(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(dt.UTC)


def _complete_lines(path: Path) -> list[bytes]:
    """The non-empty, newline-terminated lines of an append-only file (a line being appended is skipped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [line for line in data[: data.rfind(b"\n") + 1].splitlines() if line.strip()]


def _append_line(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _file_lock(path: Path, tlock: threading.Lock) -> Iterator[None]:
    """Exclusive between threads of this process (tlock) and between processes (flock)."""
    with tlock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _cn(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return cert.subject.rfc4514_string()


def _check_ca_bundle(data: bytes) -> list[x509.Certificate]:
    if len(data) > MAX_CA_BUNDLE_BYTES:
        raise BadRequestError(f"CA bundle of {len(data)} bytes exceeds the limit of {MAX_CA_BUNDLE_BYTES}")
    certs = load_certificates_pem(data)
    if not certs:
        raise BadRequestError("the CA bundle holds no certificate")
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        except ValueError as exc:
            raise BadRequestError("a certificate in the CA bundle has a malformed basicConstraints extension") from exc
        if bc is None or not bc.ca:
            raise BadRequestError(
                f"{cert.subject.rfc4514_string()} in the CA bundle is not a CA certificate (basicConstraints cA)"
            )
    return certs


# --- keys ---------------------------------------------------------------------------------------
class _Keyring:
    """Every private key in ``keys/`` (active) and ``keys/retired/``, by TUF keyid."""

    def __init__(self, keys_dir: Path) -> None:
        self.dir = keys_dir
        self.signers: dict[str, CryptoSigner] = {}
        self.active: dict[str, list[str]] = {role: [] for role in KEY_ROLES}
        self.files: dict[str, Path] = {}
        for folder, active in ((keys_dir, True), (keys_dir / "retired", False)):
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.pem")):
                m = _KEY_FILE_RE.match(path.name)
                if m is None or m["role"] not in KEY_ROLES:
                    continue
                private = serialization.load_pem_private_key(path.read_bytes(), password=None)
                signer = CryptoSigner(private)
                keyid = signer.public_key.keyid
                self.signers[keyid] = signer
                self.files[keyid] = path
                if active:
                    self.active[m["role"]].append(keyid)

    def next_index(self, role: str) -> int:
        used = [
            int(m["index"])
            for folder in (self.dir, self.dir / "retired")
            if folder.is_dir()
            for p in folder.glob(f"{role}-*.pem")
            if (m := _KEY_FILE_RE.match(p.name)) is not None
        ]
        return max(used, default=-1) + 1

    def generate(self, role: str, count: int, algorithm: str) -> list[CryptoSigner]:
        """New keys for ``role``, written to ``keys/<role>-<i>.pem`` (0600) before anything uses them."""
        out: list[CryptoSigner] = []
        index = self.next_index(role)
        for _ in range(count):
            signer = CryptoSigner.generate_ed25519() if algorithm == "ed25519" else CryptoSigner.generate_ecdsa()
            path = self.dir / f"{role}-{index}.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(signer.private_bytes)
                f.flush()
                os.fsync(f.fileno())
            keyid = signer.public_key.keyid
            self.signers[keyid] = signer
            self.files[keyid] = path
            self.active[role].append(keyid)
            out.append(signer)
            index += 1
        return out

    def retire(self, role: str, keyids: Sequence[str]) -> None:
        retired = self.dir / "retired"
        retired.mkdir(mode=0o700, exist_ok=True)
        for keyid in keyids:
            path = self.files.get(keyid)
            if path is None or path.parent != self.dir:
                continue
            dest = retired / path.name
            os.replace(path, dest)
            self.files[keyid] = dest
            if keyid in self.active[role]:
                self.active[role].remove(keyid)


# --- the TUF repository (python-tuf's Repository abstraction) -----------------------------------
class _TufRepo(Repository):
    """python-tuf's :class:`tuf.repository.Repository` over our folder, for one operation at ``now``.

    ``open`` reads the current version of a role (as referenced by timestamp -> snapshot, and the
    highest ``N.root.json``); ``close`` bumps the version, sets the expiry, signs with the role's
    keys (root: the previous root's keys too), checks the threshold is met and writes the file.
    """

    def __init__(self, root_dir: Path, settings: _Settings, keyring: _Keyring | None, now: dt.datetime | None) -> None:
        """``keyring`` and ``now`` are None for a read-only view (which cannot sign)."""
        self._dir = root_dir / "metadata"
        self._settings = settings
        self._keys = keyring
        self._now = now
        self._cache: dict[str, Metadata[Any]] = {}
        self._load()

    # -- loading
    def _read(self, name: str) -> Metadata[Any]:
        return Metadata.from_bytes((self._dir / name).read_bytes())

    def _load(self) -> None:
        versions = [
            int(m["version"])
            for p in self._dir.glob("*.root.json")
            if (m := _VERSIONED_RE.match(p.name)) is not None and m["role"] == "root"
        ]
        if not versions:
            return
        self._cache["root"] = self._read(f"{max(versions)}.root.json")
        if not (self._dir / "timestamp.json").exists():
            return
        ts = self._read("timestamp.json")
        self._cache["timestamp"] = ts
        snap = self._read(f"{ts.signed.snapshot_meta.version}.snapshot.json")
        self._cache["snapshot"] = snap
        for name, meta in snap.signed.meta.items():
            role = name.removesuffix(".json")
            self._cache[role] = self._read(f"{meta.version}.{role}.json")

    # -- Repository interface
    def open(self, role: str) -> Metadata[Any]:
        md = self._cache.get(role)
        if md is not None:
            return copy.deepcopy(md)
        signed: Root | Timestamp | Snapshot | Targets
        if role == "root":
            signed = Root()
        elif role == "timestamp":
            signed = Timestamp()
        elif role == "snapshot":
            signed = Snapshot()
        else:
            signed = Targets()
        new: Metadata[Any] = Metadata(signed)
        new.signed.version = 0  # close() bumps it to 1
        return new

    def close(self, role: str, md: Metadata[Any]) -> None:
        if self._now is None:
            raise RuntimeError("a read-only view of the repository cannot sign")
        md.signed.version += 1
        md.signed.expires = self._now + self.expiry(role)
        md.signatures.clear()
        for signer in self._signers_for(role, md):
            md.sign(signer, append=True)
        self._check_threshold(role, md)
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        atomic_write(self._dir / name, md.to_bytes(_SERIALIZER), mode=0o644)
        self._cache[role] = md

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {
            f"{role}.json": MetaFile(version=md.signed.version)
            for role, md in self._cache.items()
            if role == "targets" or role.startswith(DTYPE_ROLE_PREFIX)
        }

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(version=self._cache["snapshot"].signed.version)

    # -- helpers
    def expiry(self, role: str) -> dt.timedelta:
        key = role if role in TOP_LEVEL_ROLES else RELEASES
        return dt.timedelta(seconds=self._settings.expiry_seconds[key])

    def has(self, role: str) -> bool:
        return role in self._cache

    def current(self, role: str) -> Metadata[Any]:
        return self._cache[role]

    def dtype_roles(self) -> list[str]:
        return sorted(r for r in self._cache if r.startswith(DTYPE_ROLE_PREFIX))

    def delegated_targets(self, role: str) -> Targets:
        signed = self._cache[role].signed
        assert isinstance(signed, Targets)
        return signed

    def _delegator(self, role: str) -> Root | Targets:
        delegator = self._cache["root" if role in TOP_LEVEL_ROLES else "targets"].signed
        assert isinstance(delegator, Root | Targets)
        return delegator

    def _signers_for(self, role: str, md: Metadata[Any]) -> list[CryptoSigner]:
        if self._keys is None:
            raise RuntimeError("a read-only view of the repository cannot sign")
        keyids: list[str] = []
        if role == "root":
            keyids.extend(md.signed.roles["root"].keyids)
            if "root" in self._cache:  # Algorithm of TUF 5.3.4: a new root is signed by the old root too
                keyids.extend(k for k in self._cache["root"].signed.roles["root"].keyids if k not in keyids)
        else:
            keyids.extend(self._delegator(role).get_delegated_role(role).keyids)
        return [self._keys.signers[k] for k in keyids if k in self._keys.signers]

    def _check_threshold(self, role: str, md: Metadata[Any]) -> None:
        payload = md.signed_bytes
        try:
            if role == "root":
                md.signed.verify_delegate("root", payload, md.signatures)
                if "root" in self._cache:
                    self._cache["root"].signed.verify_delegate("root", payload, md.signatures)
            else:
                self._delegator(role).verify_delegate(role, payload, md.signatures)
        except UnsignedMetadataError as exc:
            raise IotdlmError(f"cannot sign {role}: {exc}; are its private keys missing from keys/?") from exc


# --- the vendor repository ----------------------------------------------------------------------
class VendorRepository:
    """The software vendor's remote repository folder. See the module docstring for the layout."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        settings_file = self.path / "repo.toml"
        if not settings_file.is_file():
            raise NotFoundError(
                f"{self.path} is not a repository: create one with `iotdlm repo init --dir {self.path}`"
            )
        self._settings = self._load_settings()
        self._lock = threading.Lock()
        self._reports_lock = threading.Lock()
        self._nonces: set[str] = set()
        self._reports_offset = 0

    # -- folders
    @property
    def metadata_dir(self) -> Path:
        return self.path / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.path / "targets"

    @property
    def keys_dir(self) -> Path:
        return self.path / "keys"

    @property
    def reports_file(self) -> Path:
        return self.path / "reports.jsonl"

    @property
    def published_file(self) -> Path:
        return self.path / "published.jsonl"

    # -- settings
    def _load_settings(self) -> _Settings:
        try:
            return msgspec.toml.decode((self.path / "repo.toml").read_bytes(), type=_Settings)
        except msgspec.DecodeError as exc:
            raise BadRequestError(f"{self.path / 'repo.toml'} is not valid: {exc}") from exc

    def _save_settings(self) -> None:
        atomic_write(self.path / "repo.toml", msgspec.toml.encode(self._settings), mode=0o644)

    @contextlib.contextmanager
    def _session(self, now: dt.datetime) -> Iterator[tuple[_TufRepo, _Keyring]]:
        """Exclusive access to the repository, with its current state loaded from disk."""
        with _file_lock(self.path / ".lock", self._lock):
            self._settings = self._load_settings()
            keyring = _Keyring(self.keys_dir)
            yield _TufRepo(self.path, self._settings, keyring, _utc(now)), keyring

    def _snapshot_view(self) -> _TufRepo:
        """A read-only view of the current state (no lock: every file is replaced atomically)."""
        return _TufRepo(self.path, self._load_settings(), None, None)

    # -- creation
    @classmethod
    def init(
        cls,
        path: Path,
        *,
        now: dt.datetime,
        algorithm: str = "ecdsa-p256",
        thresholds: dict[str, int] | None = None,
        keys_per_role: dict[str, int] | None = None,
        expiry: dict[str, dt.timedelta] | None = None,
        report_ca: Path | None = None,
    ) -> VendorRepository:
        """Create a repository: keys for every role, root v1 (self-signed), empty targets, snapshot, timestamp."""
        path = Path(path)
        now = _utc(now)
        if algorithm not in ALGORITHMS:
            raise UnsupportedError(f"key algorithm {algorithm!r} is not supported; use one of {list(ALGORITHMS)}")
        thr = _role_ints(thresholds or {}, "threshold")
        kpr = _role_ints(keys_per_role or {}, "keys per role")
        for role in KEY_ROLES:
            thr.setdefault(role, 1)
            kpr.setdefault(role, thr[role])
            if thr[role] > kpr[role]:
                raise BadRequestError(
                    f"threshold {thr[role]} of role {role} is larger than its number of keys ({kpr[role]})",
                    field="threshold",
                )
        exp = dict(DEFAULT_EXPIRY)
        for role, delta in (expiry or {}).items():
            exp[_check_key_role(role)] = delta
        ca_bundle = None
        if report_ca is not None:
            ca_bundle = Path(report_ca).read_bytes()
            _check_ca_bundle(ca_bundle)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConflictError(f"{path} already exists and is not an empty folder; choose a new one")
        for sub in ("metadata", "targets"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        (path / "keys").mkdir(mode=0o700, exist_ok=True)
        settings = _Settings(
            algorithm=algorithm,
            thresholds=thr,
            keys_per_role=kpr,
            expiry_seconds={r: int(d.total_seconds()) for r, d in exp.items()},
            report_ca="report-ca.pem" if ca_bundle is not None else None,
        )
        if ca_bundle is not None:
            atomic_write(path / "report-ca.pem", ca_bundle, mode=0o644)
        keyring = _Keyring(path / "keys")
        tuf = _TufRepo(path, settings, keyring, now)
        for role in KEY_ROLES:
            keyring.generate(role, kpr[role], algorithm)
        with tuf.edit_root() as root:
            for role in TOP_LEVEL_ROLES:
                for keyid in keyring.active[role]:
                    root.add_key(keyring.signers[keyid].public_key, role)
                root.roles[role].threshold = thr[role]
            root.consistent_snapshot = True
        with tuf.edit_targets():
            pass
        tuf.do_snapshot()
        tuf.do_timestamp()
        atomic_write(path / "repo.toml", msgspec.toml.encode(settings), mode=0o644)  # last: now it is a repository
        return cls(path)

    # -- publishing (paper 4.4.2-4.4.3: the signed announcement and metadata of sw_j)
    def publish(
        self,
        dtype: str,
        release_counter: int,
        image: Path,
        *,
        now: dt.datetime,
        name: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> PublishedTarget:
        """Sign image ``image`` as release ``release_counter`` of device type ``dtype``.

        The image is streamed (hashed and copied chunk by chunk, never read whole) into
        ``targets/<dtype>/<sha256>.<name>``; then the ``dtype-<dtype>`` role (created, and delegated
        from targets, on the first publish of ``dtype``), snapshot and timestamp are signed.
        ``release_counter`` must be greater than every counter published for ``dtype``
        (ConflictError otherwise). Publishing a ``name`` already published replaces its entry in
        the metadata (the older image stays on disk for clients in the middle of an update).
        ``progress`` is called with the number of bytes processed, chunk by chunk.
        """
        now = _utc(now)
        check_id(dtype, "dtype")
        if isinstance(release_counter, bool) or not isinstance(release_counter, int) or release_counter < 1:
            raise BadRequestError(
                f"release counter must be an integer >= 1, got {release_counter!r}", field="release_counter"
            )
        image = Path(image)
        if not image.is_file():
            raise NotFoundError(f"image {image} does not exist or is not a file")
        name = check_id(name if name is not None else image.name, "target name")
        path = f"{dtype}/{name}"
        role = dtype_role(dtype)
        with self._session(now) as (tuf, keyring):
            if tuf.has(role):
                _check_counter(tuf.delegated_targets(role), dtype, release_counter)
            folder = self.targets_dir / dtype
            folder.mkdir(exist_ok=True)
            length, sha256 = _stream_copy(image, folder, name, progress)
            target = TargetFile(
                length=length,
                hashes={"sha256": sha256},
                path=path,
                unrecognized_fields={"custom": {"hardware_id": dtype, "release_counter": release_counter}},
            )
            if not tuf.has(role):
                with tuf.edit_targets() as targets:
                    if targets.delegations is None:
                        targets.delegations = Delegations(keys={}, roles={})
                    assert targets.delegations.roles is not None
                    targets.delegations.roles[role] = DelegatedRole(
                        name=role,
                        keyids=[],
                        threshold=self._settings.thresholds[RELEASES],
                        terminating=True,
                        paths=[f"{dtype}/*"],
                    )
                    for keyid in keyring.active[RELEASES]:
                        targets.add_key(keyring.signers[keyid].public_key, role)
            with tuf.edit_targets(role) as delegated:
                delegated.targets[path] = target
            published = _PublishedLine(
                dtype=dtype,
                release_counter=release_counter,
                path=path,
                length=length,
                sha256=sha256,
                published_at=now,
            )
            _append_line(self.published_file, _json.encode(published))
            tuf.do_snapshot()
            tuf.do_timestamp()  # the commit point: clients see the release from here on
        return PublishedTarget(
            dtype=dtype, release_counter=release_counter, path=path, length=length, sha256=sha256, published_at=now
        )

    # -- keeping metadata fresh and keys current
    def refresh(self, *, now: dt.datetime, roles: Sequence[str] = ("timestamp",)) -> None:
        """Sign new versions of ``roles`` with a new expiry (and whatever then depends on them).

        Roles: root, targets, snapshot, timestamp, releases (every dtype role) or ``dtype-<D>``.
        A new targets or dtype role brings a new snapshot; a new snapshot brings a new timestamp.
        """
        wanted = set(roles)
        for role in wanted:
            if role not in KEY_ROLES and not role.startswith(DTYPE_ROLE_PREFIX):
                raise BadRequestError(f"unknown role {role!r}: use one of {list(KEY_ROLES)} or dtype-<D>", field="role")
        with self._session(now) as (tuf, _):
            delegated = set(tuf.dtype_roles()) if RELEASES in wanted else set()
            for role in wanted:
                if role.startswith(DTYPE_ROLE_PREFIX):
                    if not tuf.has(role):
                        raise NotFoundError(f"role {role} does not exist: nothing was published for that dtype")
                    delegated.add(role)
            if "root" in wanted:
                with tuf.edit_root():
                    pass
            for role in sorted(delegated):
                with tuf.edit_targets(role):
                    pass
            if "targets" in wanted:
                with tuf.edit_targets():
                    pass
            changed = bool(delegated) or "targets" in wanted
            if changed or "snapshot" in wanted:
                tuf.do_snapshot(force="snapshot" in wanted)
            if changed or wanted & {"snapshot", "timestamp"}:
                tuf.do_timestamp(force=True)

    def rotate(self, role: str, *, now: dt.datetime) -> None:
        """Replace the keys of ``role`` (root, targets, snapshot, timestamp or releases).

        Root: root N+1 lists the new root keys and is signed by the old AND the new ones, so a
        client holding root N follows the chain. targets / snapshot / timestamp: a new root lists
        the new keys, then the role and what depends on it are signed again. releases: the
        delegations in targets list the new keys, then every dtype role, targets, snapshot and
        timestamp are signed again. Old private keys move to ``keys/retired/``.
        """
        _check_key_role(role)
        with self._session(now) as (tuf, keyring):
            old = list(keyring.active[role])
            new = keyring.generate(role, self._settings.keys_per_role[role], self._settings.algorithm)
            try:
                self._rotate_metadata(tuf, role, new)
            except BaseException:
                keyring.retire(role, [s.public_key.keyid for s in new])  # unused: out of the way
                raise
            keyring.retire(role, old)

    def _rotate_metadata(self, tuf: _TufRepo, role: str, new: list[CryptoSigner]) -> None:
        if role in TOP_LEVEL_ROLES:
            with tuf.edit_root() as root:
                for keyid in list(root.roles[role].keyids):
                    root.revoke_key(keyid, role)
                for signer in new:
                    root.add_key(signer.public_key, role)
                root.roles[role].threshold = self._settings.thresholds[role]
            if role == "targets":
                with tuf.edit_targets():
                    pass
                tuf.do_snapshot()
                tuf.do_timestamp()
            elif role == "snapshot":
                tuf.do_snapshot(force=True)
                tuf.do_timestamp()
            elif role == "timestamp":
                tuf.do_timestamp(force=True)
        else:
            dtypes = tuf.dtype_roles()
            if dtypes:
                with tuf.edit_targets() as targets:
                    for delegated in dtypes:
                        for keyid in list(targets.get_delegated_role(delegated).keyids):
                            targets.revoke_key(keyid, delegated)
                        for signer in new:
                            targets.add_key(signer.public_key, delegated)
                for delegated in dtypes:
                    with tuf.edit_targets(delegated):
                        pass
                tuf.do_snapshot()
                tuf.do_timestamp()

    def set_expiry(self, role: str, delta: dt.timedelta) -> None:
        """Expiry period of ``role`` (root, targets, snapshot, timestamp, releases) for its next signing.

        Persisted in repo.toml. Negative periods are accepted (they make metadata expire at once:
        what tests of clients need).
        """
        _check_key_role(role)
        with _file_lock(self.path / ".lock", self._lock):
            self._settings = self._load_settings()
            self._settings.expiry_seconds[role] = int(delta.total_seconds())
            self._save_settings()

    # -- reading
    def trusted_root(self) -> bytes:
        """Bytes of ``1.root.json``: the trust anchor clients (sm, pm) are given out of band."""
        return (self.metadata_dir / "1.root.json").read_bytes()

    def latest(self, dtype: str) -> PublishedTarget | None:
        """The release of ``dtype`` with the highest release counter, or None."""
        role = dtype_role(dtype)
        view = self._snapshot_view()
        if not view.has(role):
            return None
        found = self._published(view, role)
        return max(found, key=lambda t: t.release_counter) if found else None

    def list_targets(self) -> list[PublishedTarget]:
        """Every target in the current metadata, by dtype then release counter."""
        view = self._snapshot_view()
        out: list[PublishedTarget] = []
        for role in view.dtype_roles():
            out.extend(self._published(view, role))
        return sorted(out, key=lambda t: (t.dtype, t.release_counter))

    def roles(self) -> list[RoleInfo]:
        """Version, expiry, threshold and keys of every role in the current metadata."""
        view = self._snapshot_view()
        out: list[RoleInfo] = []
        root = view.current("root").signed
        for role in TOP_LEVEL_ROLES:
            md = view.current(role)
            r = root.roles[role]
            out.append(RoleInfo(role, md.signed.version, md.signed.expires, r.threshold, tuple(r.keyids)))
        targets = view.current("targets").signed
        for role in view.dtype_roles():
            md = view.current(role)
            d = targets.get_delegated_role(role)
            out.append(RoleInfo(role, md.signed.version, md.signed.expires, d.threshold, tuple(d.keyids)))
        return out

    def _published_index(self) -> dict[tuple[str, str], _PublishedLine]:
        index: dict[tuple[str, str], _PublishedLine] = {}
        for line in _complete_lines(self.published_file):
            entry = _published_decoder.decode(line)
            index[(entry.path, entry.sha256)] = entry
        return index

    def _published(self, view: _TufRepo, role: str) -> list[PublishedTarget]:
        index = self._published_index()
        out: list[PublishedTarget] = []
        for path, target in view.delegated_targets(role).targets.items():
            custom = target.custom if isinstance(target.custom, dict) else {}
            sha256 = target.hashes["sha256"]
            entry = index.get((path, sha256))
            out.append(
                PublishedTarget(
                    dtype=str(custom.get("hardware_id")),
                    release_counter=int(custom.get("release_counter", 0)),
                    path=path,
                    length=target.length,
                    sha256=sha256,
                    published_at=entry.published_at if entry else dt.datetime.fromtimestamp(0, dt.UTC),
                )
            )
        return out

    # -- report CAs
    def report_cas(self) -> list[x509.Certificate]:
        """The CAs whose certificates may sign download reports (empty: reports are refused)."""
        settings = self._load_settings()
        if settings.report_ca is None:
            return []
        file = self.path / settings.report_ca
        if not file.is_file():
            return []
        return load_certificates_pem(file.read_bytes())

    def trust_report_ca(self, bundle: bytes, *, append: bool = False) -> list[x509.Certificate]:
        """Set (or, with ``append``, extend) the CAs trusted to issue report signers' certificates."""
        certs = _check_ca_bundle(bundle)
        with _file_lock(self.path / ".lock", self._lock):
            self._settings = self._load_settings()
            file = self.path / "report-ca.pem"
            data = bundle
            if append and self._settings.report_ca is not None and (self.path / self._settings.report_ca).is_file():
                data = (self.path / self._settings.report_ca).read_bytes().rstrip(b"\n") + b"\n" + bundle
            atomic_write(file, data, mode=0o644)
            self._settings.report_ca = file.name
            self._save_settings()
        return load_certificates_pem(data) if append else certs

    # -- download reports (paper 4.4.5)
    def record_report(self, token: bytes, *, now: dt.datetime) -> Report:
        """Verify sm's signed report of a verified download and append it to ``reports.jsonl``.

        Order: bounded header parse -> signer certificate issued by a trusted report CA and valid
        -> JWS signature, op, aud, time window -> body -> nonce never seen -> the target was
        published with that hash -> recorded. Any failure raises (BadRequestError, TooLargeError,
        UntrustedError, BadSignatureError, ReplayError, NotFoundError) and records nothing.
        """
        now = _utc(now)
        alg, leaf = envelope.peek_signer(token, max_bytes=MAX_REPORT_BYTES)
        cert, key = self._trusted_reporter(leaf, alg, now)
        env = envelope.verify(token, cert, key, alg=alg, op=OP_REPORT, aud=REPORT_AUDIENCE, now=now)
        body = decode_report_body(env.body)
        verified_at = verified_time(body)
        with _file_lock(self.path / ".reports.lock", self._reports_lock):
            self._sync_nonces()
            if env.nonce in self._nonces:
                raise ReplayError("this report was received before (its nonce is spent)", field="nonce")
            entry = self._published_index().get((body.target_path, body.sha256))
            if entry is None:
                raise NotFoundError(
                    f"no target {body.target_path} with sha256 {body.sha256} was published here", field="target_path"
                )
            if (entry.dtype, entry.release_counter, entry.length) != (body.dtype, body.release_counter, body.length):
                raise BadRequestError(
                    f"report says {body.target_path} is release {body.release_counter} of {body.dtype} "
                    f"({body.length} bytes); it was published as release {entry.release_counter} of "
                    f"{entry.dtype} ({entry.length} bytes)",
                    field="release_counter",
                )
            line = _ReportLine(
                dtype=body.dtype,
                release_counter=body.release_counter,
                target_path=body.target_path,
                sha256=body.sha256,
                length=body.length,
                reporter=_cn(cert),
                received_at=now,
                verified_at=verified_at,
                nonce=env.nonce,
                serial=format(cert.serial_number, "x"),
            )
            _append_line(self.reports_file, _json.encode(line))
            self._nonces.add(env.nonce)
            self._reports_offset = self.reports_file.stat().st_size
        return _report_of(line)

    def reports(self) -> list[Report]:
        """Every recorded report, oldest first."""
        return [_report_of(_report_line_decoder.decode(line)) for line in _complete_lines(self.reports_file)]

    def _sync_nonces(self) -> None:
        """Read the nonces of reports appended since last time (by any process)."""
        if not self.reports_file.exists():
            return
        with self.reports_file.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < self._reports_offset:
                self._nonces.clear()
                self._reports_offset = 0
            f.seek(self._reports_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            if line.strip():
                self._nonces.add(_report_line_decoder.decode(line).nonce)
        self._reports_offset += len(complete)

    def _trusted_reporter(self, leaf: bytes, alg: str, now: dt.datetime) -> tuple[x509.Certificate, envelope.JoseKey]:
        cas = self.report_cas()
        if not cas:
            raise UntrustedError(
                "this repository trusts no CA for download reports; configure one with `iotdlm repo trust --ca FILE`"
            )
        cert = load_certificate(leaf)
        try:
            subject = cert.subject.rfc4514_string()
            candidates = [ca for ca in cas if ca.subject == cert.issuer]
            if not candidates:
                raise UntrustedError(f"report signer {subject} is not issued by a CA this repository trusts")
            failure: UntrustedError | None = None
            for ca in candidates:
                if not (ca.not_valid_before_utc <= now <= ca.not_valid_after_utc):
                    failure = UntrustedError(f"report CA {ca.subject.rfc4514_string()} is not valid now")
                    continue
                try:
                    verify_issued_by(cert, ca, now=now, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
                except UntrustedError as exc:
                    failure = exc
                    continue
                public = check_public_key(cert.public_key())
                if envelope.JWS_ALG[algorithm_of(public)] != alg:
                    raise BadRequestError(f"JWS algorithm {alg} does not match the signer's key", field="alg")
                return cert, envelope.jose_key(public)
            assert failure is not None
            raise failure
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # cryptography parses extensions and keys lazily: a malformed one surfaces here
            raise UntrustedError("report signer certificate has a malformed extension or public key") from exc


# --- module helpers -----------------------------------------------------------------------------
def _check_key_role(role: str) -> str:
    if role not in KEY_ROLES:
        raise BadRequestError(f"unknown role {role!r}: use one of {list(KEY_ROLES)}", field="role")
    return role


def _role_ints(values: dict[str, int], what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for role, n in values.items():
        _check_key_role(role)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise BadRequestError(f"{what} of role {role} must be an integer >= 1, got {n!r}", field=what)
        out[role] = n
    return out


def _check_counter(existing: Targets, dtype: str, release_counter: int) -> None:
    """Release counters of a dtype only grow (rollback protection at the source)."""
    counters = [
        int(t.custom["release_counter"])
        for t in existing.targets.values()
        if isinstance(t.custom, dict) and "release_counter" in t.custom
    ]
    if counters and release_counter <= max(counters):
        raise ConflictError(
            f"release counter {release_counter} of {dtype} is not greater than the latest published, {max(counters)}",
            field="release_counter",
        )


def _stream_copy(image: Path, folder: Path, name: str, progress: Callable[[int], None] | None) -> tuple[int, str]:
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


def _report_of(line: _ReportLine) -> Report:
    return Report(
        dtype=line.dtype,
        release_counter=line.release_counter,
        target_path=line.target_path,
        sha256=line.sha256,
        reporter=line.reporter,
        received_at=line.received_at,
        nonce=line.nonce,
        verified_at=line.verified_at,
        length=line.length,
    )


def report_body(target: PublishedTarget, *, verified_at: dt.datetime) -> dict[str, Any]:
    """The body sm seals (op ``repository.report``, aud ``repository``) to report ``target`` verified."""
    body = ReportBody(
        dtype=target.dtype,
        release_counter=target.release_counter,
        target_path=target.path,
        sha256=target.sha256,
        length=target.length,
        verified_at=_utc(verified_at),
    )
    out: dict[str, Any] = msgspec.to_builtins(body)
    return out


__all__ = [
    "ALGORITHMS",
    "DEFAULT_EXPIRY",
    "KEY_ROLES",
    "RELEASES",
    "TOP_LEVEL_ROLES",
    "PublishedTarget",
    "Report",
    "RoleInfo",
    "VendorRepository",
    "dtype_role",
    "report_body",
    "target_path",
]
