"""Versioned NATS subject names and the least-privilege permissions of each module.

Every subject starts with ``iotdlm.v1.``; a breaking change of a message bumps the version in the
subject, so old and new workers can run side by side during an upgrade.

Each module connects as its own NATS user. The permission table below is rendered into the
embedded nats-server configuration, so the *server* refuses anything outside it (NATS
authorization), not a convention in our code. Replies travel on a per-module inbox prefix
(``_INBOX.<module>.``), so a module can subscribe only to its own replies.

JetStream (issue 11): no module is granted the JetStream API as a whole. A module is granted a
stream or bucket by listing, in its :class:`Permissions`, the exact API subjects its role needs on
that stream and nothing more: ``jetstream=`` for ``$JS.API.*`` / ``$JS.FC.*`` subjects (build them
with :func:`kv_read_api` / :func:`kv_admin_api` or a sibling helper for a plain stream), and
``publish=`` for the subjects it writes into the stream (``$KV.<bucket>.>`` for a bucket). Readers
get the read path only (info, direct/message get, ordered consumers); only the owner creates the
stream; nobody is granted update, delete, purge or message delete.
``tests/integration/test_jetstream_permissions_matrix.py`` checks every module against every verb
over the real nats-server: add a new stream's verbs there.
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
#: the external factory CAs registered for a trust transfer (cm accepts device client certificates
#: from them): cm asks km instead of reading km's database
KM_FACTORY_CAS = f"{PREFIX}.km.ca.factory_cas"
KM_REVOKE = f"{PREFIX}.km.certificate.revoke"
KM_OCSP = f"{PREFIX}.km.va.ocsp"
KM_CRL = f"{PREFIX}.km.va.crl"
KM_EST = f"{PREFIX}.km.est"  # cm relays EST operations below this prefix
KM_EST_SIMPLEENROLL = f"{KM_EST}.simpleenroll"
KM_EST_SIMPLEREENROLL = f"{KM_EST}.simplereenroll"
KM_EST_SERVERKEYGEN = f"{KM_EST}.serverkeygen"
KM_EST_NONCE = f"{KM_EST}.nonce"  # a device's proof nonce (ADR 0008); cm may publish: KM_EST.>
KM_REVOKED_EVENT = f"{PREFIX}.events.km.revoked"
#: the newest signed tree head of the audit log (JSON, iotdlm.wire.audit.TreeHead): cm serves it
#: read-only at /audit/checkpoint so an outside party can keep a copy
KM_AUDIT_CHECKPOINT = f"{PREFIX}.km.audit.checkpoint"
#: an RFC 9162 2.1.4 consistency proof between two sizes of the audit log (signed reply, ADR 0006):
#: cm serves it read-only at /audit/consistency for outside witnesses
KM_AUDIT_CONSISTENCY = f"{PREFIX}.km.audit.consistency"
#: provider to provider (issue 13, docs/adr/0011): cm relays what the peer provider sends over
#: HTTPS to the transfer handlers where the store is (served by km's workers)
KM_TRANSFER_PEER = f"{PREFIX}.km.transfer.peer"
KM_TRANSFER_PEER_UPDATE_INFO = f"{KM_TRANSFER_PEER}.update_info"
KM_TRANSFER_PEER_TRANSFER_MESSAGE = f"{KM_TRANSFER_PEER}.transfer_message"
KM_TRANSFER_PEER_CONFIRMATION = f"{KM_TRANSFER_PEER}.confirmation"
#: the device-facing trust-transfer routes cm relays (issue 13): a device's transfer message and its
#: fallback report at SP1, the attestation challenge and evidence at SP2 (iotdlm.wire.transfer_device)
KM_TRANSFER_DEVICE = f"{PREFIX}.km.transfer.device"
KM_TRANSFER_MESSAGE = f"{KM_TRANSFER_DEVICE}.message"
KM_TRANSFER_FALLBACK = f"{KM_TRANSFER_DEVICE}.fallback"
KM_TRANSFER_CHALLENGE = f"{KM_TRANSFER_DEVICE}.challenge"
KM_TRANSFER_EVIDENCE = f"{KM_TRANSFER_DEVICE}.evidence"
KM_TRANSFER_UPDATE = f"{KM_TRANSFER_DEVICE}.update"
KM_TRANSFER_UPDATED = f"{KM_TRANSFER_DEVICE}.updated"
KM_TRANSFER_REFUSAL = f"{KM_TRANSFER_DEVICE}.refusal"

# --- the audit log's append-only anchor (JetStream) ----------------------------------------------
#: km publishes (JetStream publish with ack) every signed tree head it makes here: only km may
#: (admin's ``iotdlm.v1.>`` excepts it through ``deny_publish``)
AUDIT_TREE_HEAD = f"{PREFIX}.audit.tree-head"
#: the stream that keeps them: created by the supervisor with deny_delete, deny_purge, no max age,
#: file storage; nobody is granted STREAM.UPDATE (which could switch those off), DELETE, PURGE or
#: MSG.DELETE on it (docs/adr/0005-audit-anchors.md)
AUDIT_HEADS_STREAM = "IOTDLM_AUDIT_HEADS"

# --- sm: software management ------------------------------------------------------------------
SM_PREFIX = f"{PREFIX}.sm"
SM_SOFTWARE_LIST = f"{PREFIX}.sm.software.list"
SM_SOFTWARE_LOAD = f"{PREFIX}.sm.software.load"
#: read-only: every release sm holds, each verified again (Algorithm 1) -- the console's Software
#: page (ADR 0030); admin may ask it, but not ``SM_SOFTWARE_LOAD`` (that is pm's)
SM_SOFTWARE_HELD = f"{PREFIX}.sm.software.held"

# --- cm: egress for sm, liveness ---------------------------------------------------------------
CM_EGRESS = f"{PREFIX}.cm.egress"
#: cm answers it while it runs; pm asks it to refuse work while cm (the door to the outside) is up
CM_PING = f"{PREFIX}.cm.ping"

# --- every module: health and metrics (issue 14, docs/adr/0018) ---------------------------------
HEALTH = "health"
METRICS = "metrics"


def health_subject(module: str) -> str:
    """``iotdlm.v1.<module>.health``: any process of ``module`` answers (queue group); with
    ``.<pid>`` appended, that process alone. JSON :class:`iotdlm.wire.health.Health`."""
    return f"{PREFIX}.{module}.{HEALTH}"


def metrics_subject(module: str) -> str:
    """``iotdlm.v1.<module>.metrics`` (``.<pid>``: one process): its Prometheus text exposition."""
    return f"{PREFIX}.{module}.{METRICS}"


# --- modes: the supervisor (the paper's Table 1) ------------------------------------------------
MODES_PREFIX = f"{PREFIX}.modes"
#: switch the operation mode (admin only); the supervisor answers with what changed
MODES_SET = f"{MODES_PREFIX}.set"
#: the mode and each service's health
MODES_STATUS = f"{MODES_PREFIX}.status"
#: stop the supervisor and everything it runs (admin only; ``iotdlm down``)
MODES_STOP = f"{MODES_PREFIX}.stop"
#: stop and start again some services of the mode in force (admin only; ``iotdlm restart``)
MODES_RESTART = f"{MODES_PREFIX}.restart"
#: JetStream key-value bucket holding the current mode: key :data:`MODE_KEY`, a JWS
#: signed by the supervisor with body ``{"mode", "since", "by"}`` (:mod:`iotdlm.modes.signed`).
#: Only modes may write it; every module may read and watch it.
MODE_BUCKET = "iotdlm_mode"
MODE_KEY = "mode"
#: event name (``iotdlm.v1.events.<module>.mode_alarm``): a service refused a mode record it could
#: not verify as signed by the supervisor; the supervisor listens and audits it (issue 11)
MODE_ALARM = "mode_alarm"
#: the event name of a message refused because its signer's certificate (km's, the supervisor's)
#: is revoked; the supervisor audits it
SIGNER_ALARM = "signer_alarm"

# --- events (publish only, one branch per module) ---------------------------------------------
EVENTS = f"{PREFIX}.events"

MODULES = ("km", "pm", "sm", "cm", "admin")
#: the supervisor's own NATS user (not a row of Table 1, so not in :data:`MODULES`)
SUPERVISOR = "modes"


#: Queue group used by every worker of one module, so N workers share one subject.
def queue_group(module: str) -> str:
    return f"iotdlm.{module}"


def inbox_prefix(module: str) -> str:
    """Reply-subject prefix for ``module``; its NATS user may subscribe only below it."""
    return f"_INBOX.{module}"


def events(module: str, name: str) -> str:
    return f"{EVENTS}.{module}.{name}"


# --- JetStream key-value ----------------------------------------------------------------------
def kv_stream(bucket: str) -> str:
    """The JetStream stream behind key-value ``bucket``."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str = ">") -> str:
    """Publishing here writes ``key`` of ``bucket`` (``>``: every key): the write permission."""
    return f"$KV.{bucket}.{key}"


