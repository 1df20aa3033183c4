"""A server-generated private key, encrypted to the device (RFC 7030 4.4.2). Pure: no I/O.

km makes the key for EST serverkeygen and must not hand it to cm in the clear (ADR 0009). It wraps
the PKCS#8 key in a CMS EnvelopedData (RFC 5652 6) whose content is an AsymmetricKeyPackage
(RFC 5958: ``id-ct-KP-aKeyPackage``, one OneAsymmetricKey, which is the PKCS#8 PrivateKeyInfo),
encrypted to the public key of the credential the device proved it holds (ADR 0008: the factory
certificate to enroll, the operational certificate to re-enroll). cm relays it as the key part
``application/pkcs7-mime; smime-type=server-generated-key``.

- content: AES-256-CBC (RFC 3565), random key and IV;
- RSA recipient: KeyTransRecipientInfo, RSAES-OAEP with SHA-256 and MGF1-SHA-256 (RFC 4055,
  RFC 8017); cryptography's ``PKCS7EnvelopeBuilder`` only does PKCS #1 v1.5, so this is built here;
- EC recipient (P-256, P-384): KeyAgreeRecipientInfo, ephemeral-static ECDH (RFC 5753
  ``dhSinglePass-stdDH-sha256kdf-scheme``, ``-sha384kdf-`` for P-384), the X9.63 KDF over
  ``ECC-CMS-SharedInfo``, and AES-256 key wrap (RFC 3394);
- Ed25519 (and Ed448): a signature-only key cannot agree a key; :func:`encrypt_key` refuses with
  :class:`~iotdlm.errors.UnsupportedError`, and a deployment whose devices hold such keys keeps
  serverkeygen off.

``openssl cms -decrypt -inform DER -inkey device.key -in key.p7`` decrypts what this makes; its
output is the AsymmetricKeyPackage. :func:`decrypt_key` is the device's side: it takes bytes from
the network, so anything it cannot read is a :class:`~iotdlm.errors.BadRequestError` saying what.
"""

from __future__ import annotations

import os
from typing import TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ
from pyasn1_modules import rfc3565, rfc4055, rfc5280, rfc5480, rfc5652, rfc5753, rfc5958

from iotdlm.errors import BadRequestError, UnsupportedError
from iotdlm.pki.keys import PrivateKey

#: the media type of the key part of a serverkeygen response when the key is encrypted
SERVER_GENERATED_KEY = "application/pkcs7-mime; smime-type=server-generated-key"
#: the largest envelope the device reads (an RSA-4096 recipient and a P-384 key: ~1 KiB)
MAX_ENVELOPE_BYTES = 16 * 1024

_T = TypeVar("_T")
_Hash = type[hashes.SHA256] | type[hashes.SHA384] | type[hashes.SHA512]

_CEK_BYTES = 32  # AES-256
_OID_AKP = rfc5958.id_ct_KP_aKeyPackage
_OID_DATA = rfc5652.id_data
#: content encryption we read: AES-CBC of each key size (we write AES-256)
_CONTENT_CIPHERS = {
    rfc3565.id_aes128_CBC: 16,
    rfc3565.id_aes192_CBC: 24,
    rfc3565.id_aes256_CBC: 32,
}
_KEY_WRAPS = {
    rfc3565.id_aes128_wrap: 16,
    rfc3565.id_aes192_wrap: 24,
    rfc3565.id_aes256_wrap: 32,
}
#: ECDH schemes (RFC 5753 7.1.4) we read, and their KDF hash
_KDF_HASHES: dict[univ.ObjectIdentifier, _Hash] = {
    rfc5753.dhSinglePass_stdDH_sha256kdf_scheme: hashes.SHA256,
    rfc5753.dhSinglePass_stdDH_sha384kdf_scheme: hashes.SHA384,
    rfc5753.dhSinglePass_stdDH_sha512kdf_scheme: hashes.SHA512,
}
_HASH_OIDS: dict[univ.ObjectIdentifier, _Hash] = {
    rfc4055.id_sha256: hashes.SHA256,
    rfc4055.id_sha384: hashes.SHA384,
    rfc4055.id_sha512: hashes.SHA512,
}


