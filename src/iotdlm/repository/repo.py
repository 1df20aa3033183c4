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

This module is the vendor's operations (init, publish, refresh, rotate, read); the pieces it runs
on: :mod:`~iotdlm.repository.storage` (the folder, settings, logs, locks),
:mod:`~iotdlm.repository.keys` (private keys), :mod:`~iotdlm.repository.metadata` (the TUF roles
and their signing) and :mod:`~iotdlm.repository.reports` (download reports).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography import x509

# securesystemslib.signer and tuf.api.metadata re-export these names without __all__, which mypy
# --strict (no implicit re-export) does not see: the ignores below are for that alone.
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
from tuf.api.metadata import DelegatedRole, Delegations, TargetFile, Targets  # type: ignore[attr-defined]

from iotdlm.errors import BadRequestError, ConflictError, NotFoundError, UnsupportedError
from iotdlm.files import atomic_write
from iotdlm.pki.chain import load_certificates_pem
from iotdlm.pki.names import check_id
from iotdlm.repository.keys import Keyring
from iotdlm.repository.metadata import TufRepo
from iotdlm.repository.reports import Report, ReportLog, check_ca_bundle, report_body
from iotdlm.repository.storage import (
    ALGORITHMS,
    DEFAULT_EXPIRY,
    DTYPE_ROLE_PREFIX,
    KEY_ROLES,
    RELEASES,
    TOP_LEVEL_ROLES,
    PublishedLine,
    PublishedTarget,
    Settings,
    append_line,
    check_key_role,
    complete_lines,
    dtype_role,
    file_lock,
    json_encoder,
    published_decoder,
    role_ints,
    stream_copy,
    target_path,
    utc,
)


@dataclass(frozen=True)
class RoleInfo:
    """The current state of one role, for ``iotdlm repo status``."""

    role: str
    version: int
    expires: dt.datetime
    threshold: int
    keyids: tuple[str, ...]


# --- the vendor repository ----------------------------------------------------------------------
class VendorRepository:
    """The software vendor's remote repository folder. See the module docstring for the layout."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        settings_file = self.path / "repo.toml"
        if not settings_file.is_file():
            raise NotFoundError(
                f"{self.path} is not a repository: create one with "
                f"`iotdlm repo init --dir {self.path} --report-ca DATA/ca/service.pem`"
            )
        self._settings = self._load_settings()
        self._lock = threading.Lock()
        self._reports = ReportLog(self.reports_file, self.path / ".reports.lock")

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
    def _load_settings(self) -> Settings:
        try:
            return msgspec.toml.decode((self.path / "repo.toml").read_bytes(), type=Settings)
        except msgspec.DecodeError as exc:
            raise BadRequestError(f"{self.path / 'repo.toml'} is not valid: {exc}") from exc

    def _save_settings(self) -> None:
        atomic_write(self.path / "repo.toml", msgspec.toml.encode(self._settings), mode=0o644)

    @contextlib.contextmanager
    def _session(self, now: dt.datetime) -> Iterator[tuple[TufRepo, Keyring]]:
        """Exclusive access to the repository, with its current state loaded from disk."""
        with file_lock(self.path / ".lock", self._lock):
            self._settings = self._load_settings()
            keyring = Keyring(self.keys_dir)
            yield TufRepo(self.path, self._settings, keyring, utc(now)), keyring

    def _snapshot_view(self) -> TufRepo:
        """A read-only view of the current state (no lock: every file is replaced atomically)."""
        return TufRepo(self.path, self._load_settings(), None, None)

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
        now = utc(now)
        if algorithm not in ALGORITHMS:
            raise UnsupportedError(f"key algorithm {algorithm!r} is not supported; use one of {list(ALGORITHMS)}")
        thr = role_ints(thresholds or {}, "threshold")
        kpr = role_ints(keys_per_role or {}, "keys per role")
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
            exp[check_key_role(role)] = delta
        ca_bundle = None
        if report_ca is not None:
            ca_bundle = Path(report_ca).read_bytes()
            check_ca_bundle(ca_bundle)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConflictError(f"{path} already exists and is not an empty folder; choose a new one")
        for sub in ("metadata", "targets"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        (path / "keys").mkdir(mode=0o700, exist_ok=True)
        settings = Settings(
            algorithm=algorithm,
            thresholds=thr,
            keys_per_role=kpr,
            expiry_seconds={r: int(d.total_seconds()) for r, d in exp.items()},
            report_ca="report-ca.pem" if ca_bundle is not None else None,
        )
        if ca_bundle is not None:
            atomic_write(path / "report-ca.pem", ca_bundle, mode=0o644)
        keyring = Keyring(path / "keys")
        tuf = TufRepo(path, settings, keyring, now)
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
        now = utc(now)
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
            length, sha256 = stream_copy(image, folder, name, progress)
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
            published = PublishedLine(
                dtype=dtype,
                release_counter=release_counter,
                path=path,
                length=length,
                sha256=sha256,
                published_at=now,
            )
            append_line(self.published_file, json_encoder.encode(published))
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
        check_key_role(role)
        with self._session(now) as (tuf, keyring):
            old = list(keyring.active[role])
            new = keyring.generate(role, self._settings.keys_per_role[role], self._settings.algorithm)
            try:
                self._rotate_metadata(tuf, role, new)
            except BaseException:
                keyring.retire(role, [s.public_key.keyid for s in new])  # unused: out of the way
                raise
            keyring.retire(role, old)

    def _rotate_metadata(self, tuf: TufRepo, role: str, new: list[CryptoSigner]) -> None:
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
        check_key_role(role)
        with file_lock(self.path / ".lock", self._lock):
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

    def _published_index(self) -> dict[tuple[str, str], PublishedLine]:
        index: dict[tuple[str, str], PublishedLine] = {}
        for line in complete_lines(self.published_file):
            entry = published_decoder.decode(line)
            index[(entry.path, entry.sha256)] = entry
        return index

    def _published(self, view: TufRepo, role: str) -> list[PublishedTarget]:
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
        certs = check_ca_bundle(bundle)
        with file_lock(self.path / ".lock", self._lock):
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
        """Verify sm's signed report of a verified download and append it to ``reports.jsonl``
        (:meth:`iotdlm.repository.reports.ReportLog.record`: the order of the checks)."""
        return self._reports.record(token, now=now, cas=self.report_cas, published=self._published_index)

    def reports(self) -> list[Report]:
        """Every recorded report, oldest first."""
        return self._reports.all()


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


__all__ = [
    "ALGORITHMS",
    "DEFAULT_EXPIRY",
    "DTYPE_ROLE_PREFIX",
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