def kv_read_api(bucket: str) -> tuple[str, ...]:
    """JetStream API subjects a module publishes to read and watch ``bucket`` (nothing else)."""
    stream = kv_stream(bucket)
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        # a watch is an ordered consumer: created without a name (the server picks one), checked
        # and flow-controlled. Not deleted: it expires on its own (inactive_threshold) when its
        # reader goes. So no reader may delete, or create by name (an update: redirect), another
        # reader's consumer.
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.FC.{stream}.>",
    )


def kv_admin_api(bucket: str) -> tuple[str, ...]:
    """JetStream API subjects the owner of ``bucket`` also needs: creating its stream."""
    return (f"$JS.API.STREAM.CREATE.{kv_stream(bucket)}",)


def stream_read_api(stream: str) -> tuple[str, ...]:
    """JetStream API subjects a module publishes to read a plain stream message by message."""
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
    )


def stream_create_api(stream: str) -> tuple[str, ...]:
    """JetStream API subjects the owner of a plain stream needs: looking at it and creating it
    (never update, delete, purge or message delete)."""
    return (f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}")


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    #: allow publishing a reply to whoever sent us a request (NATS ``allow_responses``)
    allow_responses: bool
    #: the JetStream API subjects this module needs (key-value buckets it reads or owns), added to
    #: its publish permissions when JetStream is on, and nothing else of ``$JS.API.>`` (issue 11).
    #: The in-memory bus enforces the same list.
    jetstream: tuple[str, ...] = ()
    #: subjects excepted from ``publish`` (NATS ``deny``): admin may ask anything below
    #: ``iotdlm.v1.>`` but not write the audit log's tree heads
    deny_publish: tuple[str, ...] = ()


