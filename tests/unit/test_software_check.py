"""Algorithm 1 (pm's check of software from the local repository) and the formats sm writes:
the metadata bundle, sig_sm, meta.enc. Metadata comes from a real VendorRepository (no network);
hostile cases are forged with python-tuf directly (the repository refuses to make them).

Also home of :func:`forge_role` and :func:`bundle_of`, which tests/integration/test_sm.py uses."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api._payload import MetaFile, TargetFile, Targets
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from iotdlm import software
from iotdlm.clock import SystemClock
from iotdlm.errors import (
    BadRequestError,
    BadSignatureError,
    IotdlmError,
    NotFoundError,
    TooLargeError,
    UnsupportedError,
    UntrustedError,
)
from iotdlm.pki.keys import Algorithm, generate_key, verify_bytes
from iotdlm.repository import VendorRepository
from iotdlm.wire import software as sw
from iotdlm.wire.report import ReportBody

NOW = SystemClock().now().replace(microsecond=0)
DTYPE = "boardA"
SK_SM = generate_key(Algorithm.P256)
PK_SM = SK_SM.public_key()
KEY = bytes(range(32))


# --- helpers shared with the integration tests ----------------------------------------------------
def repo_signers(repo: VendorRepository, role: str) -> list[Signer]:
    """The repository's active private keys of ``role`` (keys/<role>-<i>.pem), as python-tuf signers."""
    out: list[Signer] = []
    for path in sorted(repo.keys_dir.glob(f"{role}-*.pem")):
        out.append(CryptoSigner(load_pem_private_key(path.read_bytes(), password=None)))  # type: ignore[arg-type]
    return out


def _current(repo: VendorRepository) -> tuple[Metadata[Any], Metadata[Any]]:
    md = repo.metadata_dir
    ts: Metadata[Any] = Metadata.from_bytes((md / "timestamp.json").read_bytes())
    snap: Metadata[Any] = Metadata.from_bytes((md / f"{ts.signed.snapshot_meta.version}.snapshot.json").read_bytes())
    return ts, snap


def forge_role(
    repo: VendorRepository,
    dtype: str | None,
    mutate: Callable[[Targets], None],
    *,
    signers: list[Signer] | None = None,
    now: dt.datetime = NOW,
) -> None:
    """Publish a new version of role dtype-D (``dtype`` None: the top-level targets) changed by
    ``mutate``, signed by ``signers`` (default: the repository's own releases / targets keys), with
    snapshot and timestamp signed by the repository's keys: what a compromised or mistaken release
    key (or an attacker with another key) would serve."""
    md_dir = repo.metadata_dir
    ts, snap = _current(repo)
    role = software.role_name(dtype) if dtype is not None else "targets"
    if signers is None:
        signers = repo_signers(repo, "releases" if dtype is not None else "targets")
    version = snap.signed.meta[f"{role}.json"].version
    md: Metadata[Any] = Metadata.from_bytes((md_dir / f"{version}.{role}.json").read_bytes())
    mutate(md.signed)
    md.signed.version = version + 1
    md.signed.expires = now + dt.timedelta(days=30)
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    (md_dir / f"{version + 1}.{role}.json").write_bytes(md.to_bytes(JSONSerializer()))
    snap.signed.meta[f"{role}.json"] = MetaFile(version=version + 1)
    snap.signed.version += 1
    snap.signatures.clear()
    for s in repo_signers(repo, "snapshot"):
        snap.sign(s, append=True)
    (md_dir / f"{snap.signed.version}.snapshot.json").write_bytes(snap.to_bytes(JSONSerializer()))
    ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
    ts.signed.version += 1
    ts.signatures.clear()
    for s in repo_signers(repo, "timestamp"):
        ts.sign(s, append=True)
    (md_dir / "timestamp.json").write_bytes(ts.to_bytes(JSONSerializer()))


