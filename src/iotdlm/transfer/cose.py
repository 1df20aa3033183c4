"""COSE_Sign1 (RFC 9052) for trust transfer, on the ``cwt`` library, with bounded CBOR parsing.

- :func:`parse_sign1` -- bounded parse of untrusted bytes into a :class:`Sign1` (nothing verified):
  tag 18 (optionally inside the CWT tag 61), a protected header that is a CBOR map in a bstr, a
  map as unprotected header, a bstr payload, a bstr signature, no trailing bytes;
- :func:`verify_sign1` -- the signature, checked by ``cwt``'s COSE layer with the key of a
  certificate the caller already trusts; the ``alg`` of the protected header must be the one of
  that key (no algorithm substitution);
- :class:`CoseSigner` -- signs with a private key (``cwt``), optionally carrying the signer's
  certificate chain (``x5chain``, RFC 9360) or its thumbprint (``x5t``) in the protected header;
- :func:`sign1_with` -- builds a COSE_Sign1 with an external signing function (a device signs
  with a key that never leaves it: :meth:`iotdlm.device.simulated.SimulatedDevice.sign`).

Time checks of CWTs are ours (:mod:`iotdlm.transfer.messages`): ``cwt.CWT`` reads the wall clock,
and the state machines take ``now`` as an argument.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cwt import COSE, COSEKey

from iotdlm.errors import BadRequestError, BadSignatureError, TooLargeError, UnsupportedError
from iotdlm.pki.keys import Algorithm, PrivateKey, PublicKey, algorithm_of

#: COSE header labels (RFC 9052, RFC 9596 typ, RFC 9360 x5chain / x5t)
ALG = 1
KID = 4
TYP = 16
X5CHAIN = 33
X5T = 34
#: COSE algorithm ids (RFC 9053)
ES256 = -7
ES384 = -35
EDDSA = -8
SHA256_ALG = -16
#: SHA-256 truncated to 64 bits (RFC 9053 / RFC 9360): enough for x5t, a hint naming a certificate
#: the receiver already holds (the signature, checked with that certificate's key, is what counts)
SHA256_64_ALG = -15
X5T_LENGTHS = {SHA256_ALG: 32, SHA256_64_ALG: 8}
COSE_ALG: dict[Algorithm, int] = {Algorithm.P256: ES256, Algorithm.P384: ES384, Algorithm.ED25519: EDDSA}

TAG_SIGN1 = 18
TAG_CWT = 61
#: nesting deeper than this is not one of our messages (cbor2 allows 400)
MAX_DEPTH = 16
MAX_CHAIN = 4


def loads(data: bytes, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Decode exactly one CBOR item from ``data`` (untrusted): size limit, depth limit, no trailing
    bytes. Whatever cbor2 raises on garbage becomes a :class:`BadRequestError`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadRequestError(f"{what} must be bytes")
    if len(data) > max_bytes:
        raise TooLargeError(f"{what} of {len(data)} bytes exceeds the limit of {max_bytes}")
    if not data:
        raise BadRequestError(f"{what} is empty")
    fp = io.BytesIO(bytes(data))
    try:
        obj = cbor2.CBORDecoder(fp, max_depth=max_depth).decode()
    except RecursionError as exc:
        raise BadRequestError(f"{what} is nested too deeply") from exc
    except Exception as exc:  # cbor2 raises CBORDecodeError, ValueError, OverflowError... on garbage
        raise BadRequestError(f"{what} is not valid CBOR: {exc}") from exc
    if fp.tell() != len(data):
        raise BadRequestError(f"{what} has {len(data) - fp.tell()} trailing bytes after the CBOR item")
    return obj


def dumps(obj: Any) -> bytes:
    """Deterministic CBOR (RFC 8949 4.2.1: canonical map key order)."""
    return cbor2.dumps(obj, canonical=True)


@dataclass(frozen=True)
class Sign1:
    """A parsed, UNVERIFIED COSE_Sign1."""

    raw: bytes
    protected_bytes: bytes
    protected: dict[int, Any]
    unprotected: dict[int, Any]
    payload: bytes
    signature: bytes

    @property
    def alg(self) -> int | None:
        alg = self.protected.get(ALG)
        return alg if isinstance(alg, int) and not isinstance(alg, bool) else None

    @property
    def typ(self) -> str | int | None:
        """RFC 9596: a media type (tstr) or a CoAP Content-Format (uint)."""
        typ = self.protected.get(TYP)
        return typ if isinstance(typ, str) or (isinstance(typ, int) and not isinstance(typ, bool)) else None

    def x5chain(self) -> tuple[bytes, ...]:
        """The x5chain of the protected header (RFC 9360: one bstr, or an array of bstr), leaf first."""
        value = self.protected.get(X5CHAIN)
        if value is None:
            return ()
        if isinstance(value, bytes):
            return (value,)
        if isinstance(value, list) and value and len(value) <= MAX_CHAIN and all(isinstance(v, bytes) for v in value):
            return tuple(value)
        raise BadRequestError("COSE x5chain must be a certificate (bstr) or an array of at most 4 of them")

    def x5t(self) -> tuple[int, bytes] | None:
        """The protected header's x5t (RFC 9360 COSE_CertHash) as (hash alg, hash), or None:
        [-16 (SHA-256), 32 bytes] or [-15 (SHA-256/64), 8 bytes]."""
        value = self.protected.get(X5T)
        if value is None:
            return None
        if (
            isinstance(value, list)
            and len(value) == 2
            and value[0] in X5T_LENGTHS
            and isinstance(value[1], bytes)
            and len(value[1]) == X5T_LENGTHS[value[0]]
        ):
            return int(value[0]), bytes(value[1])
        raise BadRequestError("COSE x5t must be [-16 (SHA-256), 32-byte hash] or [-15 (SHA-256/64), 8-byte hash]")

    def names(self, cert_der: bytes) -> bool:
        """Whether the x5t names the certificate ``cert_der`` (DER)."""
        x5t = self.x5t()
        return x5t is not None and cert_hash(cert_der, x5t[0]) == x5t[1]


def parse_sign1(data: bytes, *, what: str, max_bytes: int) -> Sign1:
    obj = loads(data, what=what, max_bytes=max_bytes)
    if isinstance(obj, cbor2.CBORTag) and obj.tag == TAG_CWT:
        obj = obj.value
    if not isinstance(obj, cbor2.CBORTag) or obj.tag != TAG_SIGN1:
        raise BadRequestError(f"{what} is not a tagged COSE_Sign1 (CBOR tag 18)")
    body = obj.value
    if not isinstance(body, list) or len(body) != 4:
        raise BadRequestError(f"{what}: a COSE_Sign1 is an array of 4 items")
    protected_bytes, unprotected, payload, signature = body
    if not isinstance(protected_bytes, bytes) or not protected_bytes:
        raise BadRequestError(f"{what}: the protected header must be a non-empty bstr (it carries alg)")
    protected = loads(protected_bytes, what=f"{what} protected header", max_bytes=max_bytes)
    if not isinstance(protected, dict) or not all(isinstance(k, int) for k in protected):
        raise BadRequestError(f"{what}: the protected header must be a map with integer labels")
    if not isinstance(unprotected, dict) or not all(isinstance(k, int) for k in unprotected):
        raise BadRequestError(f"{what}: the unprotected header must be a map with integer labels")
    if set(protected) & set(unprotected):
        raise BadRequestError(f"{what}: a header label appears both protected and unprotected")
    if not isinstance(payload, bytes):
        raise BadRequestError(f"{what}: the payload must be an attached bstr")
    if not isinstance(signature, bytes):
        raise BadRequestError(f"{what}: the signature must be a bstr")
    return Sign1(
        raw=bytes(data),
        protected_bytes=protected_bytes,
        protected=dict(protected),
        unprotected=dict(unprotected),
        payload=payload,
        signature=signature,
    )


def cose_alg(key: PrivateKey | PublicKey) -> int:
    alg = algorithm_of(key)
    try:
        return COSE_ALG[alg]
    except KeyError:
        raise UnsupportedError(
            f"{alg.value} keys cannot sign COSE messages here; use P-256, P-384 or Ed25519"
        ) from None


def _public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


_VERIFIER = COSE.new()


def verify_sign1(msg: Sign1, key: PublicKey, *, what: str) -> None:
    """Verify the signature of ``msg`` with ``key`` (already trusted by the caller), or raise
    :class:`BadSignatureError`. The protected ``alg`` must be the algorithm of ``key``."""
    expected = cose_alg(key)
    if msg.alg != expected:
        raise BadSignatureError(f"{what} is signed with COSE alg {msg.alg}, but the signer's key uses {expected}")
    try:
        cose_key = COSEKey.from_pem(_public_pem(key))
        _VERIFIER.decode_with_headers(msg.raw, cose_key)
    except Exception as exc:  # cwt raises VerifyError, ValueError, DecodeError...
        raise BadSignatureError(f"the signature of {what} does not verify") from exc


def thumbprint(cert_der: bytes) -> bytes:
    return hashlib.sha256(cert_der).digest()


def cert_hash(cert_der: bytes, alg: int = SHA256_ALG) -> bytes:
    """COSE_CertHash's hashValue (RFC 9360) of a DER certificate with ``alg`` (-16 or -15)."""
    if alg not in X5T_LENGTHS:
        raise ValueError(f"COSE hash algorithm {alg} is not SHA-256 (-16) or SHA-256/64 (-15)")
    return hashlib.sha256(cert_der).digest()[: X5T_LENGTHS[alg]]


