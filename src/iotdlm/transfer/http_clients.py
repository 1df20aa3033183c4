"""The device agent's HTTPS clients for the transfer routes at cm (issue 13), implementing the
agent's seams (:class:`~iotdlm.transfer.agent.AttestationClient`,
:class:`~iotdlm.transfer.agent.FallbackClient`) and fetching the per-device transfer message.

The device authenticates with a TLS client certificate (at SP1 its operational or factory
certificate, at SP2's raURI its factory certificate: the one SP1 shared) and authenticates the
server with ``anchors``. Refusals come back as the iotdlm error of their HTTP status, with cm's one
line of text as the message; an attestation refused (403) is a failed verdict, not an error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import ssl
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
from cryptography import x509

from iotdlm.device.est_client import (  # the EST client's TLS, errors and bootstrap
    WELL_KNOWN,
    _client_context,
    _client_context_files,
    _error_for,
    bootstrap_cacerts,
)
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import BadRequestError, NotFoundError, RejectedError, TooLargeError, UnavailableError
from iotdlm.pki.chain import certs_to_pem
from iotdlm.transfer import attestation
from iotdlm.transfer.shell import UpdateImage

MESSAGE_PATH = "/transfer/message"
REFUSAL_PATH = "/transfer/refusal"
MAX_RESPONSE_BYTES = 64 * 1024
TRANSFER_HEADER = "Iotdlm-Transfer"


class TransferHttps:
    """One device's HTTPS session with one provider's cm (use as an async context manager)."""

    def __init__(
        self,
        *,
        anchors: Sequence[x509.Certificate],
        client_cert_pem: bytes | None,
        client_key_pem: bytes | None,
        timeout: float = 30.0,
    ) -> None:
        self._ssl: ssl.SSLContext | None = _client_context(certs_to_pem(list(anchors)), client_cert_pem, client_key_pem)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._borrowed = False

    @classmethod
    def over(cls, session: aiohttp.ClientSession) -> TransferHttps:
        """A client on a session the caller keeps (and closes): its connector's TLS context is the
        device's credential and anchors (:class:`DeviceHttps` builds them)."""
        self = cls.__new__(cls)
        self._ssl = None
        self._timeout = aiohttp.ClientTimeout()
        self._session, self._borrowed = session, True
        return self

    async def __aenter__(self) -> Self:
        if not self._borrowed:
            assert self._ssl is not None  # built in __init__ when the session is not borrowed
            self._session = _session(self._ssl, self._timeout)
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and not self._borrowed:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        url: str,
        what: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        resend: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """``resend``: the request means the same sent twice (a report of a state), so it is sent
        once more when the server closed the keep-alive connection it went out on (RFC 9112
        9.3.1; cm closes idle ones after Limits.idle_timeout), as aiohttp does for GET itself."""
        if not url.startswith("https://"):
            raise BadRequestError(f"{what}: {url[:80]!r} is not an https URL")
        if self._session is None:
            raise RuntimeError("use TransferHttps as an async context manager")
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            for attempt in (1, 2):
                try:
                    async with self._session.request(method, url, data=body, headers=headers) as resp:
                        data = await _read_limited(resp)
                        return resp.status, dict(resp.headers), data
                except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                    if not resend or attempt == 2 or isinstance(exc, aiohttp.ClientConnectorError):
                        raise
            raise AssertionError("unreachable")  # pragma: no cover
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UnavailableError(f"{what}: cannot reach {url[:120]} ({type(exc).__name__}: {exc})") from exc

    async def _ok(
        self,
        method: str,
        url: str,
        what: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        resend: bool = False,
    ) -> tuple[dict[str, str], bytes]:
        status, headers, data = await self._request(
            method, url, what, body=body, content_type=content_type, resend=resend
        )
        if status != 200:
            raise _error_for(status, what, data, None)
        return headers, data

    # --- SP1 ------------------------------------------------------------------------------------
    async def fetch_message(self, base_url: str, *, device: str = "") -> tuple[str, bytes]:
        """(transfer id, the device's transfer message) from SP1's cm at ``base_url`` (``device``:
        name the device; cm refuses any but the one of the client certificate)."""
        query = "?" + urllib.parse.urlencode({"device": device}) if device else ""
        url = base_url.rstrip("/") + MESSAGE_PATH + query
        headers, data = await self._ok("GET", url, "fetching the transfer message")
        return headers.get(TRANSFER_HEADER, ""), data

    async def report(self, fallback_uri: str, *, transfer_id: str, device_id: str, reason: str) -> None:
        """FallbackClient: tell SP1 (its fallbackURI) the device fell back (the device is the one of
        the client certificate; ``device_id`` is not sent)."""
        body = json.dumps({"transfer": transfer_id, "reason": reason[:500] or "unspecified"}).encode()
        await self._ok(
            "POST", fallback_uri, "reporting the fallback", body=body, content_type="application/json", resend=True
        )

    async def report_refusal(self, cm_url: str, *, reason: str, detail: str, message: str) -> None:
        """RefusalReporter: tell the provider's cm at ``cm_url`` the device refused a transfer message."""
        body = json.dumps({"reason": reason, "detail": detail[:200], "message": message}).encode()
        url = cm_url.rstrip("/") + REFUSAL_PATH
        await self._ok("POST", url, "reporting a refused transfer message", body=body, content_type="application/json")

    # --- SP2: the raURI ---------------------------------------------------------------------------
    async def challenge(self, ra_uri: str, device_id: str) -> bytes:
        """AttestationClient: a fresh nonce from SP2's verifier."""
        _h, data = await self._ok("POST", ra_uri.rstrip("/") + "/challenge", "asking for an attestation challenge")
        nonce = _json(data, "the attestation challenge").get("nonce")
        try:
            return base64.b64decode(str(nonce), validate=True)
        except ValueError as exc:
            raise BadRequestError("the attestation challenge carries no base64 nonce") from exc

    async def submit(self, ra_uri: str, evidence: bytes) -> attestation.Verdict:
        """AttestationClient: the verdict on the signed measurement (a refusal is a failed verdict)."""
        url = ra_uri.rstrip("/") + "/evidence"
        status, _h, data = await self._request(
            "POST", url, "submitting attestation evidence", body=evidence, content_type="application/cose"
        )
        text = " ".join(data[:400].decode("utf-8", "replace").split())
        if status == 403:
            return attestation.Verdict("?", False, text or "attestation refused")
        if status != 200:
            raise _error_for(status, "submitting attestation evidence", data, None)
        v = _json(data, "the attestation verdict")
        return attestation.Verdict(str(v.get("device", "?")), v.get("ok") is True, str(v.get("reason", "")))

    # --- SP2: the update server (the updateURI) ------------------------------------------------------
    async def fetch(self, update_uri: str, device_id: str) -> UpdateImage:
        """UpdateClient: the image SP2 published for the device's transfer, checked against the
        SHA-256 cm names (``info``: transfer, version, sha256)."""
        headers, image = await self._ok("GET", update_uri, "fetching the update")
        sha = headers.get("Iotdlm-Update-Sha256", "")
        if hashlib.sha256(image).hexdigest() != sha:
            raise BadRequestError("the update image does not match the SHA-256 the update server named")
        info = {"transfer": headers.get(TRANSFER_HEADER, ""), "version": headers.get("Iotdlm-Update-Version", ""),
                "sha256": sha}  # fmt: skip
        return UpdateImage(image, info)

    async def report_updated(self, update_uri: str, *, transfer_id: str, version: str) -> None:
        """Tell SP2's update server the device installed ``version`` (its status: updated)."""
        body = json.dumps({"transfer": transfer_id, "version": version}).encode()
        url = update_uri.rstrip("/") + "/report"
        await self._ok("POST", url, "reporting the update", body=body, content_type="application/json", resend=True)


