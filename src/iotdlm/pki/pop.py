"""One policy for proof-of-possession signatures, PKCS#10 and CRMF alike.

Which request keys we certify, and which signature algorithms each may use to prove possession:

=====================  =============================================================
key                    accepted POP signature algorithms
=====================  =============================================================
ECDSA P-256, P-384     ecdsa-with-SHA256, ecdsa-with-SHA384, ecdsa-with-SHA512
Ed25519                id-Ed25519 (no parameters)
RSA 2048..8192 bits    sha256/sha384/sha512WithRSAEncryption (PKCS#1 v1.5)
=====================  =============================================================

Any SHA-2 digest with any supported key: ``openssl req`` and ``openssl cmp`` sign a P-384 key with
SHA-256 by default, and an RSA key with SHA-384 is as good as with SHA-256. SHA-1, MD5 and RSASSA-PSS
are refused. The builders here sign with :func:`preferred_hash` (SHA-384 for P-384, else SHA-256).

This module is pure: no I/O.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from iotdlm import errors

__all__ = [
    "RSA_MAX_BITS",
    "RSA_MIN_BITS",
    "RequestKey",
    "accepted_algorithms",
    "algorithm_name",
    "check_pop_algorithm",
    "check_request_key",
    "preferred_algorithm",
]

RequestKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

RSA_MIN_BITS: Final = 2048
RSA_MAX_BITS: Final = 8192  # bounds the cost of one verification on untrusted input

_ECDSA: Final = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256.dotted_string: ("ecdsa-with-SHA256", hashes.SHA256),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384.dotted_string: ("ecdsa-with-SHA384", hashes.SHA384),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512.dotted_string: ("ecdsa-with-SHA512", hashes.SHA512),
}
_RSA: Final = {
    SignatureAlgorithmOID.RSA_WITH_SHA256.dotted_string: ("sha256WithRSAEncryption", hashes.SHA256),
    SignatureAlgorithmOID.RSA_WITH_SHA384.dotted_string: ("sha384WithRSAEncryption", hashes.SHA384),
    SignatureAlgorithmOID.RSA_WITH_SHA512.dotted_string: ("sha512WithRSAEncryption", hashes.SHA512),
}
_ED25519: Final = SignatureAlgorithmOID.ED25519.dotted_string
_NAMES: Final = {
    **{oid: name for oid, (name, _) in _ECDSA.items()},
    **{oid: name for oid, (name, _) in _RSA.items()},
    _ED25519: "id-Ed25519",
    # refused, but named when seen
    SignatureAlgorithmOID.ECDSA_WITH_SHA1.dotted_string: "ecdsa-with-SHA1",
    SignatureAlgorithmOID.ECDSA_WITH_SHA224.dotted_string: "ecdsa-with-SHA224",
    SignatureAlgorithmOID.RSA_WITH_SHA1.dotted_string: "sha1WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_MD5.dotted_string: "md5WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA224.dotted_string: "sha224WithRSAEncryption",
    SignatureAlgorithmOID.RSASSA_PSS.dotted_string: "RSASSA-PSS",
    SignatureAlgorithmOID.ED448.dotted_string: "id-Ed448",
    SignatureAlgorithmOID.DSA_WITH_SHA256.dotted_string: "dsa-with-SHA256",
}


def algorithm_name(oid: str) -> str:
    """The usual name of a signature algorithm OID (dotted form), else the OID itself."""
    return _NAMES.get(oid, oid)


def check_request_key(key: object) -> str:
    """A human label ("EC P-256", "RSA-2048"...) for a key we certify; UnsupportedError otherwise."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "EC P-256"
        if isinstance(key.curve, ec.SECP384R1):
            return "EC P-384"
        raise errors.UnsupportedError(f"EC curve {key.curve.name} is not supported (P-256 and P-384 are)")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, rsa.RSAPublicKey):
        if not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            raise errors.UnsupportedError(
                f"RSA-{key.key_size} is not supported (RSA {RSA_MIN_BITS}..{RSA_MAX_BITS} bits is)"
            )
        return f"RSA-{key.key_size}"
    raise errors.UnsupportedError(
        f"{type(key).__name__} keys are not supported (EC P-256/P-384, Ed25519, RSA {RSA_MIN_BITS}..{RSA_MAX_BITS} are)"
    )


def _table(key: RequestKey) -> dict[str, tuple[str, type[hashes.HashAlgorithm]]]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _ECDSA
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA
    return {}


def accepted_algorithms(key: RequestKey) -> tuple[str, ...]:
    """Dotted OIDs of the POP signature algorithms accepted with ``key`` (which must be supported)."""
    check_request_key(key)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return (_ED25519,)
    return tuple(_table(key))


def check_pop_algorithm(key: RequestKey, oid: str) -> hashes.HashAlgorithm | None:
    """The hash to verify a POP signature by ``key`` under algorithm ``oid`` (None for Ed25519).

    :class:`~iotdlm.errors.BadSignatureError` when ``oid`` is one we accept but for another kind of
    key (the POP does not match the key); :class:`~iotdlm.errors.UnsupportedError` when we accept it
    with no key (SHA-1, PSS...). ``key`` must have passed :func:`check_request_key`.
    """
    if isinstance(key, ed25519.Ed25519PublicKey):
        if oid == _ED25519:
            return None
    else:
        known = _table(key).get(oid)
        if known is not None:
            return known[1]()
    label = check_request_key(key)
    accepted = accepted_algorithms(key)
    wanted = ", ".join(algorithm_name(a) for a in accepted)
    if oid in _ECDSA or oid in _RSA or oid == _ED25519:
        raise errors.BadSignatureError(
            f"signature algorithm {algorithm_name(oid)} does not match the {label} key (expected {wanted})"
        )
    raise errors.UnsupportedError(
        f"signature algorithm {algorithm_name(oid)} is not accepted for proof of possession (with the {label} "
        f"key: {wanted})"
    )


def preferred_algorithm(key: RequestKey) -> str:
    """The algorithm our own builders sign with: SHA-384 for P-384, SHA-256 otherwise, Ed25519 pure."""
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1):
        return SignatureAlgorithmOID.ECDSA_WITH_SHA384.dotted_string
    return accepted_algorithms(key)[0]
