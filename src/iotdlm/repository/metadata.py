"""The TUF metadata of the repository: python-tuf's ``Repository`` over ``metadata/``, signing each role.

Roles: root, targets, snapshot, timestamp, and one delegated targets role ``dtype-<D>`` per device
type, signed by the "releases" keys. A new root is signed by the old root's keys too (TUF 5.3.4).
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from pathlib import Path
from typing import Any

# securesystemslib.signer, tuf.api.metadata and tuf.repository re-export these names without __all__,
# which mypy --strict (no implicit re-export) does not see: the ignores below are for that alone.
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository  # type: ignore[attr-defined]

from iotdlm.errors import IotdlmError
from iotdlm.files import atomic_write
from iotdlm.repository.keys import Keyring
from iotdlm.repository.storage import DTYPE_ROLE_PREFIX, RELEASES, TOP_LEVEL_ROLES, Settings

_VERSIONED_RE = re.compile(r"^(?P<version>[1-9][0-9]*)\.(?P<role>.+)\.json$")
_SERIALIZER = JSONSerializer(compact=False)


class TufRepo(Repository):
    """python-tuf's :class:`tuf.repository.Repository` over our folder, for one operation at ``now``.

    ``open`` reads the current version of a role (as referenced by timestamp -> snapshot, and the
    highest ``N.root.json``); ``close`` bumps the version, sets the expiry, signs with the role's
    keys (root: the previous root's keys too), checks the threshold is met and writes the file.
    """

    def __init__(self, root_dir: Path, settings: Settings, keyring: Keyring | None, now: dt.datetime | None) -> None:
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


__all__ = ["TufRepo"]