# --- encrypt (km) ------------------------------------------------------------------------------
def encrypt_key(private_key_pkcs8: bytes, recipient: x509.Certificate) -> bytes:
    """DER ContentInfo(EnvelopedData) holding ``private_key_pkcs8`` (in an AsymmetricKeyPackage),
    readable only with the private key of ``recipient``'s public key."""
    public = recipient.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise UnsupportedError(
            "the device's credential key is Ed25519/Ed448, a signature-only key: a server-generated key "
            "cannot be encrypted to it (RFC 7030 4.4.2 needs RSA or ECDH); have the device make its own "
            'key (simpleenroll), or keep est_serverkeygen = "off" for this deployment',
            field="operation",
        )
    try:
        pkcs8 = der_decoder.decode(private_key_pkcs8, asn1Spec=rfc5958.OneAsymmetricKey())
    except PyAsn1Error as exc:
        raise ValueError("private_key_pkcs8 is not a DER PKCS#8 private key") from exc
    if pkcs8[1]:
        raise ValueError("private_key_pkcs8 has trailing data")
    package = rfc5958.AsymmetricKeyPackage()
    package.append(pkcs8[0])
    content = bytes(der_encoder.encode(package))

    cek = os.urandom(_CEK_BYTES)
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(content) + padder.finalize()
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()

    ias = _issuer_and_serial(recipient)
    ri = rfc5652.RecipientInfo()
    if isinstance(public, rsa.RSAPublicKey):
        _ktri(ri["ktri"], public, ias, cek)
        version = 0  # RFC 5652 6.1: only version-0 KeyTransRecipientInfo
    elif isinstance(public, ec.EllipticCurvePublicKey):
        _kari(ri["kari"], public, ias, cek)
        version = 2  # RFC 5652 6.1: a KeyAgreeRecipientInfo (version 3) is present
    else:
        raise UnsupportedError(f"cannot encrypt a key to a {type(public).__name__}", field="operation")

    eci = rfc5652.EncryptedContentInfo()
    eci["contentType"] = _OID_AKP
    eci["contentEncryptionAlgorithm"]["algorithm"] = rfc3565.id_aes256_CBC
    eci["contentEncryptionAlgorithm"]["parameters"] = der_encoder.encode(univ.OctetString(iv))
    eci["encryptedContent"] = ciphertext

    env = rfc5652.EnvelopedData()
    env["version"] = version
    env["recipientInfos"].append(ri)
    env["encryptedContentInfo"] = eci

    ci = rfc5652.ContentInfo()
    ci["contentType"] = rfc5652.id_envelopedData
    ci["content"] = der_encoder.encode(env)
    return bytes(der_encoder.encode(ci))


def _issuer_and_serial(cert: x509.Certificate) -> rfc5652.IssuerAndSerialNumber:
    name, _ = der_decoder.decode(cert.issuer.public_bytes(), asn1Spec=rfc5280.Name())
    ias = rfc5652.IssuerAndSerialNumber()
    ias["issuer"] = name
    ias["serialNumber"] = cert.serial_number
    return ias


def _oaep_identifier() -> rfc5280.AlgorithmIdentifier:
    params = rfc4055.RSAES_OAEP_params()
    params["hashFunc"]["algorithm"] = rfc4055.id_sha256
    params["hashFunc"]["parameters"] = der_encoder.encode(univ.Null(""))
    params["maskGenFunc"]["algorithm"] = rfc4055.id_mgf1
    params["maskGenFunc"]["parameters"] = der_encoder.encode(rfc4055.sha256Identifier)
    alg = rfc5652.KeyEncryptionAlgorithmIdentifier()
    alg["algorithm"] = rfc4055.id_RSAES_OAEP
    alg["parameters"] = der_encoder.encode(params)
    return alg


def _ktri(
    ktri: rfc5652.KeyTransRecipientInfo, public: rsa.RSAPublicKey, ias: rfc5652.IssuerAndSerialNumber, cek: bytes
) -> None:
    """Fill ``ktri`` (in place: pyasn1 keeps the CHOICE's tag on the component it made)."""
    ktri["version"] = 0
    ktri["rid"]["issuerAndSerialNumber"] = ias
    ktri["keyEncryptionAlgorithm"] = _oaep_identifier()
    ktri["encryptedKey"] = public.encrypt(cek, _oaep(hashes.SHA256))