class CoseSigner:
    """Signs COSE_Sign1 messages with one private key (``cwt``). ``chain`` (leaf first) goes into
    the protected header as x5chain when ``with_chain``; otherwise, when a chain is given, the
    leaf's thumbprint goes in as x5t (SHA-256/64: for receivers that hold the certificate -- a
    pinned peer, a device's truststore -- and look it up by that hash)."""

    def __init__(self, key: PrivateKey, chain: Sequence[x509.Certificate] = (), *, with_chain: bool = False) -> None:
        self.alg = cose_alg(key)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._key = COSEKey.from_pem(pem)
        self._cose = COSE.new()
        self.chain = tuple(chain)
        self._header: dict[int, Any] = {ALG: self.alg}
        ders = [c.public_bytes(serialization.Encoding.DER) for c in self.chain]
        if ders and with_chain:
            self._header[X5CHAIN] = ders[0] if len(ders) == 1 else ders
        elif ders:
            self._header[X5T] = [SHA256_64_ALG, cert_hash(ders[0], SHA256_64_ALG)]
        self.public_key: PublicKey = key.public_key()

    def sign(self, payload: bytes, *, typ: str | int) -> bytes:
        # deterministic (RFC 8949 4.2.1) label order: the same header encodes to the same bytes
        protected = dict(sorted({**self._header, TYP: typ}.items(), key=lambda kv: dumps(kv[0])))
        out = self._cose.encode_and_sign(payload, self._key, protected=protected, unprotected={})
        assert isinstance(out, bytes)
        return out


