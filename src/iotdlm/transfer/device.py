"""The device's side of trust transfer as a PURE state machine (seed 003 VII-D, Fig. 4).

``(state, input, now) -> (new state, effects)``: no I/O here. The device agent
(:mod:`iotdlm.transfer.agent`) persists the state, carries out the effects in order on the device
(flash, network) and feeds back what happened. Inputs:

- :func:`receive` -- SP1's per-device transfer message (bytes) and what the device holds now
  (truststore, configuration);
- :func:`step_done` -- the outcome of a step the machine asked for (attest, update, enroll);
- :func:`fallback_done` -- whether the fallback URI (SP1) was told.

Checks on a transfer message, in this order (verify the bytes received, then decode):

1. bounded COSE_Sign1 parse, ``typ`` = device transfer message; the signer is the certificate of
   the device's truststore that the ``x5t`` names (SP1's transfer certificate, held by the device:
   RFC 9360's thumbprint instead of sending the chain), or else the ``x5chain`` it carries;
2. the signer is a provider's *transfer identity* (URI SAN ``urn:dev:org:<PEN>-module:transfer``), its key
   is not one the device retired at an earlier commit (FR3), and it chains to another certificate
   of the device's truststore -- the device trusts its current provider through its truststore, as
   in the paper;
3. the COSE signature (``cwt``);
4. the claims: ``aud`` is this device, the CWT times (FR2), now within the agreed reset window;
5. the ``cti`` was never seen (persisted set of ``(cti, exp)``; an entry is dropped once its
   message would be refused as expired anyway, so the set stays bounded) -- FR2, replay;
6. no transfer is already running;
7. trust anchors the message names (SHA-256 of a CA certificate) and the truststore holds are
   taken at once; otherwise the first step (:class:`FetchAnchors`) gets ``/cacerts`` at enrollURI
   unauthenticated (RFC 7030 4.1.1's bootstrap) and keeps only CA certificates whose SHA-256 the
   signed message names -- none found is a permanent failure (fallback), unreachable is retried.

Any refusal is one ``transfer_refused`` entry in the device log and changes nothing else.

Then: back up what a rollback restores (truststore, configuration, operational certificate);
install SP2's trust anchors (VII-D: the truststore must authenticate CA2, and that update is not
undone by the reset); reset the configuration to the agreed state (device id and dtype, plus the
new endpoints); then, in order, optional remote attestation (raURI), optional update before
enrollment (updateURI flag), re-enrollment with CA2 (enrollURI) with the factory certificate.
Enrollment is checked (a certificate for this device that chains to SP2's anchors or the CA
certificates CA2 sent) and only then committed: new certificate, truststore = SP2's anchors and
CA2's certificates (SP1's roots are gone), configuration under SP2, SP1's signing key retired.
A permanent failure (attestation refused, CA2 refusing, the reset window closing, a transient
failure that does not clear within ``max_attempts``) rolls back to the pre-transfer state and
tells the fallback URI (SP1): the device keeps working under SP1.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509

from iotdlm.errors import BadRequestError, ConflictError, RejectedError, ReplayError, UntrustedError
from iotdlm.pki.names import device_id_of
from iotdlm.transfer import cose
from iotdlm.transfer.messages import (
    DEFAULT_SKEW,
    TransferClaims,
    TransferMessage,
    epoch,
    from_epoch,
    peek_device_message,
    rejected_summary,
    transfer_id,
)
from iotdlm.transfer.trust import (
    cert_der,
    check_transfer_signer,
    is_ca,
    parse_certificates,
    public_key,
    spki_sha256,
    verify_chain,
)

#: configuration keys that survive the reset to the agreed state (everything else is SP1's)
AGREED_CONFIG_KEYS = ("device_id", "dtype")
DEFAULT_MAX_ATTEMPTS = 3


class Phase(enum.StrEnum):
    IDLE = "idle"  # working under its current provider, no transfer running
    RESET = "reset"  # transfer message accepted, device reset; steps to go
    ATTESTED = "attested"
    UPDATED = "updated"
    COMMITTED = "committed"  # enrolled with CA2 and committed: working under SP2
    FALLBACK = "fallback"  # rolled back; telling SP1 (fallback URI)


RUNNING = frozenset({Phase.RESET, Phase.ATTESTED, Phase.UPDATED})


class Step(enum.StrEnum):
    ANCHORS = "anchors"  # fetch SP2's trust anchors the message names by hash (/cacerts at enrollURI)
    ATTEST = "attest"
    UPDATE = "update"
    ENROLL = "enroll"


# --- state ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pending:
    """The accepted transfer, while it runs."""

    transfer_ref: bytes
    cti: bytes
    signer_spki: str
    claims: TransferClaims
    done: tuple[Step, ...] = ()
    attempts: int = 0
    #: the configuration kept through the reset (AGREED_CONFIG_KEYS), restated at the commit
    agreed: tuple[tuple[str, str], ...] = ()
    #: SP2's trust anchors (DER) the message names by hash, as the device resolved them
    anchors: tuple[bytes, ...] = ()

    @property
    def transfer_id(self) -> str:
        return transfer_id(self.transfer_ref)


@dataclass(frozen=True)
class DeviceState:
    device_id: str
    phase: Phase = Phase.IDLE
    #: (cti hex, exp epoch) of every transfer message accepted and not yet expired
    seen: tuple[tuple[str, int], ...] = ()
    #: SPKI hashes of signing keys of former providers (FR3: refused from the commit on)
    retired_signers: tuple[str, ...] = ()
    pending: Pending | None = None
    #: while phase is FALLBACK: (fallback URI, transfer id, reason) still to be reported
    fallback: tuple[str, str, str] | None = None
    last_outcome: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(_state_obj(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DeviceState:
        try:
            return _state_from(json.loads(data))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRequestError(f"the device's transfer state is unreadable: {exc}") from exc


def _claims_obj(c: TransferClaims) -> dict[str, Any]:
    return {
        "reset_not_before": epoch(c.reset_not_before),
        "reset_not_after": epoch(c.reset_not_after),
        "ra_uri": c.ra_uri,
        "update_uri": c.update_uri,
        "update_first": c.update_first,
        "enroll_uri": c.enroll_uri,
        "fallback_uri": c.fallback_uri,
        "trust_anchors": [base64.b64encode(a).decode() for a in c.trust_anchors],
    }


def _claims_from(o: Mapping[str, Any]) -> TransferClaims:
    return TransferClaims(
        reset_not_before=from_epoch(int(o["reset_not_before"])),
        reset_not_after=from_epoch(int(o["reset_not_after"])),
        ra_uri=o["ra_uri"],
        update_uri=str(o["update_uri"]),
        update_first=bool(o["update_first"]),
        enroll_uri=str(o["enroll_uri"]),
        fallback_uri=str(o["fallback_uri"]),
        trust_anchors=tuple(base64.b64decode(a) for a in o["trust_anchors"]),
    )


def _state_obj(s: DeviceState) -> dict[str, Any]:
    p = s.pending
    return {
        "device_id": s.device_id,
        "phase": s.phase.value,
        "seen": [list(x) for x in s.seen],
        "retired_signers": list(s.retired_signers),
        "pending": None
        if p is None
        else {
            "transfer_ref": p.transfer_ref.hex(),
            "cti": p.cti.hex(),
            "signer_spki": p.signer_spki,
            "claims": _claims_obj(p.claims),
            "done": [d.value for d in p.done],
            "attempts": p.attempts,
            "agreed": [list(kv) for kv in p.agreed],
            "anchors": [base64.b64encode(a).decode() for a in p.anchors],
        },
        "fallback": list(s.fallback) if s.fallback else None,
        "last_outcome": s.last_outcome,
    }


def _state_from(o: Mapping[str, Any]) -> DeviceState:
    p = o.get("pending")
    fb = o.get("fallback")
    return DeviceState(
        device_id=str(o["device_id"]),
        phase=Phase(o["phase"]),
        seen=tuple((str(c), int(e)) for c, e in o["seen"]),
        retired_signers=tuple(str(x) for x in o["retired_signers"]),
        pending=None
        if p is None
        else Pending(
            transfer_ref=bytes.fromhex(p["transfer_ref"]),
            cti=bytes.fromhex(p["cti"]),
            signer_spki=str(p["signer_spki"]),
            claims=_claims_from(p["claims"]),
            done=tuple(Step(d) for d in p["done"]),
            attempts=int(p["attempts"]),
            agreed=tuple((str(k), str(v)) for k, v in p.get("agreed", [])),
            anchors=tuple(base64.b64decode(a) for a in p.get("anchors", [])),
        ),
        fallback=(str(fb[0]), str(fb[1]), str(fb[2])) if fb else None,
        last_outcome=o.get("last_outcome"),
    )


# --- effects ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Log:
    event: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Backup:
    """Snapshot what a rollback restores: truststore, configuration, operational certificate."""


@dataclass(frozen=True)
class AddTrustAnchors:
    certificates: tuple[bytes, ...]


@dataclass(frozen=True)
class WriteConfig:
    config: Mapping[str, Any]


@dataclass(frozen=True)
class Attest:
    ra_uri: str


@dataclass(frozen=True)
class Update:
    update_uri: str


@dataclass(frozen=True)
class FetchAnchors:
    """GET /cacerts at ``enroll_uri`` without authenticating the server (RFC 7030 4.1.1 bootstrap):
    the signed hashes of the transfer message pick the anchors from what comes back."""

    enroll_uri: str


@dataclass(frozen=True)
class Enroll:
    enroll_uri: str
    #: roots to authenticate CA2's endpoint with: SP2's anchors; empty: the device's truststore
    anchors: tuple[bytes, ...]


@dataclass(frozen=True)
class Commit:
    certificate: bytes
    truststore: tuple[bytes, ...]
    config: Mapping[str, Any]


@dataclass(frozen=True)
class Rollback:
    """Restore the backup: the device is back in its pre-transfer state, under SP1."""


@dataclass(frozen=True)
class ReportFallback:
    fallback_uri: str
    transfer_id: str
    reason: str


Effect = (
    Log
    | Backup
    | AddTrustAnchors
    | WriteConfig
    | FetchAnchors
    | Attest
    | Update
    | Enroll
    | Commit
    | Rollback
    | ReportFallback
)


@dataclass(frozen=True)
class StepResult:
    step: Step
    ok: bool
    #: a failure that retrying will not fix (refusal); False: transient (unreachable, timeout)
    permanent: bool = False
    detail: str = ""
    #: ENROLL: the new operational certificate (DER) and the CA certificates CA2 sent
    certificate: bytes | None = None
    ca_certificates: tuple[bytes, ...] = ()


# --- inputs ----------------------------------------------------------------------------------------------
def _verified(
    state: DeviceState, token: bytes, now: dt.datetime, truststore: Sequence[x509.Certificate], skew: dt.timedelta
) -> tuple[TransferMessage, x509.Certificate, str]:
    """Steps 1-4 of the checks (module docstring): the message, its signer and the signer's SPKI hash."""
    msg, chain = peek_device_message(token, truststore)
    signer = chain[0]
    spki = spki_sha256(signer)
    if spki in state.retired_signers:
        raise UntrustedError("the transfer message is signed by a former provider's key, retired at a commit")
    check_transfer_signer(signer)
    # a signer named by x5t is one of the truststore's certificates: it must still chain to another one
    held = [c for c in truststore if c is not signer]
    verify_chain(signer, [*chain[1:], *held], held, now=now)
    cose.verify_sign1(msg, public_key(signer), what="the transfer message")
    tm = TransferMessage.from_payload(msg.payload, what="transfer message")
    if tm.header.audience != state.device_id:
        raise UntrustedError(f"the transfer message is for {tm.header.audience!r}, not this device", field="aud")
    tm.header.check_time(now, skew)
    return tm, signer, spki


