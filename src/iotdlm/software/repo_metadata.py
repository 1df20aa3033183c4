"""Verifying the repository's TUF metadata from the pinned root ``pk_repo`` (Algorithm 1, step 2).

No network and no expiry: sm checked freshness when it downloaded; pm checks, offline, that the
bundle's metadata chains to the root it pins and signs the target for its ``dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

# python-tuf re-exports these from tuf.api.metadata without __all__, which mypy --strict refuses to
# see through; tuf.api._payload is where they are defined.
from tuf.api._payload import DelegatedRole, Root, TargetFile, Targets
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata

from iotdlm.errors import BadRequestError, BadSignatureError, NotFoundError, UntrustedError
from iotdlm.software.bundle import MetaBundle
from iotdlm.wire.software import MAX_RELEASE_COUNTER, check_dtype


def role_name(dtype: str) -> str:
    """The repository's delegated targets role for device type ``dtype``."""
    return f"dtype-{dtype}"


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


__all__ = [
    "VerifiedTarget",
    "custom_fields",
    "delegated_role",
    "load_trusted_root",
    "role_name",
    "verify_repo_metadata",
]
