"""The vendor repository (paper 4.4) on python-tuf: what it signs, what it refuses, and that a TUF
client (python-tuf's TrustedMetadataSet, the core of ngclient) accepts what it publishes --
through delegations, thresholds, key rotations and expiry. Reports of sm (4.4.5): the valid one is
recorded, every hostile one is refused with the error that names why, and nothing is recorded."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]  # re-exported, no __all__
from tuf.api.exceptions import ExpiredMetadataError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets  # type: ignore[attr-defined]  # re-exported, no __all__
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from iotdlm.clock import SystemClock
from iotdlm.errors import (
    BadRequestError,
    BadSignatureError,
    ConflictError,
    IotdlmError,
    NotFoundError,
    ReplayError,
    TooLargeError,
    UnsupportedError,
    UntrustedError,
)
from iotdlm.pki.ca import ca_name
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.repository import PublishedTarget, VendorRepository, report_body
from iotdlm.wire.envelope import Sealer
from iotdlm.wire.report import OP_REPORT, REPORT_AUDIENCE
from tests.helpers import NOW, ORG, Identity, Pki, make_pki, pem

PKI = make_pki()
SM = PKI.module("sm")
OTHER_PKI = make_pki()


# --- helpers ------------------------------------------------------------------------------------
def _image(tmp_path: Path, name: str = "fw.bin", data: bytes = b"firmware image\n" * 100) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _ca_file(tmp_path: Path, pki: Pki = PKI) -> Path:
    path = tmp_path / "report-ca-src.pem"
    path.write_bytes(pem(pki.cas["service"].certificate))
    return path


def _md(repo: VendorRepository, name: str) -> Metadata[Any]:
    return Metadata.from_bytes((repo.metadata_dir / name).read_bytes())


def client_view(repo_dir: Path, bootstrap: bytes, now: dt.datetime) -> TrustedMetadataSet:
    """What a TUF client trusts after an update from ``bootstrap`` at ``now``: python-tuf's own
    TrustedMetadataSet fed the files as ngclient would fetch them (root chain, timestamp,
    snapshot, targets, every delegated role)."""
    md = repo_dir / "metadata"
    tms = TrustedMetadataSet(bootstrap, EnvelopeType.METADATA)
    tms.reference_time = now
    version = tms.root.version + 1
    while (md / f"{version}.root.json").exists():
        tms.update_root((md / f"{version}.root.json").read_bytes())
        version += 1
    tms.update_timestamp((md / "timestamp.json").read_bytes())
    tms.update_snapshot((md / f"{tms.timestamp.snapshot_meta.version}.snapshot.json").read_bytes())
    tms.update_targets((md / f"{tms.snapshot.meta['targets.json'].version}.targets.json").read_bytes())
    delegations = tms.targets.delegations
    for role in (delegations.roles or {}) if delegations else {}:
        data = (md / f"{tms.snapshot.meta[f'{role}.json'].version}.{role}.json").read_bytes()
        tms.update_delegated_targets(data, role, "targets")
    return tms


def _delegated(tms: TrustedMetadataSet, dtype: str) -> Targets:
    signed = tms[f"dtype-{dtype}"]
    assert isinstance(signed, Targets)
    return signed


@pytest.fixture
def repo(tmp_path: Path) -> VendorRepository:
    return VendorRepository.init(tmp_path / "repo", now=NOW, report_ca=_ca_file(tmp_path))


# --- init ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "ed25519"])
def test_init_creates_a_self_signed_root_and_top_level_roles(tmp_path: Path, algorithm: str) -> None:
    repo = VendorRepository.init(tmp_path / "repo", now=NOW, algorithm=algorithm)
    root_md = Metadata[Root].from_bytes(repo.trusted_root())
    root = root_md.signed
    assert isinstance(root, Root)
    root.verify_delegate("root", root_md.signed_bytes, root_md.signatures)
    assert root.version == 1
    assert root.consistent_snapshot is True
    assert root.expires == NOW + dt.timedelta(days=365)
    scheme = "ed25519" if algorithm == "ed25519" else "ecdsa-sha2-nistp256"
    assert {k.scheme for k in root.keys.values()} == {scheme}
    for role in ("targets", "snapshot", "timestamp"):
        assert len(root.roles[role].keyids) == 1
    assert len(set().union(*(set(r.keyids) for r in root.roles.values()))) == 4  # one key per role
    tms = client_view(repo.path, repo.trusted_root(), NOW)
    assert tms.timestamp.expires == NOW + dt.timedelta(days=1)
    assert tms.snapshot.expires == NOW + dt.timedelta(days=7)
    assert tms.targets.expires == NOW + dt.timedelta(days=90)
    assert tms.targets.delegations is None
    keys = sorted(p.name for p in repo.keys_dir.glob("*.pem"))
    assert keys == ["releases-0.pem", "root-0.pem", "snapshot-0.pem", "targets-0.pem", "timestamp-0.pem"]
    for key in repo.keys_dir.glob("*.pem"):
        assert key.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == [
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "timestamp.json",
    ]


def test_init_refuses_a_folder_in_use_and_bad_settings(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(ConflictError):
        VendorRepository.init(tmp_path / "used", now=NOW)
    with pytest.raises(BadRequestError, match="larger than its number of keys"):
        VendorRepository.init(tmp_path / "a", now=NOW, thresholds={"root": 2}, keys_per_role={"root": 1})
    with pytest.raises(BadRequestError, match="unknown role"):
        VendorRepository.init(tmp_path / "b", now=NOW, thresholds={"admin": 1})
    with pytest.raises(BadRequestError):
        VendorRepository.init(tmp_path / "c", now=NOW, thresholds={"root": 0})
    with pytest.raises(UnsupportedError):
        VendorRepository.init(tmp_path / "d", now=NOW, algorithm="rsa-1024")
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pem(SM.cert))
    with pytest.raises(BadRequestError, match="not a CA"):
        VendorRepository.init(tmp_path / "e", now=NOW, report_ca=leaf)
    with pytest.raises(NotFoundError, match="not a repository"):
        VendorRepository(tmp_path / "nothing")


# --- publish ------------------------------------------------------------------------------------
def test_publish_creates_the_delegation_and_a_target_with_custom_fields(repo: VendorRepository, tmp_path: Path) -> None:
    image = _image(tmp_path)
    published = repo.publish("boardA", 1, image, now=NOW)
    sha256 = hashlib.sha256(image.read_bytes()).hexdigest()
    assert published == PublishedTarget(
        dtype="boardA", release_counter=1, path="boardA/fw.bin", length=1500, sha256=sha256, published_at=NOW
    )
    assert (repo.targets_dir / "boardA" / f"{sha256}.fw.bin").read_bytes() == image.read_bytes()
    assert published.url_path == f"boardA/{sha256}.fw.bin"

    tms = client_view(repo.path, repo.trusted_root(), NOW)
    assert tms.targets.delegations is not None
    assert tms.targets.delegations.roles is not None
    delegation = tms.targets.delegations.roles["dtype-boardA"]
    assert delegation.paths == ["boardA/*"]
    assert delegation.terminating is True
    releases_key = load_pem_private_key((repo.keys_dir / "releases-0.pem").read_bytes(), None)
    assert delegation.keyids == [CryptoSigner(releases_key).public_key.keyid]
    target = _delegated(tms, "boardA").targets["boardA/fw.bin"]
    assert target.custom == {"hardware_id": "boardA", "release_counter": 1}
    assert target.hashes == {"sha256": sha256}
    assert target.length == 1500


def test_second_release_signs_only_the_dtype_role_snapshot_and_timestamp(
    repo: VendorRepository, tmp_path: Path
) -> None:
    repo.publish("boardA", 1, _image(tmp_path), now=NOW)
    before = client_view(repo.path, repo.trusted_root(), NOW)
    repo.publish("boardA", 2, _image(tmp_path, "fw-2.bin", b"v2"), now=NOW)
    repo.publish("boardB", 7, _image(tmp_path, "b.bin", b"b7"), now=NOW)
    after = client_view(repo.path, repo.trusted_root(), NOW)
    assert after.targets.version == before.targets.version + 1  # only boardB's delegation is new
    assert after["dtype-boardA"].version == before["dtype-boardA"].version + 1
    assert sorted(_delegated(after, "boardA").targets) == ["boardA/fw-2.bin", "boardA/fw.bin"]
    assert [(t.dtype, t.release_counter) for t in repo.list_targets()] == [("boardA", 1), ("boardA", 2), ("boardB", 7)]
    latest = repo.latest("boardA")
    assert latest is not None
    assert latest.path == "boardA/fw-2.bin"
    assert repo.latest("boardC") is None


@pytest.mark.parametrize("counter", [1, 2], ids=["lower", "same"])
def test_release_counters_only_grow(repo: VendorRepository, tmp_path: Path, counter: int) -> None:
    repo.publish("boardA", 2, _image(tmp_path), now=NOW)
    timestamp = _md(repo, "timestamp.json").signed.version
    with pytest.raises(ConflictError, match="not greater"):
        repo.publish("boardA", counter, _image(tmp_path, "other.bin", b"other"), now=NOW)
    assert _md(repo, "timestamp.json").signed.version == timestamp  # nothing signed
    repo.publish("boardB", 1, _image(tmp_path, "other.bin", b"other"), now=NOW)  # counters are per dtype
    repo.publish("boardA", 3, _image(tmp_path, "other.bin", b"other"), now=NOW)


def test_same_name_replaces_the_entry_with_the_newer_release(repo: VendorRepository, tmp_path: Path) -> None:
    repo.publish("boardA", 1, _image(tmp_path, data=b"one"), now=NOW)
    repo.publish("boardA", 2, _image(tmp_path, data=b"two"), now=NOW)
    targets = repo.list_targets()
    assert [(t.path, t.release_counter) for t in targets] == [("boardA/fw.bin", 2)]
    assert len(list((repo.targets_dir / "boardA").glob("*.fw.bin"))) == 2  # v1 still on disk for clients


@pytest.mark.parametrize(
    ("dtype", "counter", "name", "error"),
    [
        ("../x", 1, None, BadRequestError),
        ("", 1, None, BadRequestError),
        ("boardA", 0, None, BadRequestError),
        ("boardA", -3, None, BadRequestError),
        ("boardA", True, None, BadRequestError),
        ("boardA", 1, "a/b.bin", BadRequestError),
        ("boardA", 1, "..", BadRequestError),
        ("boardA", 1, ".hidden", BadRequestError),
    ],
)
def test_publish_refuses_bad_input(
    repo: VendorRepository, tmp_path: Path, dtype: str, counter: int, name: str | None, error: type[Exception]
) -> None:
    with pytest.raises(error):
        repo.publish(dtype, counter, _image(tmp_path), now=NOW, name=name)
    assert repo.list_targets() == []


def test_publish_of_a_missing_file(repo: VendorRepository, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        repo.publish("boardA", 1, tmp_path / "nope.bin", now=NOW)


def test_big_image_is_streamed_with_bounded_memory(repo: VendorRepository, tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    image = tmp_path / "big.img"
    with image.open("wb") as f:  # sparse: no disk or memory spent making it
        f.truncate(size)
    seen: list[int] = []
    tracemalloc.start()
    try:
        published = repo.publish("boardA", 1, image, now=NOW, progress=seen.append)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert published.length == size
    assert sum(seen) == size
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes while publishing a {size}-byte image"
    copy = repo.targets_dir / "boardA" / f"{published.sha256}.big.img"
    assert copy.stat().st_size == size
    # the hash of 64 MiB of zeros, computed here without holding them either
    digest = hashlib.sha256()
    zeros = bytes(1024 * 1024)
    for _ in range(64):
        digest.update(zeros)
    assert published.sha256 == digest.hexdigest()


# --- thresholds ---------------------------------------------------------------------------------
def test_threshold_two_of_two_on_every_role(tmp_path: Path) -> None:
    two = {role: 2 for role in ("root", "targets", "snapshot", "timestamp", "releases")}
    repo = VendorRepository.init(tmp_path / "repo", now=NOW, thresholds=two)
    repo.publish("boardA", 1, _image(tmp_path), now=NOW)
    tms = client_view(repo.path, repo.trusted_root(), NOW)
    assert all(r.threshold == 2 and len(r.keyids) == 2 for r in tms.root.roles.values())
    assert tms.targets.delegations is not None
    assert tms.targets.delegations.roles is not None
    assert tms.targets.delegations.roles["dtype-boardA"].threshold == 2
    # one signature short of the threshold is refused
    ts = _md(repo, "timestamp.json")
    ts.signatures.pop(next(iter(ts.signatures)))
    with pytest.raises(UnsignedMetadataError):
        tms.root.verify_delegate("timestamp", ts.signed_bytes, ts.signatures)
    role = _md(repo, "1.dtype-boardA.json")
    assert len(role.signatures) == 2
    role.signatures.pop(next(iter(role.signatures)))
    with pytest.raises(UnsignedMetadataError):
        tms.targets.verify_delegate("dtype-boardA", role.signed_bytes, role.signatures)


def test_missing_private_keys_stop_signing(repo: VendorRepository, tmp_path: Path) -> None:
    (repo.keys_dir / "timestamp-0.pem").unlink()
    with pytest.raises(IotdlmError, match="cannot sign timestamp"):
        repo.refresh(now=NOW)


# --- rotation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp", "releases"])
def test_rotation_keeps_clients_with_the_old_root_updating(repo: VendorRepository, tmp_path: Path, role: str) -> None:
    repo.publish("boardA", 1, _image(tmp_path), now=NOW)
    old_root = repo.trusted_root()
    before = client_view(repo.path, old_root, NOW)
    old_keys = (
        set(before.root.roles[role].keyids)
        if role != "releases"
        else set(before.targets.get_delegated_role("dtype-boardA").keyids)
    )
    later = NOW + dt.timedelta(hours=1)
    repo.rotate(role, now=later)
    repo.publish("boardA", 2, _image(tmp_path, "fw-2.bin", b"v2"), now=later)

    after = client_view(repo.path, old_root, later)  # from root v1, through the chain
    new_keys = (
        set(after.root.roles[role].keyids)
        if role != "releases"
        else set(after.targets.get_delegated_role("dtype-boardA").keyids)
    )
    assert new_keys
    assert not (new_keys & old_keys)
    assert "boardA/fw-2.bin" in _delegated(after, "boardA").targets
    retired = {p.name for p in (repo.keys_dir / "retired").glob("*.pem")}
    assert retired == {f"{role}-0.pem"}
    assert (repo.keys_dir / f"{role}-1.pem").exists()


def test_root_rotation_is_signed_by_old_and_new_root_keys(repo: VendorRepository) -> None:
    v1 = _md(repo, "1.root.json")
    repo.rotate("root", now=NOW)
    v2 = _md(repo, "2.root.json")
    assert isinstance(v1.signed, Root)
    assert isinstance(v2.signed, Root)
    v1.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # old keys signed the new root
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # and so did the new ones
    assert not set(v1.signed.roles["root"].keyids) & set(v2.signed.roles["root"].keyids)
    # the next rotation no longer needs (or uses) the first root key
    repo.rotate("root", now=NOW)
    v3 = _md(repo, "3.root.json")
    with pytest.raises(UnsignedMetadataError):
        v1.signed.verify_delegate("root", v3.signed_bytes, v3.signatures)
    v2.signed.verify_delegate("root", v3.signed_bytes, v3.signatures)


def test_old_releases_key_no_longer_verifies_after_rotation(repo: VendorRepository, tmp_path: Path) -> None:
    repo.publish("boardA", 1, _image(tmp_path), now=NOW)
    signed_by_old_key = _md(repo, "1.dtype-boardA.json")
    repo.rotate("releases", now=NOW)
    tms = client_view(repo.path, repo.trusted_root(), NOW)
    with pytest.raises(UnsignedMetadataError):
        tms.targets.verify_delegate("dtype-boardA", signed_by_old_key.signed_bytes, signed_by_old_key.signatures)


def test_failed_rotation_leaves_the_keys_as_they_were(repo: VendorRepository) -> None:
    root_key = repo.keys_dir / "root-0.pem"
    saved = root_key.read_bytes()
    root_key.unlink()  # the new root cannot be signed
    with pytest.raises(IotdlmError, match="cannot sign root"):
        repo.rotate("targets", now=NOW)
    assert [p.name for p in repo.keys_dir.glob("targets-*.pem")] == ["targets-0.pem"]
    assert not (repo.metadata_dir / "2.root.json").exists()
    root_key.write_bytes(saved)
    repo.rotate("targets", now=NOW)
    tms = client_view(repo.path, repo.trusted_root(), NOW)
    assert tms.root.version == 2
    assert len(tms.root.roles["targets"].keyids) == 1


def test_rotate_refuses_unknown_roles(repo: VendorRepository) -> None:
    with pytest.raises(BadRequestError):
        repo.rotate("admin", now=NOW)


# --- expiry and refresh -------------------------------------------------------------------------
def test_refresh_timestamp_and_snapshot(repo: VendorRepository) -> None:
    later = NOW + dt.timedelta(hours=20)
    repo.refresh(now=later)
    tms = client_view(repo.path, repo.trusted_root(), later)
    assert (tms.timestamp.version, tms.timestamp.expires) == (2, later + dt.timedelta(days=1))
    assert tms.snapshot.version == 1
    repo.refresh(now=later, roles=["snapshot"])
    tms = client_view(repo.path, repo.trusted_root(), later)
    assert (tms.timestamp.version, tms.snapshot.version) == (3, 2)
    assert tms.snapshot.expires == later + dt.timedelta(days=7)
    with pytest.raises(BadRequestError):
        repo.refresh(now=later, roles=["nonsense"])
    with pytest.raises(NotFoundError):
        repo.refresh(now=later, roles=["dtype-boardZ"])


def test_refresh_releases_and_root(repo: VendorRepository, tmp_path: Path) -> None:
    repo.publish("boardA", 1, _image(tmp_path), now=NOW)
    later = NOW + dt.timedelta(days=80)
    repo.refresh(now=later, roles=["releases", "targets", "root"])
    tms = client_view(repo.path, repo.trusted_root(), later)
    assert tms.root.version == 2
    assert tms["dtype-boardA"].expires == later + dt.timedelta(days=90)
    assert tms.targets.expires == later + dt.timedelta(days=90)


def test_expired_timestamp_is_refused_by_the_client(repo: VendorRepository) -> None:
    client_view(repo.path, repo.trusted_root(), NOW)
    repo.set_expiry("timestamp", dt.timedelta(days=-1))
    assert VendorRepository(repo.path).roles()[3].expires == NOW + dt.timedelta(days=1)  # not yet re-signed
    repo.refresh(now=NOW)
    with pytest.raises(ExpiredMetadataError):
        client_view(repo.path, repo.trusted_root(), NOW)
    repo.set_expiry("timestamp", dt.timedelta(hours=6))  # persisted in repo.toml
    VendorRepository(repo.path).refresh(now=NOW)
    assert client_view(repo.path, repo.trusted_root(), NOW).timestamp.expires == NOW + dt.timedelta(hours=6)


def test_client_clock_past_expiry_is_refused(repo: VendorRepository) -> None:
    with pytest.raises(ExpiredMetadataError):
        client_view(repo.path, repo.trusted_root(), NOW + dt.timedelta(days=2))


# --- reports (paper 4.4.5) ----------------------------------------------------------------------
def _seal(
    target: PublishedTarget,
    *,
    who: Identity = SM,
    now: dt.datetime = NOW,
    op: str = OP_REPORT,
    aud: str = REPORT_AUDIENCE,
    nonce: str | None = None,
    change: Callable[[dict[str, Any]], None] | None = None,
) -> bytes:
    body = report_body(target, verified_at=now)
    if change is not None:
        change(body)
    return who.sealer.seal(op, body, aud=aud, now=now, nonce=nonce)


@pytest.fixture
def published(repo: VendorRepository, tmp_path: Path) -> PublishedTarget:
    return repo.publish("boardA", 4, _image(tmp_path), now=NOW)


def test_valid_report_is_recorded(repo: VendorRepository, published: PublishedTarget) -> None:
    token = _seal(published, nonce="nonce-0001")
    report = repo.record_report(token, now=NOW + dt.timedelta(seconds=3))
    assert (report.dtype, report.release_counter, report.target_path, report.sha256) == (
        "boardA",
        4,
        "boardA/fw.bin",
        published.sha256,
    )
    assert report.reporter == "sm"
    assert report.nonce == "nonce-0001"
    assert report.received_at == NOW + dt.timedelta(seconds=3)
    assert report.verified_at == NOW
    assert VendorRepository(repo.path).reports() == [report]


def test_report_with_unix_time_verified_at(repo: VendorRepository, published: PublishedTarget) -> None:
    token = _seal(published, change=lambda b: b.update(verified_at=NOW.timestamp()))
    assert repo.record_report(token, now=NOW).verified_at == NOW


def _no_report(repo: VendorRepository) -> None:
    assert repo.reports() == []


def _identity(ca: str, **profile_changes: Any) -> Identity:
    """An "sm" certificate issued by another CA of the test PKI, or with another profile."""
    key = generate_key(Algorithm.P256)
    profile = dataclasses.replace(DEFAULT_PROFILES["service"], issuer=ca, **profile_changes)
    cert = PKI.cas[ca].issue(profile, key.public_key(), ca_name("sm", ORG), now=NOW, serial=x509.random_serial_number())
    return Identity("sm", key, cert, Sealer(key, cert))


def test_report_from_an_untrusted_ca(repo: VendorRepository, published: PublishedTarget) -> None:
    with pytest.raises(UntrustedError, match="not issued by a CA"):
        repo.record_report(_seal(published, who=_identity("factory")), now=NOW)
    _no_report(repo)


def test_report_from_a_ca_with_our_name_but_another_key(repo: VendorRepository, published: PublishedTarget) -> None:
    impostor = OTHER_PKI.module("sm")
    assert impostor.cert.issuer == PKI.cas["service"].certificate.subject  # same name, other key
    with pytest.raises(UntrustedError, match="bad signature"):
        repo.record_report(_seal(published, who=impostor), now=NOW)
    _no_report(repo)


def test_report_signer_without_client_auth(repo: VendorRepository, published: PublishedTarget) -> None:
    server_only = _identity("service", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    with pytest.raises(UntrustedError, match="extended key usage"):
        repo.record_report(_seal(published, who=server_only), now=NOW)
    _no_report(repo)


def test_report_with_an_expired_certificate(repo: VendorRepository, published: PublishedTarget) -> None:
    late = SM.cert.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(UntrustedError, match="not valid at"):
        repo.record_report(_seal(published, now=late), now=late)
    _no_report(repo)


def test_report_with_a_bad_signature(repo: VendorRepository, published: PublishedTarget) -> None:
    header, payload, sig = _seal(published).split(b".")
    claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    claims["body"]["release_counter"] = 99
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    with pytest.raises(BadSignatureError):
        repo.record_report(b".".join([header, forged, sig]), now=NOW)
    _no_report(repo)


def test_replayed_report(repo: VendorRepository, published: PublishedTarget) -> None:
    token = _seal(published)
    repo.record_report(token, now=NOW)
    with pytest.raises(ReplayError, match="nonce"):
        repo.record_report(token, now=NOW)
    with pytest.raises(ReplayError):  # also after a restart: the nonce is kept with the report
        VendorRepository(repo.path).record_report(token, now=NOW)
    assert len(repo.reports()) == 1


def test_report_outside_the_time_window(repo: VendorRepository, published: PublishedTarget) -> None:
    with pytest.raises(ReplayError):
        repo.record_report(_seal(published), now=NOW + dt.timedelta(minutes=6))
    _no_report(repo)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda b: b.update(sha256="0" * 64), NotFoundError),
        (lambda b: b.update(target_path="boardA/other.bin"), NotFoundError),
        (lambda b: b.update(release_counter=5), BadRequestError),
        (lambda b: b.update(length=1), BadRequestError),
        (lambda b: b.update(dtype="boardB", target_path="boardB/fw.bin"), NotFoundError),
        (lambda b: b.update(target_path="boardB/fw.bin"), BadRequestError),
        (lambda b: b.update(sha256="ABC"), BadRequestError),
        (lambda b: b.update(extra=1), BadRequestError),
        (lambda b: b.pop("length"), BadRequestError),
        (lambda b: b.update(verified_at="2026-11-21T12:00:00"), BadRequestError),
        (lambda b: b.update(release_counter="4"), BadRequestError),
        (lambda b: b.update(dtype="../x"), BadRequestError),
    ],
    ids=[
        "unknown-hash",
        "unknown-path",
        "wrong-counter",
        "wrong-length",
        "unknown-dtype",
        "path-outside-dtype",
        "bad-hash",
        "unknown-field",
        "missing-field",
        "naive-time",
        "counter-as-string",
        "bad-dtype",
    ],
)
def test_report_with_a_bad_body(
    repo: VendorRepository,
    published: PublishedTarget,
    change: Callable[[dict[str, Any]], None],
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        repo.record_report(_seal(published, change=change), now=NOW)
    _no_report(repo)


@pytest.mark.parametrize(
    ("op", "aud"), [("km.issue", REPORT_AUDIENCE), (OP_REPORT, "km")], ids=["wrong-op", "wrong-audience"]
)
def test_report_for_another_operation_or_receiver(
    repo: VendorRepository, published: PublishedTarget, op: str, aud: str
) -> None:
    with pytest.raises(BadRequestError):
        repo.record_report(_seal(published, op=op, aud=aud), now=NOW)
    _no_report(repo)


@pytest.mark.parametrize(
    ("token", "error"),
    [
        (b"", BadRequestError),
        (b"garbage", BadRequestError),
        (b"a.b.c", BadRequestError),
        (b"x" * (64 * 1024 + 1), TooLargeError),
    ],
    ids=["empty", "garbage", "three-parts", "too-large"],
)
def test_garbage_reports(repo: VendorRepository, token: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        repo.record_report(token, now=NOW)
    _no_report(repo)


def test_reports_need_a_trusted_ca(tmp_path: Path) -> None:
    repo = VendorRepository.init(tmp_path / "repo", now=NOW)
    target = repo.publish("boardA", 1, _image(tmp_path), now=NOW)
    with pytest.raises(UntrustedError, match="repo trust"):
        repo.record_report(_seal(target), now=NOW)
    repo.trust_report_ca(pem(PKI.cas["service"].certificate))
    repo.record_report(_seal(target), now=NOW)
    # replacing the bundle withdraws trust; appending keeps it
    repo.trust_report_ca(pem(OTHER_PKI.cas["service"].certificate))
    with pytest.raises(UntrustedError):
        repo.record_report(_seal(target), now=NOW)
    repo.trust_report_ca(pem(PKI.cas["service"].certificate), append=True)
    assert len(repo.report_cas()) == 2
    repo.record_report(_seal(target), now=NOW)
    repo.record_report(_seal(target, who=OTHER_PKI.module("sm")), now=NOW)
    assert len(repo.reports()) == 3
    with pytest.raises(BadRequestError):
        repo.trust_report_ca(b"not pem")


_REAL_HEADER = _seal(PublishedTarget("boardA", 1, "boardA/fw.bin", 1, "0" * 64, NOW)).split(b".")[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=2048),
        st.tuples(st.binary(max_size=300), st.binary(max_size=300)).map(
            lambda t: b".".join([_REAL_HEADER, base64.urlsafe_b64encode(t[0]).rstrip(b"="), t[1]])
        ),
        st.tuples(st.binary(max_size=200), st.binary(max_size=200)).map(
            lambda t: b".".join([base64.urlsafe_b64encode(t[0]).rstrip(b"="), t[1], b"sig"])
        ),
    )
)
def test_any_bytes_raise_only_iotdlm_errors(repo: VendorRepository, token: bytes) -> None:
    with contextlib.suppress(IotdlmError):
        repo.record_report(token, now=NOW)
    assert repo.reports() == []


def test_report_file_is_appended_line_by_line(repo: VendorRepository, published: PublishedTarget) -> None:
    repo.record_report(_seal(published), now=NOW)
    repo.record_report(_seal(published), now=NOW)
    lines = repo.reports_file.read_bytes().splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["target_path"] == "boardA/fw.bin" for line in lines)
    assert os.stat(repo.reports_file).st_size > 0


# --- the command line ---------------------------------------------------------------------------
def test_cli_walkthrough(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from iotdlm.cli.repository import repo as repo_cli

    runner = CliRunner()
    d = str(tmp_path / "repo")

    def ok(*args: str) -> str:
        result = runner.invoke(repo_cli, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    ok("init", "--dir", d, "--threshold", "root=2", "--report-ca", str(_ca_file(tmp_path)))
    image = _image(tmp_path, "fw-1.bin")
    assert "release 1 of boardA" in ok("publish", "--dir", d, "--dtype", "boardA", "--version", "1", str(image))
    refused = runner.invoke(repo_cli, ["publish", "--dir", d, "--dtype", "boardA", "--version", "1", str(image)])
    assert refused.exit_code == 4
    assert "not greater" in refused.output
    ok("rotate", "--dir", d, "--role", "releases")
    ok("expiry", "--dir", d, "--role", "timestamp", "--days", "2")
    ok("refresh", "--dir", d, "--role", "timestamp", "--role", "dtype-boardA")
    ok("trust", "--dir", d, "--ca", str(_ca_file(tmp_path)), "--append")
    status = ok("status", "--dir", d)
    assert "boardA" in status
    assert "dtype-boardA" in status
    repo = VendorRepository(tmp_path / "repo")
    target = repo.latest("boardA")
    assert target is not None
    repo.record_report(_seal(target), now=NOW)
    assert "boardA" in ok("reports", "--dir", d)
    tms = client_view(repo.path, repo.trusted_root(), SystemClock().now())
    # one refresh signed both at the same time: timestamp with its new 2-day period, the role with 90 days
    assert tms["dtype-boardA"].expires - tms.timestamp.expires == dt.timedelta(days=88)
    assert tms.root.roles["root"].threshold == 2
    bad = runner.invoke(repo_cli, ["init", "--dir", str(tmp_path / "r2"), "--threshold", "root"])
    assert bad.exit_code == 4
    for command in ("init", "publish", "serve", "rotate", "refresh", "trust", "status", "reports", "expiry"):
        assert "Usage" in ok(command, "--help")
