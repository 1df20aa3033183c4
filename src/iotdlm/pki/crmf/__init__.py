"""CRMF (RFC 4211) ``CertReqMessages``: built by pm, parsed and checked by km.

Two kinds of proof of possession (POP) are produced and accepted:

- ``raVerified`` (``ProofOfPossession [0] NULL``): pm builds the request for a device that only handed
  over its public key out of band. *Whether* ``raVerified`` is acceptable is the caller's policy (km
  accepts it only inside a request signed by pm); :func:`parse` only reports it.
- ``signature`` (``POPOSigningKey [1]``) with ``poposkInput`` absent: the signature is over the DER of
  ``CertReqMsg.certReq`` (the ASN.1 comment of RFC 4211 section 4.1; the prose there says "certificate
  template", but OpenSSL signs ``certReq`` too, see the OpenSSL-made vectors in the tests). RFC 4211
  only allows this form when the template holds both ``subject`` and ``publicKey``, so that is required.

Supported keys and the POP signature algorithms accepted with each are one policy shared with PKCS#10:
:mod:`iotdlm.pki.pop` (any SHA-2 digest with EC and RSA keys; pure Ed25519). Our own builders sign
with SHA-384 for P-384 and SHA-256 otherwise.

:func:`parse` is strict: canonical DER only (every message is re-encoded and compared byte for byte),
no trailing bytes, sizes bounded before any ASN.1 decoding, and only :mod:`iotdlm.errors` classes
escape for any input. Template fields other than ``subject`` and ``publicKey`` (validity, extensions,
controls, regInfo...) are accepted and not used: the CA fills certificates from its own profile.
:class:`CrmfRequest` names them (``ignored_fields``, ``requested_extensions``) so km can tell the
requester what it dropped, and :attr:`CrmfRequest.der` keeps the whole message.

An RFC 4210 CMP ``PKIMessage`` is not CertReqMessages: :func:`parse` says so, and
:func:`unwrap_cmp` takes the CertReqMessages out of an ``ir`` / ``cr`` / ``kur`` (without checking the
CMP protection; the POP inside is checked as always).

This package is pure: no I/O.
"""

from iotdlm.pki.crmf.asn1 import MAX_CRMF_BYTES, PrivateKey, PublicKey
from iotdlm.pki.crmf.building import build_ra_verified, build_ra_verified_many, build_signed
from iotdlm.pki.crmf.cmp import CmpRequest, looks_like_cmp, unwrap_cmp
from iotdlm.pki.crmf.parsing import CrmfRequest, parse

__all__ = [
    "MAX_CRMF_BYTES",
    "CmpRequest",
    "CrmfRequest",
    "PrivateKey",
    "PublicKey",
    "build_ra_verified",
    "build_ra_verified_many",
    "build_signed",
    "looks_like_cmp",
    "parse",
    "unwrap_cmp",
]