def _resolve_anchors(refs: Sequence[bytes], candidates: Sequence[x509.Certificate]) -> tuple[bytes, ...]:
    """The certificates (DER) the trustAnchors hashes name, each a CA certificate."""
    by_hash = {cose.cert_hash(cert_der(c)): c for c in candidates}
    out: list[bytes] = []
    for ref in refs:
        cert = by_hash.get(ref)
        if cert is None:
            raise UntrustedError(
                f"trust anchor {ref.hex()[:16]}... is neither in the truststore nor among the CA certificates of "
                "the enrollURI's /cacerts",
                field="trustAnchors",
            )
        if not is_ca(cert):
            raise UntrustedError(f"trust anchor {ref.hex()[:16]}... is not a CA certificate", field="trustAnchors")
        out.append(cert_der(cert))
    return tuple(out)


def receive(
    state: DeviceState,
    token: bytes,
    now: dt.datetime,
    *,
    truststore: Sequence[x509.Certificate],
    config: Mapping[str, Any],
    skew: dt.timedelta = DEFAULT_SKEW,
) -> tuple[DeviceState, list[Effect]]:
    """A transfer message arrived (from SP1, through cm or any other way: it is verified here)."""
    state = _purge_seen(state, now, skew)
    try:
        tm, signer, spki = _verified(state, token, now, truststore, skew)
        c = tm.claims
        if not (c.reset_not_before - skew <= now <= c.reset_not_after + skew):
            raise ReplayError(
                f"now is outside the agreed reset window {c.reset_not_before.isoformat()} to "
                f"{c.reset_not_after.isoformat()}",
                field="ResetTimeNotBefore",
            )
        if any(cti == tm.header.cti.hex() for cti, _exp in state.seen):
            raise ReplayError("this transfer message was received before (its cti was seen)", field="cti")
        if state.phase in RUNNING or state.phase is Phase.FALLBACK:
            raise ConflictError(f"a transfer is already running on this device (phase {state.phase.value})")
        held = {cose.cert_hash(cert_der(t)) for t in truststore}
        # anchors the device holds already are taken now; the others are fetched (Step.ANCHORS)
        anchors = _resolve_anchors(c.trust_anchors, truststore) if all(r in held for r in c.trust_anchors) else ()
    except RejectedError as exc:
        return state, [Log("transfer_refused", rejected_summary(exc))]
    agreed = tuple((k, str(config[k])) for k in AGREED_CONFIG_KEYS if k in config)
    pending = Pending(
        transfer_ref=tm.transfer_ref, cti=tm.header.cti, signer_spki=spki, claims=c, agreed=agreed, anchors=anchors
    )
    new = replace(
        state,
        phase=Phase.RESET,
        seen=(*state.seen, (tm.header.cti.hex(), epoch(tm.header.expires))),
        pending=pending,
        fallback=None,
    )
    reset_config: dict[str, Any] = dict(agreed)
    reset_config.update(_endpoints(c, pending.transfer_id))
    effects: list[Effect] = [
        Log(
            "transfer_accepted",
            {"transfer": pending.transfer_id, "cti": tm.header.cti.hex(), "signer": signer.subject.rfc4514_string()},
        ),
        Backup(),
    ]
    if anchors:
        effects.append(AddTrustAnchors(anchors))
    effects.append(WriteConfig(reset_config))
    effects.append(Log("transfer_reset", {"transfer": pending.transfer_id}))
    effects.append(_step_effect(pending, _next_step(pending)))
    return new, effects