def _oaep(h: _Hash) -> asym_padding.OAEP:
    return asym_padding.OAEP(mgf=asym_padding.MGF1(algorithm=h()), algorithm=h(), label=None)


def _shared_info(wrap: rfc5280.AlgorithmIdentifier, ukm: bytes | None, kek_bytes: int) -> bytes:
    """DER ECC-CMS-SharedInfo (RFC 5753 7.2): the X9.63 KDF's shared info."""
    info = rfc5753.ECC_CMS_SharedInfo()
    info["keyInfo"]["algorithm"] = wrap["algorithm"]
    if wrap["parameters"].isValue:
        info["keyInfo"]["parameters"] = wrap["parameters"]
    if ukm is not None:
        info["entityUInfo"] = ukm
    info["suppPubInfo"] = (kek_bytes * 8).to_bytes(4, "big")
    return bytes(der_encoder.encode(info))


def _kek(
    shared: bytes,
    h: _Hash,
    wrap: rfc5280.AlgorithmIdentifier,
    ukm: bytes | None,
    kek_bytes: int,
) -> bytes:
    kdf = X963KDF(algorithm=h(), length=kek_bytes, sharedinfo=_shared_info(wrap, ukm, kek_bytes))
    return kdf.derive(shared)


def _kari(
    kari: rfc5652.KeyAgreeRecipientInfo,
    public: ec.EllipticCurvePublicKey,
    ias: rfc5652.IssuerAndSerialNumber,
    cek: bytes,
) -> None:
    """Fill ``kari`` (in place, as :func:`_ktri`)."""
    h: _Hash
    if isinstance(public.curve, ec.SECP256R1):
        scheme, h = rfc5753.dhSinglePass_stdDH_sha256kdf_scheme, hashes.SHA256
    elif isinstance(public.curve, ec.SECP384R1):
        scheme, h = rfc5753.dhSinglePass_stdDH_sha384kdf_scheme, hashes.SHA384
    else:
        raise UnsupportedError(
            f"cannot encrypt a key to elliptic curve {public.curve.name}; P-256 or P-384", field="operation"
        )
    ephemeral = ec.generate_private_key(public.curve)
    shared = ephemeral.exchange(ec.ECDH(), public)
    wrap = rfc5280.AlgorithmIdentifier()
    wrap["algorithm"] = rfc3565.id_aes256_wrap  # parameters absent (RFC 3565 2.3.2)
    kek = _kek(shared, h, wrap, None, 32)

    kari["version"] = 3
    opk = kari["originator"]["originatorKey"]
    opk["algorithm"]["algorithm"] = rfc5480.id_ecPublicKey  # parameters absent: the recipient's curve
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    opk["publicKey"] = univ.BitString.fromOctetString(point)
    kari["keyEncryptionAlgorithm"]["algorithm"] = scheme
    kari["keyEncryptionAlgorithm"]["parameters"] = der_encoder.encode(wrap)
    rek = rfc5652.RecipientEncryptedKey()
    rek["rid"]["issuerAndSerialNumber"] = ias
    rek["encryptedKey"] = aes_key_wrap(kek, cek)
    kari["recipientEncryptedKeys"].append(rek)


# --- decrypt (the device) ----------------------------------------------------------------------
def decrypt_key(envelope_der: bytes, key: PrivateKey) -> bytes:
    """The PKCS#8 DER private key inside ``envelope_der``, decrypted with ``key`` (the device's
    current credential key); BadRequestError saying what is wrong with anything else."""
    if not isinstance(envelope_der, bytes | bytearray | memoryview):
        raise BadRequestError("the server-generated key must be bytes")
    data = bytes(envelope_der)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise BadRequestError(f"the server-generated key exceeds {MAX_ENVELOPE_BYTES} bytes")
    ci = _decode(data, rfc5652.ContentInfo(), "a CMS ContentInfo")
    if ci["contentType"] != rfc5652.id_envelopedData:
        raise BadRequestError(
            f"the server-generated key is a CMS {ci['contentType']}, not an EnvelopedData (1.2.840.113549.1.7.3)"
        )
    env = _decode(bytes(ci["content"]), rfc5652.EnvelopedData(), "a CMS EnvelopedData")
    cek = _recover_cek(env["recipientInfos"], key)
    eci = env["encryptedContentInfo"]
    if not eci["encryptedContent"].isValue:
        raise BadRequestError("the server-generated key's EnvelopedData carries no encrypted content")
    content = _decrypt_content(eci, cek)
    return _key_from_content(eci["contentType"], content)