def _inbox(module: str) -> str:
    return f"{inbox_prefix(module)}.>"


def _observed(module: str) -> tuple[str, ...]:
    """The health and metrics subjects ``module`` answers (any process, or one by pid)."""
    return tuple(f"{PREFIX}.{module}.{kind}{tail}" for kind in (HEALTH, METRICS) for tail in ("", ".*"))


def _observe_all() -> tuple[str, ...]:
    """Asking any module's processes for their health and metrics."""
    return _observed("*")


#: every module reads (and watches) the operation mode: services check it themselves
_READ_MODE = kv_read_api(MODE_BUCKET)

PERMISSIONS: dict[str, Permissions] = {
    "km": Permissions(
        # AUDIT_TREE_HEAD: km alone writes its signed tree heads into the append-only stream; KM_CRL: km's
        # own mode guard checks the supervisor's certificate against the service CA's CRL
        publish=(f"{EVENTS}.km.>", AUDIT_TREE_HEAD, KM_CRL),
        # km workers hear each other's revocations (to drop cached OCSP answers)
        subscribe=(f"{PREFIX}.km.>", _inbox("km"), f"{EVENTS}.km.>"),
        allow_responses=True,
        jetstream=_READ_MODE,
    ),
    "pm": Permissions(
        # CM_PING: pm refuses to work while cm runs (defence in depth beside the mode)
        # KM_CRL: the signers of km's replies and of the mode record are checked against the CRL
        publish=(KM_ISSUE, KM_ISSUE_BATCH, KM_CHAIN, KM_CRL, f"{SM_PREFIX}.software.>", CM_PING, f"{EVENTS}.pm.>"),
        subscribe=(f"{PREFIX}.pm.>", _inbox("pm")),
        allow_responses=True,
        jetstream=_READ_MODE,
    ),
    "sm": Permissions(
        publish=(f"{CM_EGRESS}.>", KM_CRL, f"{EVENTS}.sm.>"),
        subscribe=(f"{SM_PREFIX}.>", _inbox("sm")),
        allow_responses=True,
        jetstream=_READ_MODE,
    ),
    "cm": Permissions(
        publish=(
            KM_RENEW,
            f"{KM_EST}.>",
            f"{PREFIX}.km.va.>",
            KM_CHAIN,
            KM_FACTORY_CAS,
            KM_AUDIT_CHECKPOINT,
            KM_AUDIT_CONSISTENCY,
            f"{EVENTS}.cm.>",
            f"{KM_TRANSFER_PEER}.>",
            f"{KM_TRANSFER_DEVICE}.>",
            # cm's readiness: km answers
            f"{PREFIX}.km.{HEALTH}",
        ),
        # its own health and metrics (any process, or one by pid); nothing of another module's
        # km's revocations: cm drops the OCSP answers it keeps for them
        subscribe=(f"{CM_EGRESS}.>", CM_PING, KM_REVOKED_EVENT, *_observed("cm"), _inbox("cm")),
        allow_responses=True,
        jetstream=_READ_MODE,
    ),
    # the operator's tools (CLI, console): may ask anything, may listen to events, may read the
    # audit log's tree heads (`audit verify`), may not write them; may list what sm holds
    # (SM_SOFTWARE_HELD) but not load it for flashing (pm's)
    "admin": Permissions(
        publish=(f"{PREFIX}.>",),
        subscribe=(_inbox("admin"), f"{EVENTS}.>"),
        allow_responses=False,
        jetstream=(*_READ_MODE, *stream_read_api(AUDIT_HEADS_STREAM)),
        deny_publish=(AUDIT_TREE_HEAD, SM_SOFTWARE_LOAD),
    ),
    # the supervisor: answers mode switches and status, is the only writer of the mode
    SUPERVISOR: Permissions(
        # and asks each process it started for its health and metrics (its /metrics, ADR 0018)
        publish=(kv_subject(MODE_BUCKET), f"{EVENTS}.{SUPERVISOR}.>", *_observe_all()),
        subscribe=(f"{MODES_PREFIX}.>", _inbox(SUPERVISOR), f"{EVENTS}.*.{MODE_ALARM}", f"{EVENTS}.*.{SIGNER_ALARM}"),
        allow_responses=True,
        jetstream=(*_READ_MODE, *kv_admin_api(MODE_BUCKET), *stream_create_api(AUDIT_HEADS_STREAM)),
    ),
}
