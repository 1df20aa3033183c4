"""sm's Algorithm 2 (SoftwareManager) against a real VendorRepository folder, fetched in process
through the Fetcher seam: no sockets, so the fetcher can also play a hostile server (more bytes
than signed and no Content-Length, a connection that dies mid-image, a repository that is down).
The same flows over real HTTP are in tests/integration/test_sm.py.

Also home of :class:`DirFetcher` and :class:`SmEnv`, which test_sm_service.py and test_sm_cli.py use."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tuf.api import exceptions as tuf_exc
from tuf.api._payload import Targets
from tuf.api.serialization import DeserializationError

from iotdlm import software
from iotdlm.clock import FixedClock, SystemClock
from iotdlm.errors import (
    BadRequestError,
    BadSignatureError,
    ConflictError,
    IotdlmError,
    NotFoundError,
    ReplayError,
    TooLargeError,
    UnavailableError,
    UntrustedError,
)
from iotdlm.repository import VendorRepository
from iotdlm.repository.server import http_status
from iotdlm.sm import NoEgressFetcher, PostResponse, SoftwareManager, map_error
from iotdlm.sm.fetcher import EGRESS_CLOSED, HttpStatusError
from iotdlm.sm.local import LocalRepository
from tests.helpers import Identity, make_pki, pem
from tests.unit.test_software_check import add_target, forge_role

NOW = SystemClock().now().replace(microsecond=0)
PKI = make_pki(now=NOW - dt.timedelta(days=1))
SM = PKI.module("sm", now=NOW - dt.timedelta(days=1))
DTYPE = "boardA"
BASE = "http://repo.test"
KEY = os.urandom(32)


@dataclass
class DirFetcher:
    """Serves a repository folder behind BASE. ``extra`` bytes are appended to every image and
    ``max_length`` is ignored (a hostile server: no Content-Length, more bytes than signed);
    ``die_after`` chunks, the connection breaks; ``down`` makes everything unreachable."""

    repo: VendorRepository
    extra: bytes = b""
    die_after: int | None = None
    down: bool = False
    post_down: bool = False
    chunk: int = 64 * 1024
    urls: list[str] = field(default_factory=list)
    posts: list[bytes] = field(default_factory=list)
    yielded: int = 0

    def _file(self, url: str) -> Path:
        if not url.startswith(BASE + "/"):
            raise UnavailableError(f"unknown host in {url}")
        rel = url[len(BASE) + 1 :]
        kind, _, name = rel.partition("/")
        folder = {"metadata": self.repo.metadata_dir, "targets": self.repo.targets_dir}.get(kind)
        path = folder / name if folder is not None else None
        if path is None or not path.is_file():
            raise HttpStatusError(f"HTTP 404 for {rel}", status=404)
        return path

    @contextlib.contextmanager
    def _stream(self, url: str) -> Iterator[Iterator[bytes]]:
        self.urls.append(url)
        if self.down:
            raise UnavailableError("repo.test: connection refused")
        data = self._file(url).read_bytes()
        if "/targets/" in url:
            data += self.extra

        def chunks() -> Iterator[bytes]:
            for n, i in enumerate(range(0, len(data), self.chunk)):
                if self.die_after is not None and n >= self.die_after:
                    raise UnavailableError("connection reset by peer")
                piece = data[i : i + self.chunk]
                self.yielded += len(piece)
                yield piece

        yield chunks()

    def stream(self, url: str, *, max_length: int | None = None) -> AbstractContextManager[Iterator[bytes]]:
        return self._stream(url)

    def post(self, url: str, body: bytes, *, content_type: str) -> PostResponse:
        self.posts.append(body)
        if self.post_down:
            raise UnavailableError("repo.test: connection refused")
        assert url == f"{BASE}/reports"
        assert content_type == "application/jose"
        try:
            self.repo.record_report(body, now=SystemClock().now())
        except IotdlmError as exc:
            return PostResponse(http_status(exc), msgspec.json.encode(exc.to_wire()))
        return PostResponse(201, b'{"status":"recorded"}')


@dataclass
class SmEnv:
    root: Path
    repo: VendorRepository
    image: Path
    fetcher: DirFetcher
    identity: Identity = field(default_factory=lambda: SM)

    def manager(
        self, *, fetcher: Any = None, clock: Any = None, trusted_root: bytes | None = None, **kw: Any
    ) -> SoftwareManager:
        return SoftwareManager(
            self.root / "sm",
            repository_url=BASE,
            trusted_root=trusted_root if trusted_root is not None else self.repo.trusted_root(),
            fetcher=fetcher if fetcher is not None else self.fetcher,
            key=self.identity.key,
            sealer=self.identity.sealer,
            meta_key=KEY,
            clock=clock if clock is not None else SystemClock(),
            **kw,
        )

    def publish(self, counter: int, data: bytes | None = None, name: str = "fw.bin") -> Path:
        self.image.write_bytes(data if data is not None else os.urandom(200_000 + counter))
        self.repo.publish(DTYPE, counter, self.image, now=NOW, name=name)
        return self.image

    @property
    def local(self) -> LocalRepository:
        return LocalRepository(self.root / "sm")

    def nothing_staged(self) -> bool:
        tmp = self.root / "sm" / "_tmp"
        return not tmp.exists() or not any(tmp.iterdir())


def make_env(root: Path, *, report_ca: bool = True) -> SmEnv:
    ca = root / "report-ca.pem"
    ca.write_bytes(pem(PKI.cas["service"].certificate))
    repo = VendorRepository.init(root / "repo", now=NOW, report_ca=ca if report_ca else None)
    return SmEnv(root, repo, root / "fw.bin", DirFetcher(repo))


@pytest.fixture
def env(tmp_path: Path) -> SmEnv:
    return make_env(tmp_path)


# --- Algorithm 2 ------------------------------------------------------------------------------------
def test_new_release_is_verified_stored_signed_and_reported(env: SmEnv) -> None:
    image = env.publish(3).read_bytes()
    result = env.manager().check(DTYPE)
    assert (result.outcome, result.latest, result.current, result.reported) == ("stored", 3, 3, True)
    folder = env.root / "sm" / DTYPE / "3"
    assert sorted(p.name for p in folder.iterdir()) == ["image", "info.json", "meta.enc", "sig_sm"]
    assert (folder / "image").read_bytes() == image
    info = msgspec.json.decode((folder / "info.json").read_bytes())
    assert info == {
        "dtype": DTYPE,
        "release_counter": 3,
        "target_path": f"{DTYPE}/fw.bin",
        "length": len(image),
        "sha256": hashlib.sha256(image).hexdigest(),
        "stored_at": info["stored_at"],
    }
    meta = software.decrypt_meta((folder / "meta.enc").read_bytes(), KEY, DTYPE, 3)
    out = software.verify_software(
        folder / "image", meta, (folder / "sig_sm").read_bytes(), SM.key.public_key(), env.repo.trusted_root(),
        dtype=DTYPE,
    )  # fmt: skip
    assert out.release_counter == 3
    (report,) = env.repo.reports()
    assert (report.dtype, report.release_counter, report.sha256, report.length) == (
        DTYPE, 3, hashlib.sha256(image).hexdigest(), len(image),
    )  # fmt: skip
    assert report.reporter == "sm"
    assert env.nothing_staged()
    assert env.local.load_state().pending_reports == []


def test_same_release_is_ignored_and_newer_is_fetched(env: SmEnv) -> None:
    env.publish(3)
    sm = env.manager()
    assert sm.check(DTYPE).outcome == "stored"
    before = len(env.fetcher.urls)
    again = sm.check(DTYPE)
    assert (again.outcome, again.latest, again.current, again.stored) == ("up_to_date", 3, 3, None)
    # nothing changed at the repository: the root probe and the timestamp, nothing else
    assert [u.removeprefix(BASE) for u in env.fetcher.urls[before:]] == [
        "/metadata/2.root.json",
        "/metadata/timestamp.json",
    ]
    env.publish(4)
    assert sm.check(DTYPE).outcome == "stored"
    assert env.local.counters(DTYPE) == [3, 4]
    assert [r.release_counter for r in env.repo.reports()] == [3, 4]


def test_an_older_release_published_beside_the_latest_is_ignored(env: SmEnv) -> None:
    env.publish(5)
    sm = env.manager()
    sm.check(DTYPE)
    forge_role(env.repo, DTYPE, add_target(f"{DTYPE}/old.bin", b"old", {"hardware_id": DTYPE, "release_counter": 2}))
    result = sm.check(DTYPE)
    assert (result.outcome, result.latest) == ("up_to_date", 5)
    assert env.local.counters(DTYPE) == [5]


def test_rollback_below_a_release_seen_before_is_refused(env: SmEnv) -> None:
    env.publish(3, name="fw3.bin")
    env.publish(5, name="fw5.bin")
    sm = env.manager()
    assert sm.check(DTYPE).latest == 5

    def drop_5(t: Targets) -> None:
        del t.targets[f"{DTYPE}/fw5.bin"]

    forge_role(env.repo, DTYPE, drop_5)  # validly signed, but the latest went back to 3
    with pytest.raises(ReplayError) as info:
        sm.check(DTYPE)
    assert info.value.field == "release_counter"
    assert "rollback attempt" in info.value.message
    assert "now 3" in info.value.message
    assert env.local.counters(DTYPE) == [5]
    forge_role(env.repo, DTYPE, lambda t: t.targets.clear())
    with pytest.raises(ReplayError, match="rollback attempt: dtype-boardA lists no release"):
        sm.check(DTYPE)


def test_wrong_hardware_id_is_refused_before_downloading(env: SmEnv) -> None:
    env.publish(3)
    forge_role(
        env.repo, DTYPE, add_target(f"{DTYPE}/evil.bin", b"evil", {"hardware_id": "boardB", "release_counter": 9})
    )
    with pytest.raises(UntrustedError) as info:
        env.manager().check(DTYPE)
    assert info.value.field == "hardware_id"
    assert "wrong device type" in info.value.message
    assert not any("/targets/" in u for u in env.fetcher.urls)
    assert env.local.counters(DTYPE) == []


def test_two_releases_with_the_same_counter_are_refused(env: SmEnv) -> None:
    env.publish(3)
    forge_role(env.repo, DTYPE, add_target(f"{DTYPE}/twin.bin", b"twin", {"hardware_id": DTYPE, "release_counter": 3}))
    with pytest.raises(ConflictError, match="several targets with release counter 3"):
        env.manager().check(DTYPE)


def test_more_bytes_than_signed_are_cut_off_and_nothing_is_stored(env: SmEnv) -> None:
    image = env.publish(3)
    env.fetcher.extra = b"\0" * (10 * env.fetcher.chunk)  # no Content-Length: only sm's own cap stops it
    with pytest.raises(TooLargeError) as info:
        env.manager().check(DTYPE)
    assert info.value.field == "image"
    assert "cut off" in info.value.message
    assert env.fetcher.yielded <= sum(len(p.read_bytes()) for p in env.repo.metadata_dir.iterdir()) + (
        image.stat().st_size + env.fetcher.chunk
    )
    assert env.local.counters(DTYPE) == []
    assert env.nothing_staged()
    assert env.repo.reports() == []


def test_altered_image_is_refused_and_nothing_is_stored(env: SmEnv) -> None:
    env.publish(3)
    (served,) = list((env.repo.targets_dir / DTYPE).iterdir())
    data = bytearray(served.read_bytes())
    data[100] ^= 0xFF
    served.write_bytes(bytes(data))
    with pytest.raises(BadSignatureError) as info:
        env.manager().check(DTYPE)
    assert info.value.field == "image"
    assert env.local.counters(DTYPE) == []
    assert env.nothing_staged()


def test_connection_lost_mid_image_leaves_nothing(env: SmEnv) -> None:
    env.publish(3, data=os.urandom(1_000_000))
    env.fetcher.die_after = 3
    with pytest.raises(UnavailableError, match="connection reset"):
        env.manager().check(DTYPE)
    assert env.local.counters(DTYPE) == []
    assert env.nothing_staged()
    env.fetcher.die_after = None
    assert env.manager().check(DTYPE).outcome == "stored"


def test_expiry_is_judged_on_the_injected_clock(env: SmEnv) -> None:
    """A freeze attack seen from the future: the timestamp expires after one day."""
    env.publish(3)
    later = FixedClock(NOW + dt.timedelta(days=2))
    with pytest.raises(UntrustedError) as info:
        env.manager(clock=later).check(DTYPE)
    assert info.value.field == "meta_repo"
    assert "expired" in info.value.message
    assert "freeze attack" in info.value.message
    assert env.local.counters(DTYPE) == []
    assert env.manager(clock=FixedClock(NOW + dt.timedelta(hours=1))).check(DTYPE).outcome == "stored"


def test_no_egress_refuses_everything(env: SmEnv) -> None:
    env.publish(3)
    with pytest.raises(UnavailableError) as info:
        env.manager(fetcher=NoEgressFetcher()).check(DTYPE)
    assert info.value.message == EGRESS_CLOSED
    assert env.local.dtypes() == []
    assert env.nothing_staged()


def test_report_is_kept_until_the_repository_takes_it(env: SmEnv) -> None:
    env.publish(3)
    env.fetcher.post_down = True
    first = env.manager().check(DTYPE)
    assert (first.outcome, first.reported) == ("stored", False)
    assert [r.release_counter for r in env.local.load_state().pending_reports] == [3]
    assert env.repo.reports() == []
    env.fetcher.post_down = False
    assert env.manager().check(DTYPE).outcome == "up_to_date"
    assert [r.release_counter for r in env.repo.reports()] == [3]
    assert env.local.load_state().pending_reports == []
    assert len(env.fetcher.posts) == 2
    assert env.fetcher.posts[0] != env.fetcher.posts[1]  # each attempt sealed afresh (new nonce)


def test_report_refused_by_the_repository_is_kept_and_resent_once_trusted(tmp_path: Path) -> None:
    """Issue 14, stumble 6: a repository set up without a report CA refuses every report (403
    untrusted); sm keeps them, says what the vendor must do, and they go through after `repo trust`."""
    env = make_env(tmp_path, report_ca=False)  # the repository trusts no report CA
    env.publish(3)
    result = env.manager().check(DTYPE)
    assert (result.outcome, result.reported) == ("stored", False)
    assert result.report_refused is not None
    assert "HTTP 403" in result.report_refused
    assert "(untrusted)" in result.report_refused
    assert "iotdlm repo trust" in result.report_refused
    assert [r.release_counter for r in env.local.load_state().pending_reports] == [3]
    assert env.manager().flush_reports() == 0
    assert env.manager().pending_reports() == 1
    env.repo.trust_report_ca(pem(PKI.cas["service"].certificate))
    assert env.manager().flush_reports() == 1
    assert env.manager().pending_reports() == 0
    assert [r.release_counter for r in env.repo.reports()] == [3]


def test_kept_reports_are_bounded_the_oldest_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iotdlm.sm import updater

    monkeypatch.setattr(updater, "MAX_PENDING_REPORTS", 2)
    env = make_env(tmp_path, report_ca=False)
    for counter in (3, 4, 5):
        env.publish(counter)
        assert env.manager().check(DTYPE).outcome == "stored"
    assert [r.release_counter for r in env.local.load_state().pending_reports] == [4, 5]


def test_image_over_the_configured_limit_is_refused(env: SmEnv) -> None:
    env.publish(3, data=b"x" * 5000)
    with pytest.raises(TooLargeError, match="over the configured limit of 4096"):
        env.manager(max_image_bytes=4096).check(DTYPE)
    assert not any("/targets/" in u for u in env.fetcher.urls)


def test_nothing_published_for_the_dtype(env: SmEnv) -> None:
    result = env.manager().check(DTYPE)
    assert (result.outcome, result.latest, result.current) == ("no_release", None, None)
    assert [u.removeprefix(BASE) for u in env.fetcher.urls] == [
        "/metadata/2.root.json", "/metadata/timestamp.json", "/metadata/1.snapshot.json", "/metadata/1.targets.json",
    ]  # fmt: skip


def test_a_delegation_that_does_not_cover_the_dtype_is_refused(env: SmEnv) -> None:
    env.publish(3)

    def narrow(t: Targets) -> None:
        assert t.delegations is not None
        assert t.delegations.roles is not None
        t.delegations.roles[software.role_name(DTYPE)].paths = [f"{DTYPE}/v2/*"]

    forge_role(env.repo, None, narrow)
    with pytest.raises(UntrustedError, match=r"but not for the paths boardA/\*"):
        env.manager().check(DTYPE)


def test_a_damaged_trust_anchor_is_refused(env: SmEnv) -> None:
    with pytest.raises(BadRequestError) as info:
        env.manager(trusted_root=b'{"signed": {}}')
    assert info.value.field == "trusted_root"


def test_bad_dtype_is_refused(env: SmEnv) -> None:
    with pytest.raises(BadRequestError):
        env.manager().check("../etc")


@pytest.mark.parametrize(
    ("exc", "cls", "words"),
    [
        (tuf_exc.ExpiredMetadataError("timestamp.json is expired"), UntrustedError, "freeze attack"),
        (tuf_exc.UnsignedMetadataError("timestamp was signed by 0/1 keys"), BadSignatureError, "wrong key"),
        (tuf_exc.BadVersionNumberError("New timestamp version 1 must be >= 2"), ReplayError, "older version"),
        (tuf_exc.LengthOrHashMismatchError("Observed hash x"), BadSignatureError, "signed length or hash"),
        (DeserializationError("Failed to deserialize JSON"), BadRequestError, "malformed"),
        (tuf_exc.RepositoryError("Role dtype-boardA was delegated but is not part of snapshot"), UntrustedError, ""),
        (tuf_exc.DownloadLengthMismatchError("Downloaded 20000 bytes"), TooLargeError, "cut off"),
        (tuf_exc.DownloadHTTPError("HTTP error", 500), UnavailableError, "HTTP 500"),
        (tuf_exc.SlowRetrievalError(), UnavailableError, "cannot download"),
        (OSError(28, "No space left on device"), IotdlmError, "No space left"),
    ],
)
def test_python_tuf_errors_map_to_iotdlm_errors(exc: Exception, cls: type[IotdlmError], words: str) -> None:
    err = map_error(exc)
    assert type(err) is cls
    assert words in err.message


def test_map_error_keeps_the_seams_own_error() -> None:
    inner = UnavailableError(EGRESS_CLOSED)
    outer = tuf_exc.DownloadError("Failed to download")
    outer.__cause__ = inner
    assert map_error(outer) is inner


# --- the local repository, for pm ----------------------------------------------------------------------
def test_list_and_load(env: SmEnv) -> None:
    env.publish(3)
    sm = env.manager()
    sm.check(DTYPE)
    env.publish(4)
    sm.check(DTYPE)
    assert [v.release_counter for v in sm.list(DTYPE)] == [3, 4]
    assert [v.release_counter for v in sm.list()] == [3, 4]
    latest = sm.load(DTYPE)
    assert latest.release_counter == 4
    assert Path(latest.image_path).is_absolute()
    assert Path(latest.image_path) == (env.root / "sm" / DTYPE / "4" / "image").resolve()
    assert latest.meta_enc == (env.root / "sm" / DTYPE / "4" / "meta.enc").read_bytes()
    assert sm.load(DTYPE, 3).sig_sm == (env.root / "sm" / DTYPE / "3" / "sig_sm").read_bytes()
    with pytest.raises(NotFoundError):
        sm.load(DTYPE, 5)
    with pytest.raises(NotFoundError):
        sm.load("boardB")
    assert sm.list("boardB") == []


def test_half_written_versions_are_invisible(env: SmEnv) -> None:
    local = env.local
    with local.staging(DTYPE, 9) as stage:
        stage.write("image", b"partial")
        assert local.counters(DTYPE) == []
    assert env.nothing_staged()
    (env.root / "sm" / DTYPE / "10").mkdir(parents=True)  # no info.json: not a version
    (env.root / "sm" / DTYPE / "007").mkdir()
    assert local.counters(DTYPE) == []
    with pytest.raises(NotFoundError):
        local.paths(DTYPE, 10)


def test_damaged_info_json_is_reported_not_trusted(env: SmEnv) -> None:
    env.publish(3)
    env.manager().check(DTYPE)
    info = env.root / "sm" / DTYPE / "3" / "info.json"
    info.write_bytes(info.read_bytes().replace(b'"release_counter":3', b'"release_counter":4'))
    with pytest.raises(BadRequestError, match="describes boardA/4"):
        env.local.info(DTYPE, 3)
    assert env.local.list(DTYPE) == []


# --- hypothesis: the local repository's own files are parsed, never trusted blindly -------------------
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=300) | st.sampled_from([b"{}", b'{"dtypes":{"a":{}}}', b'{"pending_reports":[{}]}']))
def test_state_file_takes_any_bytes(tmp_path: Path, data: bytes) -> None:
    local = LocalRepository(tmp_path / "sm-state")
    (tmp_path / "sm-state").mkdir(exist_ok=True)
    (tmp_path / "sm-state" / "_state.json").write_bytes(data)
    error: BadRequestError | None = None
    try:
        state = local.load_state()
    except BadRequestError as exc:
        error = exc
    if error is not None:
        assert error.field == "state"
    else:
        assert isinstance(state.dtypes, dict)


@FUZZ
@given(data=st.binary(max_size=300) | st.builds(msgspec.json.encode, st.fixed_dictionaries({
    "dtype": st.sampled_from([DTYPE, "boardB", "../x"]), "release_counter": st.integers(-2, 5),
    "target_path": st.text(max_size=10), "length": st.integers(-1, 10), "sha256": st.text(max_size=5),
    "stored_at": st.text(max_size=5)})))  # fmt: skip
def test_info_json_takes_any_bytes(tmp_path: Path, data: bytes) -> None:
    folder = tmp_path / "sm-info" / DTYPE / "3"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "info.json").write_bytes(data)
    local = LocalRepository(tmp_path / "sm-info")
    try:
        info = local.info(DTYPE, 3)
    except IotdlmError:
        return
    assert (info.dtype, info.release_counter) == (DTYPE, 3)


def test_http_status_error_does_not_shadow_unavailable_on_the_wire() -> None:
    from iotdlm.errors import from_wire

    assert type(from_wire(UnavailableError("database did not answer").to_wire())) is UnavailableError
    back = from_wire(HttpStatusError("HTTP 503 for /metadata/timestamp.json", status=503).to_wire())
    assert type(back) is HttpStatusError
    assert isinstance(back, UnavailableError)


@given(text=st.text(max_size=300) | st.sampled_from(['{"message": "no", "code": "untrusted"}', '{"message": 3}', "[]"]))
def test_the_repositorys_refusal_is_read_whatever_it_says(text: str) -> None:
    from iotdlm.sm.updater import _report_message

    said = _report_message(text)
    assert isinstance(said, str)
    if text == '{"message": "no", "code": "untrusted"}':
        assert said == "no (untrusted)"
