"""``meta.enc``: the metadata bundle encrypted at rest (Section 5.2.4), key shared only by sm and pm.

::

    meta.enc = 0x01 || nonce (12 random bytes) || AES-256-GCM(key, nonce, meta, aad) (ciphertext || 16-byte tag)
    aad      = UTF-8 of f"{dtype}/{release_counter}"

The AAD binds the ciphertext to its place in the local repository: a meta.enc moved to another
dtype or version does not decrypt.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iotdlm.errors import BadRequestError, BadSignatureError, TooLargeError, UnsupportedError
from iotdlm.software.bundle import MAX_BUNDLE_BYTES

META_ENC_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32


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


__all__ = ["KEY_BYTES", "META_ENC_VERSION", "decrypt_meta", "encrypt_meta"]
