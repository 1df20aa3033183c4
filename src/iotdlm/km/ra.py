"""Registration authority: who may ask for which certificate. Deny by default.

Rules (each is a small function; the first that matches decides, none matching is a refusal):

1. **pm provisioning** -- a pm (its service certificate names its dtype) may request a *factory*
   or *operational* certificate for a device of its own dtype, with CSR/CRMF signature POP or with
   CRMF ``raVerified`` (pm vouches that it holds the device: the paper's Fig. 5). Req.4: "the CA
   shall issue certificates for devices only through an authorized entity".
2. **device renewal** -- a device holding a valid, current *operational* certificate may re-key
   it for itself (new key, signature POP only).
3. **operator** -- the admin identity (operator tools) may request any profile, signature POP
   only (a raVerified stamp is pm's alone).
4. **operator renewal** -- the admin identity may renew a valid certificate of a renewable
   profile for the same device and profile, with the same key or a new one (signature POP); the
   old certificate is superseded.

Every grant is also held to the profile's name rule, if the operator set one
(``device_id_pattern``, :mod:`iotdlm.pki.profile_config`).

Authorizing returns a :class:`Grant`: the constraints the CA applies (profile, device id, dtype,
validity cap). The CA never takes subject or extensions from the request itself.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from iotdlm.errors import ConflictError, NotAuthorizedError
from iotdlm.pki.profiles import DEVICE_PROFILES

Pop = Literal["signature", "ra_verified", "server_generated"]
Operation = Literal["issue", "renew", "est_enroll", "est_reenroll"]


@dataclass(frozen=True)
class ModulePrincipal:
    module: str  # km, pm, sm, cm, admin
    dtype: str | None
    fingerprint: str

    def describe(self) -> str:
        return f"{self.module}[{self.dtype}]" if self.dtype else self.module


@dataclass(frozen=True)
class DevicePrincipal:
    device_id: str
    profile: str  # profile of the certificate it authenticated with
    status: str  # status of that certificate in the store
    serial: int
    issuer: str
    fingerprint: str

    def describe(self) -> str:
        return f"device {self.device_id}"


Principal = ModulePrincipal | DevicePrincipal


@dataclass(frozen=True)
class DeviceState:
    """What the store knows of the target device (None fields: not registered yet)."""

    dtype: str | None
    status: str | None  # active, retired


@dataclass(frozen=True)
class PresentedCredential:
    """The certificate a device authenticated with at cm's TLS edge, as km checked it itself."""

    profile: str  # factory | operational
    device_id: str
    status: str  # valid | revoked | superseded (from km's store)
    issuer: str
    serial: int


@dataclass(frozen=True)
class CertRequestFacts:
    operation: Operation
    profile: str
    device_id: str
    pop: Pop
    device: DeviceState
    presented: PresentedCredential | None = None
    #: the certificate a renewal replaces, as km's store knows it (operator renewal)
    replaces: PresentedCredential | None = None
    #: whether the profile asked for may be renewed (:attr:`iotdlm.pki.profiles.Profile.renewable`)
    renewable: bool = False


@dataclass(frozen=True)
class Grant:
    profile: str
    device_id: str
    dtype: str | None
    validity: dt.timedelta | None
    rule: str
    #: the certificate this request replaces (renewal): (issuer, serial)
    supersedes: tuple[str, int] | None = None


Rule = Callable[[Principal, CertRequestFacts], Grant | None]


def _check_device_usable(facts: CertRequestFacts) -> None:
    if facts.device.status == "retired":
        raise ConflictError(
            f"device {facts.device_id} is decommissioned; it cannot obtain certificates",
            device_id=facts.device_id,
        )


def rule_pm_provisioning(p: Principal, f: CertRequestFacts) -> Grant | None:
    if not isinstance(p, ModulePrincipal) or p.module != "pm" or f.operation != "issue":
        return None
    if p.dtype is None:
        raise NotAuthorizedError("this pm certificate names no dtype; pm identities are per device type")
    if f.profile not in DEVICE_PROFILES:
        raise NotAuthorizedError(
            f"pm may request only {', '.join(DEVICE_PROFILES)} certificates, not {f.profile!r}", field="profile"
        )
    if f.device.dtype is not None and f.device.dtype != p.dtype:
        raise NotAuthorizedError(
            f"device {f.device_id} is of dtype {f.device.dtype}; pm[{p.dtype}] may not request for it",
            device_id=f.device_id,
        )
    _check_device_usable(f)
    return Grant(profile=f.profile, device_id=f.device_id, dtype=p.dtype, validity=None, rule="pm-provisioning")


def rule_device_renewal(p: Principal, f: CertRequestFacts) -> Grant | None:
    if not isinstance(p, DevicePrincipal) or f.operation != "renew":
        return None
    if f.pop != "signature":
        raise NotAuthorizedError("a device must prove possession of its new key by signing the request")
    if p.profile != "operational":
        raise NotAuthorizedError(
            f"only an operational certificate can be renewed by its holder (this one is {p.profile})"
        )
    if p.status != "valid":
        raise NotAuthorizedError(f"the current certificate of device {p.device_id} is {p.status}; it cannot renew")
    if f.device_id != p.device_id:
        raise NotAuthorizedError(f"device {p.device_id} may renew only its own certificate", device_id=f.device_id)
    _check_device_usable(f)
    return Grant(
        profile="operational",
        device_id=p.device_id,
        dtype=f.device.dtype,
        validity=None,
        rule="device-renewal",
        supersedes=(p.issuer, p.serial),
    )