def sign1_with(
    sign: Callable[[bytes], bytes], key: PublicKey, payload: bytes, *, typ: str | int, x5chain: Sequence[bytes] = ()
) -> bytes:
    """A COSE_Sign1 whose signature is made by ``sign`` (DER ECDSA, as cryptography and our
    devices make them, or raw Ed25519) over the Sig_structure; ``key`` is the signer's public key."""
    alg = cose_alg(key)
    header: dict[int, Any] = {ALG: alg, TYP: typ}
    if x5chain:
        header[X5CHAIN] = x5chain[0] if len(x5chain) == 1 else list(x5chain)
    protected = dumps(header)
    to_be_signed = dumps(["Signature1", protected, b"", payload])
    signature = sign(to_be_signed)
    if isinstance(key, ec.EllipticCurvePublicKey):
        r, s = decode_dss_signature(signature)
        n = (key.curve.key_size + 7) // 8
        signature = r.to_bytes(n, "big") + s.to_bytes(n, "big")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise UnsupportedError("only EC and Ed25519 keys sign COSE messages here")
    return dumps(cbor2.CBORTag(TAG_SIGN1, [protected, {}, payload, signature]))


def der_signature(raw: bytes, key: ec.EllipticCurvePublicKey) -> bytes:
    """COSE's raw r||s ECDSA signature as DER (what cryptography verifies)."""
    n = (key.curve.key_size + 7) // 8
    if len(raw) != 2 * n:
        raise BadSignatureError("ECDSA signature of the wrong length")
    return encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))
