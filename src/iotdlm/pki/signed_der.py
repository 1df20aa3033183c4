"""Certificates, CRLs and OCSP responses signed by a key cryptography does not hold (an HSM).

cryptography's builders sign only with a private key object of its own (``builder.sign(key, hash)``);
there is no API that hands out the to-be-signed bytes and takes a signature back (ADR 0025). So:

1. the builder signs once with a *template* key of the same kind (an in-memory key of the same
   algorithm and hash, made by :func:`template_key`): cryptography writes the whole structure, its
   signatureAlgorithm included, which depends on the key type and hash only, never on the key;
2. the to-be-signed part of that result (``tbs_certificate_bytes``, ``tbs_certlist_bytes``,
   ``tbs_response_bytes``), byte for byte what cryptography wrote, is signed by the :class:`Signer`;
3. the template's signature BIT STRING is replaced by the Signer's, with pyasn1 (the outer
   SEQUENCE read as raw TLVs: the tbs and the algorithm identifier are copied untouched);
4. the result is parsed again by cryptography and its signature checked against the Signer's public
   key: a Signer that signed the wrong thing, or a mistake here, raises instead of shipping.

This module is pure: no I/O. The Signer may do I/O (a PKCS#11 session) inside ``sign``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from pyasn1.codec.der import decoder, encoder
from pyasn1.type import tag, univ
from pyasn1_modules import rfc6960

from iotdlm.pki.keys import Algorithm, PrivateKey, PublicKey, hash_for, verify_bytes

if TYPE_CHECKING:
    from iotdlm.pki.keys import Signer

__all__ = ["Template", "sign_certificate", "sign_crl", "sign_ocsp_response", "template_key"]

#: a template RSA key only fixes the signatureAlgorithm (sha256WithRSAEncryption): its size does not
#: matter, and 2048 bits are made ten times faster than 3072
_TEMPLATE_RSA_BITS = 2048
_STAND_IN_FROM = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
#: ResponderID byKey: [2] EXPLICIT (constructed, 22 bytes) OCTET STRING (20 bytes)
_BY_KEY = bytes([0xA2, 0x16, 0x04, 0x14])


@dataclass(frozen=True)
class Template:
    """A signer's template key and the stand-in responder certificate of that key (made once)."""

    key: PrivateKey
    stand_in: x509.Certificate

    @property
    def stand_in_key_hash(self) -> bytes:
        """RFC 6960 4.2.1 KeyHash: SHA-1 of the stand-in's public key BIT STRING."""
        return x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()).digest


def template_key(alg: Algorithm) -> Template:
    """An in-memory key whose signatures carry the same signatureAlgorithm as a key of ``alg``."""
    key: PrivateKey
    if alg is Algorithm.P256:
        key = ec.generate_private_key(ec.SECP256R1())
    elif alg is Algorithm.P384:
        key = ec.generate_private_key(ec.SECP384R1())
    elif alg is Algorithm.RSA3072:
        key = rsa.generate_private_key(public_exponent=65537, key_size=_TEMPLATE_RSA_BITS)
    else:
        raise ValueError(f"no external signing for {alg.value}: use ecdsa-p256, ecdsa-p384 or rsa-3072")
    return Template(key=key, stand_in=_stand_in_certificate(key))


def _raw_sequence() -> univ.SequenceOf:
    return univ.SequenceOf(componentType=univ.Any())


def _replace_signature(signed_der: bytes, tbs: bytes, signature: bytes) -> bytes:
    """``signed_der`` (SEQUENCE { tbs, signatureAlgorithm, signature BIT STRING, ... }) with its
    signature replaced; the other elements are copied byte for byte.

    The TBS is known, so it is found right after the outer header (2 to 6 bytes), and only the short
    tail after it (algorithm identifier, signature, anything else) is read, as raw TLVs: a CRL's
    TBS of many entries is never walked."""
    start = next((k for k in range(2, 7) if signed_der.startswith(tbs, k)), None)
    if start is None or signed_der[0] != 0x30:
        raise ValueError("the template structure is not SEQUENCE { tbs, algorithm, signature, ... }")
    algorithm, after = decoder.decode(signed_der[start + len(tbs) :], asn1Spec=univ.Any())
    old_signature, extra = decoder.decode(after, asn1Spec=univ.Any())
    if bytes(old_signature)[:1] != b"\x03":
        raise ValueError("the template's signature is not a BIT STRING")
    out = _raw_sequence()
    out.append(univ.Any(tbs + bytes(algorithm) + encoder.encode(univ.BitString.fromOctetString(signature)) + extra))
    return bytes(encoder.encode(out))


def _checked(public_key: PublicKey, signature: bytes, tbs: bytes, expected_tbs: bytes) -> None:
    if tbs != expected_tbs:
        raise ValueError("assembling the signed structure changed its to-be-signed bytes")
    verify_bytes(public_key, signature, tbs)  # BadSignatureError: the Signer signed something else