def bundle_of(repo: VendorRepository, dtype: str, target_path: str, *, roots_from: int = 1) -> bytes:
    """The bundle sm would store for ``target_path``, read straight from the repository's files."""
    md = repo.metadata_dir
    _ts, snap = _current(repo)
    versions = sorted(int(p.name.split(".")[0]) for p in md.glob("*.root.json"))
    roots = [(md / f"{v}.root.json").read_bytes() for v in versions if v >= roots_from]
    targets = (md / f"{snap.signed.meta['targets.json'].version}.targets.json").read_bytes()
    role = software.role_name(dtype)
    role_raw = (md / f"{snap.signed.meta[f'{role}.json'].version}.{role}.json").read_bytes()
    return software.encode_bundle(dtype=dtype, target_path=target_path, roots=roots, targets=targets, role=role_raw)


def add_target(path: str, data: bytes, custom: dict[str, Any]) -> Callable[[Targets], None]:
    def mutate(t: Targets) -> None:
        target = TargetFile.from_data(path, data)
        target.unrecognized_fields["custom"] = custom
        t.targets[path] = target

    return mutate


# --- fixtures -------------------------------------------------------------------------------------
@dataclass
class Stored:
    """One version as sm stores it, built here with the functions sm uses."""

    repo: VendorRepository
    image: Path
    meta: bytes
    sig: bytes

    @property
    def root(self) -> bytes:
        return self.repo.trusted_root()


IMAGE = os.urandom(300_000)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    tmp = tmp_path_factory.mktemp("alg1")
    repo = VendorRepository.init(tmp / "repo", now=NOW)
    image = tmp / "fw.bin"
    image.write_bytes(IMAGE)
    repo.publish(DTYPE, 7, image, now=NOW)
    meta = bundle_of(repo, DTYPE, f"{DTYPE}/fw.bin")
    return Stored(repo, image, meta, software.compute_sig_sm(SK_SM, meta, image))


@pytest.fixture
def fresh_repo(tmp_path: Path) -> tuple[VendorRepository, Path]:
    repo = VendorRepository.init(tmp_path / "repo", now=NOW)
    image = tmp_path / "fw.bin"
    image.write_bytes(IMAGE)
    repo.publish(DTYPE, 7, image, now=NOW)
    return repo, image


def _raises(field: str, cls: type[IotdlmError], fn: Callable[[], object], *words: str) -> IotdlmError:
    with pytest.raises(cls) as info:
        fn()
    assert info.value.field == field, info.value
    for w in words:
        assert w in info.value.message, info.value.message
    return info.value


# --- the good case --------------------------------------------------------------------------------
def test_verifies_and_reports_what_was_signed(stored: Stored) -> None:
    out = software.verify_software(stored.image, stored.meta, stored.sig, PK_SM, stored.root, dtype=DTYPE)
    assert (out.dtype, out.release_counter, out.target_path, out.length) == (DTYPE, 7, f"{DTYPE}/fw.bin", len(IMAGE))
    assert out.sha256 == hashlib.sha256(IMAGE).hexdigest()
    assert out.custom == {"hardware_id": DTYPE, "release_counter": 7}


def test_image_may_be_a_file_object(stored: Stored) -> None:
    out = software.verify_software(io.BytesIO(IMAGE), stored.meta, stored.sig, PK_SM, stored.root, dtype=DTYPE)
    assert out.length == len(IMAGE)


def test_sig_sm_is_a_signature_over_sha256_of_meta_then_image(stored: Stored) -> None:
    """The documented definition, computed independently: sign_bytes(sk_sm, SHA-256(meta || sw))."""
    verify_bytes(PK_SM, stored.sig, hashlib.sha256(stored.meta + IMAGE).digest())
    with pytest.raises(BadSignatureError):
        verify_bytes(PK_SM, stored.sig, hashlib.sha256(IMAGE + stored.meta).digest())


def test_expiry_is_not_checked(tmp_path: Path, fresh_repo: tuple[VendorRepository, Path]) -> None:
    """The factory may flash days after sm downloaded: metadata expired since is still good for pm."""
    repo, image = fresh_repo
    repo.set_expiry("releases", dt.timedelta(seconds=-10))
    repo.set_expiry("targets", dt.timedelta(seconds=-10))
    repo.refresh(now=NOW, roles=("releases", "targets"))
    meta = bundle_of(repo, DTYPE, f"{DTYPE}/fw.bin")
    sig = software.compute_sig_sm(SK_SM, meta, image)
    assert software.verify_software(image, meta, sig, PK_SM, repo.trusted_root(), dtype=DTYPE).release_counter == 7


