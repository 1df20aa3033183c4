"""The repository's private keys: ``keys/<role>-<i>.pem`` (active) and ``keys/retired/`` (rotated out)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization

# securesystemslib.signer re-exports CryptoSigner without __all__, which mypy --strict (no implicit
# re-export) does not see: the ignore is for that alone.
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

from iotdlm.repository.storage import KEY_ROLES

_KEY_FILE_RE = re.compile(r"^(?P<role>[a-z]+)-(?P<index>[0-9]+)\.pem$")


class Keyring:
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


__all__ = ["Keyring"]
