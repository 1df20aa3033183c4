"""Algorithm 2 on python-tuf's ngclient: check, verify, download, store, sign, report.

One :meth:`SoftwareManager.check` for a dtype D:

1. *Check for new software without revealing the installed one* (4.4.2, Req.6): ngclient refreshes
   root, timestamp, snapshot and top-level targets, then loads the delegated role ``dtype-D``. The
   only requests are TUF metadata fetches; the one that names anything names the dtype
   (``N.dtype-D.json``). The installed release counter never leaves this process.
2. *Verify* ``sig_{j+a}`` (ngclient: signatures and thresholds from the pinned root, expiry -- a
   freeze attack is refused --, rollback of metadata versions, snapshot consistency), then pick the
   target of ``dtype-D`` with the greatest ``custom.release_counter``; refuse it unless
   ``custom.hardware_id == D``. A greatest counter lower than one seen before in verified metadata
   is a rollback attempt: refused (and reported as a ``refused`` event by the service). Equal to or
   lower than the one stored locally: nothing to do.
3. *Download* ``meta_repo`` (already verified) and ``sw_{j+a}``: streamed into a staging folder of
   the local repository with the signed length as a hard cap (a server sending more is cut off),
   hashed on the fly, once: the signed hashes (the SHA-256 among them is what ``sig_sm`` signs, ADR 0024).
4. *Store* (4.4.4, Fig. 8): ``image``, ``meta.enc`` (AES-256-GCM under the sm-pm key), ``sig_sm`` (format 2),
   ``info.json``, renamed into place at once. Before storing, the bundle is verified with the very
   function pm runs (:func:`iotdlm.software.verify_repo_metadata`).
5. *Report* (4.4.5): a JWS envelope signed by sm (op ``repository.report``) POSTed to the
   repository; if it cannot be delivered it is kept and retried after later checks.

We do not use ngclient's ``download_target``: it writes a temporary file in the system temp folder,
reads it back to hash it and copies it again (three passes over a 1 GiB image, outside the local
repository). The download here is one pass into the local repository's own staging folder, with the
same checks (length cap, every signed hash) and the same URL (consistent-snapshot hash prefix).
The receiving thread only receives: each hash and the write run in a thread of their own (hashlib and
file writes release the GIL), and the pages written are handed to the disk as the download goes, so
the fsync before the rename is short (docs/benchmarks.md, "sm: verified download and store").
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import msgspec
from tuf.api import exceptions as tuf_exc
from tuf.api._payload import Root, Snapshot, TargetFile, Targets
from tuf.api.metadata import Metadata
from tuf.api.serialization import DeserializationError
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.updater import Updater

from iotdlm import software
from iotdlm.clock import Clock
from iotdlm.errors import (
    BadRequestError,
    BadSignatureError,
    ConflictError,
    IotdlmError,
    ReplayError,
    TooLargeError,
    UnavailableError,
    UntrustedError,
)
from iotdlm.pki.keys import PrivateKey
from iotdlm.sm.fetcher import Fetcher, TufFetcher
from iotdlm.sm.local import META_ENC, SIG_SM, DtypeState, LocalRepository, StoredPaths
from iotdlm.wire import software as sw
from iotdlm.wire.envelope import Sealer
from iotdlm.wire.report import OP_REPORT, REPORT_AUDIENCE, ReportBody

log = logging.getLogger(__name__)

TUF_DIR = "_tuf"
LOCK = "_lock"
#: a path inside dtype-D's delegated paths, looked up only to make ngclient load that role; it is
#: never sent anywhere (ngclient requests roles by name, not targets by path)
PROBE = "iotdlm-sm-probe"
JOSE = "application/jose"
#: reports kept for resending at most (refused or undelivered); the oldest go first beyond it
MAX_PENDING_REPORTS = 64

Progress = Callable[[int, int], None]
Outcome = Literal["stored", "up_to_date", "no_release"]


@dataclass(frozen=True)
class CheckResult:
    dtype: str
    outcome: Outcome
    #: greatest release counter in the repository's verified metadata (None: nothing published)
    latest: int | None
    #: greatest release counter stored locally after this check
    current: int | None
    stored: sw.StoredSoftware | None = None
    reported: bool = False
    #: why the repository refused this check's report, if it did (the report is kept and resent)
    report_refused: str | None = None


def map_error(exc: BaseException) -> IotdlmError:
    """A python-tuf (or I/O) failure as the iotdlm error that says what failed."""
    cause: BaseException | None = exc
    while cause is not None:  # the seam's own errors (egress closed, unreachable, too large)
        if isinstance(cause, IotdlmError):
            return cause
        cause = cause.__cause__
    f = "meta_repo"
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return TooLargeError(f"repository metadata is larger than allowed, cut off: {exc}", field=f)
    if isinstance(exc, tuf_exc.DownloadHTTPError):
        return UnavailableError(f"the repository answered HTTP {exc.status_code}: {exc}")
    if isinstance(exc, tuf_exc.DownloadError):
        return UnavailableError(f"cannot download repository metadata: {exc}")
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return UntrustedError(
            f"repository metadata has expired ({exc}): a freeze attack, or the repository stopped refreshing "
            "its metadata; refused",
            field=f,
        )
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return BadSignatureError(
            f"repository metadata is not signed by the keys the trusted root delegates ({exc}): "
            "signed by a wrong key, or forged; refused",
            field=f,
        )
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        return ReplayError(f"repository metadata rolled back to an older version ({exc}); refused", field=f)
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return BadSignatureError(
            f"repository metadata does not match its signed length or hash ({exc}); refused", field=f
        )
    if isinstance(exc, DeserializationError):
        return BadRequestError(f"repository metadata is malformed: {exc}", field=f)
    if isinstance(exc, tuf_exc.RepositoryError):
        return UntrustedError(f"repository metadata refused: {exc}", field=f)
    if isinstance(exc, OSError):
        return IotdlmError(f"local repository I/O failed: {exc}")
    return IotdlmError(f"software check failed: {exc}")


class _SinkWorker:
    """Feeds chunks to one sink (a hash's ``update``, a file's ``write``) in a worker thread. hashlib
    and file writes release the GIL on large buffers, so the hashes and the write of a chunk run beside
    the receiving of the next ones; at most ``depth`` chunks wait. An error of the sink is kept, the
    rest of the chunks are dropped (the receiver never blocks on a dead worker), and :meth:`close`
    raises it."""

    def __init__(self, sink: Callable[[bytes], object], depth: int = 8) -> None:
        self._sink = sink
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sm-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._sink(chunk)
                except BaseException as exc:  # kept for close(), which raises it in the caller's thread
                    self.error = exc

    def feed(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put(chunk)

    def close(self) -> None:
        """Wait until every chunk fed has gone to the sink (the worker ends); raise the sink's error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self.error is not None:
            raise self.error


