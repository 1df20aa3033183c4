"""A simulated device on the network: the loop ``iotdlm device run`` and ``iotdlm fleet run`` drive.

Each pass (:meth:`DeviceRunner.tick`), in this order (seed 003 VI-C, VI-D, VII-D):

1. a trust transfer that was running (or a fallback still to report) carries on
   (:class:`TransferHandler`, the transfer agent :class:`iotdlm.transfer.agent.DeviceAgent`);
2. a device without a usable operational certificate enrolls over EST with its factory
   certificate ("Upon startup the IoT device contacts the CA1 to do initial enrollment");
   one whose operational certificate reached ``renew_at`` of its lifetime re-enrolls with it
   ("Before the operational certificate expires the device will do re-enrollment"). Either way
   the device makes a NEW key pair for the certificate (the CSR's key); the key of the credential
   it presents proves the request (ADR 0008, :class:`~iotdlm.device.est_client.EstClient`); the
   new key becomes the operational key only with its certificate, and is destroyed on a failure;
3. it asks its provider's cm for a transfer message (:class:`MessageSource`, ``GET
   /transfer/message``, :class:`iotdlm.transfer.http_clients.DeviceMessages` over HTTPS) and hands
   a new one to the transfer agent. A 404 (no message for this
   device, or a cm without that route) skips the step with one log line.

Where the device's cm is: its configuration's ``enroll_uri`` (the CA-URI), which a transfer
rewrites at commit. Time comes from the injected clock: the schedule is decided on it (TLS and
km check certificates on theirs). Failures are logged (device log and ``logging``) and reported
in :class:`TickReport`; the loop goes on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509

from iotdlm.clock import Clock
from iotdlm.device.coap_client import CoapEstClient, coap_client_for
from iotdlm.device.est_client import WELL_KNOWN, EstClient
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.device.truststore import same_truststore, updated_truststore
from iotdlm.errors import IotdlmError, NotFoundError
from iotdlm.files import atomic_write
from iotdlm.pki.chain import certs_to_pem

log = logging.getLogger(__name__)

#: re-enroll once this fraction of the operational certificate's lifetime has passed
DEFAULT_RENEW_AT = 2 / 3
#: fetch EST /cacerts (and update the truststore) at each enrollment and at least this often
DEFAULT_CACERTS_EVERY = dt.timedelta(days=1)
TRANSFER_MESSAGE_PATH = "/transfer/message"


class TransferReceipt(Protocol):
    @property
    def accepted(self) -> bool: ...

    @property
    def phase(self) -> str: ...

    @property
    def detail(self) -> str: ...


class TransferHandler(Protocol):
    """The device's transfer agent (:class:`iotdlm.transfer.agent.DeviceAgent`)."""

    async def handle(self, token: bytes) -> TransferReceipt: ...

    async def resume(self) -> object: ...


class PassConnections(Protocol):
    """The device's HTTPS connections and TLS contexts of a pass
    (:class:`iotdlm.transfer.http_clients.DeviceHttps`), closed when the pass ends."""

    async def close(self) -> None: ...


class MessageSource(Protocol):
    async def fetch(self, dev: SimulatedDevice, base_url: str) -> bytes | None:
        """The device's transfer message from its provider's cm; None when there is none (404)."""
        ...


def truststore_pem(dev: SimulatedDevice) -> bytes:
    certs = dev.truststore()
    if not certs:
        raise NotFoundError(f"device {dev.device_id} has an empty truststore: it cannot authenticate its cm")
    return certs_to_pem(certs)


@dataclass
class TickReport:
    """What one pass did (``actions``: enrolled, reenrolled, transfer-<phase>; ``errors``: why a
    step failed, in words)."""

    device_id: str
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    serial: str | None = None
    not_after: str | None = None
    issuer: str | None = None


