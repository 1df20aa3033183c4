"""Hashing the image: the hash objects TUF names, one streamed pass, the check against signed hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from iotdlm.errors import BadSignatureError, NotFoundError, UnsupportedError

#: the image is read in chunks of this size, never whole
CHUNK = 1024 * 1024


class Hasher(Protocol):
    """What hashlib objects offer (sha256, blake2b...)."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...

    def hexdigest(self) -> str: ...


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


def stream_image(image: Path | BinaryIO, sinks: list[Callable[[bytes], object]]) -> int:
    """Feed ``image`` (a path or a binary file at its start) to every sink; the number of bytes read."""
    n = 0
    if isinstance(image, Path):
        try:
            with image.open("rb", buffering=0) as f:
                return stream_image(f, sinks)
        except FileNotFoundError:
            raise NotFoundError(f"image {image} does not exist", field="image") from None
    while True:
        chunk = image.read(CHUNK)
        if not chunk:
            return n
        n += len(chunk)
        for sink in sinks:
            sink(chunk)


__all__ = ["CHUNK", "Hasher", "check_hashes", "new_hasher", "stream_image"]
