"""The device's proof to km that it holds its current credential's key (ADR 0008). Pure: no I/O.

cm relays EST requests, so cm could forge them: km issues to a device only on a signature, made by
the key of the client certificate the device presented (the factory key to enroll, the operational
key to re-enroll), over a km-issued nonce, the EST operation and the SHA-256 of the CSR's public
key. cm relays the signature (the ``Iotdlm-Est-Proof`` header) but cannot make one.

The signed message is ASCII text, so openssl can make it (docs/operations.md has the recipe)::

    iotdlm-est-proof-v1\\n<operation>\\n<nonce>\\n<sha256 hex of the CSR's SubjectPublicKeyInfo>\\n

The header's value is ``<nonce> <base64 signature>``. The nonce is km's: base64url of 8 bytes of
issue time (Unix seconds), 16 random bytes and a 16-byte HMAC-SHA256 (km's key) over the client
certificate's fingerprint, the time and the random bytes -- so km checks it is its own, fresh and
for this credential without storing it; km's replay table makes it single-use.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from iotdlm.errors import BadRequestError, BadSignatureError, UntrustedError
from iotdlm.pki.keys import PrivateKey, PublicKey, sign_bytes, verify_bytes

#: the HTTP header (cm -> km: :attr:`iotdlm.wire.km.EstRequest.proof`)
HEADER = "Iotdlm-Est-Proof"
LABEL = "iotdlm-est-proof-v1"
OPERATIONS = ("simpleenroll", "simplereenroll", "serverkeygen")
#: how long a nonce km issued may be used
NONCE_TTL = dt.timedelta(minutes=5)
_NONCE_RAW = 8 + 16 + 16
NONCE_CHARS = 54  # base64url of 40 bytes, unpadded
#: the longest signature we read (RSA-4096: 512 bytes -> 684 base64 characters)
MAX_SIGNATURE_CHARS = 700
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{54}$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
_MAC_LABEL = b"iotdlm-est-nonce-v1\x00"


@dataclass(frozen=True)
class Proof:
    nonce: str
    signature: bytes


def spki_sha256(public_key: PublicKey) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo (what
    ``openssl pkey -pubin -outform DER | openssl dgst -sha256 -r`` prints)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def message(operation: str, nonce: str, new_key: PublicKey) -> bytes:
    """The bytes the current credential's key signs."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown EST operation {operation!r}")
    return f"{LABEL}\n{operation}\n{nonce}\n{spki_sha256(new_key)}\n".encode("ascii")


def make(current_key: PrivateKey, operation: str, nonce: str, new_key: PublicKey) -> str:
    """The header value: the device signs with its current credential's key."""
    sig = sign_bytes(current_key, message(operation, nonce, new_key))
    return f"{nonce} {base64.b64encode(sig).decode('ascii')}"


def parse(text: str) -> Proof:
    """The header value, or BadRequestError saying what is wrong with it."""
    if not isinstance(text, str) or len(text) > NONCE_CHARS + 1 + MAX_SIGNATURE_CHARS:
        raise BadRequestError(f"the {HEADER} header is too long", field="proof")
    parts = text.strip().split(" ")
    if len(parts) != 2:
        raise BadRequestError(
            f"the {HEADER} header must be '<nonce> <base64 signature>' (one space between)", field="proof"
        )
    nonce, sig = parts
    if not _NONCE_RE.match(nonce):
        raise BadRequestError(f"the {HEADER} header's nonce is not one km issues", field="proof")
    if not sig or not _B64_RE.match(sig):
        raise BadRequestError(f"the {HEADER} header's signature is not base64", field="proof")
    std = sig.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"the {HEADER} header's signature is not base64", field="proof") from None
    if not raw:
        raise BadRequestError(f"the {HEADER} header's signature is empty", field="proof")
    return Proof(nonce=nonce, signature=raw)


def verify(proof: Proof, current_key: PublicKey, operation: str, new_key: PublicKey) -> None:
    """UntrustedError unless the current credential's key signed this operation, nonce and new key."""
    try:
        verify_bytes(current_key, proof.signature, message(operation, proof.nonce, new_key))
    except (BadSignatureError, ValueError) as exc:
        raise UntrustedError(
            f"the {HEADER} signature does not verify under the key of the client certificate presented "
            f"(it must sign this {operation}, this nonce and the CSR's public key)",
            field="proof",
        ) from exc


# --- km's nonces ------------------------------------------------------------------------------
def _mac(key: bytes, fingerprint: str, head: bytes) -> bytes:
    return hmac.new(key, _MAC_LABEL + fingerprint.encode("ascii") + b"\x00" + head, hashlib.sha256).digest()[:16]


def issue_nonce(key: bytes, fingerprint: str, now: dt.datetime, *, rand: bytes | None = None) -> str:
    """A nonce for the credential whose certificate has SHA-256 ``fingerprint`` (hex)."""
    r = os.urandom(16) if rand is None else rand
    if len(r) != 16:
        raise ValueError("rand must be 16 bytes")
    head = int(now.timestamp()).to_bytes(8, "big", signed=True) + r
    return base64.urlsafe_b64encode(head + _mac(key, fingerprint, head)).decode("ascii").rstrip("=")


def nonce_expiry(
    nonce: str, key: bytes, fingerprint: str, now: dt.datetime, ttl: dt.timedelta = NONCE_TTL
) -> dt.datetime:
    """When ``nonce`` expires, if km issued it (under ``key``) for this credential and it is still
    fresh; else UntrustedError. (Spending it is the store's: single use.)"""
    if not _NONCE_RE.match(nonce):
        raise UntrustedError("the proof's nonce is not one km issued", field="proof")
    raw = base64.urlsafe_b64decode(nonce + "==")
    if len(raw) != _NONCE_RAW:
        raise UntrustedError("the proof's nonce is not one km issued", field="proof")
    head, mac = raw[:24], raw[24:]
    if not hmac.compare_digest(mac, _mac(key, fingerprint, head)):
        raise UntrustedError(
            "the proof's nonce is not one km issued for the client certificate presented", field="proof"
        )
    issued = dt.datetime.fromtimestamp(int.from_bytes(head[:8], "big", signed=True), tz=dt.UTC)
    expires = issued + ttl
    if now >= expires or issued > now + dt.timedelta(minutes=1):
        raise UntrustedError(
            f"the proof's nonce has expired (nonces are good for {int(ttl.total_seconds())} s): fetch a new one",
            field="proof",
        )
    return expires
