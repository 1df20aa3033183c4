"""The C509 registries this codec knows: integers for OIDs and whole DER AlgorithmIdentifiers.

Values from the "CBOR Encoded X.509 (C509)" IANA registries of draft-ietf-cose-cbor-encoded-cert
(:data:`iotdlm.c509.DRAFT`, section 8 "IANA Considerations"): C509 RDN Attributes, Extensions,
Certificate Policies, Information Access, Extended Key Usages, Signature Algorithms and Public Key
Algorithms. Only the entries a re-encoding needs; an OID not listed here is carried as an
unwrapped CBOR OID (RFC 9090), which the draft allows everywhere an integer is allowed.

Pure data: no I/O.
"""

from __future__ import annotations

from typing import Final

#: C509 RDN Attributes registry: value -> attribute type OID (dotted)
RDN_ATTRIBUTES: Final[dict[int, str]] = {
    0: "1.2.840.113549.1.9.1",  # emailAddress (IA5String)
    1: "2.5.4.3",  # commonName
    2: "2.5.4.4",  # surname
    3: "2.5.4.5",  # serialNumber
    4: "2.5.4.6",  # countryName
    5: "2.5.4.7",  # localityName
    6: "2.5.4.8",  # stateOrProvinceName
    7: "2.5.4.9",  # streetAddress
    8: "2.5.4.10",  # organizationName
    9: "2.5.4.11",  # organizationalUnitName
    10: "2.5.4.12",  # title
    11: "2.5.4.15",  # businessCategory
    12: "2.5.4.17",  # postalCode
    13: "2.5.4.42",  # givenName
    14: "2.5.4.43",  # initials
    15: "2.5.4.44",  # generationQualifier
    16: "2.5.4.46",  # dnQualifier
    17: "2.5.4.65",  # pseudonym
    18: "2.5.4.97",  # organizationIdentifier
    19: "1.3.6.1.4.1.311.60.2.1.1",  # jurisdictionLocalityName
    20: "1.3.6.1.4.1.311.60.2.1.2",  # jurisdictionStateOrProvinceName
    21: "1.3.6.1.4.1.311.60.2.1.3",  # jurisdictionCountryName
    22: "0.9.2342.19200300.100.1.25",  # domainComponent (IA5String)
    25: "2.5.4.41",  # name
    26: "2.5.4.20",  # telephoneNumber
    27: "2.5.4.54",  # dmdName
    28: "0.9.2342.19200300.100.1.1",  # uid
    29: "1.2.840.113549.1.9.2",  # unstructuredName
    30: "1.2.840.113549.1.9.8",  # unstructuredAddress
}
#: attributes whose value is always an IA5String: a non-negative int, no sign to spare
IA5_ATTRIBUTES: Final = frozenset({0, 22})

#: C509 Extensions registry: value -> extension OID
EXTENSIONS: Final[dict[int, str]] = {
    1: "2.5.29.14",  # subjectKeyIdentifier
    2: "2.5.29.15",  # keyUsage
    3: "2.5.29.17",  # subjectAltName
    4: "2.5.29.19",  # basicConstraints
    5: "2.5.29.31",  # cRLDistributionPoints
    6: "2.5.29.32",  # certificatePolicies
    7: "2.5.29.35",  # authorityKeyIdentifier
    8: "2.5.29.37",  # extKeyUsage
    9: "1.3.6.1.5.5.7.1.1",  # authorityInfoAccess
    29: "2.5.29.46",  # freshestCRL
    36: "1.3.6.1.5.5.7.48.1.5",  # id-pkix-ocsp-nocheck
}

#: C509 Certificate Policies registry (the ones a CA of ours or of the Web may name)
CERTIFICATE_POLICIES: Final[dict[int, str]] = {
    0: "2.5.29.32.0",  # anyPolicy
    1: "2.23.140.1.2.1",  # domain-validated
    2: "2.23.140.1.2.2",  # organization-validated
    3: "2.23.140.1.2.3",  # individual-validated
    4: "2.23.140.1.1",  # ev-guidelines
    7: "1.3.6.1.5.5.7.14.2",  # id-cp-ipAddr-asNumber
    8: "1.3.6.1.5.5.7.14.3",  # id-cp-ipAddr-asNumber-v2
}