class DeviceHttps:
    """A simulated device's HTTPS clients for one pass of its loop: the transfer agent's
    :class:`~iotdlm.transfer.agent.AttestationClient`, :class:`~iotdlm.transfer.agent.UpdateClient`,
    :class:`~iotdlm.transfer.agent.FallbackClient` and :class:`~iotdlm.transfer.agent.Enroller`
    (EST with CA2), and the runner's message fetch.

    Each call presents the credential its route takes -- at SP1 (message, fallback) the operational
    certificate, else the factory one; at SP2 (raURI, updateURI, enrollURI) the factory
    certificate, the one SP1 shared -- and authenticates the server with the device's truststore
    as it is then (SP2's anchors join it before the raURI is asked), or for EST with the anchors the
    transfer message named.

    One TLS context and one keep-alive session per (credential, anchors) for the pass: the
    attestation challenge and evidence share a connection, as do EST's nonce, simpleenroll and
    cacerts. Nothing is shared between devices (each device its own ``DeviceHttps``), and a new
    credential or truststore makes a new context and connection. :meth:`close` (the runner calls
    it at the end of each pass) closes the connections and drops the contexts."""

    def __init__(self, dev: SimulatedDevice, *, timeout: float = 30.0) -> None:
        self.dev = dev
        self.timeout = timeout
        self._sessions: dict[tuple[bytes, bytes], aiohttp.ClientSession] = {}

    def _session_for(
        self,
        anchors: Sequence[x509.Certificate],
        cert_pem: bytes,
        key_pem: bytes,
        files: tuple[Path, Path] | None = None,
    ) -> aiohttp.ClientSession:
        """The pass's session for this credential and these anchors (made on first use). ``files``:
        where the device keeps that certificate and key (loaded from there, not copied)."""
        anchors_pem = certs_to_pem(list(anchors))
        key = (hashlib.sha256(cert_pem + b"\0" + key_pem).digest(), hashlib.sha256(anchors_pem).digest())
        session = self._sessions.get(key)
        if session is None or session.closed:
            try:
                ctx = (
                    _client_context_files(anchors_pem, files)
                    if files is not None
                    else _client_context(anchors_pem, cert_pem, key_pem)
                )
            except ValueError as exc:
                raise NotFoundError(f"the device's truststore or credential does not load: {exc}") from exc
            session = self._sessions[key] = _session(ctx, aiohttp.ClientTimeout(total=self.timeout))
        return session

    def _client(self, kind: str) -> TransferHttps:
        anchors = self.dev.truststore()
        if not anchors:
            raise NotFoundError(f"device {self.dev.device_id} has an empty truststore: it cannot authenticate cm")
        if kind == "sp1":
            kind = "operational" if self.dev.certificate("operational") is not None else "factory"
        return TransferHttps.over(self._session_for(anchors, *self._identity(kind)))

    def _identity(self, kind: str) -> tuple[bytes, bytes, tuple[Path, Path]]:
        """(certificate PEM, key PEM, their files) of the device's ``kind`` credential."""
        files = self.dev.tls_identity_files(kind)
        return files[0].read_bytes(), files[1].read_bytes(), files

    async def close(self) -> None:
        """The end of the pass: close the connections, drop the TLS contexts."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def messages(self, base_url: str) -> bytes | None:
        """MessageSource.fetch: the device's transfer message at its cm; None when there is none."""
        client = self._client("sp1")  # a device that cannot speak TLS is told so, not taken for a 404
        try:
            _tid, token = await client.fetch_message(base_url)
        except NotFoundError:  # cm: no message waits for this device (or no transfer route)
            return None
        if len(token) > MAX_RESPONSE_BYTES:
            raise TooLargeError(f"the transfer message exceeds {MAX_RESPONSE_BYTES} bytes")
        return token

    async def report(self, fallback_uri: str, *, transfer_id: str, device_id: str, reason: str) -> None:
        await self._client("sp1").report(fallback_uri, transfer_id=transfer_id, device_id=device_id, reason=reason)

    async def report_refusal(self, cm_url: str, *, reason: str, detail: str, message: str) -> None:
        async with self._client("sp1") as c:
            await c.report_refusal(cm_url, reason=reason, detail=detail, message=message)

    async def challenge(self, ra_uri: str, device_id: str) -> bytes:
        return await self._client("factory").challenge(ra_uri, device_id)

    async def submit(self, ra_uri: str, evidence: bytes) -> attestation.Verdict:
        return await self._client("factory").submit(ra_uri, evidence)

    async def fetch(self, update_uri: str, device_id: str) -> UpdateImage:
        return await self._client("factory").fetch(update_uri, device_id)

    async def report_updated(self, update_uri: str, *, transfer_id: str, version: str) -> None:
        await self._client("factory").report_updated(update_uri, transfer_id=transfer_id, version=version)

    # --- Enroller: EST with CA2 at the enrollURI ------------------------------------------------------
    async def enroll(
        self,
        enroll_uri: str,
        *,
        anchors: Sequence[x509.Certificate],
        client_cert_pem: bytes,
        client_key_pem: bytes,
        csr: bytes,
    ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        """EST simpleenroll then cacerts, on one connection authenticated by ``anchors``, with the
        credential the agent names (the factory certificate)."""
        from iotdlm.device.est_client import EstClient

        base = enroll_uri[: -len(WELL_KNOWN)] if enroll_uri.endswith(WELL_KNOWN) else enroll_uri
        if not anchors:
            raise RejectedError("no anchors to authenticate the enrollment URI with")
        files = None
        with contextlib.suppress(NotFoundError):
            cert_pem, key_pem, factory = self._identity("factory")
            files = factory if (cert_pem, key_pem) == (client_cert_pem, client_key_pem) else None
        try:
            session = self._session_for(anchors, client_cert_pem, client_key_pem, files)
            client = EstClient(
                base, trust_anchor_pem=certs_to_pem(list(anchors)), client_cert_pem=client_cert_pem,
                client_key_pem=client_key_pem, timeout=self.timeout, session=session,
            )  # fmt: skip
        except (ValueError, NotFoundError) as exc:
            raise RejectedError(f"cannot use the enrollment URI or anchors: {exc}") from exc
        cert = await client.simpleenroll(csr)
        return cert, await client.cacerts()

    async def cacerts(self, enroll_uri: str) -> list[x509.Certificate]:
        """Enroller.cacerts: the RFC 7030 4.1.1 bootstrap (the server not authenticated)."""
        return await bootstrap_cacerts(enroll_uri, seconds=self.timeout)


class DeviceMessages:
    """The runner's :class:`~iotdlm.device.runner.MessageSource` (``GET <cm>/transfer/message``
    with the device's certificate): on the device's :class:`DeviceHttps` of the pass when given
    (``https``), else on one of its own for the call."""

    def __init__(self, *, timeout: float = 30.0, https: DeviceHttps | None = None) -> None:
        self.timeout = timeout
        self.https = https

    async def fetch(self, dev: SimulatedDevice, base_url: str) -> bytes | None:
        if self.https is not None and self.https.dev is dev:
            return await self.https.messages(base_url)
        https = DeviceHttps(dev, timeout=self.timeout)
        try:
            return await https.messages(base_url)
        finally:
            await https.close()


def _session(ctx: ssl.SSLContext, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=ctx, limit=2), trust_env=False)


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        out = json.loads(data)
    except ValueError as exc:
        raise BadRequestError(f"{what} is not JSON") from exc
    if not isinstance(out, dict):
        raise BadRequestError(f"{what} is not a JSON object")
    return out


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(16 * 1024):
        buf += chunk
        if len(buf) > MAX_RESPONSE_BYTES:
            raise TooLargeError(f"the answer exceeds {MAX_RESPONSE_BYTES} bytes")
    return bytes(buf)


__all__ = ["DeviceHttps", "DeviceMessages", "TransferHttps"]
