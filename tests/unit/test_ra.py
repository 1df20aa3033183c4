"""The RA's rules, table-driven: deny by default, and each allowance exactly as wide as intended."""

from __future__ import annotations

import pytest

from iotdlm.errors import ConflictError, NotAuthorizedError
from iotdlm.km.ra import (
    Authorizer,
    CertRequestFacts,
    DevicePrincipal,
    DeviceState,
    ModulePrincipal,
    PresentedCredential,
)

PM_A = ModulePrincipal("pm", "boardA", "fp-pm-a")
PM_NODTYPE = ModulePrincipal("pm", None, "fp-pm")
CM = ModulePrincipal("cm", None, "fp-cm")
SM = ModulePrincipal("sm", None, "fp-sm")
ADMIN = ModulePrincipal("admin", None, "fp-admin")
DEV1 = DevicePrincipal("dev-1", "operational", "valid", 1, "operational", "fp-d1")
DEV1_FACTORY = DevicePrincipal("dev-1", "factory", "valid", 2, "factory", "fp-d1f")
DEV1_REVOKED = DevicePrincipal("dev-1", "operational", "revoked", 3, "operational", "fp-d1r")

NEW = DeviceState(None, None)
A = DeviceState("boardA", "active")
B = DeviceState("boardB", "active")
RETIRED = DeviceState("boardA", "retired")


FACTORY_OK = PresentedCredential("factory", "dev-1", "valid", "factory", 10)
FACTORY_REVOKED = PresentedCredential("factory", "dev-1", "revoked", "factory", 11)
OPERATIONAL_OK = PresentedCredential("operational", "dev-1", "valid", "operational", 12)


def facts(op="issue", profile="operational", device="dev-1", pop="signature", state=NEW, presented=None):
    return CertRequestFacts(operation=op, profile=profile, device_id=device, pop=pop, device=state, presented=presented)


ALLOWED = [
    ("pm-factory-csr", PM_A, facts(profile="factory"), "pm-provisioning"),
    ("pm-operational-raverified", PM_A, facts(pop="ra_verified"), "pm-provisioning"),
    ("pm-known-device-same-dtype", PM_A, facts(state=A), "pm-provisioning"),
    ("device-renews-own", DEV1, facts(op="renew", state=A), "device-renewal"),
    ("operator-service-cert", ADMIN, facts(profile="service"), "operator"),
    ("est-enroll-factory", CM, facts(op="est_enroll", presented=FACTORY_OK), "est-enroll"),
    ("est-serverkeygen", CM, facts(op="est_enroll", pop="server_generated", presented=FACTORY_OK), "est-enroll"),
    ("est-reenroll-operational", CM, facts(op="est_reenroll", presented=OPERATIONAL_OK), "est-reenroll"),
]

DENIED = [
    ("pm-other-dtype", PM_A, facts(state=B), NotAuthorizedError),
    ("pm-without-dtype", PM_NODTYPE, facts(), NotAuthorizedError),
    ("pm-service-profile", PM_A, facts(profile="service"), NotAuthorizedError),
    ("pm-renew", PM_A, facts(op="renew"), NotAuthorizedError),
    ("pm-retired-device", PM_A, facts(state=RETIRED), ConflictError),
    ("cm-issue", CM, facts(), NotAuthorizedError),
    ("sm-issue", SM, facts(), NotAuthorizedError),
    ("cm-raverified", CM, facts(pop="ra_verified"), NotAuthorizedError),
    ("admin-raverified", ADMIN, facts(pop="ra_verified"), NotAuthorizedError),
    ("device-issue-new", DEV1, facts(op="issue"), NotAuthorizedError),
    ("device-renew-other", DEV1, facts(op="renew", device="dev-2"), NotAuthorizedError),
    ("device-renew-with-factory-cert", DEV1_FACTORY, facts(op="renew"), NotAuthorizedError),
    ("device-renew-revoked", DEV1_REVOKED, facts(op="renew"), NotAuthorizedError),
    ("device-raverified", DEV1, facts(op="renew", pop="ra_verified"), NotAuthorizedError),
    ("device-retired", DEV1, facts(op="renew", state=RETIRED), ConflictError),
    ("est-without-credential", CM, facts(op="est_enroll"), NotAuthorizedError),
    ("est-revoked-factory", CM, facts(op="est_enroll", presented=FACTORY_REVOKED), NotAuthorizedError),
    ("est-reenroll-with-factory", CM, facts(op="est_reenroll", presented=FACTORY_OK), NotAuthorizedError),
    ("est-enroll-with-operational", CM, facts(op="est_enroll", presented=OPERATIONAL_OK), NotAuthorizedError),
    ("est-other-device", CM, facts(op="est_enroll", device="dev-2", presented=FACTORY_OK), NotAuthorizedError),
    ("est-factory-profile", CM, facts(op="est_enroll", profile="factory", presented=FACTORY_OK), NotAuthorizedError),
    ("est-retired", CM, facts(op="est_enroll", state=RETIRED, presented=FACTORY_OK), ConflictError),
    ("est-by-pm", PM_A, facts(op="est_enroll", presented=FACTORY_OK), NotAuthorizedError),
    ("serverkeygen-outside-est", ADMIN, facts(pop="server_generated"), NotAuthorizedError),
]


@pytest.mark.parametrize(("name", "principal", "f", "rule"), ALLOWED, ids=[c[0] for c in ALLOWED])
def test_allowed(name: str, principal, f: CertRequestFacts, rule: str) -> None:
    grant = Authorizer().authorize(principal, f)
    assert grant.rule == rule
    assert grant.device_id == f.device_id
    if rule == "pm-provisioning":
        assert grant.dtype == "boardA"
    if rule == "device-renewal":
        assert grant.supersedes == (DEV1.issuer, DEV1.serial)
        assert grant.profile == "operational"


@pytest.mark.parametrize(("name", "principal", "f", "error"), DENIED, ids=[c[0] for c in DENIED])
def test_denied(name: str, principal, f: CertRequestFacts, error: type[Exception]) -> None:
    with pytest.raises(error):
        Authorizer().authorize(principal, f)


def test_no_rules_denies_everything() -> None:
    with pytest.raises(NotAuthorizedError):
        Authorizer(rules=()).authorize(ADMIN, facts(profile="service"))