def test_root_rotation_is_followed_from_the_pinned_root(fresh_repo: tuple[VendorRepository, Path]) -> None:
    repo, image = fresh_repo
    pinned = repo.trusted_root()
    repo.rotate("root", now=NOW)
    repo.rotate("targets", now=NOW)  # targets now signed by a key only root v3 knows
    meta = bundle_of(repo, DTYPE, f"{DTYPE}/fw.bin")
    sig = software.compute_sig_sm(SK_SM, meta, image)
    assert software.verify_software(image, meta, sig, PK_SM, pinned, dtype=DTYPE).release_counter == 7
    # without the middle of the root history the new targets key cannot be trusted
    bundle = software.decode_bundle(meta)
    gap = software.encode_bundle(
        dtype=DTYPE,
        target_path=bundle.target_path,
        roots=[bundle.roots[0], bundle.roots[2]],
        targets=bundle.targets,
        role=bundle.role,
    )
    _raises(
        "meta_repo",
        UntrustedError,
        lambda: software.verify_repo_metadata(software.decode_bundle(gap), pinned, dtype=DTYPE),
        "root is missing",
    )
    # and with only the pinned root, the rotated targets key is unknown
    old = software.encode_bundle(
        dtype=DTYPE, target_path=bundle.target_path, roots=[bundle.roots[0]], targets=bundle.targets, role=bundle.role
    )
    _raises(
        "meta_repo",
        BadSignatureError,
        lambda: software.verify_repo_metadata(software.decode_bundle(old), pinned, dtype=DTYPE),
    )


# --- step 1: sig_sm ---------------------------------------------------------------------------------
def test_altered_image_fails_sig_sm_and_says_the_image_changed(stored: Stored) -> None:
    bad = bytearray(IMAGE)
    bad[1000] ^= 1
    _raises(
        "sig_sm",
        BadSignatureError,
        lambda: software.verify_software(
            io.BytesIO(bytes(bad)), stored.meta, stored.sig, PK_SM, stored.root, dtype=DTYPE
        ),
        "sm's signature",
        "halt",
        "the image was altered",
    )


def test_altered_sig_sm_fails(stored: Stored) -> None:
    bad = bytearray(stored.sig)
    bad[-3] ^= 0x40
    _raises(
        "sig_sm",
        BadSignatureError,
        lambda: software.verify_software(stored.image, stored.meta, bytes(bad), PK_SM, stored.root, dtype=DTYPE),
        "sig_sm or the metadata was altered",
    )


def test_sig_sm_by_another_key_fails(stored: Stored) -> None:
    other = generate_key(Algorithm.P256)
    sig = software.compute_sig_sm(other, stored.meta, stored.image)
    _raises(
        "sig_sm",
        BadSignatureError,
        lambda: software.verify_software(stored.image, stored.meta, sig, PK_SM, stored.root, dtype=DTYPE),
    )


def test_altered_metadata_fails_sig_sm(stored: Stored) -> None:
    meta = stored.meta.replace(b'"dtype":"boardA"', b'"dtype":"boardB"')
    assert meta != stored.meta
    _raises(
        "sig_sm",
        BadSignatureError,
        lambda: software.verify_software(stored.image, meta, stored.sig, PK_SM, stored.root, dtype=DTYPE),
    )


def test_oversized_signature_is_refused(stored: Stored) -> None:
    _raises(
        "sig_sm",
        TooLargeError,
        lambda: software.verify_software(stored.image, stored.meta, b"x" * 5000, PK_SM, stored.root, dtype=DTYPE),
    )


# --- step 2: meta_repo with pk_repo (a compromised sm signs whatever it likes) ----------------------
def _signed(meta: bytes, image: Path) -> bytes:
    return software.compute_sig_sm(SK_SM, meta, image)


