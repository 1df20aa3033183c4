"""Building CA certificates and issuing end-entity certificates (pure: no I/O).

RFC 5280 points we hold to: positive random serials of at most 20 octets (159 random bits here,
well over the 64 bits required), SKI on every certificate and AKI on every non-root one, critical
basicConstraints and keyUsage on CAs, UTCTime up to 2049 and GeneralizedTime after (cryptography
chooses the encoding by date), and no end-entity certificate outliving its issuer.

Revocation pointers: issuing CA certificates name the root's CRL (CRL distribution point) and the
root's certificate (AIA caIssuers); end-entity certificates name the OCSP responder, their issuing
CA's certificate (AIA caIssuers) and their CRL partition. Issuing CAs carry the certificate
policies of what they issue (``openssl verify -explicit_policy``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID, NameOID, ObjectIdentifier

from iotdlm.errors import NotFoundError
from iotdlm.pki.keys import PublicKey, Signer
from iotdlm.pki.profiles import KeyUsageSpec, Profile, key_usage_for
from iotdlm.pki.rotation import Generation

#: how far back a new certificate's notBefore is set, for devices whose clocks lag
BACKDATE = dt.timedelta(minutes=1)


def ca_name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _ca_extensions(
    builder: x509.CertificateBuilder, public_key: PublicKey, path_length: int | None
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            key_usage_for(KeyUsageSpec(key_cert_sign=True, crl_sign=True), public_key).extension(), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_root(
    signer: Signer,
    subject: x509.Name,
    *,
    now: dt.datetime,
    validity: dt.timedelta,
    urls: PublicUrls | None = None,
) -> x509.Certificate:
    """The self-signed root. With ``urls`` it names its own CRL as its distribution point: a
    relying party that checks every certificate of the chain (``openssl verify -crl_check_all``)
    checks the root too, against the root's CRL, and can only fetch that CRL (``-crl_download``)
    from a URL the root names."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(signer.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
    )
    builder = _ca_extensions(builder, signer.public_key, path_length=1)
    if urls is not None:
        builder = builder.add_extension(_distribution_point(urls.root_crl()), critical=False)
    return signer.sign_certificate(builder)


def make_intermediate(
    parent_signer: Signer,
    parent_cert: x509.Certificate,
    public_key: PublicKey,
    subject: x509.Name,
    *,
    now: dt.datetime,
    validity: dt.timedelta,
    urls: PublicUrls | None = None,
    policies: Sequence[ObjectIdentifier] = (),
) -> x509.Certificate:
    """An issuing CA under the root: with ``urls``, CDP = the root's CRL and AIA caIssuers = the
    root's certificate; ``policies`` are the certificate policies of what it will issue."""
    not_after = min(now + validity, parent_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(parent_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(parent_signer.public_key), critical=False)
    )
    builder = _ca_extensions(builder, public_key, path_length=0)
    if policies:
        builder = builder.add_extension(
            x509.CertificatePolicies([x509.PolicyInformation(p, None) for p in policies]), critical=False
        )
    if urls is not None:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess([_ca_issuers(urls.ca_issuers("root"))]), critical=False
        ).add_extension(_distribution_point(urls.root_crl()), critical=False)
    return parent_signer.sign_certificate(builder)


def _ca_issuers(url: str) -> x509.AccessDescription:
    return x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(url))


def _distribution_point(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)], relative_name=None, reasons=None, crl_issuer=None
            )
        ]
    )


_Extensions = tuple[x509.Extension[x509.ExtensionType], ...]
#: entries kept by :meth:`IssuingCA._fixed_extensions` (profiles x key types x CRL partitions)
_EXTENSIONS_CACHE_MAX = 4096


def _naive_utc(t: dt.datetime) -> dt.datetime:
    """What cryptography's builder keeps of a time (as its ``not_valid_before`` setter does)."""
    return t.astimezone(dt.UTC).replace(tzinfo=None) if t.tzinfo is not None else t


