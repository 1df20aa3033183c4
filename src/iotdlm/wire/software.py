"""Software in the local repository: the metadata bundle, ``sig_sm``, metadata at rest, Algorithm 1.

Pure (no I/O besides reading the image handed in). sm writes what is described here, pm checks it.

**The metadata bundle** (the paper's ``meta_repo``: what pm verifies with ``pk_repo``) is canonical
JSON, UTF-8, no whitespace, keys in this order (alphabetical)::

    {"dtype": "<D>",
     "format": "iotdlm.sm.meta/1",
     "role": "<base64 of the dtype-D delegated targets metadata, bytes as served by the repository>",
     "roots": ["<base64 of N.root.json>", ...],   # root history, ascending and contiguous, the
                                                  # last one is the root sm trusted at download
     "target_path": "<D>/<name>",
     "targets": "<base64 of the top-level targets metadata, bytes as served>"}

Base64 is standard with padding (msgspec's encoding of ``bytes``). :func:`decode_bundle` accepts
only the exact canonical encoding (it re-encodes and compares), so the bundle has one byte string
and ``meta || sw`` cannot be re-split into another valid (meta, sw) pair.

**sig_sm** (Fig. 8, hash-then-sign so a 1 GiB image never sits in memory)::

    digest = SHA-256(meta || sw)            # meta = the bundle bytes above (plaintext), sw = image
    sig_sm = iotdlm.pki.keys.sign_bytes(sk_sm, digest)

``sign_bytes`` over the 32-byte digest means: ECDSA P-256 with SHA-256 (P-384: SHA-384) over the
digest, DER-encoded (r, s); Ed25519 over the digest; RSA PKCS#1 v1.5 with SHA-256 over the digest.
The ``sig_sm`` file holds the raw signature bytes.

**meta.enc** (Section 5.2.4: metadata encrypted at rest, key shared only by sm and pm)::

    meta.enc = 0x01 || nonce (12 random bytes) || AES-256-GCM(key, nonce, meta, aad) (ciphertext || 16-byte tag)
    aad      = UTF-8 of f"{dtype}/{release_counter}"

The AAD binds the ciphertext to its place in the local repository: a meta.enc moved to another
dtype or version does not decrypt.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# python-tuf re-exports these from tuf.api.metadata without __all__, which mypy --strict refuses to
# see through; tuf.api._payload is where they are defined.
from tuf.api._payload import DelegatedRole, Root, TargetFile, Targets
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata

from iotdlm.errors import (
    BadRequestError,
    BadSignatureError,
    IotdlmError,
    NotFoundError,
    TooLargeError,
    UnsupportedError,
    UntrustedError,
)
from iotdlm.pki.keys import PrivateKey, PublicKey, sign_bytes, verify_bytes

BUNDLE_FORMAT = "iotdlm.sm.meta/1"
#: largest bundle accepted (roots + top-level targets + one dtype role)
MAX_BUNDLE_BYTES = 32 * 1024 * 1024
MAX_ROOTS = 1024
MAX_SIG_BYTES = 1024
META_ENC_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
#: release counters are JSON integers in the repository's metadata: 0 .. 2**63 - 1
MAX_RELEASE_COUNTER = 2**63 - 1
CHUNK = 1024 * 1024

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def role_name(dtype: str) -> str:
    """The repository's delegated targets role for device type ``dtype``."""
    return f"dtype-{dtype}"


def check_dtype(dtype: str, *, field: str = "dtype") -> str:
    if not isinstance(dtype, str) or not _ID_RE.match(dtype):
        raise BadRequestError(
            f"dtype {dtype!r} is not valid: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            field=field,
        )
    return dtype


def check_release_counter(value: object, *, field: str = "release_counter") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_RELEASE_COUNTER:
        raise BadRequestError(f"release counter {value!r} is not an integer in 0..2**63-1", field=field)
    return value


# --- the metadata bundle ------------------------------------------------------------------------