def _close_all(workers: list[_SinkWorker]) -> None:
    """Close every worker (none is left waiting), then raise the first error one of them kept."""
    errors: list[BaseException] = []
    for w in workers:
        try:
            w.close()
        except BaseException as exc:  # every worker is closed first; the first error is raised below
            errors.append(exc)
    if errors:
        raise errors[0]


#: the image's pages are handed to the disk every this many bytes while the download goes on
WRITE_BEHIND = 64 * 1024 * 1024


def write_behind(f: Any) -> Callable[[bytes], None]:
    """``f.write``, and every WRITE_BEHIND bytes a hint that starts writing the pages behind to the disk
    (POSIX_FADV_DONTNEED starts the writeback of dirty pages without waiting for it), so the final
    fsync finds little left to do instead of the whole image."""
    fd = f.fileno()
    done = 0
    flushed = 0

    def write(chunk: bytes) -> None:
        nonlocal done, flushed
        f.write(chunk)
        done += len(chunk)
        if done - flushed >= WRITE_BEHIND and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, flushed, done - flushed, os.POSIX_FADV_DONTNEED)
            flushed = done

    return write


class SoftwareManager:
    """sm's core (synchronous; the service runs it in a worker thread).

    ``root``: sm's folder (``DIR/sm``; the local repository and ngclient's metadata cache live there).
    ``trusted_root``: the pinned root metadata of the repository (pk_repo).
    ``fetcher``: the only egress. ``key`` signs ``sig_sm``; ``sealer`` signs reports (sm's identity).
    ``meta_key``: the 32-byte key shared with pm that encrypts metadata at rest.
    """

    def __init__(
        self,
        root: Path,
        *,
        repository_url: str,
        trusted_root: bytes,
        fetcher: Fetcher,
        key: PrivateKey,
        sealer: Sealer,
        meta_key: bytes,
        clock: Clock,
        max_image_bytes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.repository_url = repository_url.rstrip("/")
        self.trusted_root = trusted_root
        self.pinned = software.load_trusted_root(trusted_root)  # refuse a damaged anchor at once
        self.fetcher = fetcher
        self.key = key
        self.sealer = sealer
        if len(meta_key) != software.KEY_BYTES:
            raise ValueError(f"the sm-pm key must be {software.KEY_BYTES} bytes")
        self.meta_key = meta_key
        self.clock = clock
        self.max_image_bytes = max_image_bytes
        self.local = LocalRepository(self.root)
        self._lock = threading.Lock()

    @property
    def tuf_dir(self) -> Path:
        return self.root / TUF_DIR

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One check at a time, in this process and across processes (CLI beside a running sm)."""
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    # --- Algorithm 2 ----------------------------------------------------------------------------
    def check(self, dtype: str, *, progress: Progress | None = None) -> CheckResult:
        """Check the repository for a newer release of ``dtype``; download, verify and store it.

        Raises a RejectedError subclass naming what failed (expired or wrongly signed metadata,
        rollback, wrong hardware_id, altered or oversized image), or UnavailableError when the
        repository cannot be reached (egress closed included). Nothing is stored on failure.
        """
        sw.check_dtype(dtype)
        with self.locked():
            self.local.clean_staging()
            try:
                result = self._check(dtype, progress)
            except IotdlmError:
                raise
            except (tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError) as exc:
                raise map_error(exc) from exc
            delivered, refused = self._deliver_reports()
            if result.stored is not None:
                key = (result.stored.target_path, result.stored.sha256)
                result = dataclasses.replace(result, reported=key in delivered, report_refused=refused.get(key))
            return result

    def _updater(self) -> Updater:
        self.tuf_dir.mkdir(parents=True, exist_ok=True)
        updater = Updater(
            metadata_dir=str(self.tuf_dir),
            metadata_base_url=f"{self.repository_url}/metadata/",
            target_dir=None,
            target_base_url=f"{self.repository_url}/targets/",
            fetcher=TufFetcher(self.fetcher),
            config=UpdaterConfig(),
            bootstrap=self.trusted_root,
        )
        # ngclient judges expiry against its own reading of the system clock; give it ours so that
        # time is injected everywhere (python-tuf 3+ keeps it in TrustedMetadataSet.reference_time)
        trusted_set = getattr(updater, "_trusted_set", None)
        if trusted_set is not None and hasattr(trusted_set, "reference_time"):
            trusted_set.reference_time = self.clock.now()
        return updater

    def _read_cached(self, role: str) -> bytes:
        return (self.tuf_dir / f"{quote(role, '')}.json").read_bytes()

    def _check(self, dtype: str, progress: Progress | None) -> CheckResult:
        now = self.clock.now()
        role = software.role_name(dtype)

        # steps 1-2: TUF metadata only (timestamp, snapshot, targets, dtype-D): ngclient verifies
        updater = self._updater()
        updater.refresh()
        updater.get_targetinfo(f"{dtype}/{PROBE}")  # loads dtype-D if targets delegates it

        # the verified metadata, as ngclient persisted it
        targets_raw = self._read_cached(Targets.type)
        snapshot = Metadata[Snapshot].from_bytes(self._read_cached(Snapshot.type)).signed
        targets_md = Metadata[Targets].from_bytes(targets_raw)
        state = self.local.load_state()
        dstate = state.dtypes.setdefault(dtype, DtypeState())
        roles = targets_md.signed.delegations.roles if targets_md.signed.delegations is not None else None
        if not roles or role not in roles:
            return self._nothing_published(dtype, dstate, f"the repository delegates no role {role}")
        listed = snapshot.meta.get(f"{role}.json")
        try:
            role_raw = self._read_cached(role)
        except FileNotFoundError:
            raise UntrustedError(
                f"the repository delegates {role} but not for the paths {dtype}/*: its releases cannot be listed",
                field="meta_repo",
            ) from None
        role_md = Metadata[Targets].from_bytes(role_raw)
        if listed is None or listed.version != role_md.signed.version:
            raise UntrustedError(
                f"{role} metadata in the cache is not the version the snapshot lists; refused", field="meta_repo"
            )

        chosen = self._latest(dtype, roles[role], role_md.signed)
        if chosen is None:
            return self._nothing_published(dtype, dstate, f"{role} lists no release")
        latest, target = chosen
        # Algorithm 2: compare ver_{j+a} with what sm knows
        if dstate.seen_latest is not None and latest < dstate.seen_latest:
            raise ReplayError(
                f"rollback attempt: the repository's latest release of {dtype} is now {latest}, but release "
                f"{dstate.seen_latest} was seen in earlier verified metadata; refused",
                field="release_counter",
            )
        dstate.seen_latest = latest
        dstate.checked_at = sw.iso(now)
        self.local.save_state(state)
        current = self.local.current(dtype)
        if current is not None and latest <= current:
            return CheckResult(dtype, "up_to_date", latest=latest, current=current)
        if self.max_image_bytes is not None and target.length > self.max_image_bytes:
            raise TooLargeError(
                f"release {latest} of {dtype} is {target.length} bytes, over the configured limit of "
                f"{self.max_image_bytes}",
                field="image",
            )

        meta = self._meta_repo(dtype, latest, target, targets_raw, role_raw)
        return self._store(dtype, latest, target, meta, progress)

    def _meta_repo(self, dtype: str, latest: int, target: TargetFile, targets_raw: bytes, role_raw: bytes) -> bytes:
        """meta_repo: verify it exactly as pm will (Algorithm 1, step 2) before downloading sw."""
        meta = software.encode_bundle(
            dtype=dtype, target_path=target.path, roots=self._root_chain(), targets=targets_raw, role=role_raw
        )
        verified = software.verify_repo_metadata(software.decode_bundle(meta), self.trusted_root, dtype=dtype)
        if (verified.release_counter, verified.length, verified.hashes) != (latest, target.length, target.hashes):
            raise UntrustedError(
                "the metadata bundle does not describe the target ngclient verified", field="meta_repo"
            )
        return meta

    def _store(
        self, dtype: str, latest: int, target: TargetFile, meta: bytes, progress: Progress | None
    ) -> CheckResult:
        """Algorithm 2 steps 3-5: download sw_{j+a}, check its hash, store it with meta.enc and sig_sm;
        queue the report of the verified download."""
        # step 3-4: download sw_{j+a}, check its hash, store it with meta.enc and sig_sm
        with self.local.staging(dtype, latest) as stage:
            digest, sha256 = self._download(self._target_url(target), target, stage.paths.image, progress)
            stage.write(META_ENC, software.encrypt_meta(meta, self.meta_key, dtype, latest))
            stage.write(SIG_SM, software.sign_sig_sm_v2(self.key, meta, digest))
            stored_at = self.clock.now()
            info = sw.StoredSoftware(
                dtype=dtype,
                release_counter=latest,
                target_path=target.path,
                length=target.length,
                sha256=sha256,
                stored_at=sw.iso(stored_at),
            )
            stage.commit(info)
        log.info("stored %s release %d (%d bytes)", dtype, latest, target.length)

        # step 5: report the verified download
        report = ReportBody(
            dtype=dtype,
            release_counter=latest,
            target_path=target.path,
            sha256=sha256,
            length=target.length,
            verified_at=stored_at.astimezone(dt.UTC),
        )
        state = self.local.load_state()
        state.pending_reports.append(report)
        self.local.save_state(state)
        return CheckResult(dtype, "stored", latest=latest, current=latest, stored=info)

    def _nothing_published(self, dtype: str, dstate: DtypeState, why: str) -> CheckResult:
        if dstate.seen_latest is not None:
            raise ReplayError(
                f"rollback attempt: {why}, but release {dstate.seen_latest} of {dtype} was seen in earlier "
                "verified metadata; refused",
                field="release_counter",
            )
        return CheckResult(dtype, "no_release", latest=None, current=self.local.current(dtype))

    @staticmethod
    def _latest(dtype: str, delegation: Any, role: Targets) -> tuple[int, TargetFile] | None:
        """The target with the greatest release counter, checked to be signed for ``dtype``."""
        best: tuple[int, TargetFile] | None = None
        tie = False
        for path, target in role.targets.items():
            if not delegation.is_delegated_path(path):
                log.warning("ignoring target %s: outside the paths delegated to %s", path, software.role_name(dtype))
                continue
            custom = target.custom
            counter = custom.get("release_counter") if isinstance(custom, dict) else None
            if not isinstance(counter, int) or isinstance(counter, bool) or not 0 <= counter <= sw.MAX_RELEASE_COUNTER:
                log.warning("ignoring target %s: no valid custom release_counter", path)
                continue
            if best is None or counter > best[0]:
                best, tie = (counter, target), False
            elif counter == best[0]:
                tie = True
        if best is None:
            return None
        if tie:
            raise ConflictError(
                f"{software.role_name(dtype)} lists several targets with release counter {best[0]}; refused",
                field="release_counter",
            )
        software.custom_fields(best[1], dtype, field="hardware_id")  # wrong dtype: refused
        return best

    def _root_chain(self) -> list[bytes]:
        """Root metadata from the pinned version to the one ngclient trusts now (ascending)."""
        current = Metadata[Root].from_bytes((self.tuf_dir / "root.json").read_bytes()).signed.version
        first = self.pinned.signed.version
        return [(self.tuf_dir / "root_history" / f"{v}.root.json").read_bytes() for v in range(first, current + 1)]

    def _target_url(self, target: TargetFile) -> str:
        root = Metadata[Root].from_bytes((self.tuf_dir / "root.json").read_bytes()).signed
        path = target.path
        if root.consistent_snapshot:  # as ngclient: <dir>/<first hash>.<name>
            dirname, sep, basename = path.rpartition("/")
            path = f"{dirname}{sep}{next(iter(target.hashes.values()))}.{basename}"
        return f"{self.repository_url}/targets/{path}"

    def _download(self, url: str, target: TargetFile, dest: Path, progress: Progress | None) -> tuple[bytes, str]:
        """Stream ``url`` into ``dest``; (SHA-256 of sw, its hex) once length and every signed hash match.
        One hash pass: the SHA-256 checked here is the one ``sig_sm`` signs (format 2, ADR 0024). More
        bytes than signed: cut off and refused."""
        hashers = {alg: software.new_hasher(alg) for alg in target.hashes}
        if "sha256" not in hashers:
            hashers["sha256"] = software.new_hasher("sha256")
        received = 0
        try:
            with self.fetcher.stream(url, max_length=target.length) as chunks, open(dest, "xb") as f:
                with contextlib.suppress(OSError, AttributeError):  # a hint: all the blocks at once, where it can
                    os.posix_fallocate(f.fileno(), 0, target.length)
                # each hash and the write in its own thread, beside the receiving done here
                workers = [_SinkWorker(h.update) for h in hashers.values()]
                workers.append(_SinkWorker(write_behind(f)))
                try:
                    for chunk in chunks:
                        received += len(chunk)
                        if received > target.length:
                            raise TooLargeError(
                                f"the repository sent more than the {target.length} bytes signed for "
                                f"{target.path}; cut off and refused",
                                field="image",
                            )
                        for w in workers:
                            w.feed(chunk)
                        if progress is not None:
                            progress(received, target.length)
                except BaseException:
                    with contextlib.suppress(BaseException):  # the first error is the one to report
                        _close_all(workers)
                    raise
                _close_all(workers)  # every chunk hashed and written (or the sink's error raised)
                f.flush()
                os.fsync(f.fileno())
        except TooLargeError as exc:
            raise TooLargeError(exc.message, field="image") from exc
        observed = {alg: h.hexdigest() for alg, h in hashers.items()}
        software.check_hashes(target.hashes, observed, target.length, received)
        return hashers["sha256"].digest(), observed["sha256"]

    # --- reports (4.4.5) --------------------------------------------------------------------------
    def _deliver_reports(self) -> tuple[set[tuple[str, str]], dict[tuple[str, str], str]]:
        """POST every pending report. Those the repository accepted leave the queue; the others stay
        for the next check -- undelivered (the repository unreachable or busy) and refused alike (a
        repository that does not trust sm's CA yet accepts them once the vendor runs `repo trust`),
        the oldest dropped beyond MAX_PENDING_REPORTS. Returns the (target_path, sha256) accepted,
        and why each refused one was refused."""
        state = self.local.load_state()
        if not state.pending_reports:
            return set(), {}
        keep: list[ReportBody] = []
        delivered: set[tuple[str, str]] = set()
        refused: dict[tuple[str, str], str] = {}
        unreachable = False
        for body in state.pending_reports:
            if unreachable:
                keep.append(body)
                continue
            try:
                problem = self._post_report(body)
            except IotdlmError as exc:
                log.warning("report of %s not delivered (kept for later): %s", body.target_path, exc)
                keep.append(body)
                unreachable = True
                continue
            if problem is None:
                delivered.add((body.target_path, body.sha256))
            else:
                refused[(body.target_path, body.sha256)] = problem
                keep.append(body)
        if len(keep) > MAX_PENDING_REPORTS:
            dropped = keep[: len(keep) - MAX_PENDING_REPORTS]
            log.error(
                "dropping the %d oldest unsent download reports (more than %d kept)", len(dropped), MAX_PENDING_REPORTS
            )
            keep = keep[len(dropped) :]
        state.pending_reports = keep
        self.local.save_state(state)
        return delivered, refused

    def _post_report(self, body: ReportBody) -> str | None:
        """None when the repository accepted the report; why, when it refused it (kept and resent)."""
        token = self.sealer.seal(OP_REPORT, msgspec.to_builtins(body), aud=REPORT_AUDIENCE, now=self.clock.now())
        resp = self.fetcher.post(f"{self.repository_url}/reports", token, content_type=JOSE)
        if 200 <= resp.status < 300:
            return None
        text = resp.body[:300].decode("utf-8", "replace")
        if resp.status >= 500 or resp.status in (408, 429):
            raise UnavailableError(f"the repository could not take the report now (HTTP {resp.status}): {text}")
        problem = f"HTTP {resp.status}: {_report_message(text)}"
        if resp.status == 403:
            problem += (
                "; the vendor must trust the CA of sm's certificate: "
                "`iotdlm repo trust --dir REPO --ca DATA/ca/service.pem`"
            )
        log.error(
            "the repository refused the report of %s (kept, resent at the next check): %s", body.target_path, problem
        )
        return problem

    def flush_reports(self) -> int:
        """Deliver pending reports now; how many the repository accepted."""
        with self.locked():
            return len(self._deliver_reports()[0])

    def pending_reports(self) -> int:
        """How many download reports wait to be resent."""
        return len(self.local.load_state().pending_reports)

    # --- the local repository, for pm ---------------------------------------------------------------
    def list(self, dtype: str | None = None) -> list[sw.StoredSoftware]:
        return self.local.list(dtype)

    def load(self, dtype: str, release_counter: int | None = None) -> sw.LoadResponse:
        """What pm needs to run Algorithm 1 on a stored version (default: the latest)."""
        paths: StoredPaths = self.local.paths(dtype, release_counter)
        info = self.local.info(dtype, int(paths.folder.name))
        return sw.LoadResponse(
            dtype=dtype,
            release_counter=info.release_counter,
            image_path=str(paths.image.resolve()),
            meta_enc=paths.meta_enc.read_bytes(),
            sig_sm=paths.sig_sm.read_bytes(),
        )


def _report_message(text: str) -> str:
    """The ``message`` of the repository's JSON refusal, else the body as it came."""
    try:
        body = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        code = body.get("code")
        return f"{body['message']} ({code})" if isinstance(code, str) else str(body["message"])
    return text