def _endpoints(c: TransferClaims, tid: str) -> dict[str, Any]:
    out: dict[str, Any] = {"enroll_uri": c.enroll_uri, "fallback_uri": c.fallback_uri, "transfer": tid}
    if c.update_uri:
        out["update_uri"] = c.update_uri
    if c.ra_uri:
        out["ra_uri"] = c.ra_uri
    return out


def _next_step(p: Pending) -> Step:
    if p.claims.trust_anchors and not p.anchors:
        return Step.ANCHORS
    if p.claims.ra_uri and Step.ATTEST not in p.done:
        return Step.ATTEST
    if p.claims.update_first and Step.UPDATE not in p.done:
        return Step.UPDATE
    return Step.ENROLL


def _step_effect(p: Pending, step: Step) -> Effect:
    if step is Step.ANCHORS:
        return FetchAnchors(p.claims.enroll_uri)
    if step is Step.ATTEST:
        assert p.claims.ra_uri is not None
        return Attest(p.claims.ra_uri)
    if step is Step.UPDATE:
        return Update(p.claims.update_uri)
    return Enroll(p.claims.enroll_uri, p.anchors)


def next_effect(state: DeviceState) -> Effect | None:
    """What to do next in a running transfer (after a restart of the agent), or None."""
    if state.phase in RUNNING and state.pending is not None:
        return _step_effect(state.pending, _next_step(state.pending))
    if state.phase is Phase.FALLBACK and state.fallback is not None:
        return ReportFallback(*state.fallback)
    return None