class MetaBundle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``meta_repo`` as stored: fields in alphabetical order, so msgspec's encoding is canonical."""

    dtype: str
    format: str
    role: bytes
    roots: list[bytes]
    target_path: str
    targets: bytes


_encoder = msgspec.json.Encoder()
_bundle_decoder = msgspec.json.Decoder(MetaBundle)


def encode_bundle(*, dtype: str, target_path: str, roots: list[bytes], targets: bytes, role: bytes) -> bytes:
    check_dtype(dtype)
    if not roots:
        raise ValueError("a bundle needs at least one root")
    return _encoder.encode(
        MetaBundle(dtype=dtype, format=BUNDLE_FORMAT, role=role, roots=roots, target_path=target_path, targets=targets)
    )


def decode_bundle(data: bytes) -> MetaBundle:
    """Parse a bundle; anything but the exact canonical encoding of a valid bundle is refused."""
    f = "meta_repo"
    if len(data) > MAX_BUNDLE_BYTES:
        raise TooLargeError(f"metadata bundle of {len(data)} bytes exceeds {MAX_BUNDLE_BYTES}", field=f)
    try:
        bundle = _bundle_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequestError(f"metadata bundle is not valid: {exc}", field=f) from exc
    if bundle.format != BUNDLE_FORMAT:
        raise UnsupportedError(f"metadata bundle format {bundle.format!r} is not {BUNDLE_FORMAT!r}", field=f)
    check_dtype(bundle.dtype, field=f)
    if not bundle.roots or len(bundle.roots) > MAX_ROOTS:
        raise BadRequestError(f"metadata bundle must hold 1 to {MAX_ROOTS} roots", field=f)
    if _encoder.encode(bundle) != data:
        raise BadRequestError("metadata bundle is not in canonical form", field=f)
    return bundle


# --- sig_sm ------------------------------------------------------------------------------------