def base_url_of(enroll_uri: str) -> str:
    """cm's base URL from an EST URI (``https://host:port/.well-known/est`` -> ``https://host:port``)."""
    uri = enroll_uri.rstrip("/")
    return uri[: -len(WELL_KNOWN)] if uri.endswith(WELL_KNOWN) else uri


class DeviceRunner:
    def __init__(
        self,
        dev: SimulatedDevice,
        *,
        clock: Clock,
        transfers: TransferHandler | None = None,
        messages: MessageSource | None = None,
        renew_at: float = DEFAULT_RENEW_AT,
        timeout: float = 30.0,
        connections: PassConnections | None = None,
        cacerts_every: dt.timedelta = DEFAULT_CACERTS_EVERY,
        cm_credentials: Mapping[str, bytes] | None = None,
    ) -> None:
        """``connections``: what the transfer steps and the message fetch keep open during a pass
        (one TLS context and keep-alive connection per credential and host), closed at its end.
        ``cacerts_every``: how often the device asks /cacerts when it does not enroll (ADR 0026).
        ``cm_credentials``: for a constrained device, the EDHOC credential of each cm it enrolls
        with over CoAP (``coap://`` enroll_uri; ADR 0029), by base URI."""
        if not 0 < renew_at < 1:
            raise ValueError("renew_at is a fraction of the certificate's lifetime, between 0 and 1")
        self.dev = dev
        self.clock = clock
        self.transfers = transfers
        self.messages = messages
        self.renew_at = renew_at
        self.timeout = timeout
        self.connections = connections
        self.cacerts_every = cacerts_every
        self.cm_credentials = dict(cm_credentials or {})
        self._state_path = dev.path / "flash" / "runner.json"
        self._told_404 = False

    # --- the schedule (pure given the certificate and the time) -------------------------------------
    def renewal_due(self, cert: x509.Certificate) -> dt.datetime:
        """When ``cert`` is to be replaced: ``renew_at`` of its lifetime after notBefore."""
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        return cert.not_valid_before_utc + life * self.renew_at

    def needs(self, now: dt.datetime) -> str | None:
        """``simpleenroll`` (no usable operational certificate), ``simplereenroll`` (due), or None."""
        op = self.dev.certificate("operational")
        if op is None or now >= op.not_valid_after_utc or now < op.not_valid_before_utc:
            return "simpleenroll"
        return "simplereenroll" if now >= self.renewal_due(op) else None

    # --- one pass ------------------------------------------------------------------------------------
    async def tick(self) -> TickReport:
        try:
            return await self._tick()
        finally:
            if self.connections is not None:
                await self.connections.close()

    async def _tick(self) -> TickReport:
        report = TickReport(self.dev.device_id)
        if self.transfers is not None:
            await self._run_step(report, "transfer", self.transfers.resume())
        now = self.clock.now()
        operation = self.needs(now)
        if operation is not None:
            await self._run_step(report, operation, self.enroll(operation, report))
        elif self.cacerts_due(now):
            await self._run_step(report, "cacerts", self.refresh_truststore(report))
        if self.messages is not None:
            await self._run_step(report, "transfer message", self.poll(report))
        op = self.dev.certificate("operational")
        if op is not None:
            report.serial = format(op.serial_number, "x")
            report.not_after = op.not_valid_after_utc.isoformat()
            report.issuer = op.issuer.rfc4514_string()
        return report

    async def _run_step(self, report: TickReport, what: str, step: Awaitable[object]) -> None:
        try:
            await step
        except (IotdlmError, ValueError) as exc:  # ValueError: a truststore or URL the EST client cannot use
            code, message = (exc.code, exc.message) if isinstance(exc, IotdlmError) else ("bad_request", str(exc))
            report.errors.append(f"{what}: {code}: {message}")
            self.dev.log("runner_step_failed", step=what, code=code, message=message)
            log.warning("device %s: %s failed: %s", self.dev.device_id, what, message)

    def base_url(self) -> str:
        uri = self.dev.config().get("enroll_uri")
        if not isinstance(uri, str) or not uri.startswith(("https://", "coap://")):
            raise NotFoundError(
                f"device {self.dev.device_id} has no https or coap enroll_uri in its configuration: give --cm URL"
            )
        return base_url_of(uri)

    def anchors_pem(self) -> bytes:
        """The device's truststore (PEM): what authenticates its cm."""
        return truststore_pem(self.dev)

    async def enroll(self, operation: str, report: TickReport) -> None:
        """EST ``simpleenroll`` (factory certificate) or ``simplereenroll`` (operational), for a new
        key pair made on the device; installed with its certificate, destroyed on a failure."""
        kind = "factory" if operation == "simpleenroll" else "operational"
        cert_pem, key_pem = self.dev.tls_identity(kind)
        base = self.base_url()
        # over CoAP the device authenticates cm by the EDHOC credential it pins, not by anchors
        anchors = b"" if base.startswith("coap://") else self.anchors_pem()
        await asyncio.to_thread(self.dev.generate_pending_key)
        try:
            csr = await asyncio.to_thread(self.dev.make_csr, "pending")
            client: EstClient | CoapEstClient
            if base.startswith("coap://"):
                client = self._coap_client(base, cert_pem, key_pem)
            else:
                client = EstClient(
                    base,
                    trust_anchor_pem=anchors,
                    client_cert_pem=cert_pem,
                    client_key_pem=key_pem,
                    timeout=self.timeout,
                    connections=1,
                )
            async with client:
                cert = await (client.simpleenroll(csr) if kind == "factory" else client.simplereenroll(csr))
                # RFC 7030 4.1: the current CA certificates, on the same connection (ADR 0026)
                cacerts = await self._quietly(report, "cacerts", client.cacerts())
            await asyncio.to_thread(self.dev.install_operational, cert)
        except BaseException:
            await asyncio.to_thread(self.dev.destroy_pending_key)
            raise
        action = "enrolled" if kind == "factory" else "reenrolled"
        self.dev.log(action, serial=format(cert.serial_number, "x"), not_after=cert.not_valid_after_utc.isoformat())
        report.actions.append(action)
        if cacerts is not None:
            await self._run_step(report, "cacerts", self.install_cacerts(cacerts, report))

    # --- the truststore from EST /cacerts (CA rotation, ADR 0026) ------------------------------------
    def cacerts_due(self, now: dt.datetime) -> bool:
        """Whether ``cacerts_every`` passed since the last /cacerts answer. A device that never
        asked starts counting now (its truststore was flashed at provisioning)."""
        last = self._state().get("cacerts_at")
        if last is None:
            self._remember_cacerts(now)
            return False
        try:
            return not isinstance(last, str) or now - dt.datetime.fromisoformat(last) >= self.cacerts_every
        except (ValueError, TypeError):  # a damaged state file: ask again
            return True

    def _remember_cacerts(self, now: dt.datetime) -> None:
        state = self._state()
        state["cacerts_at"] = now.isoformat()
        atomic_write(self._state_path, json.dumps(state).encode(), mode=0o644)

    async def refresh_truststore(self, report: TickReport) -> None:
        """Ask cm's /cacerts (``crts`` over CoAP) with the device's current credential; install what it says."""
        kind = "operational" if self.dev.certificate("operational") is not None else "factory"
        cert_pem, key_pem = self.dev.tls_identity(kind)
        base = self.base_url()
        client: EstClient | CoapEstClient
        if base.startswith("coap://"):
            client = self._coap_client(base, cert_pem, key_pem)
        else:
            client = EstClient(
                base, trust_anchor_pem=self.anchors_pem(), client_cert_pem=cert_pem, client_key_pem=key_pem,
                timeout=self.timeout, connections=1,
            )  # fmt: skip
        async with client:
            cacerts = await client.cacerts()
        await self.install_cacerts(cacerts, report)

    async def install_cacerts(self, cacerts: list[x509.Certificate], report: TickReport) -> None:
        """The truststore the /cacerts answer makes (:func:`updated_truststore`), written when it changed."""
        now = self.clock.now()
        current = self.dev.truststore()
        new = updated_truststore(current, cacerts, now)
        if not same_truststore(current, new):
            await asyncio.to_thread(self.dev.write_truststore, new)
            report.actions.append("truststore-updated")
        self._remember_cacerts(now)

    async def _quietly(
        self, report: TickReport, what: str, step: Awaitable[list[x509.Certificate]]
    ) -> list[x509.Certificate] | None:
        try:
            return await step
        except (IotdlmError, ValueError) as exc:
            report.errors.append(f"{what}: {exc.message if isinstance(exc, IotdlmError) else exc}")
            return None

    def _coap_client(self, base: str, cert_pem: bytes, key_pem: bytes) -> CoapEstClient:
        """Enrollment over CoAP/EDHOC/OSCORE with the cm whose EDHOC credential the device holds."""
        cred = self.cm_credentials.get(base)
        if cred is None:
            raise NotFoundError(
                f"device {self.dev.device_id} holds no EDHOC credential for {base}: give the cm's "
                "coap-edhoc-cred.cbor (--cm-credential)"
            )
        c509 = self.dev.hardware.truststore_format == "c509"  # a constrained device: C509 on the wire
        return coap_client_for(base, cred, cert_pem, key_pem, timeout=self.timeout, c509=c509)

    async def poll(self, report: TickReport) -> None:
        """Ask cm for this device's transfer message; hand a new one to the transfer agent."""
        assert self.messages is not None
        base = self.base_url()
        token = await self.messages.fetch(self.dev, base)
        if token is None:
            if not self._told_404:
                self._told_404 = True
                log.info(
                    "device %s: skipping the transfer step: %s%s answered 404 (no transfer message for "
                    "this device, or a cm without the transfer route)",
                    self.dev.device_id, base, TRANSFER_MESSAGE_PATH,
                )  # fmt: skip
                self.dev.log("transfer_message_none", url=base + TRANSFER_MESSAGE_PATH)
            return
        digest = hashlib.sha256(token).hexdigest()
        state = self._state()
        if digest in state.get("messages", []):
            return  # handed over already (the transfer agent would refuse it as a replay anyway)
        state["messages"] = [*state.get("messages", []), digest][-32:]
        atomic_write(self._state_path, json.dumps(state).encode(), mode=0o644)
        if self.transfers is None:
            return
        receipt = await self.transfers.handle(token)
        report.actions.append(f"transfer-{receipt.phase}")
        if not receipt.accepted:
            report.errors.append(f"transfer message refused: {receipt.detail}")

    def _state(self) -> dict[str, Any]:
        if not self._state_path.is_file():
            return {}
        data = json.loads(self._state_path.read_text())
        return data if isinstance(data, dict) else {}


async def run_fleet(
    runners: Sequence[DeviceRunner],
    *,
    once: bool,
    interval: float,
    stop: asyncio.Event,
    on_tick: Callable[[TickReport], None],
    concurrency: int = 32,
) -> None:
    """Devices in one process, pass after pass ``interval`` seconds apart until ``stop`` is set
    (one pass each with ``once``): each its own keys and state on disk, its own HTTPS
    connections. ``concurrency`` bounds the passes running at once."""
    sem = asyncio.Semaphore(concurrency)

    async def one(r: DeviceRunner) -> None:
        while True:
            async with sem:
                on_tick(await r.tick())
            if once or stop.is_set():
                return
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            except TimeoutError:
                pass

    await asyncio.gather(*(one(r) for r in runners))


__all__ = [
    "DEFAULT_RENEW_AT",
    "DeviceRunner",
    "MessageSource",
    "PassConnections",
    "TickReport",
    "TransferHandler",
    "TransferReceipt",
    "base_url_of",
    "run_fleet",
]