def test_metadata_of_another_repository_is_refused(stored: Stored, tmp_path: Path) -> None:
    other = VendorRepository.init(tmp_path / "other", now=NOW)
    other.publish(DTYPE, 8, stored.image, now=NOW)
    meta = bundle_of(other, DTYPE, f"{DTYPE}/fw.bin")
    _raises(
        "meta_repo",
        BadSignatureError,
        lambda: software.verify_software(
            stored.image, meta, _signed(meta, stored.image), PK_SM, stored.root, dtype=DTYPE
        ),
        "not signed by the keys trusted",
    )


def test_role_signed_by_a_wrong_key_is_refused(fresh_repo: tuple[VendorRepository, Path]) -> None:
    repo, image = fresh_repo
    forge_role(repo, DTYPE, lambda t: None, signers=[CryptoSigner.generate_ecdsa()])
    meta = bundle_of(repo, DTYPE, f"{DTYPE}/fw.bin")
    _raises(
        "meta_repo",
        BadSignatureError,
        lambda: software.verify_software(image, meta, _signed(meta, image), PK_SM, repo.trusted_root(), dtype=DTYPE),
        "dtype-boardA",
    )


def test_wrong_hardware_id_is_refused(fresh_repo: tuple[VendorRepository, Path]) -> None:
    repo, image = fresh_repo
    data = image.read_bytes()
    forge_role(repo, DTYPE, add_target(f"{DTYPE}/evil.bin", data, {"hardware_id": "boardB", "release_counter": 9}))
    meta = bundle_of(repo, DTYPE, f"{DTYPE}/evil.bin")
    _raises(
        "meta_repo",
        UntrustedError,
        lambda: software.verify_software(image, meta, _signed(meta, image), PK_SM, repo.trusted_root(), dtype=DTYPE),
        "hardware_id 'boardB'",
        "wrong device type",
    )


@pytest.mark.parametrize(
    ("name", "custom", "cls", "words"),
    [
        ("no custom", None, BadRequestError, "no custom fields"),
        ("counter missing", {"hardware_id": DTYPE}, BadRequestError, "release_counter"),
        ("counter a string", {"hardware_id": DTYPE, "release_counter": "9"}, BadRequestError, "release_counter"),
        ("counter a bool", {"hardware_id": DTYPE, "release_counter": True}, BadRequestError, "release_counter"),
        ("counter negative", {"hardware_id": DTYPE, "release_counter": -1}, BadRequestError, "release_counter"),
        ("hardware_id missing", {"release_counter": 9}, UntrustedError, "hardware_id None"),
    ],
)
def test_custom_fields_are_required(
    fresh_repo: tuple[VendorRepository, Path], name: str, custom: Any, cls: type[IotdlmError], words: str
) -> None:
    repo, image = fresh_repo
    data = image.read_bytes()

    def mutate(t: Targets) -> None:
        target = TargetFile.from_data(f"{DTYPE}/x.bin", data)
        if custom is not None:
            target.unrecognized_fields["custom"] = custom
        t.targets[target.path] = target

    forge_role(repo, DTYPE, mutate)
    meta = bundle_of(repo, DTYPE, f"{DTYPE}/x.bin")
    _raises(
        "meta_repo",
        cls,
        lambda: software.verify_repo_metadata(software.decode_bundle(meta), repo.trusted_root(), dtype=DTYPE),
        words,
    )


def test_target_outside_the_delegated_paths_is_refused(fresh_repo: tuple[VendorRepository, Path]) -> None:
    repo, image = fresh_repo
    forge_role(
        repo, DTYPE, add_target("boardB/fw.bin", image.read_bytes(), {"hardware_id": DTYPE, "release_counter": 9})
    )
    meta = bundle_of(repo, DTYPE, "boardB/fw.bin")
    _raises(
        "meta_repo",
        UntrustedError,
        lambda: software.verify_repo_metadata(software.decode_bundle(meta), repo.trusted_root(), dtype=DTYPE),
        "outside the paths delegated",
    )