def step_done(
    state: DeviceState,
    result: StepResult,
    now: dt.datetime,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    skew: dt.timedelta = DEFAULT_SKEW,
) -> tuple[DeviceState, list[Effect]]:
    p = state.pending
    if state.phase not in RUNNING or p is None:
        raise ConflictError(f"no transfer step is running (phase {state.phase.value})")
    expected = _next_step(p)
    if result.step is not expected:
        raise ConflictError(f"step {result.step.value} reported, but {expected.value} is the step running")
    tid = p.transfer_id
    if now > p.claims.reset_not_after + skew:
        return _fail(state, f"the reset window closed at {p.claims.reset_not_after.isoformat()}")
    if not result.ok:
        attempts = p.attempts + 1
        if result.permanent or attempts >= max_attempts:
            why = "refused" if result.permanent else f"still failing after {attempts} attempts"
            return _fail(state, f"{result.step.value} {why}: {result.detail}")
        new = replace(state, pending=replace(p, attempts=attempts))
        return new, [
            Log(
                "transfer_retry",
                {"transfer": tid, "step": result.step.value, "attempt": attempts, "detail": result.detail},
            ),
            _step_effect(p, expected),
        ]
    if result.step is Step.ENROLL:
        return _commit(state, p, result, now)
    if result.step is Step.ANCHORS:
        return _anchors_fetched(state, p, result)
    done = replace(p, done=(*p.done, result.step), attempts=0)
    phase = Phase.ATTESTED if result.step is Step.ATTEST else Phase.UPDATED
    new = replace(state, phase=phase, pending=done)
    return new, [
        Log(f"transfer_{phase.value}", {"transfer": tid, "detail": result.detail}),
        _step_effect(done, _next_step(done)),
    ]