def rule_operator(p: Principal, f: CertRequestFacts) -> Grant | None:
    if not isinstance(p, ModulePrincipal) or p.module != "admin" or f.operation != "issue":
        return None
    if f.pop != "signature":
        raise NotAuthorizedError("raVerified proof of possession is accepted only in requests signed by pm")
    _check_device_usable(f)
    return Grant(profile=f.profile, device_id=f.device_id, dtype=f.device.dtype, validity=None, rule="operator")


def rule_operator_renewal(p: Principal, f: CertRequestFacts) -> Grant | None:
    """The operator renews a certificate (``iotdlm ca renew``): same device, same profile; the
    old certificate must be valid and is superseded (it stays good for the superseded grace)."""
    if not isinstance(p, ModulePrincipal) or p.module != "admin" or f.operation != "renew":
        return None
    old = f.replaces
    if old is None:
        raise NotAuthorizedError("a renewal names the certificate it replaces")
    if f.pop != "signature":
        raise NotAuthorizedError("a new key must be proven by the signature of its request")
    if old.status != "valid":
        raise NotAuthorizedError(f"certificate {old.serial:x} is {old.status}; only a valid certificate is renewed")
    if (old.profile, old.device_id) != (f.profile, f.device_id):
        raise NotAuthorizedError("a renewal keeps the device and profile of the certificate it replaces")
    if not f.renewable:
        raise NotAuthorizedError(
            f"{f.profile} certificates are not renewable; issue a new one with `iotdlm ca issue --force`",
            field="profile",
        )
    _check_device_usable(f)
    return Grant(
        profile=f.profile,
        device_id=f.device_id,
        dtype=f.device.dtype,
        validity=None,
        rule="operator-renewal",
        supersedes=(old.issuer, old.serial),
    )


def rule_est_enrollment(p: Principal, f: CertRequestFacts) -> Grant | None:
    """EST through cm (RFC 7030; seed 003 VI-C and VI-D): a device that authenticated with its
    registered factory certificate enrolls for an operational certificate; one holding a valid
    operational certificate re-enrolls (the old one is superseded)."""
    if not isinstance(p, ModulePrincipal) or p.module != "cm" or f.operation not in ("est_enroll", "est_reenroll"):
        return None
    cred = f.presented
    if cred is None:
        raise NotAuthorizedError("EST enrollment needs the client certificate the device presented")
    if f.profile != "operational":
        raise NotAuthorizedError(f"EST issues operational certificates, not {f.profile!r}", field="profile")
    if cred.device_id != f.device_id:
        raise NotAuthorizedError(f"the client certificate names device {cred.device_id}, not {f.device_id}")
    wanted = "factory" if f.operation == "est_enroll" else "operational"
    if cred.profile != wanted:
        verb = "enroll" if f.operation == "est_enroll" else "re-enroll"
        raise NotAuthorizedError(f"to {verb}, a device authenticates with its {wanted} certificate, not {cred.profile}")
    if cred.status != "valid":
        raise NotAuthorizedError(f"the {cred.profile} certificate of device {cred.device_id} is {cred.status}")
    _check_device_usable(f)
    return Grant(
        profile="operational",
        device_id=f.device_id,
        dtype=f.device.dtype,
        validity=None,
        rule="est-" + ("enroll" if f.operation == "est_enroll" else "reenroll"),
        supersedes=(cred.issuer, cred.serial) if f.operation == "est_reenroll" else None,
    )


DEFAULT_RULES: tuple[Rule, ...] = (
    rule_pm_provisioning,
    rule_device_renewal,
    rule_est_enrollment,
    rule_operator,
    rule_operator_renewal,
)


class Authorizer:
    def __init__(
        self, rules: tuple[Rule, ...] = DEFAULT_RULES, *, name_rules: Mapping[str, re.Pattern[str]] | None = None
    ) -> None:
        """``name_rules``: per profile, the pattern every device id of that profile must match in
        full (``device_id_pattern`` in iotdlm.toml), whichever rule grants the request."""
        self._rules = rules
        self._name_rules = dict(name_rules or {})

    def authorize(self, principal: Principal, facts: CertRequestFacts) -> Grant:
        """Return the grant of the first rule that allows the request; raise NotAuthorizedError otherwise."""
        if facts.pop == "server_generated" and facts.operation not in ("est_enroll", "est_reenroll"):
            raise NotAuthorizedError("server-generated keys are only for EST serverkeygen")
        if facts.pop == "ra_verified" and not (isinstance(principal, ModulePrincipal) and principal.module == "pm"):
            raise NotAuthorizedError(
                f"raVerified proof of possession is accepted only in requests signed by pm, not by "
                f"{principal.describe()}",
                device_id=facts.device_id,
            )
        for rule in self._rules:
            grant = rule(principal, facts)
            if grant is not None:
                self._check_name(grant)
                return grant
        raise NotAuthorizedError(
            f"{principal.describe()} may not {facts.operation} {facts.profile} certificates for "
            f"device {facts.device_id}",
            device_id=facts.device_id,
        )

    def _check_name(self, grant: Grant) -> None:
        pattern = self._name_rules.get(grant.profile)
        if pattern is not None and pattern.fullmatch(grant.device_id) is None:
            raise NotAuthorizedError(
                f"device id {grant.device_id!r} does not match the {grant.profile} profile's name rule "
                f"({pattern.pattern}, device_id_pattern in iotdlm.toml)",
                field="device_id",
                device_id=grant.device_id,
            )


def authorize_revocation(principal: Principal) -> None:
    """Revocation and decommissioning are the operator's (the admin identity). Deny by default."""
    if isinstance(principal, ModulePrincipal) and principal.module == "admin":
        return
    raise NotAuthorizedError(f"{principal.describe()} may not revoke certificates; only the operator may")