def test_bundle_for_another_dtype_or_target_is_refused(stored: Stored) -> None:
    bundle = software.decode_bundle(stored.meta)
    _raises(
        "meta_repo",
        UntrustedError,
        lambda: software.verify_repo_metadata(bundle, stored.root, dtype="boardB"),
        "for dtype 'boardA'",
    )
    missing = software.decode_bundle(
        software.encode_bundle(
            dtype=DTYPE, target_path=f"{DTYPE}/nope.bin", roots=bundle.roots, targets=bundle.targets, role=bundle.role
        )
    )
    _raises("meta_repo", NotFoundError, lambda: software.verify_repo_metadata(missing, stored.root, dtype=DTYPE))
    swapped = software.decode_bundle(
        software.encode_bundle(
            dtype=DTYPE, target_path=bundle.target_path, roots=bundle.roots, targets=bundle.role, role=bundle.targets
        )
    )
    _raises("meta_repo", BadSignatureError, lambda: software.verify_repo_metadata(swapped, stored.root, dtype=DTYPE))


def test_a_damaged_trusted_root_is_refused(stored: Stored) -> None:
    with pytest.raises(BadRequestError) as info:
        software.verify_repo_metadata(software.decode_bundle(stored.meta), b"{}", dtype=DTYPE)
    assert info.value.field == "trusted_root"


# --- step 3: the image against the signed target ------------------------------------------------------
def test_image_signed_by_a_compromised_sm_fails_against_the_metadata(stored: Stored, tmp_path: Path) -> None:
    evil = tmp_path / "evil.bin"
    evil.write_bytes(IMAGE[:-1] + bytes([IMAGE[-1] ^ 1]))
    _raises(
        "image",
        BadSignatureError,
        lambda: software.verify_software(
            evil, stored.meta, _signed(stored.meta, evil), PK_SM, stored.root, dtype=DTYPE
        ),
        "does not match the signed",
    )
    short = tmp_path / "short.bin"
    short.write_bytes(IMAGE[:-10])
    _raises(
        "image",
        BadSignatureError,
        lambda: software.verify_software(
            short, stored.meta, _signed(stored.meta, short), PK_SM, stored.root, dtype=DTYPE
        ),
        "altered or truncated",
    )


def test_every_signed_hash_is_checked(fresh_repo: tuple[VendorRepository, Path], tmp_path: Path) -> None:
    repo, image = fresh_repo
    data = image.read_bytes()

    def add(hashes: dict[str, str]) -> Callable[[Targets], None]:
        def mutate(t: Targets) -> None:
            t.targets[f"{DTYPE}/multi.bin"] = TargetFile(
                len(data),
                hashes,
                f"{DTYPE}/multi.bin",
                {"custom": {"hardware_id": DTYPE, "release_counter": 9}},
            )

        return mutate

    good = {"sha256": hashlib.sha256(data).hexdigest(), "sha512": hashlib.sha512(data).hexdigest()}
    forge_role(repo, DTYPE, add(good))
    meta = bundle_of(repo, DTYPE, f"{DTYPE}/multi.bin")
    assert (
        software.verify_software(image, meta, _signed(meta, image), PK_SM, repo.trusted_root(), dtype=DTYPE).hashes
        == good
    )
    forge_role(repo, DTYPE, add({**good, "sha512": hashlib.sha512(b"other").hexdigest()}))
    meta = bundle_of(repo, DTYPE, f"{DTYPE}/multi.bin")
    _raises(
        "image",
        BadSignatureError,
        lambda: software.verify_software(image, meta, _signed(meta, image), PK_SM, repo.trusted_root(), dtype=DTYPE),
        "sha512",
    )
    forge_role(repo, DTYPE, add({**good, "md17": "00"}))
    meta = bundle_of(repo, DTYPE, f"{DTYPE}/multi.bin")
    _raises(
        "image",
        UnsupportedError,
        lambda: software.verify_software(image, meta, _signed(meta, image), PK_SM, repo.trusted_root(), dtype=DTYPE),
        "md17",
    )