class Hasher(Protocol):
    """What hashlib objects offer (sha256, blake2b...)."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...

    def hexdigest(self) -> str: ...


def sig_sm_hasher(meta: bytes) -> Hasher:
    """A SHA-256 already fed with ``meta``: feed it the image, then :func:`sign_sig_sm` its digest."""
    h = hashlib.sha256()
    h.update(meta)
    return h


def sign_sig_sm(sk_sm: PrivateKey, digest: bytes) -> bytes:
    """``sig_sm`` = sign(sk_sm, SHA-256(meta || sw)); ``digest`` is that SHA-256 (32 bytes)."""
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError("sig_sm signs the 32-byte SHA-256 of meta || sw")
    return sign_bytes(sk_sm, digest)


def compute_sig_sm(sk_sm: PrivateKey, meta: bytes, image: Path | BinaryIO) -> bytes:
    """Sign ``meta || image`` (streamed) as sm does; for tools and tests."""
    h = sig_sm_hasher(meta)
    _stream(image, [h.update])
    return sign_sig_sm(sk_sm, h.digest())


# --- metadata at rest ----------------------------------------------------------------------------


def _aad(dtype: str, release_counter: int) -> bytes:
    return f"{dtype}/{release_counter}".encode()


def _check_key(key: bytes) -> AESGCM:
    if len(key) != KEY_BYTES:
        raise ValueError(f"the sm-pm key must be {KEY_BYTES} bytes, got {len(key)}")
    return AESGCM(key)


def encrypt_meta(meta: bytes, key: bytes, dtype: str, release_counter: int) -> bytes:
    """meta.enc = 0x01 || nonce || AES-256-GCM(key, nonce, meta, aad=f"{dtype}/{release_counter}")."""
    aead = _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    return bytes([META_ENC_VERSION]) + nonce + aead.encrypt(nonce, meta, _aad(dtype, release_counter))


def decrypt_meta(enc: bytes, key: bytes, dtype: str, release_counter: int) -> bytes:
    """The plaintext bundle of meta.enc; a wrong key, place (dtype/version) or any altered byte is refused."""
    aead = _check_key(key)
    f = "meta_enc"
    if len(enc) > MAX_BUNDLE_BYTES + 1 + NONCE_BYTES + TAG_BYTES:
        raise TooLargeError(f"meta.enc of {len(enc)} bytes exceeds the limit", field=f)
    if len(enc) < 1 + NONCE_BYTES + TAG_BYTES:
        raise BadRequestError(f"meta.enc of {len(enc)} bytes is too short to be encrypted metadata", field=f)
    if enc[0] != META_ENC_VERSION:
        raise UnsupportedError(f"meta.enc format version {enc[0]} is not {META_ENC_VERSION}", field=f)
    nonce = enc[1 : 1 + NONCE_BYTES]
    try:
        return aead.decrypt(nonce, enc[1 + NONCE_BYTES :], _aad(dtype, release_counter))
    except InvalidTag:
        raise BadSignatureError(
            f"meta.enc of {dtype}/{release_counter} does not authenticate with the sm-pm key: "
            "altered, moved from another version, or encrypted under another key",
            field=f,
        ) from None


# --- verifying the repository metadata (pk_repo) -------------------------------------------------

_T = TypeVar("_T", Root, Targets)


@dataclass(frozen=True)
class VerifiedTarget:
    """A target the repository signed for ``dtype``, as read from verified metadata."""

    dtype: str
    release_counter: int
    target_path: str
    length: int
    hashes: dict[str, str]
    custom: dict[str, Any]
    root_version: int
    targets_version: int
    role_version: int

    @property
    def sha256(self) -> str | None:
        return self.hashes.get("sha256")


def _load(data: bytes, cls: type[_T], what: str, field: str) -> Metadata[_T]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except (RepositoryError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise BadRequestError(f"{what} is not TUF metadata: {exc}", field=field) from exc
    if not isinstance(md.signed, cls):
        raise BadRequestError(f"{what} is {md.signed.type!r} metadata, expected {cls.type!r}", field=field)
    return md


def _signed_bytes(md: Metadata[Any], what: str, field: str) -> bytes:
    try:
        return md.signed_bytes
    except (RepositoryError, ValueError, TypeError) as exc:
        raise BadRequestError(f"{what} cannot be canonicalised: {exc}", field=field) from exc


def _verify_delegate(delegator: Root | Targets, role: str, md: Metadata[Any], what: str, field: str) -> None:
    try:
        delegator.verify_delegate(role, _signed_bytes(md, what, field), md.signatures)
    except RepositoryError as exc:  # UnsignedMetadataError
        raise BadSignatureError(f"{what} is not signed by the keys trusted for {role!r}: {exc}", field=field) from exc
    except ValueError as exc:  # no such delegation
        raise UntrustedError(f"{what}: {exc}", field=field) from exc


def load_trusted_root(trusted_root: bytes, *, field: str = "trusted_root") -> Metadata[Root]:
    """The pinned root (pk_repo): parsed and checked to be signed by its own threshold of keys."""
    md = _load(trusted_root, Root, "the trusted root", field)
    _verify_delegate(md.signed, Root.type, md, "the trusted root", field)
    return md


def _walk_roots(pinned: Metadata[Root], roots: list[bytes], field: str) -> Root:
    """Follow the bundle's root history from the pinned root (TUF 5.3: each new root is signed by a
    threshold of the previous root's keys and of its own, versions strictly +1). Roots not newer
    than the pinned one are skipped; expiry is not checked (see :func:`verify_software`)."""
    current = pinned.signed
    for i, raw in enumerate(roots):
        md = _load(raw, Root, f"bundle root #{i}", field)
        v = md.signed.version
        if v <= current.version:
            continue
        if v != current.version + 1:
            raise UntrustedError(
                f"bundle root history jumps from version {current.version} to {v}: a root is missing", field=field
            )
        _verify_delegate(current, Root.type, md, f"root version {v}", field)
        _verify_delegate(md.signed, Root.type, md, f"root version {v} (by its own keys)", field)
        current = md.signed
    return current


def custom_fields(target: TargetFile, dtype: str, *, field: str) -> tuple[int, dict[str, Any]]:
    """(release_counter, custom) of a target signed for ``dtype``; refuses another hardware_id."""
    custom = target.custom
    if not isinstance(custom, dict):
        raise BadRequestError(
            f"target {target.path!r} has no custom fields (hardware_id, release_counter)", field=field
        )
    hw = custom.get("hardware_id")
    if hw != dtype:
        raise UntrustedError(
            f"target {target.path!r} is signed for hardware_id {hw!r}, not for dtype {dtype!r}: wrong device type",
            field=field,
        )
    counter = custom.get("release_counter")
    if not isinstance(counter, int) or isinstance(counter, bool) or not 0 <= counter <= MAX_RELEASE_COUNTER:
        raise BadRequestError(f"target {target.path!r} has no valid custom release_counter ({counter!r})", field=field)
    return counter, custom


def delegated_role(targets: Targets, dtype: str, *, field: str) -> DelegatedRole:
    name = role_name(dtype)
    roles = targets.delegations.roles if targets.delegations is not None else None
    if not roles or name not in roles:
        raise UntrustedError(
            f"the repository's targets metadata delegates no role {name!r} (dtype unknown)", field=field
        )
    return roles[name]


def verify_repo_metadata(bundle: MetaBundle, trusted_root: bytes, *, dtype: str) -> VerifiedTarget:
    """Algorithm 1, step 2 (no network, no expiry): verify the bundle's metadata from the pinned root.

    Top-level targets against the (rotated) root, the ``dtype-D`` role against the targets
    delegation, then find ``target_path`` in that role, inside the role's delegated paths, with
    ``custom.hardware_id == dtype`` and an integer ``custom.release_counter``.
    Every failure is a RejectedError with ``field="meta_repo"``.
    """
    f = "meta_repo"
    check_dtype(dtype)
    if bundle.dtype != dtype:
        raise UntrustedError(f"metadata bundle is for dtype {bundle.dtype!r}, not {dtype!r}", field=f)
    pinned = load_trusted_root(trusted_root)
    root = _walk_roots(pinned, bundle.roots, f)
    targets_md = _load(bundle.targets, Targets, "targets metadata", f)
    _verify_delegate(root, Targets.type, targets_md, "top-level targets metadata", f)
    name = role_name(dtype)
    delegation = delegated_role(targets_md.signed, dtype, field=f)
    role_md = _load(bundle.role, Targets, f"{name} metadata", f)
    _verify_delegate(targets_md.signed, name, role_md, f"{name} metadata", f)
    target = role_md.signed.targets.get(bundle.target_path)
    if target is None:
        raise NotFoundError(f"target {bundle.target_path!r} is not in the signed {name} metadata", field=f)
    if not delegation.is_delegated_path(target.path):
        raise UntrustedError(f"target {target.path!r} is outside the paths delegated to {name}", field=f)
    counter, custom = custom_fields(target, dtype, field=f)
    return VerifiedTarget(
        dtype=dtype,
        release_counter=counter,
        target_path=target.path,
        length=target.length,
        hashes=dict(target.hashes),
        custom=dict(custom),
        root_version=root.version,
        targets_version=targets_md.signed.version,
        role_version=role_md.signed.version,
    )


# --- hashing the image ---------------------------------------------------------------------------


def new_hasher(algorithm: str) -> Hasher:
    """A hash object for a TUF hash algorithm name (as python-tuf names them)."""
    if algorithm == "blake2b-256":
        return hashlib.blake2b(digest_size=32)
    try:
        return hashlib.new(algorithm)
    except (ValueError, TypeError):
        raise UnsupportedError(f"hash algorithm {algorithm!r} of the target is not supported", field="image") from None


def check_hashes(expected: dict[str, str], observed: dict[str, str], length: int, observed_length: int) -> None:
    """Algorithm 2 / Algorithm 1 step 3: the image's length and every signed hash must match."""
    if observed_length != length:
        raise BadSignatureError(
            f"image is {observed_length} bytes, the repository signed {length}: altered or truncated", field="image"
        )
    for alg, want in expected.items():
        got = observed.get(alg)
        if got is None:
            raise ValueError(f"hash {alg} was not computed")
        if got != want.lower():
            raise BadSignatureError(
                f"image {alg} {got} does not match the signed {want}: the image was altered", field="image"
            )