def _anchors_fetched(state: DeviceState, p: Pending, result: StepResult) -> tuple[DeviceState, list[Effect]]:
    """Step 7 of the checks: the fetched CA certificates the signed hashes name become anchors."""
    try:
        fetched = parse_certificates(result.ca_certificates, what="/cacerts certificate")
        anchors = _resolve_anchors(p.claims.trust_anchors, fetched)
    except RejectedError as exc:
        return _fail(state, f"anchors: {exc.message}")
    done = replace(p, anchors=anchors, attempts=0)
    new = replace(state, pending=done)
    return new, [
        AddTrustAnchors(anchors),
        Log("transfer_anchors", {"transfer": p.transfer_id, "count": len(anchors)}),
        _step_effect(done, _next_step(done)),
    ]


def _commit(state: DeviceState, p: Pending, result: StepResult, now: dt.datetime) -> tuple[DeviceState, list[Effect]]:
    try:
        if result.certificate is None:
            raise BadRequestError("the enrollment returned no certificate")
        (cert,) = parse_certificates([result.certificate], what="new operational certificate")
        ca_certs = parse_certificates(result.ca_certificates, what="CA certificate")
        anchors = parse_certificates(p.anchors, what="trust anchor") if p.anchors else []
        if device_id_of(cert) != state.device_id:
            raise UntrustedError("the new operational certificate names another device")
        roots = anchors or [c for c in ca_certs if c.issuer == c.subject]
        verify_chain(cert, ca_certs, roots, now=now)
    except (RejectedError, ValueError) as exc:
        detail = exc.message if isinstance(exc, RejectedError) else str(exc)
        return _fail(state, f"enroll: the new certificate is not acceptable: {detail}")
    truststore: list[bytes] = []
    for c in [*anchors, *ca_certs]:
        d = cert_der(c)
        if d not in truststore:
            truststore.append(d)
    config: dict[str, Any] = {**dict(p.agreed), "device_id": state.device_id, **_endpoints(p.claims, p.transfer_id)}
    config.pop("fallback_uri", None)
    config.pop("transfer", None)
    new = replace(
        state,
        phase=Phase.COMMITTED,
        pending=None,
        retired_signers=(*state.retired_signers, p.signer_spki),
        last_outcome=f"committed {p.transfer_id}",
    )
    return new, [
        Commit(certificate=result.certificate, truststore=tuple(truststore), config=config),
        Log(
            "transfer_committed",
            {
                "transfer": p.transfer_id,
                "serial": format(cert.serial_number, "x"),
                "issuer": cert.issuer.rfc4514_string(),
            },
        ),
    ]


