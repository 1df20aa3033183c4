""":class:`Pkcs11Signer`: the :class:`~iotdlm.pki.keys.Signer` of a CA key held in a PKCS#11 token.

ECDSA: the data is hashed on the host (SHA-256 for P-256, SHA-384 for P-384) and the digest signed
with ``CKM_ECDSA`` -- SoftHSM 2.6 has no ``CKM_ECDSA_SHA256`` and many HSMs only offer the raw
mechanism -- and the raw ``r || s`` it returns is DER-encoded (``Ecdsa-Sig-Value``, RFC 5480) with
cryptography. RSA: ``CKM_SHA256_RSA_PKCS`` (PKCS#1 v1.5 with SHA-256). Certificates, CRLs and OCSP
responses are assembled by :mod:`iotdlm.pki.signed_der` (ADR 0025).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509 import ocsp
from pkcs11 import KeyType, Mechanism
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_ec_public_key
from pkcs11.util.rsa import encode_rsa_public_key

from iotdlm.errors import UnavailableError
from iotdlm.hsm.token import KeyPair, Token
from iotdlm.hsm.uri import Pkcs11Uri
from iotdlm.pki import signed_der
from iotdlm.pki.keys import Algorithm, PublicKey, algorithm_of, check_public_key, hash_for

__all__ = ["Pkcs11Signer"]


def _public_key(pair: KeyPair) -> PublicKey:
    if pair.public.key_type == KeyType.EC:
        der = encode_ec_public_key(pair.public)
    elif pair.public.key_type == KeyType.RSA:
        der = encode_rsa_public_key(pair.public)
    else:
        raise ValueError(f"the key is of PKCS#11 type {pair.public.key_type!r}: use EC (P-256, P-384) or RSA")
    return check_public_key(serialization.load_der_public_key(der))


class Pkcs11Signer:
    """Signs with the private key a PKCS#11 URI names in ``token``; the key never leaves the token."""

    def __init__(self, token: Token, uri: Pkcs11Uri) -> None:
        self._token = token
        self._pair = token.find(uri)
        self._pub = _public_key(self._pair)
        self._alg = algorithm_of(self._pub)
        self._hash = hash_for(self._pub)
        self._template = signed_der.template_key(self._alg)
        self.uri = uri

    @property
    def public_key(self) -> PublicKey:
        return self._pub

    @property
    def algorithm(self) -> Algorithm:
        return self._alg

    def sign(self, data: bytes) -> bytes:
        """A signature over ``data`` as cryptography makes it (DER ECDSA, PKCS#1 v1.5 RSA)."""
        assert self._hash is not None  # Ed25519 never reaches a token (template_key refuses it)
        try:
            if isinstance(self._pub, ec.EllipticCurvePublicKey):
                h = hashes.Hash(self._hash)
                h.update(data)
                digest = h.finalize()
                with self._token.lock:
                    raw = self._pair.private.sign(digest, mechanism=Mechanism.ECDSA)
                half = len(raw) // 2
                return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
            with self._token.lock:
                return bytes(self._pair.private.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS))
        except p11.PKCS11Error as exc:
            raise UnavailableError(f"{self._token.description} did not sign: {exc!r}") from exc

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return signed_der.sign_certificate(builder, self, self._template)

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return signed_der.sign_crl(builder, self, self._template)

    def sign_ocsp(self, builder: ocsp.OCSPResponseBuilder, responder: x509.Certificate) -> ocsp.OCSPResponse:
        return signed_der.sign_ocsp_response(builder, responder, self, self._template)