def _stream(image: Path | BinaryIO, sinks: list[Callable[[bytes], object]]) -> int:
    n = 0
    if isinstance(image, Path):
        try:
            with image.open("rb", buffering=0) as f:
                return _stream(f, sinks)
        except FileNotFoundError:
            raise NotFoundError(f"image {image} does not exist", field="image") from None
    while True:
        chunk = image.read(CHUNK)
        if not chunk:
            return n
        n += len(chunk)
        for sink in sinks:
            sink(chunk)


def _peek_target(meta: bytes) -> TargetFile | None:
    """The target the (still untrusted) bundle names: only to choose which hashes to compute in the
    one pass over the image, and to say what looks altered when sig_sm fails. Nothing is decided on it."""
    try:
        bundle = _bundle_decoder.decode(meta)
        role: Metadata[Any] = Metadata.from_bytes(bundle.role)
        return role.signed.targets.get(bundle.target_path) if isinstance(role.signed, Targets) else None
    except Exception:  # a hint only; step 2 reports the real problem
        return None


def _peek_algorithms(meta: bytes) -> set[str]:
    algs = {"sha256"}
    target = _peek_target(meta)
    if target is not None:
        for alg in target.hashes:
            try:
                new_hasher(alg)
            except IotdlmError:
                continue
            algs.add(alg)
    return algs