def _fail(state: DeviceState, reason: str) -> tuple[DeviceState, list[Effect]]:
    p = state.pending
    assert p is not None
    new = replace(
        state,
        phase=Phase.FALLBACK,
        pending=None,
        fallback=(p.claims.fallback_uri, p.transfer_id, reason),
        last_outcome=f"fallback {p.transfer_id}: {reason}"[:500],
    )
    return new, [
        Log("transfer_failed", {"transfer": p.transfer_id, "reason": reason}),
        Rollback(),
        Log("transfer_rolled_back", {"transfer": p.transfer_id}),
        ReportFallback(p.claims.fallback_uri, p.transfer_id, reason),
    ]


def fallback_done(state: DeviceState, ok: bool, now: dt.datetime, detail: str = "") -> tuple[DeviceState, list[Effect]]:
    """The fallback URI (SP1) was told (``ok``), or could not be reached (report again later)."""
    if state.phase is not Phase.FALLBACK:
        raise ConflictError(f"no fallback to report (phase {state.phase.value})")
    if not ok:
        return state, [Log("fallback_unreachable", {"detail": detail})]
    uri = state.fallback[0] if state.fallback else ""
    return replace(state, phase=Phase.IDLE, fallback=None), [Log("fallback_reported", {"fallback_uri": uri})]


def _purge_seen(state: DeviceState, now: dt.datetime, skew: dt.timedelta) -> DeviceState:
    """A cti whose message expired (beyond the skew) can go: such a message is refused by time."""
    keep = tuple((c, e) for c, e in state.seen if from_epoch(e) + skew >= now)
    return state if len(keep) == len(state.seen) else replace(state, seen=keep)


__all__ = [
    "AGREED_CONFIG_KEYS",
    "AddTrustAnchors",
    "Attest",
    "Backup",
    "Commit",
    "DeviceState",
    "Effect",
    "Enroll",
    "FetchAnchors",
    "Log",
    "Pending",
    "Phase",
    "ReportFallback",
    "Rollback",
    "Step",
    "StepResult",
    "Update",
    "WriteConfig",
    "fallback_done",
    "next_effect",
    "receive",
    "step_done",
]