def _decode(data: bytes, spec: _T, what: str) -> _T:
    try:
        value, rest = der_decoder.decode(data, asn1Spec=spec)
    except (PyAsn1Error, ValueError, TypeError, IndexError, KeyError, OverflowError) as exc:
        raise BadRequestError(f"the server-generated key is not {what}") from exc
    if rest:
        raise BadRequestError(f"the server-generated key's {what} has trailing data")
    return cast(_T, value)


def _recover_cek(infos: rfc5652.RecipientInfos, key: PrivateKey) -> bytes:
    """The content-encryption key from the first recipient info this key opens."""
    tried: list[str] = []
    for ri in infos:
        kind = ri.getName()
        if kind == "ktri" and isinstance(key, rsa.RSAPrivateKey):
            cek = _open_ktri(ri["ktri"], key)
        elif kind == "kari" and isinstance(key, ec.EllipticCurvePrivateKey):
            cek = _open_kari(ri["kari"], key)
        else:
            tried.append(kind)
            continue
        if cek is not None:
            return cek
        tried.append(kind)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raise BadRequestError("an Ed25519 key cannot decrypt a server-generated key (no key agreement)")
    raise BadRequestError(
        "the server-generated key is not encrypted to this device's key "
        f"(recipient infos: {', '.join(tried) or 'none'})"
    )


def _open_ktri(ktri: rfc5652.KeyTransRecipientInfo, key: rsa.RSAPrivateKey) -> bytes | None:
    alg = ktri["keyEncryptionAlgorithm"]
    if alg["algorithm"] != rfc4055.id_RSAES_OAEP:
        raise BadRequestError(
            f"the server-generated key is wrapped with {alg['algorithm']}, not RSAES-OAEP "
            "(PKCS #1 v1.5 is not accepted)"
        )
    h = _oaep_hash(alg)
    try:
        cek = key.decrypt(bytes(ktri["encryptedKey"]), _oaep(h))
    except ValueError:
        return None  # not for this key (or tampered with): try the next recipient
    return cek


def _oaep_hash(alg: rfc5280.AlgorithmIdentifier) -> _Hash:
    if not alg["parameters"].isValue:
        raise BadRequestError("RSAES-OAEP without parameters means SHA-1, which is not accepted")
    params = _decode(bytes(alg["parameters"]), rfc4055.RSAES_OAEP_params(), "RSAES-OAEP parameters")
    if not params["hashFunc"].isValue or not params["maskGenFunc"].isValue:
        raise BadRequestError("RSAES-OAEP with the default SHA-1 hash is not accepted")
    h = _HASH_OIDS.get(params["hashFunc"]["algorithm"])
    if h is None:
        raise BadRequestError(f"RSAES-OAEP hash {params['hashFunc']['algorithm']} is not supported")
    mgf = params["maskGenFunc"]
    if mgf["algorithm"] != rfc4055.id_mgf1 or not mgf["parameters"].isValue:
        raise BadRequestError("RSAES-OAEP mask generation other than MGF1 is not supported")
    mgf_hash = _decode(bytes(mgf["parameters"]), rfc5280.AlgorithmIdentifier(), "an MGF1 hash")
    if _HASH_OIDS.get(mgf_hash["algorithm"]) is not h:
        raise BadRequestError("RSAES-OAEP with MGF1 over a different hash is not supported")
    if params["pSourceFunc"].isValue:
        raise BadRequestError("RSAES-OAEP with a label is not supported")
    return h


