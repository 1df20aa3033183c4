"""Building CRLs for the validation authority (pure: no I/O). RFC 5280 section 5.

Every issuing CA publishes one partitioned CRL per partition (``crl_partition(serial, n)`` fixes a
certificate's partition at issuance; its CRL distribution point names that partition's URL), plus
a delta CRL per partition.

Full CRL extensions:

- ``cRLNumber`` (monotonic per CA and partition, one sequence shared by the full CRLs and the
  deltas of that partition, RFC 5280 5.2.3 -- the caller keeps the counter),
- ``authorityKeyIdentifier`` (the CA's SKI),
- ``issuingDistributionPoint``, **critical** (RFC 5280 5.2.5): the partition URL, exactly the
  name the certificates carry in their CRL distribution point, and ``onlyContainsUserCerts``
  (our CRLs never list CA certificates),
- ``freshestCRL`` (non-critical, RFC 5280 5.2.6): where the delta for this partition lives.

Delta CRL extensions: ``cRLNumber``, ``deltaCRLIndicator`` (critical, the base CRL number), AKI,
and the **same** ``issuingDistributionPoint`` as the base -- the full CRL's URL, *not* the delta's
own URL. That is what RFC 5280 asks (5.2.4: a delta has the same scope as its base; 6.3.3 (c)(2):
a complete CRL with an IDP extension needs a delta with a matching IDP extension), and what
OpenSSL enforces: ``check_delta_base`` in x509_vfy.c compares the two IDP extensions byte for byte,
and a delta whose IDP names the delta URL is silently ignored by ``openssl verify -use_deltas``
(tests/unit/test_crl.py shows both). Where a delta is fetched from is said by the base's
``freshestCRL``; a delta carries no ``freshestCRL`` (RFC 5280 5.2.6: it MUST NOT).

OpenSSL (3.0) relying parties must check with ``-crl_check -use_deltas -extended_crl``
(``X509_V_FLAG_USE_DELTAS | X509_V_FLAG_EXTENDED_CRL_SUPPORT``): without extended CRL support,
OpenSSL's CRL selection does not set delta CRLs aside and takes the newest matching CRL -- the
delta -- as the complete one, so a certificate listed only in the base passes. Never hand a delta
to an OpenSSL verifier that is not told to use deltas.

The root CA's CRL (:func:`build_crl` with ``ca_certs=True``, for ``PublicUrls.crl("root", 0)``) lists
revoked issuing-CA certificates: one full CRL, no partitions and no delta, so it carries no
``freshestCRL``. Its critical ``issuingDistributionPoint`` says only ``onlyContainsCACerts`` and
names no distribution point: OpenSSL (``verify -crl_check_all``) checks the self-signed root
against this CRL too, and a root without a CRL distribution point (roots made before it named
one) is out of the scope of a CRL whose IDP names one ("different CRL scope", x509_vfy.c
``crl_crldp_check``); an IDP without a name covers every CA certificate the root signed, whatever
URL it was fetched from (RFC 5280 5.2.5 makes ``distributionPoint`` optional). The issuing-CA
certificates, and the root itself (so that ``-crl_download`` finds it at the root's depth too),
name its URL in their CRL distribution point.

Revocation reasons: :func:`revocation_reason` is what may enter as the reason of a revocation.
``removeFromCRL`` is not one (RFC 5280 5.3.1: it appears only in a delta CRL, for a certificate
taken off hold), and neither is ``certificateHold``: this CA has no way to release a hold, so a
hold would be a revocation that claims to be temporary.

Entry extensions: ``reasonCode`` when a reason is known. ``unspecified`` is written as no reason
code (RFC 5280 5.3.1: the extension "SHOULD be absent instead of using the unspecified (0)
reasonCode value"), and ``removeFromCRL`` is only allowed in a delta CRL.

Speed: ``CertificateRevocationListBuilder.add_revoked_certificate`` returns a new builder holding a
*copy* of the list, so adding n entries one by one costs O(n^2) (measured with cryptography 50:
0.25 s of copying for 16,000 entries, 4x for every doubling). The builder's constructor takes the
finished list of ``RevokedCertificate`` objects (a public keyword argument of its ``__init__``),
so :func:`build_crl` builds the entries first and hands them over once: 16,000 entries build and
sign in about 0.1 s, almost all of it in ``RevokedCertificateBuilder``.

Size: with 159-bit serials (20 octets, what ``x509.random_serial_number`` gives), an entry is 39
bytes without a reason code and 53 bytes with one (UTCTime; a GeneralizedTime revocation date
after 2049 adds 2). :func:`max_entries_for` uses the worst case, 55 bytes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509

from iotdlm.errors import BadRequestError
from iotdlm.pki.ca import IssuingCA, PublicUrls

#: RFC 5280 reason names (the values of x509.ReasonFlags), in the CRLReason ENUMERATED order
REASONS: tuple[str, ...] = (
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "removeFromCRL",
    "privilegeWithdrawn",
    "aACompromise",
)

#: worst-case DER bytes of one revokedCertificates entry: 20-octet serial (22), GeneralizedTime
#: (17), reasonCode extension (14), SEQUENCE header (2). Measured 53 with UTCTime.
ENTRY_BYTES_MAX = 55
#: bytes of a CRL besides its entries, with room to spare: issuer name, times, extensions with two
#: URLs, the signature and the length headers. Measured for an empty full CRL: 380 (Ed25519) to
#: 720 bytes (RSA-3072) with a short base URL, 1,125 bytes for RSA-3072 and a 200-character host.
CRL_OVERHEAD_BYTES = 2048

_BY_NAME: dict[str, x509.ReasonFlags] = {}
for _flag in x509.ReasonFlags:
    _BY_NAME[_flag.value.lower()] = _flag
    _BY_NAME[_flag.name.lower()] = _flag
if {f.value for f in x509.ReasonFlags} != set(REASONS):  # cryptography grew a reason we do not know
    raise RuntimeError("x509.ReasonFlags and crl.REASONS differ")

#: one CRLReason object per reason, shared by all entries (saves building 16,000 of them)
_REASON_EXT: dict[x509.ReasonFlags, x509.CRLReason] = {f: x509.CRLReason(f) for f in x509.ReasonFlags}


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: dt.datetime  # tz-aware
    reason: str | None  # one of REASONS (or its snake_case name); None: no reasonCode


def parse_reason(name: str) -> x509.ReasonFlags:
    """An RFC 5280 reason name (``keyCompromise``) or its snake_case form (``key_compromise``),
    case-insensitive, as :class:`x509.ReasonFlags`; anything else is a BadRequestError."""
    flag = _BY_NAME.get(name.strip().lower()) if isinstance(name, str) else None
    if flag is None:
        raise BadRequestError(
            f"unknown revocation reason {name!r}; valid reasons: {', '.join(REASONS)}", field="reason"
        )
    return flag


#: reasons a revocation may not be given (see the module docstring)
_NOT_FOR_REVOCATION: dict[x509.ReasonFlags, str] = {
    x509.ReasonFlags.remove_from_crl: (
        "removeFromCRL is not a revocation reason: RFC 5280 5.3.1 allows it only in a delta CRL, for a "
        "certificate taken off hold"
    ),
    x509.ReasonFlags.certificate_hold: (
        "certificateHold is not supported: this CA cannot release a hold, so revoke for good with "
        "another reason (e.g. keyCompromise, cessationOfOperation)"
    ),
}


def revocation_reason(name: str | None) -> str | None:
    """The RFC 5280 name of a reason given for a revocation (``None`` for none or
    ``unspecified``, written as no reasonCode). Unknown names, ``removeFromCRL`` and
    ``certificateHold`` are BadRequestErrors that say why."""
    if name is None:
        return None
    flag = parse_reason(name)
    refusal = _NOT_FOR_REVOCATION.get(flag)
    if refusal is not None:
        raise BadRequestError(refusal, field="reason")
    return None if flag is x509.ReasonFlags.unspecified else flag.value


def _utc(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value.astimezone(dt.UTC)


def _crl_extension_reason(reason: str | None, *, delta: bool) -> x509.CRLReason | None:
    if reason is None:
        return None
    flag = parse_reason(reason)
    if flag is x509.ReasonFlags.unspecified:
        return None
    if flag is x509.ReasonFlags.remove_from_crl and not delta:
        raise ValueError("removeFromCRL may appear only in a delta CRL (RFC 5280 5.3.1)")
    return _REASON_EXT[flag]


def _idp(url: str, *, ca_certs: bool = False) -> x509.IssuingDistributionPoint:
    return x509.IssuingDistributionPoint(
        # the root's CRL names no distribution point: see the module docstring
        full_name=None if ca_certs else [x509.UniformResourceIdentifier(url)],
        relative_name=None,
        only_contains_user_certs=not ca_certs,
        only_contains_ca_certs=ca_certs,
        only_some_reasons=None,
        indirect_crl=False,
        only_contains_attribute_certs=False,
    )


def build_crl(
    ca: IssuingCA,
    entries: Iterable[RevokedEntry],
    *,
    number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
    partition: int,
    urls: PublicUrls,
    delta_base: int | None = None,
    ca_certs: bool = False,
) -> x509.CertificateRevocationList:
    """Sign the full CRL (``delta_base`` None) or the delta CRL against base CRL ``delta_base``
    of ``partition`` of ``ca``; with ``ca_certs`` the root's CRL of CA certificates (one full CRL,
    partition 0, no delta). Entries are written in serial order; a serial listed twice, naive
    datetimes, or numbers out of range are caller bugs (ValueError)."""
    this_update = _utc(this_update, "this_update")
    next_update = _utc(next_update, "next_update")
    if next_update <= this_update:
        raise ValueError("next_update must be after this_update")
    if not 0 <= number < 1 << 159:  # cRLNumber: non-negative, at most 20 octets
        raise ValueError(f"CRL number {number} out of range")
    if not 0 <= partition < urls.crl_partitions:
        raise ValueError(f"partition {partition} out of range 0..{urls.crl_partitions - 1}")
    delta = delta_base is not None
    if ca_certs and (delta or partition != 0):
        raise ValueError("the CRL of CA certificates is one full CRL: partition 0, no delta")
    if delta_base is not None and not 0 <= delta_base < number:
        raise ValueError(f"delta base CRL number {delta_base} must be below this CRL's number {number}")

    revoked: list[x509.RevokedCertificate] = []
    seen: set[int] = set()
    for entry in sorted(entries, key=lambda e: e.serial):
        if entry.serial in seen:
            raise ValueError(f"serial {entry.serial:x} listed twice")
        seen.add(entry.serial)
        rb = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(_utc(entry.revoked_at, "revoked_at"))
        )
        ext = _crl_extension_reason(entry.reason, delta=delta)
        if ext is not None:
            rb = rb.add_extension(ext, critical=False)
        revoked.append(rb.build())

    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    # One constructor call hands over the whole list instead of n add_revoked_certificate() copies
    # (see the module docstring); the setters below pass the list on without copying it.
    builder = (
        x509.CertificateRevocationListBuilder(revoked_certificates=revoked)
        .issuer_name(ca.certificate.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(_idp(urls.crl(ca.name, partition), ca_certs=ca_certs), critical=True)
    )
    if delta_base is not None:
        builder = builder.add_extension(x509.DeltaCRLIndicator(delta_base), critical=True)
    elif not ca_certs:
        freshest = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(urls.crl(ca.name, partition, delta=True))],
            relative_name=None,
            reasons=None,
            crl_issuer=None,
        )
        builder = builder.add_extension(x509.FreshestCRL([freshest]), critical=False)
    return ca.signer.sign_crl(builder)


def max_entries_for(size_limit: int = 1 << 20) -> int:
    """How many entries surely fit in a CRL of at most ``size_limit`` DER bytes (worst case:
    20-octet serials, reason codes, GeneralizedTime; see the module docstring)."""
    return max(0, (size_limit - CRL_OVERHEAD_BYTES) // ENTRY_BYTES_MAX)
