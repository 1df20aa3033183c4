"""Key algorithms, key generation and PEM (de)serialisation, and the :class:`Signer` seam.

A CA key never needs to be an in-memory object outside this file: everything that signs X.509
structures goes through a :class:`Signer`. :class:`KeySigner` holds a key loaded from an encrypted
PEM file; :class:`iotdlm.hsm.Pkcs11Signer` holds a key in a PKCS#11 token (ADR 0025).
"""

from __future__ import annotations

import enum
from typing import Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp

from iotdlm.errors import BadRequestError, BadSignatureError, UnsupportedError

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

MIN_RSA_BITS = 2048


class Algorithm(enum.StrEnum):
    """Key algorithms a deployment may choose (``iotdlm init --algorithm``)."""

    P256 = "ecdsa-p256"
    P384 = "ecdsa-p384"
    ED25519 = "ed25519"
    RSA3072 = "rsa-3072"


def generate_key(alg: Algorithm) -> PrivateKey:
    if alg is Algorithm.P256:
        return ec.generate_private_key(ec.SECP256R1())
    if alg is Algorithm.P384:
        return ec.generate_private_key(ec.SECP384R1())
    if alg is Algorithm.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if alg is Algorithm.RSA3072:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"unknown algorithm {alg!r}")


def algorithm_of(key: PrivateKey | PublicKey) -> Algorithm:
    """The :class:`Algorithm` of a key, or UnsupportedError (naming the key type) if we do not take it."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return Algorithm.P256
        if isinstance(key.curve, ec.SECP384R1):
            return Algorithm.P384
        raise UnsupportedError(f"elliptic curve {key.curve.name} is not supported; use P-256 or P-384")
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return Algorithm.ED25519
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise UnsupportedError(f"RSA key of {key.key_size} bits is too short; at least {MIN_RSA_BITS}")
        return Algorithm.RSA3072
    raise UnsupportedError(f"key type {type(key).__name__} is not supported")


def check_public_key(key: object) -> PublicKey:
    """Accept only the public key types and sizes we issue for; raise UnsupportedError otherwise."""
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise UnsupportedError(f"public key type {type(key).__name__} is not supported")
    algorithm_of(key)
    return key


def hash_for(key: PrivateKey | PublicKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The signature hash that goes with ``key`` (None for Ed25519, which hashes internally)."""
    alg = algorithm_of(key)
    if alg is Algorithm.P384:
        return hashes.SHA384()
    if alg is Algorithm.ED25519:
        return None
    return hashes.SHA256()


def sign_bytes(key: PrivateKey, data: bytes) -> bytes:
    h = hash_for(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert h is not None
        return key.sign(data, ec.ECDSA(h))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    assert h is not None
    return key.sign(data, padding.PKCS1v15(), h)


def verify_bytes(key: PublicKey, signature: bytes, data: bytes) -> None:
    """Verify, or raise BadSignatureError."""
    h = hash_for(key)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            assert h is not None
            key.verify(signature, data, ec.ECDSA(h))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            assert h is not None
            key.verify(signature, data, padding.PKCS1v15(), h)
    except InvalidSignature as exc:
        raise BadSignatureError("signature does not verify") from exc


def private_key_to_pem(key: PrivateKey, passphrase: bytes | None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def load_private_key_pem(data: bytes, passphrase: bytes | None) -> PrivateKey:
    """Load a PEM private key; wrong passphrase or garbage -> BadRequestError saying which."""
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        # cryptography raises TypeError for "encrypted but no password" and the reverse
        raise BadRequestError(
            "the private key is encrypted and no passphrase was given"
            if passphrase is None
            else "a passphrase was given but the private key is not encrypted"
        ) from exc
    except ValueError as exc:
        raise BadRequestError("cannot load private key: wrong passphrase or not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise UnsupportedError(f"private key type {type(key).__name__} is not supported")
    algorithm_of(key)
    return key


def public_key_to_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(data: bytes) -> PublicKey:
    """A public key from PEM or DER SubjectPublicKeyInfo, checked against what we support."""
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, TypeError) as exc:
        raise BadRequestError("not a PEM or DER SubjectPublicKeyInfo public key") from exc
    return check_public_key(key)


_B = TypeVar("_B", x509.CertificateBuilder, x509.CertificateRevocationListBuilder)


class Signer(Protocol):
    """What a CA needs from its key. A file key implements it here; an HSM can implement it too."""

    @property
    def public_key(self) -> PublicKey: ...

    @property
    def algorithm(self) -> Algorithm: ...

    def sign(self, data: bytes) -> bytes: ...

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate: ...

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList: ...

    def sign_ocsp(self, builder: ocsp.OCSPResponseBuilder, responder: x509.Certificate) -> ocsp.OCSPResponse:
        """Sign a response whose responder id (by key hash) and only certificate are ``responder``."""
        ...


class KeySigner:
    """A :class:`Signer` over a private key held in memory (loaded from an encrypted file)."""

    def __init__(self, key: PrivateKey) -> None:
        self._key = key
        self._alg = algorithm_of(key)
        self._hash = hash_for(key)
        self._pub = key.public_key()

    @property
    def public_key(self) -> PublicKey:
        return self._pub

    @property
    def algorithm(self) -> Algorithm:
        return self._alg

    @property
    def private_key(self) -> PrivateKey:
        """For libraries that need the key object itself (JWS, OCSP). An HSM signer would not offer it."""
        return self._key

    def sign(self, data: bytes) -> bytes:
        return sign_bytes(self._key, data)

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self._key, self._hash)

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return builder.sign(self._key, self._hash)

    def sign_ocsp(self, builder: ocsp.OCSPResponseBuilder, responder: x509.Certificate) -> ocsp.OCSPResponse:
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder).certificates([responder])
        return builder.sign(self._key, self._hash)