def test_missing_image_is_not_found(stored: Stored, tmp_path: Path) -> None:
    _raises(
        "image",
        NotFoundError,
        lambda: software.verify_software(tmp_path / "nope", stored.meta, stored.sig, PK_SM, stored.root, dtype=DTYPE),
    )


# --- the bundle ----------------------------------------------------------------------------------------
def test_bundle_is_canonical_json_with_sorted_keys(stored: Stored) -> None:
    obj = msgspec.json.decode(stored.meta)
    assert list(obj) == ["dtype", "format", "role", "roots", "target_path", "targets"]
    assert obj["format"] == software.BUNDLE_FORMAT
    assert b" " not in stored.meta
    assert b"\n" not in stored.meta


@pytest.mark.parametrize(
    ("name", "edit", "cls"),
    [
        ("whitespace", lambda m: m.replace(b",", b", ", 1), BadRequestError),
        ("trailing byte", lambda m: m + b" ", BadRequestError),
        ("unknown field", lambda m: m[:-1] + b',"x":1}', BadRequestError),
        ("other format", lambda m: m.replace(software.BUNDLE_FORMAT.encode(), b"iotdlm.sm.meta/9"), UnsupportedError),
        (
            "no roots",
            lambda m: m.replace(m[m.index(b'"roots":[') : m.index(b'],"target_path"') + 1], b'"roots":[]'),
            BadRequestError,
        ),
        ("bad dtype", lambda m: m.replace(b'"dtype":"boardA"', b'"dtype":"../x"'), BadRequestError),
        ("not json", lambda m: b"\xff" + m, BadRequestError),
    ],
)
def test_bundle_decoder_refuses(
    stored: Stored, name: str, edit: Callable[[bytes], bytes], cls: type[IotdlmError]
) -> None:
    _raises("meta_repo", cls, lambda: software.decode_bundle(edit(stored.meta)))


def test_oversized_bundle_is_refused() -> None:
    _raises("meta_repo", TooLargeError, lambda: software.decode_bundle(b" " * (software.MAX_BUNDLE_BYTES + 1)))


# --- meta.enc -----------------------------------------------------------------------------------------
def test_meta_enc_round_trip_and_layout(stored: Stored) -> None:
    enc = software.encrypt_meta(stored.meta, KEY, DTYPE, 7)
    assert enc[0] == 1
    assert len(enc) == 1 + 12 + len(stored.meta) + 16
    assert stored.meta[:40] not in enc
    assert software.decrypt_meta(enc, KEY, DTYPE, 7) == stored.meta
    assert software.encrypt_meta(stored.meta, KEY, DTYPE, 7) != enc  # fresh nonce each time


@pytest.mark.parametrize(
    ("name", "edit", "key", "dtype", "counter", "cls"),
    [
        ("flipped byte", lambda e: e[:30] + bytes([e[30] ^ 1]) + e[31:], KEY, DTYPE, 7, BadSignatureError),
        ("truncated", lambda e: e[:-1], KEY, DTYPE, 7, BadSignatureError),
        ("other dtype (aad)", lambda e: e, KEY, "boardB", 7, BadSignatureError),
        ("other release (aad)", lambda e: e, KEY, DTYPE, 8, BadSignatureError),
        ("other key", lambda e: e, bytes(32), DTYPE, 7, BadSignatureError),
        ("unknown version", lambda e: b"\x02" + e[1:], KEY, DTYPE, 7, UnsupportedError),
        ("too short", lambda e: e[:20], KEY, DTYPE, 7, BadRequestError),
    ],
)
def test_meta_enc_refuses(
    name: str, edit: Callable[[bytes], bytes], key: bytes, dtype: str, counter: int, cls: type[IotdlmError]
) -> None:
    enc = software.encrypt_meta(b'{"some":"metadata"}', KEY, DTYPE, 7)
    _raises("meta_enc", cls, lambda: software.decrypt_meta(edit(enc), key, dtype, counter))


def test_meta_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        software.encrypt_meta(b"x", b"short", DTYPE, 1)