#: C509 Policies Qualifiers registry
POLICY_QUALIFIERS: Final[dict[int, str]] = {1: "1.3.6.1.5.5.7.2.1"}  # id-qt-cps (IA5String)

#: C509 Information Access registry
INFORMATION_ACCESS: Final[dict[int, str]] = {
    1: "1.3.6.1.5.5.7.48.1",  # id-ad-ocsp
    2: "1.3.6.1.5.5.7.48.2",  # id-ad-caIssuers
    3: "1.3.6.1.5.5.7.48.3",  # id-ad-timeStamping
    5: "1.3.6.1.5.5.7.48.5",  # id-ad-caRepository
}

#: C509 Extended Key Usages registry
EXTENDED_KEY_USAGES: Final[dict[int, str]] = {
    0: "2.5.29.37.0",  # anyExtendedKeyUsage
    1: "1.3.6.1.5.5.7.3.1",  # serverAuth
    2: "1.3.6.1.5.5.7.3.2",  # clientAuth
    3: "1.3.6.1.5.5.7.3.3",  # codeSigning
    4: "1.3.6.1.5.5.7.3.4",  # emailProtection
    8: "1.3.6.1.5.5.7.3.8",  # timeStamping
    9: "1.3.6.1.5.5.7.3.9",  # OCSPSigning
}

#: C509 Signature Algorithms registry: value -> the whole DER AlgorithmIdentifier (hex)
SIGNATURE_ALGORITHMS: Final[dict[int, str]] = {
    -256: "300d06092a864886f70d0101050500",  # sha1WithRSAEncryption
    -255: "300906072a8648ce3d0401",  # ecdsa-with-SHA1
    0: "300a06082a8648ce3d040302",  # ecdsa-with-SHA256
    1: "300a06082a8648ce3d040303",  # ecdsa-with-SHA384
    2: "300a06082a8648ce3d040304",  # ecdsa-with-SHA512
    12: "300506032b6570",  # Ed25519
    13: "300506032b6571",  # Ed448
    23: "300d06092a864886f70d01010b0500",  # sha256WithRSAEncryption
    24: "300d06092a864886f70d01010c0500",  # sha384WithRSAEncryption
    25: "300d06092a864886f70d01010d0500",  # sha512WithRSAEncryption
    26: "304106092a864886f70d01010a3034a00f300d06096086480165030402010500a11c301a06092a864886f70d010108"
    "300d06096086480165030402010500a203020120",  # RSASSA-PSS SHA-256
    27: "304106092a864886f70d01010a3034a00f300d06096086480165030402020500a11c301a06092a864886f70d010108"
    "300d06096086480165030402020500a203020130",  # RSASSA-PSS SHA-384
    28: "304106092a864886f70d01010a3034a00f300d06096086480165030402030500a11c301a06092a864886f70d010108"
    "300d06096086480165030402030500a203020140",  # RSASSA-PSS SHA-512
}
#: signature algorithms whose issuerSignatureValue is ECDSA r || s (draft section 3.2.2)
ECDSA_SIGNATURES: Final = frozenset({-255, 0, 1, 2})

#: C509 Public Key Algorithms registry: value -> the whole DER AlgorithmIdentifier (hex)
PUBLIC_KEY_ALGORITHMS: Final[dict[int, str]] = {
    0: "300d06092a864886f70d0101010500",  # rsaEncryption
    1: "301306072a8648ce3d020106082a8648ce3d030107",  # id-ecPublicKey secp256r1
    2: "301006072a8648ce3d020106052b81040022",  # id-ecPublicKey secp384r1
    3: "301006072a8648ce3d020106052b81040023",  # id-ecPublicKey secp521r1
    8: "300506032b656e",  # X25519
    9: "300506032b656f",  # X448
    12: "300506032b6570",  # Ed25519
    13: "300506032b6571",  # Ed448
}
#: public key algorithms whose subjectPublicKey is a point on a Weierstrass curve (section 3.2.1)
EC_CURVES: Final[dict[int, str]] = {1: "secp256r1", 2: "secp384r1", 3: "secp521r1"}
RSA_PUBLIC_KEY: Final = 0


def inverse(table: dict[int, str]) -> dict[str, int]:
    """The table read the other way: OID (or DER hex) -> value."""
    return {v: k for k, v in table.items()}