def crl_partition(serial: int, partitions: int) -> int:
    """The CRL partition a certificate belongs to, fixed at issuance (its CRL distribution point).

    Partitioned CRLs (RFC 5280 5.2.5, issuing distribution point) keep every CRL small however
    many certificates are revoked: a relying party fetches only the partition named in the
    certificate it checks.
    """
    return serial % partitions


@dataclass(frozen=True)
class PublicUrls:
    """Where relying parties fetch revocation data and CA certificates (AIA OCSP and caIssuers,
    CRL distribution points); cm serves these paths."""

    base: str  # e.g. "http://127.0.0.1:8080" -- cm serves these paths
    crl_partitions: int = 64

    def ocsp(self) -> str:
        return f"{self.base.rstrip('/')}/ocsp"

    def crl(self, issuer: str, partition: int, *, delta: bool = False) -> str:
        kind = "delta" if delta else "crl"
        return f"{self.base.rstrip('/')}/crl/{issuer}/{partition}.{kind}"

    def root_crl(self) -> str:
        """The root CA's CRL (one partition): it lists revoked issuing CAs."""
        return self.crl("root", 0)

    def ca_issuers(self, name: str) -> str:
        """A CA's certificate, DER (AIA caIssuers, RFC 5280 4.2.2.1)."""
        return f"{self.base.rstrip('/')}/ca/{name}.crt"