# --- hypothesis: every parser raises iotdlm errors only ---------------------------------------------
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=400))
def test_decrypt_meta_takes_any_bytes(data: bytes) -> None:
    with pytest.raises(IotdlmError):
        software.decrypt_meta(data, KEY, DTYPE, 1)


@FUZZ
@given(st.binary(max_size=2000))
def test_decode_bundle_takes_any_bytes(data: bytes) -> None:
    with pytest.raises(IotdlmError) as info:
        software.decode_bundle(data)
    assert info.value.field == "meta_repo"


@FUZZ
@given(
    role=st.binary(max_size=300) | st.sampled_from([b"{}", b'{"signed":{},"signatures":[]}', b"[]", b"1e999"]),
    targets=st.binary(max_size=300),
    root=st.binary(max_size=300),
    path=st.text(max_size=30),
)
def test_bundle_contents_take_any_bytes(stored: Stored, role: bytes, targets: bytes, root: bytes, path: str) -> None:
    good = software.decode_bundle(stored.meta)
    for roots, t, r in (
        ([root], good.targets, good.role),
        (good.roots, targets, good.role),
        (good.roots, good.targets, role),
        ([*good.roots, root], good.targets, good.role),
    ):
        bundle = software.MetaBundle(
            dtype=DTYPE, format=software.BUNDLE_FORMAT, role=r, roots=roots, target_path=path, targets=t
        )
        with pytest.raises(IotdlmError):
            software.verify_repo_metadata(bundle, stored.root, dtype=DTYPE)


@FUZZ
@given(meta=st.binary(max_size=500), sig=st.binary(max_size=100))
def test_verify_software_takes_any_meta_and_signature(stored: Stored, meta: bytes, sig: bytes) -> None:
    with pytest.raises(IotdlmError):
        software.verify_software(io.BytesIO(b"image"), meta, sig, PK_SM, stored.root, dtype=DTYPE)
    # even when sm signed the garbage (a compromised sm), it is refused at step 2
    signed = software.compute_sig_sm(SK_SM, meta, io.BytesIO(b"image"))
    with pytest.raises(IotdlmError) as info:
        software.verify_software(io.BytesIO(b"image"), meta, signed, PK_SM, stored.root, dtype=DTYPE)
    assert info.value.field == "meta_repo"


MESSAGES: list[type[Any]] = [
    sw.ListRequest,
    sw.ListResponse,
    sw.LoadRequest,
    sw.LoadResponse,
    sw.NotifyMessage,
    ReportBody,
    sw.StoredSoftware,
]


@FUZZ
@given(
    data=st.binary(max_size=300)
    | st.builds(
        lambda d: msgspec.json.encode(d),
        st.dictionaries(
            st.sampled_from(["dtype", "release_counter", "versions", "image_path", "meta_enc", "sig_sm", "x"]),
            st.none() | st.integers() | st.text(max_size=70) | st.booleans() | st.lists(st.integers(), max_size=2),
            max_size=5,
        ),
    )
)
def test_wire_messages_take_any_bytes(data: bytes) -> None:
    for cls in MESSAGES:
        try:
            out = sw.decode(data, cls)
        except IotdlmError:
            continue
        dtype = getattr(out, "dtype", None)
        assert dtype is None or sw.check_dtype(dtype) == dtype


@pytest.mark.parametrize(
    ("data", "cls"),
    [
        (b'{"dtype":"../etc"}', BadRequestError),
        (b'{"dtype":"boardA","release_counter":-1}', BadRequestError),
        (b'{"dtype":"boardA","release_counter":true}', BadRequestError),
        (b'{"dtype":"boardA","extra":1}', BadRequestError),
        (b"{", BadRequestError),
    ],
)
def test_wire_messages_refuse(data: bytes, cls: type[IotdlmError]) -> None:
    with pytest.raises(cls):
        sw.decode(data, sw.LoadRequest)


def test_load_request_defaults_to_latest() -> None:
    assert sw.decode(b'{"dtype":"boardA"}', sw.LoadRequest).release_counter is None