def _open_kari(kari: rfc5652.KeyAgreeRecipientInfo, key: ec.EllipticCurvePrivateKey) -> bytes | None:
    alg = kari["keyEncryptionAlgorithm"]
    h = _KDF_HASHES.get(alg["algorithm"])
    if h is None:
        raise BadRequestError(
            f"the server-generated key's key agreement {alg['algorithm']} is not a "
            "dhSinglePass-stdDH-sha256/384/512kdf scheme (RFC 5753)"
        )
    if not alg["parameters"].isValue:
        raise BadRequestError("the key agreement names no key wrap algorithm")
    wrap = _decode(bytes(alg["parameters"]), rfc5280.AlgorithmIdentifier(), "a key wrap algorithm")
    kek_bytes = _KEY_WRAPS.get(wrap["algorithm"])
    if kek_bytes is None:
        raise BadRequestError(f"key wrap {wrap['algorithm']} is not AES key wrap")
    originator = kari["originator"]
    if originator.getName() != "originatorKey":
        raise BadRequestError("the key agreement's originator is not an ephemeral public key")
    opk = originator["originatorKey"]
    if opk["algorithm"]["algorithm"] != rfc5480.id_ecPublicKey:
        raise BadRequestError("the key agreement's ephemeral key is not an EC public key")
    try:
        point = opk["publicKey"].asOctets()
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, point)
        shared = key.exchange(ec.ECDH(), ephemeral)
    except (ValueError, TypeError) as exc:
        raise BadRequestError("the key agreement's ephemeral key is not a point on the device key's curve") from exc
    ukm = bytes(kari["ukm"]) if kari["ukm"].isValue else None
    kek = _kek(shared, h, wrap, ukm, kek_bytes)
    for rek in kari["recipientEncryptedKeys"]:
        try:
            return aes_key_unwrap(kek, bytes(rek["encryptedKey"]))
        except (InvalidUnwrap, ValueError):
            continue
    return None


def _decrypt_content(eci: rfc5652.EncryptedContentInfo, cek: bytes) -> bytes:
    alg = eci["contentEncryptionAlgorithm"]
    size = _CONTENT_CIPHERS.get(alg["algorithm"])
    if size is None:
        raise BadRequestError(f"the server-generated key's content cipher {alg['algorithm']} is not AES-CBC")
    if len(cek) != size:
        raise BadRequestError("the server-generated key's content key does not fit its cipher")
    if not alg["parameters"].isValue:
        raise BadRequestError("the server-generated key's AES-CBC has no IV")
    iv = _decode(bytes(alg["parameters"]), univ.OctetString(), "an AES-CBC IV")
    ciphertext = bytes(eci["encryptedContent"])
    if len(bytes(iv)) != 16 or not ciphertext or len(ciphertext) % 16:
        raise BadRequestError("the server-generated key's AES-CBC IV or ciphertext has the wrong length")
    decryptor = Cipher(algorithms.AES(cek), modes.CBC(bytes(iv))).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise BadRequestError("the server-generated key does not decrypt (bad padding)") from exc


def _key_from_content(content_type: univ.ObjectIdentifier, content: bytes) -> bytes:
    if content_type == _OID_DATA:  # a bare PKCS#8 key, as some servers send it
        one = _decode(content, rfc5958.OneAsymmetricKey(), "a PKCS#8 private key")
    elif content_type == _OID_AKP:
        package = _decode(content, rfc5958.AsymmetricKeyPackage(), "an AsymmetricKeyPackage")
        if len(package) != 1:
            raise BadRequestError(f"the AsymmetricKeyPackage holds {len(package)} keys, not one")
        one = package[0]
    else:
        raise BadRequestError(f"the server-generated key's content is a {content_type}, not an AsymmetricKeyPackage")
    try:
        return bytes(der_encoder.encode(one))
    except PyAsn1Error as exc:  # pragma: no cover - decoded DER re-encodes
        raise BadRequestError("the server-generated key does not re-encode") from exc


__all__ = ["MAX_ENVELOPE_BYTES", "SERVER_GENERATED_KEY", "decrypt_key", "encrypt_key"]
