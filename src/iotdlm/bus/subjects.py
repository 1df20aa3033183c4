"""Versioned NATS subject names and the least-privilege permissions of each module.

Every subject starts with ``iotdlm.v1.``; a breaking change of a message bumps the version in the
subject, so old and new workers can run side by side during an upgrade.

Each module connects as its own NATS user. The permission table below is rendered into the
embedded nats-server configuration, so the *server* refuses anything outside it (NATS
authorization), not a convention in our code. Replies travel on a per-module inbox prefix
(``_INBOX.<module>.``), so a module can subscribe only to its own replies.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "iotdlm.v1"

# --- km: CA + RA + VA -------------------------------------------------------------------------
KM_ISSUE = f"{PREFIX}.km.certificate.issue"
KM_ISSUE_BATCH = f"{PREFIX}.km.certificate.issue_batch"
KM_RENEW = f"{PREFIX}.km.certificate.renew"
KM_GET = f"{PREFIX}.km.certificate.get"
KM_CHAIN = f"{PREFIX}.km.ca.chain"
KM_REVOKE = f"{PREFIX}.km.certificate.revoke"
KM_OCSP = f"{PREFIX}.km.va.ocsp"
KM_CRL = f"{PREFIX}.km.va.crl"
KM_EST = f"{PREFIX}.km.est"  # cm relays EST operations below this prefix
KM_EST_SIMPLEENROLL = f"{KM_EST}.simpleenroll"
KM_EST_SIMPLEREENROLL = f"{KM_EST}.simplereenroll"
KM_EST_SERVERKEYGEN = f"{KM_EST}.serverkeygen"
KM_REVOKED_EVENT = f"{PREFIX}.events.km.revoked"

# --- sm: software management ------------------------------------------------------------------
SM_PREFIX = f"{PREFIX}.sm"
SM_SOFTWARE_LIST = f"{PREFIX}.sm.software.list"
SM_SOFTWARE_LOAD = f"{PREFIX}.sm.software.load"

# --- cm: egress for sm ------------------------------------------------------------------------
CM_EGRESS = f"{PREFIX}.cm.egress"

# --- events (publish only, one branch per module) ---------------------------------------------
EVENTS = f"{PREFIX}.events"

MODULES = ("km", "pm", "sm", "cm", "admin")


#: Queue group used by every worker of one module, so N workers share one subject.
def queue_group(module: str) -> str:
    return f"iotdlm.{module}"


def inbox_prefix(module: str) -> str:
    """Reply-subject prefix for ``module``; its NATS user may subscribe only below it."""
    return f"_INBOX.{module}"


def events(module: str, name: str) -> str:
    return f"{EVENTS}.{module}.{name}"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    #: allow publishing a reply to whoever sent us a request (NATS ``allow_responses``)
    allow_responses: bool


def _inbox(module: str) -> str:
    return f"{inbox_prefix(module)}.>"


PERMISSIONS: dict[str, Permissions] = {
    "km": Permissions(
        publish=(f"{EVENTS}.km.>",),
        # km workers hear each other's revocations (to drop cached OCSP answers)
        subscribe=(f"{PREFIX}.km.>", _inbox("km"), f"{EVENTS}.km.>"),
        allow_responses=True,
    ),
    "pm": Permissions(
        publish=(KM_ISSUE, KM_ISSUE_BATCH, KM_CHAIN, f"{SM_PREFIX}.software.>", f"{EVENTS}.pm.>"),
        subscribe=(f"{PREFIX}.pm.>", _inbox("pm")),
        allow_responses=True,
    ),
    "sm": Permissions(
        publish=(f"{CM_EGRESS}.>", f"{EVENTS}.sm.>"),
        subscribe=(f"{SM_PREFIX}.>", _inbox("sm")),
        allow_responses=True,
    ),
    "cm": Permissions(
        publish=(KM_RENEW, f"{KM_EST}.>", f"{PREFIX}.km.va.>", KM_CHAIN, f"{EVENTS}.cm.>"),
        subscribe=(f"{CM_EGRESS}.>", _inbox("cm")),
        allow_responses=True,
    ),
    # the operator's tools (CLI, console): may ask anything, may listen to events
    "admin": Permissions(
        publish=(f"{PREFIX}.>",),
        subscribe=(_inbox("admin"), f"{EVENTS}.>"),
        allow_responses=False,
    ),
}
