"""C509 certificates (draft-ietf-cose-cbor-encoded-cert): CBOR re-encoded X.509, lossless.

The revision followed is :data:`DRAFT`: the editor's copy of the draft in
github.com/cose-wg/CBOR-certificates at commit 00bf2869 (2025), where a re-encoded X.509 v3
certificate is c509CertificateType 3 (2 is natively signed; drafts up to -09 used 0 and 1) and a
C509Certificate is one CBOR array of 11 elements.

- :func:`encode_c509` -- DER -> C509 (refuses what cannot come back byte-identical);
- :func:`decode_c509` -- C509 (untrusted bytes) -> DER, for the caller to verify as any DER;
- :func:`encode_c509_bag` / :func:`decode_c509_bag` -- a truststore: the draft's COSE_C509
  (section 3.4: one C509CertData byte string, or an array of them).

Pure: no I/O.
"""

from iotdlm.c509.codec import C509_REENCODED, MAX_CERTIFICATE_BYTES, decode_c509, encode_c509
from iotdlm.c509.truststore import MAX_BAG_CERTIFICATES, decode_c509_bag, encode_c509_bag

#: the revision of draft-ietf-cose-cbor-encoded-cert this package follows
DRAFT = "draft-ietf-cose-cbor-encoded-cert (editor's copy, cose-wg/CBOR-certificates@00bf2869)"

__all__ = [
    "C509_REENCODED",
    "DRAFT",
    "MAX_BAG_CERTIFICATES",
    "MAX_CERTIFICATE_BYTES",
    "decode_c509",
    "decode_c509_bag",
    "encode_c509",
    "encode_c509_bag",
]