def sign_certificate(builder: x509.CertificateBuilder, signer: Signer, template: Template) -> x509.Certificate:
    """``builder`` signed by ``signer`` (see the module docstring)."""
    draft = builder.sign(template.key, hash_for(template.key))
    tbs = draft.tbs_certificate_bytes
    der = _replace_signature(draft.public_bytes(serialization.Encoding.DER), tbs, signer.sign(tbs))
    cert = x509.load_der_x509_certificate(der)
    _checked(signer.public_key, cert.signature, cert.tbs_certificate_bytes, tbs)
    return cert


def sign_crl(
    builder: x509.CertificateRevocationListBuilder, signer: Signer, template: Template
) -> x509.CertificateRevocationList:
    """``builder`` signed by ``signer`` (see the module docstring)."""
    draft = builder.sign(template.key, hash_for(template.key))
    tbs = draft.tbs_certlist_bytes
    der = _replace_signature(draft.public_bytes(serialization.Encoding.DER), tbs, signer.sign(tbs))
    crl = x509.load_der_x509_crl(der)
    _checked(signer.public_key, crl.signature, crl.tbs_certlist_bytes, tbs)
    return crl


def _stand_in_certificate(template: PrivateKey) -> x509.Certificate:
    """A self-signed certificate of the template key: cryptography's OCSP builder takes the
    responder's certificate only together with its key, so the draft names this one, and
    :func:`sign_ocsp_response` puts the real responder's key hash and certificate in its place.
    Never emitted; its dates do not matter."""
    stand_in = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "template")])
    return (
        x509.CertificateBuilder()
        .subject_name(stand_in)
        .issuer_name(stand_in)
        .public_key(template.public_key())
        .serial_number(1)
        .not_valid_before(_STAND_IN_FROM)
        .not_valid_after(_STAND_IN_FROM + dt.timedelta(days=1))
        .sign(template, hash_for(template))
    )


def _explicit_certs(certificate: x509.Certificate) -> univ.Any:
    """``certs [0] EXPLICIT SEQUENCE OF Certificate`` holding ``certificate`` (RFC 6960 4.2.1)."""
    seq = univ.SequenceOf(componentType=univ.Any()).subtype(
        explicitTag=tag.Tag(tag.tagClassContext, tag.tagFormatConstructed, 0)
    )
    seq.append(univ.Any(certificate.public_bytes(serialization.Encoding.DER)))
    return univ.Any(encoder.encode(seq))


def sign_ocsp_response(
    builder: ocsp.OCSPResponseBuilder, responder: x509.Certificate, signer: Signer, template: Template
) -> ocsp.OCSPResponse:
    """A successful OCSPResponse from ``builder`` (its single response and extensions, no responder
    id yet), responder id by key hash and ``responder`` included, signed by ``signer``.

    OCSPResponse ::= SEQUENCE { responseStatus, responseBytes [0] EXPLICIT SEQUENCE { responseType,
    response OCTET STRING (the DER of the BasicOCSPResponse) } } (RFC 6960 4.2.1). The draft names a
    stand-in responder (see :func:`_stand_in_certificate`); its tbsResponseData gets the real
    responder's key hash, is signed, and the BasicOCSPResponse is put together again with the real
    certificate."""
    draft = (
        builder.responder_id(ocsp.OCSPResponderEncoding.HASH, template.stand_in)
        .certificates([template.stand_in])
        .sign(template.key, hash_for(template.key))
    )
    outer, rest = decoder.decode(draft.public_bytes(serialization.Encoding.DER), asn1Spec=rfc6960.OCSPResponse())
    if rest:
        raise ValueError("the template OCSP response has trailing bytes")
    parts, rest = decoder.decode(bytes(outer["responseBytes"]["response"]), asn1Spec=_raw_sequence())
    if rest or len(parts) != 4 or bytes(parts[0]) != draft.tbs_response_bytes:
        raise ValueError("the template BasicOCSPResponse is not SEQUENCE { tbs, algorithm, signature, certs }")
    # responderID byKey [2] EXPLICIT KeyHash (OCTET STRING of 20 bytes): the stand-in's hash, found
    # once, is replaced by the real responder's, same length, so no length around it changes
    # (decoding ResponseData with pyasn1 instead costs ten times the token's signature)
    key_hash = x509.SubjectKeyIdentifier.from_public_key(responder.public_key()).digest
    stand_in_id = _BY_KEY + template.stand_in_key_hash
    if bytes(parts[0]).count(stand_in_id) != 1:
        raise ValueError("the template tbsResponseData does not name the stand-in responder once")
    tbs = bytes(parts[0]).replace(stand_in_id, _BY_KEY + key_hash)
    basic = _raw_sequence()
    basic.append(univ.Any(tbs))
    basic.append(parts[1])
    basic.append(univ.Any(encoder.encode(univ.BitString.fromOctetString(signer.sign(tbs)))))
    basic.append(_explicit_certs(responder))
    outer["responseBytes"]["response"] = univ.OctetString(bytes(encoder.encode(basic)))
    response = ocsp.load_der_ocsp_response(bytes(encoder.encode(outer)))
    if response.responder_key_hash != key_hash or response.certificates != [responder]:
        raise ValueError("assembling the OCSP response lost its responder")
    _checked(signer.public_key, response.signature, response.tbs_response_bytes, tbs)
    return response
