"""The device agent of trust transfer (I/O shell around :mod:`iotdlm.transfer.device`): runs on
a device (here a :class:`~iotdlm.device.simulated.SimulatedDevice`), persists the machine's state
in the device's flash, carries out its effects and talks to the network through injected clients.

Files it keeps on the device::

    DEV/flash/transfer/state.json    the machine's state (phase, seen ctis, retired signer keys)
    DEV/flash/transfer/backup.json   what a rollback restores: truststore, configuration,
                                     operational certificate (removed at commit)

Clients (seams): :class:`Enroller` (EST with CA2: :class:`EstEnroller` over HTTPS through cm, or
:class:`RelayEnroller` in-process as cm relays it to km), :class:`AttestationClient`,
:class:`UpdateClient`, :class:`FallbackClient`, :class:`RefusalReporter`. Failures are classified for the machine: an
:class:`~iotdlm.errors.UnavailableError` is transient (retried up to ``max_attempts``), a
refusal (:class:`~iotdlm.errors.RejectedError`) is permanent (fallback).

FR3 (seed 003 IX-C, forward secrecy): re-enrollment with CA2 certifies a NEW key pair made on the
device for it (:meth:`~iotdlm.device.simulated.SimulatedDevice.generate_pending_key`), never a key
of the SP1 era. The new key signs the CSR; the factory key proves the credential the device
presents (the TLS client certificate and km's proof, ADR 0008); the certificate CA2 sends must
certify the new key. At commit the new key becomes the operational key with CA2's certificate; a
rollback destroys it. The device key still signs the attestation evidence (its factory
certificate certifies it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography import x509

from iotdlm.clock import Clock
from iotdlm.device.est_client import bootstrap_cacerts  # re-exported: the bootstrap lives with EST
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import IotdlmError, NotFoundError, RejectedError, UnavailableError, UntrustedError
from iotdlm.files import atomic_write
from iotdlm.pki import est_proof
from iotdlm.pki.chain import certs_to_pem, der, load_certificate, load_certificates_pem
from iotdlm.pki.est_proof import spki_sha256 as spki_of
from iotdlm.pki.keys import check_public_key, load_private_key_pem
from iotdlm.transfer import attestation, device
from iotdlm.transfer.device import DeviceState, Phase, Step, StepResult
from iotdlm.transfer.shell import Receipt, Sp1Service, Sp2Verifier, StaticUpdateServer, UpdateImage
from iotdlm.wire.transfer_device import MAX_REFUSAL_DETAIL, refusal_reason

WELL_KNOWN_EST = "/.well-known/est"


class Enroller(Protocol):
    async def enroll(
        self,
        enroll_uri: str,
        *,
        anchors: Sequence[x509.Certificate],
        client_cert_pem: bytes,
        client_key_pem: bytes,
        csr: bytes,
    ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        """(new operational certificate, CA certificates) from CA2, authenticated by the factory
        certificate; ``anchors`` authenticate CA2's endpoint."""
        ...

    async def cacerts(self, enroll_uri: str) -> list[x509.Certificate]:
        """The CA certificates at ``enroll_uri`` (EST /cacerts), the server NOT authenticated (RFC
        7030 4.1.1 bootstrap): the caller keeps only those a signed hash names."""
        ...


class AttestationClient(Protocol):
    async def challenge(self, ra_uri: str, device_id: str) -> bytes: ...

    async def submit(self, ra_uri: str, evidence: bytes) -> attestation.Verdict: ...


class UpdateClient(Protocol):
    async def fetch(self, update_uri: str, device_id: str) -> UpdateImage: ...


@runtime_checkable
class UpdateReporter(Protocol):
    """An update client that also tells SP2's update server the device installed the image
    (:meth:`iotdlm.transfer.http_clients.TransferHttps.report_updated`: SP2's status updated)."""

    async def report_updated(self, update_uri: str, *, transfer_id: str, version: str) -> None: ...


class FallbackClient(Protocol):
    async def report(self, fallback_uri: str, *, transfer_id: str, device_id: str, reason: str) -> None: ...


class RefusalReporter(Protocol):
    """Tells the device's current provider's cm that the device refused a transfer message (its
    ``POST /transfer/refusal``): ``reason`` from :data:`iotdlm.wire.transfer_device.REFUSAL_REASONS`,
    ``message`` the SHA-256 (hex) of the refused bytes."""

    async def report_refusal(self, cm_url: str, *, reason: str, detail: str, message: str) -> None: ...


