"""The trust-transfer messages (seed 003, section VII; Listings 1 and 2; Fig. 4), pure codecs.

Every decoder takes untrusted bytes and either returns a checked, immutable object or raises an
:class:`iotdlm.errors.RejectedError` subclass; nothing else escapes (hypothesis-tested). Signatures
are verified over the bytes received before the payload is decoded.

UpdateInfoList (SP1 -> SP2), CDDL; a JWS (RFC 7515, compact, ``alg`` ES256 for P-256 keys,
``typ`` ``iotdlm-update-info+cbor``, ``x5c`` = SP1's transfer certificate, the identity agreed in
the contract and pinned by SP2) whose payload is the CBOR array ``UpdateInfoExport``::

    UpdateInfoExport = [
        UpdateInfoList,            ; Listing 1, as the paper gives it
        factoryCertificates: x5bag, ; RFC 9360 COSE_X509: the full DER certificates, the i-th being
                                    ; the certificate whose TBSCertificate is the i-th entry's
        audience: tstr,            ; SP2's provider id (the export is for SP2 only)
        issuedAt: #6.1(int),
    ]
    UpdateInfoList = [* DeviceUpdateInfo]
    DeviceUpdateInfo = [
        factoryCertificate: bstr,      ; DER TBSCertificate (the paper's TBSCertificate)
        updateTimeNotBefore: #6.1(int),
        updateTimeNotAfter: #6.1(int),
        versionInfo: [suit-manifest-seq-number: uint, suit-reference-uri: tstr],
        ? raReference: bstr .size 32,  ; only when remote attestation is agreed (VII-C: "SP1 needs to
                                       ; share the information needed for a verifier"): SHA-256 of
                                       ; the firmware image the device must be running
    ]

Why both the TBSCertificate and the x5bag: the paper's DeviceUpdateInfo names the factory
certificate by its TBSCertificate, and the paper also has the factory certificates *shared* so the
new CA can authenticate the devices (VI-B: x5bag). A TBSCertificate alone cannot be verified (the
issuer's signature is outside it), so the full certificates travel alongside in an x5bag, and the
decoder checks that each entry's TBSCertificate is exactly the TBS of the certificate at the same
index. SP2 forwards that x5bag unchanged to CA2.

CWTs (COSE_Sign1, RFC 8392 / RFC 9052, signed with ``cwt``); the full CDDL is ``transfer.cddl``
beside this file, its mapping to the paper ``docs/transfer-cddl.md``. Standard claims: iss 1, aud 3,
exp 4, nbf 5, iat 6, cti 7 (16 random bytes). The paper's fields use private claim keys (RFC 8392
9.1: below -65536 is private use):

=========  ========================  =================================================
key        claim                     value
=========  ========================  =================================================
-70001     TransferMessage           Listing 2's group as an array: [ResetTimeNotBefore,
                                     ResetTimeNotAfter, raURI / null, updateURI, update-first,
                                     enrollURI, fallbackURI, ? trustAnchors: [1*8 [-16, SHA-256]]]
-70008     transferRef               bstr .size 16: the transfer id (SHA-256 of the
                                     UpdateInfoList JWS answered, first 16 bytes)
-70009     enrolled                  [+ [device-id: tstr, certificate-sha256: bstr .size 32]]
=========  ========================  =================================================

COSE ``typ`` (label 16) is a CoAP Content-Format of the experimental range (RFC 9596 uint, RFC 7252
12.3): 65301 TransferMessage, 65302 device transfer message, 65303 confirmation.

- TransferMessage (SP2 -> SP1): iss, aud (SP1's provider id), exp, nbf, iat, cti, -70001, -70008;
  ``x5t`` (label 34, SHA-256/64) names SP2's pinned transfer certificate; fallbackURI may be empty.
- Device transfer message (SP1 -> one device): the same claims, copied, with ``aud`` = the device
  id, no ``iss``, a new ``cti``, fallbackURI = SP1's update server; ``x5t`` names SP1's transfer
  certificate, which the device holds in its truststore (or ``x5chain``, label 33, for a device that
  does not).
- Confirmation (SP2 -> SP1): iss, aud, exp, nbf, iat, cti, -70008, -70009; ``x5t`` as above.
"""

from __future__ import annotations

from iotdlm.transfer import cose
from iotdlm.transfer.messages.cwt import (
    Confirmation,
    CwtHeader,
    Enrolled,
    OpenedDeviceMessage,
    TransferClaims,
    TransferMessage,
    open_confirmation,
    open_transfer_message,
    peek_device_message,
    peek_transfer_ref,
    rejected_summary,
    sign_confirmation,
    sign_device_message,
    sign_transfer_message,
)
from iotdlm.transfer.messages.primitives import (
    AUD,
    CTI,
    DEFAULT_SKEW,
    ENROLLED,
    EXP,
    IAT,
    ISS,
    JWS_TYP,
    MAX_ANCHORS,
    MAX_CONFIRMATION_BYTES,
    MAX_CWT_BYTES,
    MAX_DEVICES,
    MAX_ID,
    MAX_UPDATE_INFO_BYTES,
    MAX_URI,
    MAX_X5BAG_BYTES,
    NBF,
    TRANSFER,
    TRANSFER_REF,
    TRANSFER_REF_BYTES,
    TYP_CONFIRMATION,
    TYP_DEVICE_TRANSFER,
    TYP_TRANSFER_MESSAGE,
    check_uri,
    decode_x5bag,
    encode_x5bag,
    epoch,
    from_epoch,
    sha256,
    tag_time,
    x5bag_from_obj,
    x5bag_obj,
)
from iotdlm.transfer.messages.update_info import (
    DeviceUpdateInfo,
    SharedDevice,
    UpdateInfoExport,
    VerifiedExport,
    VersionInfo,
    encode_update_info_list,
    open_update_info,
    sign_update_info,
    transfer_id,
)

__all__ = [
    "AUD",
    "CTI",
    "DEFAULT_SKEW",
    "ENROLLED",
    "EXP",
    "IAT",
    "ISS",
    "JWS_TYP",
    "MAX_ANCHORS",
    "MAX_CONFIRMATION_BYTES",
    "MAX_CWT_BYTES",
    "MAX_DEVICES",
    "MAX_ID",
    "MAX_UPDATE_INFO_BYTES",
    "MAX_URI",
    "MAX_X5BAG_BYTES",
    "NBF",
    "TRANSFER",
    "TRANSFER_REF",
    "TRANSFER_REF_BYTES",
    "TYP_CONFIRMATION",
    "TYP_DEVICE_TRANSFER",
    "TYP_TRANSFER_MESSAGE",
    "Confirmation",
    "CwtHeader",
    "DeviceUpdateInfo",
    "Enrolled",
    "OpenedDeviceMessage",
    "SharedDevice",
    "TransferClaims",
    "TransferMessage",
    "UpdateInfoExport",
    "VerifiedExport",
    "VersionInfo",
    "check_uri",
    "cose",
    "decode_x5bag",
    "encode_update_info_list",
    "encode_x5bag",
    "epoch",
    "from_epoch",
    "open_confirmation",
    "open_transfer_message",
    "open_update_info",
    "peek_device_message",
    "peek_transfer_ref",
    "rejected_summary",
    "sha256",
    "sign_confirmation",
    "sign_device_message",
    "sign_transfer_message",
    "sign_update_info",
    "tag_time",
    "transfer_id",
    "x5bag_from_obj",
    "x5bag_obj",
]
