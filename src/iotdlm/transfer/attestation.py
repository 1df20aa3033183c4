"""Remote attestation for trust transfer (seed 003 VII-C/D, optional): pure evidence codec and
verifier.

The paper leaves the RA scheme open ("highly dependent on the type of RA performed"); ours is the
simplest that still means something for a device without a TPM: a nonce challenge, and the device
signs, with its FACTORY key (the identity both providers know from the UpdateInfoList), the SHA-256
of the firmware image it runs. SP2's verifier compares it with the reference SP1 shared
(``raReference`` of the DeviceUpdateInfo).

Evidence (COSE_Sign1, ``typ`` ``application/iotdlm-attestation-evidence+cose``, ``x5chain`` = the
device's factory certificate), payload::

    Evidence = { 1: nonce bstr (16..64), 2: device-id tstr, 3: measurement bstr .size 32 }

The verifier keeps a few outstanding nonces per device (single use, short-lived, at most
:data:`MAX_CHALLENGES_PER_DEVICE`): each is a :class:`Challenge`, kept in the store by km
(:mod:`iotdlm.store.challenges`), so any km worker judges the answer, across a restart too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from iotdlm.errors import BadRequestError, RejectedError, ReplayError, UntrustedError
from iotdlm.pki.keys import PublicKey
from iotdlm.transfer import cose
from iotdlm.transfer.trust import cert_der, parse_certificates, public_key

TYP_EVIDENCE = "application/iotdlm-attestation-evidence+cose"
NONCE, DEVICE, MEASUREMENT = 1, 2, 3
MAX_EVIDENCE_BYTES = 16 * 1024
DEFAULT_TTL = dt.timedelta(minutes=5)
#: challenges a device may have outstanding at once (the newest; a retried request does not void
#: the answer to the one before it)
MAX_CHALLENGES_PER_DEVICE = 4


def measure(image: bytes) -> bytes:
    """The measurement: SHA-256 of the firmware image."""
    return hashlib.sha256(image).digest()


def make_evidence(
    sign: Callable[[bytes], bytes],
    key: PublicKey,
    factory_certificate: x509.Certificate,
    *,
    nonce: bytes,
    device_id: str,
    measurement: bytes,
) -> bytes:
    """The device's evidence, signed on the device (``sign`` never exposes the key)."""
    payload = cose.dumps({NONCE: nonce, DEVICE: device_id, MEASUREMENT: measurement})
    return cose.sign1_with(sign, key, payload, typ=TYP_EVIDENCE, x5chain=[cert_der(factory_certificate)])


@dataclass(frozen=True)
class Evidence:
    nonce: bytes
    device_id: str
    measurement: bytes
    factory_certificate: x509.Certificate
    message: cose.Sign1


def peek_evidence(data: bytes) -> Evidence:
    """Bounded parse, NOT verified: which device claims to have sent it (to find its state)."""
    msg = cose.parse_sign1(data, what="attestation evidence", max_bytes=MAX_EVIDENCE_BYTES)
    if msg.typ != TYP_EVIDENCE:
        raise BadRequestError(f"the evidence has COSE typ {msg.typ!r}, not {TYP_EVIDENCE!r}")
    chain = parse_certificates(msg.x5chain(), what="evidence x5chain certificate")
    if len(chain) != 1:
        raise BadRequestError("the evidence must carry exactly the device's factory certificate")
    body = cose.loads(msg.payload, what="evidence payload", max_bytes=MAX_EVIDENCE_BYTES)
    if not isinstance(body, dict) or set(body) != {NONCE, DEVICE, MEASUREMENT}:
        raise BadRequestError("the evidence payload must be {1: nonce, 2: device id, 3: measurement}")
    nonce, device_id, measurement = body[NONCE], body[DEVICE], body[MEASUREMENT]
    if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 64:
        raise BadRequestError("the evidence nonce must be 16 to 64 bytes")
    if not isinstance(device_id, str) or not 0 < len(device_id) <= 255:
        raise BadRequestError("the evidence device id must be a text string")
    if not isinstance(measurement, bytes) or len(measurement) != 32:
        raise BadRequestError("the measurement must be a 32-byte SHA-256")
    return Evidence(nonce, device_id, measurement, chain[0], msg)


@dataclass(frozen=True)
class Reference:
    """What SP1 shared for one device: its factory certificate and the agreed measurement."""

    device_id: str
    #: SHA-256 (hex) of the device's factory certificate, as shared in the UpdateInfoList
    factory_fingerprint: str
    measurement: bytes


@dataclass(frozen=True)
class Challenge:
    """The verifier's state for one device: its outstanding nonce."""

    device_id: str
    nonce: bytes
    expires: dt.datetime


@dataclass(frozen=True)
class Verdict:
    device_id: str
    ok: bool
    reason: str = ""


def challenge(device_id: str, nonce: bytes, now: dt.datetime, *, ttl: dt.timedelta = DEFAULT_TTL) -> Challenge:
    """A new challenge replaces any outstanding one of the device."""
    if not 16 <= len(nonce) <= 64:
        raise ValueError("nonces are 16 to 64 random bytes")
    return Challenge(device_id=device_id, nonce=nonce, expires=now + ttl)


def verify(
    state: Challenge | None, evidence: bytes, now: dt.datetime, *, reference: Reference | None
) -> tuple[Challenge | None, Verdict]:
    """Judge evidence against the device's outstanding challenge and SP1's reference. The nonce is
    spent whatever the outcome (one try per challenge). Never raises for bad evidence: the verdict
    says why it failed."""
    try:
        ev = peek_evidence(evidence)
    except RejectedError as exc:
        return state, Verdict(state.device_id if state else "?", False, exc.message)
    try:
        if state is None or state.device_id != ev.device_id:
            raise ReplayError(f"no challenge is outstanding for device {ev.device_id}")
        if ev.nonce != state.nonce:
            raise ReplayError("the evidence does not answer the outstanding challenge (nonce)")
        if now > state.expires:
            raise ReplayError("the challenge expired")
        if reference is None or reference.device_id != ev.device_id:
            raise UntrustedError(f"device {ev.device_id} is not one whose attestation reference SP1 shared")
        if hashlib.sha256(cert_der(ev.factory_certificate)).hexdigest() != reference.factory_fingerprint:
            raise UntrustedError("the evidence is not signed with the device's registered factory certificate")
        cose.verify_sign1(ev.message, public_key(ev.factory_certificate), what="the evidence")
        if ev.measurement != reference.measurement:
            raise UntrustedError("the measured firmware differs from the reference agreed with SP1")
    except RejectedError as exc:
        spent = None if state is not None and state.device_id == ev.device_id else state
        return spent, Verdict(ev.device_id, False, exc.message)
    return None, Verdict(ev.device_id, True, "measurement matches the reference")


__all__ = [
    "Challenge",
    "Evidence",
    "Reference",
    "Verdict",
    "challenge",
    "make_evidence",
    "measure",
    "peek_evidence",
    "verify",
]