# --- real EST through cm ------------------------------------------------------------------------------
class EstEnroller:
    """EST (RFC 7030) over HTTPS to the enrollURI: simpleenroll with the factory certificate as
    TLS client certificate, then cacerts; the server is authenticated by ``anchors``."""

    def __init__(self, *, timeout: float = 30.0) -> None:
        self.timeout = timeout

    async def enroll(
        self,
        enroll_uri: str,
        *,
        anchors: Sequence[x509.Certificate],
        client_cert_pem: bytes,
        client_key_pem: bytes,
        csr: bytes,
    ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        from iotdlm.device.est_client import EstClient

        base = enroll_uri[: -len(WELL_KNOWN_EST)] if enroll_uri.endswith(WELL_KNOWN_EST) else enroll_uri
        try:
            client = EstClient(
                base,
                trust_anchor_pem=certs_to_pem(anchors),
                client_cert_pem=client_cert_pem,
                client_key_pem=client_key_pem,
                timeout=self.timeout,
                connections=1,
            )
        except ValueError as exc:
            raise RejectedError(f"cannot use the enrollment URI or anchors: {exc}") from exc
        async with client:
            cert = await client.simpleenroll(csr)
            cacerts = await client.cacerts()
        return cert, cacerts

    async def cacerts(self, enroll_uri: str) -> list[x509.Certificate]:
        return await bootstrap_cacerts(enroll_uri, seconds=self.timeout)


class EstRelay(Protocol):
    """What cm relays EST with (:class:`iotdlm.client.km.KmClient` as cm)."""

    async def est(self, operation: str, client_certificate: bytes, csr: bytes, *, proof: str | None = None) -> Any: ...

    async def est_nonce(self, client_certificate: bytes) -> Any: ...

    async def chain(self) -> Any: ...


class RelayEnroller:
    """In-process enrollment as cm relays it to km (benches; tests that need no HTTPS): the
    enrollURI names which CA's relay to use; cm's TLS checks are not exercised."""

    def __init__(self, relays: Mapping[str, EstRelay]) -> None:
        self.relays = relays
        #: CA certificates per relay, asked once (cm caches /cacerts the same way)
        self._cacerts: dict[str, list[x509.Certificate]] = {}

    async def enroll(
        self,
        enroll_uri: str,
        *,
        anchors: Sequence[x509.Certificate],
        client_cert_pem: bytes,
        client_key_pem: bytes,
        csr: bytes,
    ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        relay = self.relays.get(enroll_uri)
        if relay is None:
            raise UnavailableError(f"cannot reach the EST server at {enroll_uri}")
        factory = load_certificate(client_cert_pem)
        # the device's proof of its factory key (ADR 0008), as EstClient makes it
        nonce = (await relay.est_nonce(der(factory))).nonce
        new_key = check_public_key(x509.load_der_x509_csr(csr).public_key())
        proof = est_proof.make(load_private_key_pem(client_key_pem, None), "simpleenroll", nonce, new_key)
        out = await relay.est("simpleenroll", der(factory), csr, proof=proof)
        cacerts = self._cacerts.get(enroll_uri)
        if cacerts is None:
            chain = await relay.chain()
            cacerts = [x509.load_der_x509_certificate(c) for c in chain.chains.get("operational", [])]
            self._cacerts[enroll_uri] = cacerts
        return x509.load_der_x509_certificate(out.certificate.certificate), cacerts

    async def cacerts(self, enroll_uri: str) -> list[x509.Certificate]:
        relay = self.relays.get(enroll_uri)
        if relay is None:
            raise UnavailableError(f"cannot reach the EST server at {enroll_uri}")
        chain = await relay.chain()
        ders = [chain.root, *(d for name in sorted(chain.chains) for d in chain.chains[name])]
        return [x509.load_der_x509_certificate(d) for d in dict.fromkeys(ders)]


# --- in-process peers (tests, benches) --------------------------------------------------------------------
class LocalAttestation:
    def __init__(self, verifiers: Mapping[str, Sp2Verifier]) -> None:
        self.verifiers = verifiers

    def _get(self, ra_uri: str) -> Sp2Verifier:
        v = self.verifiers.get(ra_uri)
        if v is None:
            raise UnavailableError(f"cannot reach the attestation verifier at {ra_uri}")
        return v

    async def challenge(self, ra_uri: str, device_id: str) -> bytes:
        return await asyncio.to_thread(self._get(ra_uri).challenge, device_id)

    async def submit(self, ra_uri: str, evidence: bytes) -> attestation.Verdict:
        return await asyncio.to_thread(self._get(ra_uri).submit, evidence)


class LocalUpdates:
    def __init__(self, servers: Mapping[str, StaticUpdateServer]) -> None:
        self.servers = servers

    async def fetch(self, update_uri: str, device_id: str) -> UpdateImage:
        server = self.servers.get(update_uri)
        if server is None:
            raise UnavailableError(f"cannot reach the update server at {update_uri}")
        return await asyncio.to_thread(server.fetch, device_id)


class LocalFallback:
    def __init__(self, services: Mapping[str, Sp1Service]) -> None:
        self.services = services

    async def report(self, fallback_uri: str, *, transfer_id: str, device_id: str, reason: str) -> None:
        svc = self.services.get(fallback_uri)
        if svc is None:
            raise UnavailableError(f"cannot reach the fallback URI {fallback_uri}")
        await asyncio.to_thread(svc.fallback, transfer_id, device_id, reason)


# --- the agent -------------------------------------------------------------------------------------------
def _atomic(path: Path, data: bytes) -> None:
    """Write-then-rename (the agent is the only writer of its files, one operation at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode=0o644)


class DeviceAgent:
    def __init__(
        self,
        dev: SimulatedDevice,
        *,
        clock: Clock,
        enroller: Enroller,
        fallback: FallbackClient,
        attestation_client: AttestationClient | None = None,
        updates: UpdateClient | None = None,
        max_attempts: int = device.DEFAULT_MAX_ATTEMPTS,
        retry_delay: float = 2.0,
        refusals: RefusalReporter | None = None,
    ) -> None:
        """``retry_delay``: seconds before the first retry of a step that failed transiently,
        doubled at each further attempt. ``refusals``: where a refused transfer message is reported
        (the cm of the device's ``enroll_uri``, its current provider); None: logged only."""
        self.dev = dev
        self.clock = clock
        self.enroller = enroller
        self.fallback_client = fallback
        self.attestation = attestation_client
        self.updates = updates
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.refusals = refusals
        self._dir = dev.path / "flash" / "transfer"
        self._lock = asyncio.Lock()
        self._saved: bytes | None = None

    # --- state ----------------------------------------------------------------------------------
    @property
    def state(self) -> DeviceState:
        path = self._dir / "state.json"
        if path.is_file():
            self._saved = path.read_bytes()
            return DeviceState.from_json(self._saved)
        return DeviceState(device_id=self.dev.device_id)

    def _save(self, state: DeviceState) -> None:
        data = state.to_json()
        if data != self._saved:
            _atomic(self._dir / "state.json", data)
            self._saved = data

    # --- inputs -----------------------------------------------------------------------------------
    async def handle(self, token: bytes) -> Receipt:
        """A transfer message arrived: check it, reset, and run the transfer to its end."""
        async with self._lock:
            state, next_effect = await asyncio.to_thread(self._receive, token)
            if state.phase is not Phase.RESET:
                refused = [e for e in self.dev.events() if e.get("event") == "transfer_refused"]
                why = refused[-1].get("message", "refused") if refused else "refused"
                if refused:
                    await self._report_refusal(token, refused[-1])
                return Receipt(self.dev.device_id, False, state.phase.value, str(why))
            final = await self._run(state, next_effect)
            return Receipt(self.dev.device_id, True, final.phase.value, final.last_outcome or "")

    async def _report_refusal(self, token: bytes, event: Mapping[str, Any]) -> None:
        """Tell the current provider's cm (its enroll_uri's) why the message was refused; a report
        that fails is logged on the device, never retried (the refusal stands either way)."""
        uri = self.dev.config().get("enroll_uri")
        if self.refusals is None or not isinstance(uri, str) or not uri.startswith(("https://", "coap://")):
            return
        base = uri.rstrip("/")
        base = base[: -len(WELL_KNOWN_EST)] if base.endswith(WELL_KNOWN_EST) else base
        field = event.get("field")
        reason = refusal_reason(str(event.get("code", "")), field if isinstance(field, str) else None)
        detail = str(event.get("message", ""))[:MAX_REFUSAL_DETAIL]
        try:
            await self.refusals.report_refusal(
                base, reason=reason, detail=detail, message=hashlib.sha256(token).hexdigest()
            )
            self.dev.log("refusal_reported", reason=reason, cm=base)
        except IotdlmError as exc:
            self.dev.log("refusal_report_failed", reason=reason, code=exc.code, message=exc.message[:200])

    async def resume(self) -> DeviceState:
        """After a restart: carry on with a transfer that was running (or a fallback to report)."""
        async with self._lock:
            state = self.state
            return await self._run(state, device.next_effect(state))

    def _receive(self, token: bytes) -> tuple[DeviceState, device.Effect | None]:
        state = self.state
        new, effects = device.receive(
            state, token, self.clock.now(), truststore=self.dev.truststore(), config=self.dev.config()
        )
        return new, self._apply_and_save(effects, new)

    def _apply_and_save(self, effects: Sequence[device.Effect], state: DeviceState) -> device.Effect | None:
        """Flash first, then the state that says it is done (a crash in between repeats, never skips)."""
        nxt = self._apply(effects)
        self._save(state)
        return nxt

    async def _run(self, state: DeviceState, effect: device.Effect | None) -> DeviceState:
        while effect is not None:
            if isinstance(effect, device.ReportFallback):
                try:
                    await self.fallback_client.report(
                        effect.fallback_uri, transfer_id=effect.transfer_id, device_id=self.dev.device_id,
                        reason=effect.reason,
                    )  # fmt: skip
                    ok, detail = True, ""
                except IotdlmError as exc:
                    ok, detail = False, f"{exc.code}: {exc.message}"
                state, effects = device.fallback_done(state, ok, self.clock.now(), detail)
                await asyncio.to_thread(self._apply_and_save, effects, state)
                return state
            result = await self._step(effect)
            state, effects = device.step_done(state, result, self.clock.now(), max_attempts=self.max_attempts)
            effect = await asyncio.to_thread(self._apply_and_save, effects, state)
            if state.pending is not None and state.pending.attempts > 0 and self.retry_delay > 0:
                await asyncio.sleep(self.retry_delay * 2 ** (state.pending.attempts - 1))
        return state

    # --- steps (network) ----------------------------------------------------------------------------
    async def _step(self, effect: device.Effect) -> StepResult:
        if isinstance(effect, device.FetchAnchors):
            step = Step.ANCHORS
        elif isinstance(effect, device.Attest):
            step = Step.ATTEST
        elif isinstance(effect, device.Update):
            step = Step.UPDATE
        elif isinstance(effect, device.Enroll):
            step = Step.ENROLL
        else:
            raise RuntimeError(f"not a network step: {effect!r}")
        try:
            if isinstance(effect, device.FetchAnchors):
                cacerts = await self.enroller.cacerts(effect.enroll_uri)
                return StepResult(Step.ANCHORS, ok=True, ca_certificates=tuple(der(c) for c in cacerts))
            if isinstance(effect, device.Attest):
                return await self._attest(effect)
            if isinstance(effect, device.Update):
                return await self._update(effect)
            assert isinstance(effect, device.Enroll)
            return await self._enroll(effect)
        except UnavailableError as exc:
            return StepResult(step, ok=False, permanent=False, detail=f"{exc.code}: {exc.message}")
        except RejectedError as exc:
            return StepResult(step, ok=False, permanent=True, detail=f"{exc.code}: {exc.message}")
        except IotdlmError as exc:
            return StepResult(step, ok=False, permanent=True, detail=f"{exc.code}: {exc.message}")

    async def _attest(self, effect: device.Attest) -> StepResult:
        if self.attestation is None:
            raise UnavailableError("this device has no attestation client")
        nonce = await self.attestation.challenge(effect.ra_uri, self.dev.device_id)
        factory = self.dev.certificate("factory")
        if factory is None:
            raise NotFoundError("the device has no factory certificate")
        sha = self.dev.image_sha256("slot-a")
        measurement = bytes.fromhex(sha) if sha else attestation.measure(b"")
        evidence = attestation.make_evidence(
            self.dev.sign, self.dev.public_key(), factory, nonce=nonce, device_id=self.dev.device_id,
            measurement=measurement,
        )  # fmt: skip
        verdict = await self.attestation.submit(effect.ra_uri, evidence)
        return StepResult(Step.ATTEST, ok=verdict.ok, permanent=not verdict.ok, detail=verdict.reason)

    async def _update(self, effect: device.Update) -> StepResult:
        if self.updates is None:
            raise UnavailableError("this device has no update client")
        image = await self.updates.fetch(effect.update_uri, self.dev.device_id)

        def write() -> None:
            with tempfile.TemporaryDirectory(dir=self.dev.path) as d:
                p = Path(d) / "image"
                p.write_bytes(image.image)
                self.dev.write_image("slot-b", p, dict(image.info))

        await asyncio.to_thread(write)
        version = str(image.info.get("version", ""))
        if isinstance(self.updates, UpdateReporter):
            # the image is installed whatever the report's fate: a failed report is logged, not retried
            try:
                await self.updates.report_updated(
                    effect.update_uri, transfer_id=str(image.info.get("transfer", "")), version=version
                )
            except IotdlmError as exc:
                self.dev.log("update_report_failed", code=exc.code, message=exc.message)
        return StepResult(Step.UPDATE, ok=True, detail=str(image.info.get("version", "")))

    async def _enroll(self, effect: device.Enroll) -> StepResult:
        anchors = (
            [x509.load_der_x509_certificate(a) for a in effect.anchors] if effect.anchors else self.dev.truststore()
        )
        cert_pem, key_pem = self.dev.tls_identity("factory")
        csr = await asyncio.to_thread(self._new_key_csr)
        cert, cacerts = await self.enroller.enroll(
            effect.enroll_uri, anchors=anchors, client_cert_pem=cert_pem, client_key_pem=key_pem, csr=csr
        )
        if spki_of(check_public_key(cert.public_key())) != spki_of(self.dev.public_key("pending")):
            raise UntrustedError("CA2's certificate does not certify the new key pair the device asked for (FR3)")
        return StepResult(Step.ENROLL, ok=True, certificate=der(cert), ca_certificates=tuple(der(c) for c in cacerts))

    def _new_key_csr(self) -> bytes:
        """FR3: a new key pair for CA2, made on the device (kept across a retry of this step)."""
        if not self.dev.has_key("pending"):
            self.dev.generate_pending_key()
        return self.dev.make_csr("pending")

    # --- local effects (flash) -----------------------------------------------------------------------
    def _apply(self, effects: Sequence[device.Effect]) -> device.Effect | None:
        """Carry out the local effects in order; return the first network step (or fallback report)."""
        for e in effects:
            if isinstance(e, device.Log):
                self.dev.log(e.event, **dict(e.data))
            elif isinstance(e, device.Backup):
                self._backup()
            elif isinstance(e, device.AddTrustAnchors):
                current = self.dev.truststore()
                ders = {der(c) for c in current}
                extra = [x509.load_der_x509_certificate(a) for a in e.certificates if a not in ders]
                self.dev.write_truststore([*current, *extra])
            elif isinstance(e, device.WriteConfig):
                self.dev.write_config(dict(e.config))
            elif isinstance(e, device.Commit):
                self.dev.install_operational(x509.load_der_x509_certificate(e.certificate))
                self.dev.write_truststore([x509.load_der_x509_certificate(c) for c in e.truststore])
                self.dev.write_config(dict(e.config))
                (self._dir / "backup.json").unlink(missing_ok=True)
            elif isinstance(e, device.Rollback):
                self._rollback()
            else:
                return e
        return None

    def _backup(self) -> None:
        op = self.dev.certificate("operational")
        data = {
            "truststore": [certs_to_pem([c]).decode() for c in self.dev.truststore()],
            "config": self.dev.config(),
            "operational": certs_to_pem([op]).decode() if op is not None else None,
        }
        _atomic(self._dir / "backup.json", json.dumps(data).encode())

    def _rollback(self) -> None:
        self.dev.destroy_pending_key()  # FR3: the key meant for CA2 dies with the transfer
        path = self._dir / "backup.json"
        if not path.is_file():
            self.dev.log("rollback_without_backup")
            return
        data = json.loads(path.read_text())
        self.dev.write_truststore([c for pem in data["truststore"] for c in load_certificates_pem(pem.encode())])
        self.dev.write_config(data["config"])
        if data.get("operational"):
            self.dev.write_certificate("operational", load_certificate(data["operational"].encode()))
        path.unlink()


@dataclass
class DirectDelivery:
    """Delivery straight to device agents (tests, benches); in a deployment cm delivers."""

    agents: Mapping[str, DeviceAgent]

    async def deliver(self, device_id: str, token: bytes) -> Receipt:
        agent = self.agents.get(device_id)
        if agent is None:
            raise UnavailableError(f"device {device_id} is not reachable", device_id=device_id)
        return await agent.handle(token)


__all__ = [
    "AttestationClient",
    "DeviceAgent",
    "DirectDelivery",
    "Enroller",
    "EstEnroller",
    "FallbackClient",
    "LocalAttestation",
    "LocalFallback",
    "LocalUpdates",
    "RefusalReporter",
    "RelayEnroller",
    "UpdateClient",
    "UpdateReporter",
    "bootstrap_cacerts",
]