def _diagnose(meta: bytes, hashers: dict[str, Hasher], length: int) -> str:
    target = _peek_target(meta)
    if target is None:
        return "the metadata is not readable either: the metadata was altered"
    matches = target.length == length and all(
        alg in hashers and hashers[alg].hexdigest() == want.lower() for alg, want in target.hashes.items()
    )
    if matches:
        return "the image matches the metadata: sig_sm or the metadata was altered"
    return "the image does not match the metadata's hash: the image was altered"


@dataclass(frozen=True)
class VerifiedSoftware:
    """What Algorithm 1 established: sm signed this image and metadata, and the repository signed
    this image for ``dtype`` at ``release_counter``."""

    dtype: str
    release_counter: int
    target_path: str
    length: int
    sha256: str
    hashes: dict[str, str]
    custom: dict[str, Any]


def verify_software(
    image: Path | BinaryIO,
    meta: bytes,
    sig_sm: bytes,
    pk_sm: PublicKey,
    trusted_root: bytes,
    *,
    dtype: str,
) -> VerifiedSoftware:
    """Algorithm 1: verify software from the local repository before flashing it, in the paper's order.

    1. ``sig_sm`` with ``pk_sm`` over SHA-256(meta || sw) (module docstring). Failure raises
       BadSignatureError with ``field="sig_sm"``: sm's signature failed -- the local repository was
       altered or sm is compromised; pm must halt and raise an alarm.
    2. ``meta`` (the plaintext bundle) with ``pk_repo``: the pinned ``trusted_root`` (rotations
       followed through the bundle's root history), the top-level targets, the ``dtype-D`` role, the
       target with ``custom.hardware_id == dtype`` (:func:`verify_repo_metadata`); ``field="meta_repo"``.
    3. The image's length and hashes against the signed target; ``field="image"``.

    Expiry is NOT checked: the factory may be offline for days between sm's download and pm's
    flashing, and sm checked freshness (timestamp, snapshot, targets, role expiry; rollback of
    metadata versions) when it downloaded. Neither are release counters compared with what a device
    runs: that is pm's policy, with ``release_counter`` of the result.

    The image is read once (step 1's digest and step 3's hashes together); the decisions are taken
    in the order above. ``image`` may be a path or a binary file object positioned at its start.
    """
    check_dtype(dtype)
    if len(sig_sm) > MAX_SIG_BYTES:
        raise TooLargeError(f"sig_sm of {len(sig_sm)} bytes is not a signature", field="sig_sm")
    if len(meta) > MAX_BUNDLE_BYTES:
        raise TooLargeError(f"metadata bundle of {len(meta)} bytes exceeds {MAX_BUNDLE_BYTES}", field="meta_repo")
    sig_h = sig_sm_hasher(meta)
    hashers = {alg: new_hasher(alg) for alg in sorted(_peek_algorithms(meta))}
    length = _stream(image, [sig_h.update, *(h.update for h in hashers.values())])

    # step 1: sm's signature over meta || sw
    try:
        verify_bytes(pk_sm, sig_sm, sig_h.digest())
    except BadSignatureError:
        raise BadSignatureError(
            "sm's signature sig_sm over the metadata and image does not verify with pk_sm: the local repository "
            f"was altered or sm is compromised; halt ({_diagnose(meta, hashers, length)})",
            field="sig_sm",
        ) from None

    # step 2: the repository's metadata with pk_repo
    bundle = decode_bundle(meta)
    target = verify_repo_metadata(bundle, trusted_root, dtype=dtype)

    # step 3: the image against the signed target
    observed = {alg: h.hexdigest() for alg, h in hashers.items()}
    for alg in target.hashes:
        if alg not in observed:  # the one pass computed every supported algorithm the target lists
            new_hasher(alg)  # UnsupportedError
            raise RuntimeError(f"hash {alg} was not computed")
    check_hashes(target.hashes, observed, target.length, length)
    sha = observed["sha256"]
    return VerifiedSoftware(
        dtype=dtype,
        release_counter=target.release_counter,
        target_path=target.target_path,
        length=length,
        sha256=sha,
        hashes=dict(target.hashes),
        custom=target.custom,
    )