@dataclass
class IssuingCA:
    """An issuing CA: its certificate, its signer and the chain up to (and including) the root."""

    name: str
    certificate: x509.Certificate
    signer: Signer
    chain: tuple[x509.Certificate, ...]  # [this CA, ..., root]
    #: which generation of its role it is (:mod:`iotdlm.pki.rotation`); None: generation 1, active
    generation: Generation | None = None
    _aki: x509.AuthorityKeyIdentifier = field(init=False, repr=False)
    _subject: x509.Name = field(init=False, repr=False, compare=False)
    _not_after: dt.datetime = field(init=False, repr=False, compare=False)
    _extensions_cache: dict[tuple[object, ...], tuple[_Extensions, _Extensions, _Extensions]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        self._subject = self.certificate.subject  # read from the certificate once, not per issuance
        self._not_after = self.certificate.not_valid_after_utc

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1]

    @property
    def role(self) -> str:
        """What profiles name as their issuer: ``operational`` for every generation of it."""
        return self.generation.role if self.generation is not None else self.name

    @property
    def active(self) -> bool:
        """Whether it issues its role's certificates (not rotated out)."""
        return self.generation is None or self.generation.active

    def in_cacerts(self, now: dt.datetime) -> bool:
        """Whether EST ``/cacerts`` lists it: active, or rotated out and still in its overlap."""
        return self.generation is None or self.generation.in_cacerts(now)

    def issue(
        self,
        profile: Profile,
        public_key: PublicKey,
        subject: x509.Name,
        *,
        now: dt.datetime,
        serial: int,
        uris: Sequence[str] = (),
        general_names: Sequence[x509.GeneralName] = (),
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[object] = (),
        urls: PublicUrls | None = None,
        validity: dt.timedelta | None = None,
    ) -> x509.Certificate:
        """Sign an end-entity certificate for ``public_key`` under ``profile``.

        Validity is the profile's (or the shorter ``validity`` an authorizer chose), cut at the
        issuer's own notAfter.
        """
        if profile.issuer not in (self.name, self.role):
            raise ValueError(f"profile {profile.name} is issued by {profile.issuer}, not {self.name}")
        life = profile.validity if validity is None else min(validity, profile.validity)
        not_after = min(now + life, self._not_after)
        not_before = now - BACKDATE
        if not_after <= not_before:
            raise ValueError(
                f"the {self.name} CA's certificate expired on {not_after:%Y-%m-%d}: it can sign nothing valid"
            )
        if not 0 < serial < 1 << 159:
            raise ValueError("a certificate's serial number is a positive integer of at most 159 bits")
        head, middle, tail = self._fixed_extensions(profile, public_key, serial, urls)
        ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
        extensions = [*head, x509.Extension(ski.oid, False, ski), *middle]
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        san += general_names
        san += [x509.DNSName(d) for d in dns_names]
        san += [x509.IPAddress(ip) for ip in ip_addresses]  # type: ignore[arg-type]
        if san:
            extensions.append(
                x509.Extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False, x509.SubjectAlternativeName(san))
            )
        extensions += tail
        # the builder made in one call (cryptography's public constructor) with extension objects
        # made once per profile and partition: a third of the CPU of building it step by step, where
        # every add_extension copies the list and compares it with the ones before (issue 15). The
        # checks the step-by-step setters make are the ones above; the times are naive UTC as theirs.
        builder = x509.CertificateBuilder(
            issuer_name=self._subject,
            subject_name=subject,
            public_key=public_key,
            serial_number=serial,
            not_valid_before=_naive_utc(not_before),
            not_valid_after=_naive_utc(not_after),
            extensions=extensions,
        )
        return self.signer.sign_certificate(builder)

    def _fixed_extensions(
        self, profile: Profile, public_key: PublicKey, serial: int, urls: PublicUrls | None
    ) -> tuple[_Extensions, _Extensions, _Extensions]:
        """The extensions of ``profile``'s certificates that depend only on the profile, the key's
        type and the CRL partition -- those written before the subject key identifier, between it
        and the subject alternative name, and after that -- made once and kept."""
        pointers = urls if urls is not None and profile.with_revocation_pointers else None
        partition = crl_partition(serial, pointers.crl_partitions) if pointers is not None else None
        key = (profile, type(public_key), pointers, partition)
        fixed = self._extensions_cache.get(key)
        if fixed is None:
            fixed = self._make_fixed_extensions(profile, public_key, pointers, partition)
            if len(self._extensions_cache) >= _EXTENSIONS_CACHE_MAX:
                self._extensions_cache.clear()
            self._extensions_cache[key] = fixed
        return fixed

    def _make_fixed_extensions(
        self, profile: Profile, public_key: PublicKey, urls: PublicUrls | None, partition: int | None
    ) -> tuple[_Extensions, _Extensions, _Extensions]:
        head: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (key_usage_for(profile.key_usage, public_key).extension(), True),
            (x509.ExtendedKeyUsage(list(profile.eku)), False),
        ]
        tail: list[tuple[x509.ExtensionType, bool]] = []
        if urls is not None and partition is not None:
            ocsp = x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(urls.ocsp())
            )
            # the partition's full CRL, and (RFC 5280 4.2.1.15) its delta: a relying party that
            # uses deltas sees a revocation at once, before the next full CRL
            tail += [
                (x509.AuthorityInformationAccess([ocsp, _ca_issuers(urls.ca_issuers(self.name))]), False),
                (_distribution_point(urls.crl(self.name, partition)), False),
                (x509.FreshestCRL(_distribution_point(urls.crl(self.name, partition, delta=True))), False),
            ]
        if profile.ocsp_no_check:
            tail.append((x509.OCSPNoCheck(), False))
        middle = [
            (self._aki, False),
            (x509.CertificatePolicies([x509.PolicyInformation(profile.policy_oid, None)]), False),
        ]
        return _extensions(head), _extensions(middle), _extensions(tail)


def _extensions(values: Sequence[tuple[x509.ExtensionType, bool]]) -> _Extensions:
    return tuple(x509.Extension(v.oid, critical, v) for v, critical in values)


def active_ca(cas: Mapping[str, IssuingCA], role: str) -> IssuingCA:
    """The generation of ``role`` that issues (after a rotation, not the CA named ``role``)."""
    for ca in cas.values():
        if ca.role == role and ca.active:
            return ca
    raise NotFoundError(f"no active {role[:40]} CA here; issuing CAs: {', '.join(sorted(cas))}", field="ca")


def cas_of(cas: Mapping[str, IssuingCA], roles: Sequence[str]) -> list[IssuingCA]:
    """Every generation of ``roles``, active or rotated out (certificates of both are checked)."""
    return [ca for ca in cas.values() if ca.role in roles]