# --- wire messages (sm's NATS API, the report, the local repository's info.json) ----------------


class StoredSoftware(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``info.json`` of one stored version (unencrypted: only what pm needs to list)."""

    dtype: str
    release_counter: int
    target_path: str
    length: int
    sha256: str
    stored_at: str  # ISO 8601 UTC


class ListRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str


class ListResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    versions: list[StoredSoftware]  # ascending release counter


class LoadRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    release_counter: int | None = None  # default: the latest stored


class LoadResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    release_counter: int
    image_path: str  # absolute; pm and sm share the local repository folder
    meta_enc: bytes
    sig_sm: bytes


class NotifyMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The repository announced a new release for ``dtype`` (cm relays its webhook)."""

    dtype: str


class SmEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """Published by sm on ``iotdlm.v1.events.sm.<kind>`` (stored, checked, refused, failed)."""

    kind: str
    dtype: str
    release_counter: int | None = None
    code: str | None = None
    message: str | None = None
    field: str | None = None


_M = TypeVar("_M")


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)


def decode(data: bytes, cls: type[_M], *, what: str = "request") -> _M:
    """Decode a message; schema or JSON problems become BadRequestError; dtype and counters are checked."""
    try:
        out = msgspec.json.decode(data, type=cls)
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"{what} is not valid: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"{what} is not valid JSON: {exc}") from exc
    dtype = getattr(out, "dtype", None)
    if dtype is not None:
        check_dtype(dtype)
    counter = getattr(out, "release_counter", None)
    if counter is not None:
        check_release_counter(counter)
    return out


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


__all__ = [
    "BUNDLE_FORMAT",
    "ListRequest",
    "ListResponse",
    "LoadRequest",
    "LoadResponse",
    "MetaBundle",
    "NotifyMessage",
    "SmEvent",
    "StoredSoftware",
    "VerifiedSoftware",
    "VerifiedTarget",
    "check_hashes",
    "compute_sig_sm",
    "custom_fields",
    "decode",
    "decode_bundle",
    "decrypt_meta",
    "delegated_role",
    "encode",
    "encode_bundle",
    "encrypt_meta",
    "load_trusted_root",
    "new_hasher",
    "role_name",
    "sig_sm_hasher",
    "sign_sig_sm",
    "verify_repo_metadata",
    "verify_software",
]
