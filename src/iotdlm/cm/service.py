"""cm as a running service: the HTTPS listener (EST, OCSP, CRLs), the optional plain-HTTP listener
(OCSP, CRLs) and the optional egress proxy for sm; relays to km over NATS as the cm identity.

With cm stopped nothing outside reaches km, pm or sm, and sm cannot reach the repository (the
paper's Table 1: cm is off during provisioning).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from iotdlm import cm_https
from iotdlm.aio import cancel_and_wait
from iotdlm.bus import Bus, Message, Subscription
from iotdlm.bus import subjects as s
from iotdlm.client.km import KmClient
from iotdlm.client.transfer_device import TransferDeviceClient
from iotdlm.clock import Clock, SystemClock
from iotdlm.cm import est
from iotdlm.cm.cacerts import CaCerts
from iotdlm.cm.coap import CREDENTIAL_FILE, DEFAULT_KEY_FILE, CoapDoor, load_or_make_key, responder_ccs
from iotdlm.cm.config import CmConfig
from iotdlm.cm.egress import EgressProxy
from iotdlm.cm.ocsp_cache import OcspCache, revoked_serial
from iotdlm.cm.server import EGRESS_MODES, CmApp, KmRelay, ModeCheck
from iotdlm.cm.tls import TlsSite, server_tls_context
from iotdlm.deployment import Deployment
from iotdlm.errors import IotdlmError, UnavailableError
from iotdlm.observe import ModuleMetrics, Observer
from iotdlm.observe.serve import ModeReader, km_answering, mode_ready
from iotdlm.pki.keys import private_key_to_pem
from iotdlm.wire.coap_est import ccs_bytes

log = logging.getLogger(__name__)


#: seconds between two requests for the registered factory CAs while km does not answer
FACTORY_CAS_RETRY = 30.0


class ModeGuardLike(Protocol):
    """What CmService starts and stops (:class:`iotdlm.modes.guard.ModeGuard`)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class CmTls:
    """cm's TLS material: its server context and the CA certificates /cacerts starts with."""

    context: ssl.SSLContext
    #: CA name (root, factory, operational, service) -> certificate; issuing CAs first, root last
    ca_certificates: Mapping[str, x509.Certificate]


def deployment_tls(
    dep: Deployment,
    extra_client_cas: Sequence[x509.Certificate] = (),
    *,
    now: dt.datetime,
    server_files: tuple[Path, Path] | None = None,
) -> CmTls:
    """From a deployment: cm's HTTPS certificate -- the one iotdlm issued (``DIR/modules/cm/https.pem``,
    see :mod:`iotdlm.cm_https`) or the operator's ``server_files`` (chain, key) -- as the server
    chain, checked at ``now``; the root, factory and operational CAs -- and ``extra_client_cas``,
    the external factory CAs registered for a trust transfer -- as the anchors for device client
    certificates. Warns when the certificate does not name the deployment's public host."""
    if server_files is None:
        chain, key = cm_https.load_issued_pair(dep.root, now=now)
    else:
        cert_path, key_path = server_files
        chain, key = cm_https.load_server_pair(
            _read_file(cert_path, "--tls-cert"), _read_file(key_path, "--tls-key"), now=now, source=str(cert_path)
        )
    missing = cm_https.missing_public_host(chain[0], dep.config.public_url)
    if missing is not None:
        log.warning(
            "cm's HTTPS certificate does not name %s, the host of the public URL %s: clients that check "
            "the host name will refuse it",
            missing,
            dep.config.public_url,
        )
    root = dep.ca_certificate("root")
    # every generation of the factory and operational CAs: a rotated-out one's devices still
    # present its certificates until they expire; /cacerts starts with those in it now (ADR 0026)
    generations = dep.ca_generations()
    issuing = dep.issuing_ca_certificates()
    device_cas = [issuing[g.name] for g in generations if g.role in ("factory", "operational")]
    ctx = server_tls_context(
        certificate_chain=chain,
        key_pem=private_key_to_pem(key, None),
        client_cas=[root, *device_cas, *extra_client_cas],
    )
    listed = sorted(g.name for g in generations if g.in_cacerts(now))
    return CmTls(context=ctx, ca_certificates={**{n: issuing[n] for n in listed}, "root": root})


def _coap_key(dep: Deployment, config: CmConfig) -> ec.EllipticCurvePrivateKey | None:
    """cm's EDHOC key when the CoAP door is on (made at the first start); its credential, the CCS
    devices pin, is written beside it for the operator to hand to devices (ADR 0029)."""
    if config.coap is None:
        return None
    folder = dep.root / "modules" / "cm"
    key = load_or_make_key(config.coap.edhoc_key or folder / DEFAULT_KEY_FILE)
    (folder / CREDENTIAL_FILE).write_bytes(ccs_bytes(responder_ccs(key, "cm")))
    return key


def _read_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(cm_https.MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise cm_https.ServerCertificateError(f"{what} {path}: {exc.strerror or exc}", field=what) from None


class CmService:
    """cm's listeners around a :class:`KmRelay`. ``await start()``, read the bound ports, ``await stop()``."""

    def __init__(
        self,
        config: CmConfig,
        *,
        km: KmRelay,
        tls: ssl.SSLContext,
        ca_certificates: Sequence[x509.Certificate] | Mapping[str, x509.Certificate] = (),
        clock: Clock | None = None,
        bus: Bus | None = None,
        mode: ModeCheck | None = None,
        guard: ModeGuardLike | None = None,
        factory_cas: Callable[[], Awaitable[list[x509.Certificate]]] | None = None,
        superseded_grace: dt.timedelta = dt.timedelta(0),
        coap_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        """``mode`` checks the operation mode before each request (None: no check); ``guard``, if
        given, is started and stopped with the service (a ModeGuard is both). ``factory_cas``
        asks km for the external factory CAs registered for a trust transfer (``KmClient.factory_cas``):
        asked at start, and again every :data:`FACTORY_CAS_RETRY` seconds while km does not answer
        (km is off in software-management); cm's TLS then trusts device certificates from them.
        ``superseded_grace`` (the deployment's ``superseded_grace_seconds``): how long after its
        thisUpdate cm may keep a good OCSP answer (with a ``bus``: see :mod:`iotdlm.cm.ocsp_cache`).
        ``coap_key``: cm's EDHOC key, needed when ``config.coap`` turns the CoAP door on (ADR 0029)."""
        self._superseded_grace = superseded_grace
        self.config = config
        self.clock = clock or SystemClock()
        self.tls = tls
        self._factory_cas = factory_cas
        self._factory_task: asyncio.Task[None] | None = None
        self.bus = bus  # closed by stop() when given (from_deployment connects it)
        cacerts = CaCerts(ca_certificates, fetch=km.chain, clock=self.clock, ttl=config.cacerts_ttl)
        self.app = CmApp(
            km,
            clock=self.clock,
            limits=config.limits,
            cacerts=cacerts,
            csrattrs=est.csrattrs_der(config.csr_algorithm),
            mode=mode,
        )
        self.guard = guard
        self.egress: EgressProxy | None = (
            EgressProxy(config.egress, admit=self._admit_egress) if config.egress is not None else None
        )
        self.coap: CoapDoor | None = None
        if config.coap is not None:
            if coap_key is None:
                raise ValueError("the CoAP door needs cm's EDHOC key")
            self.coap = CoapDoor(
                config.coap,
                km=km,
                cacerts=cacerts,
                key=coap_key,
                mode=mode,
                retry_after=config.limits.retry_after,
                clock=self.clock,
                transfer=TransferDeviceClient.like(km) if isinstance(km, KmClient) else None,
            )
        self._runners: list[web.AppRunner] = []
        self._https: TlsSite | None = None
        self._http: TlsSite | None = None
        self._ping: Subscription | None = None
        self._revocations: Subscription | None = None
        self._started_at = ""

    @classmethod
    async def from_deployment(
        cls, dep: Deployment, config: CmConfig, *, clock: Clock | None = None, check_mode: bool = True
    ) -> CmService:
        """Connect to the deployment's NATS as cm and build the service (not started). With
        ``check_mode`` (the default) cm watches the operation mode (a ModeGuard) and refuses what
        Table 1 forbids. ``config.tls_cert``/``tls_key``: an operator's HTTPS pair instead of the
        one iotdlm issued."""
        from iotdlm.client.connect import connect_identity, km_trust, sealer_for
        from iotdlm.client.km import KmClient
        from iotdlm.modes.guard import ModeGuard
        from iotdlm.modes.signed import ModeVerifier

        clock = clock or SystemClock()
        files = (
            (config.tls_cert, config.tls_key) if config.tls_cert is not None and config.tls_key is not None else None
        )
        tls = deployment_tls(dep, now=clock.now(), server_files=files)  # a bad pair fails before connecting
        bus, ident = await connect_identity(dep, "cm")
        km = KmClient(bus, sealer_for(ident), clock, timeout=config.limits.km_timeout, trust=km_trust(dep))
        guard = ModeGuard(bus, ModeVerifier.for_deployment(dep, clock)) if check_mode else None
        svc = cls(
            config,
            km=km,
            tls=tls.context,
            ca_certificates=tls.ca_certificates,
            clock=clock,
            bus=bus,
            mode=guard,
            guard=guard,
            # cm asks km (a signed reply); it never opens km's database
            factory_cas=km.factory_cas,
            superseded_grace=dt.timedelta(seconds=dep.config.superseded_grace_seconds),
            coap_key=_coap_key(dep, config),
        )
        svc.app.peer = km  # the trust transfer's routes between providers (cm/transfer_peer.py)
        svc.observe(bus, guard)
        return svc

    def observe(self, bus: Bus, guard: ModeReader | None) -> None:
        """Keep cm's metrics and answer its health on ``bus`` and at /ready (docs/adr/0018): ready
        when connected, the mode runs cm and, where the mode runs km, km answers."""
        metrics = ModuleMetrics("cm")
        ready = km_answering(bus, mode_ready(bus, guard, "cm"), guard) if guard is not None else None
        self.app.metrics = metrics
        self.app.observer = Observer(bus, metrics, mode=guard, ready=ready)

    async def _load_factory_cas(self, fetch: Callable[[], Awaitable[list[x509.Certificate]]]) -> None:
        """The registered factory CAs into cm's TLS trust, once km answers (restart cm after
        registering a new CA)."""
        while True:
            try:
                registered = await fetch()
            except UnavailableError as exc:
                log.info("cm: km does not answer for the registered factory CAs (%s); asking again later", exc)
            except IotdlmError as exc:
                log.error("cm: km's list of registered factory CAs is refused: %s", exc)
            else:
                if registered:
                    self.tls.load_verify_locations(cadata=b"".join(c.public_bytes(Encoding.DER) for c in registered))
                    log.info("cm trusts %d registered factory CAs (trust transfer)", len(registered))
                return
            await asyncio.sleep(FACTORY_CAS_RETRY)

    def _admit_egress(self) -> None:
        if self.app.mode is not None:
            self.app.mode.require(EGRESS_MODES, "egress for sm")

    # --- ports ------------------------------------------------------------------------------------
    @property
    def https_port(self) -> int:
        if self._https is None:
            raise RuntimeError("cm is not started")
        return self._https.port

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    @property
    def egress_port(self) -> int | None:
        return self.egress.port if self.egress is not None else None

    def urls(self) -> dict[str, str]:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        out = {"https": f"https://{host}:{self.https_port}"}
        if self._http is not None:
            out["http"] = f"http://{host}:{self._http.port}"
        if self.egress is not None:
            out["egress"] = self.egress.url
        if self.coap is not None and self._https is not None:
            out["coap"] = f"coap://{host}:{self.coap.port}"
        return out

    # --- life ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            if self.guard is not None:
                await self.guard.start()
            if self._factory_cas is not None:
                self._factory_task = asyncio.get_running_loop().create_task(
                    self._load_factory_cas(self._factory_cas), name="cm-factory-cas"
                )
            lim = self.config.limits
            self._https = await self._listen(
                self.app.https_app(), self.config.https_port, self.tls, lim.handshake_timeout
            )
            if self.config.http_port is not None:
                self._http = await self._listen(self.app.http_app(), self.config.http_port, None, lim.handshake_timeout)
            if self.egress is not None:
                await self.egress.start()
            if self.coap is not None:
                await self.coap.start()
            self._started_at = self.clock.now().isoformat()
            if self.bus is not None:
                # pm asks this to refuse work while the door to the outside is open
                self._ping = await self.bus.serve(s.CM_PING, self._answer_ping)
                # km's revocations drop cm's kept OCSP answers at once: only then does cm keep any
                self._revocations = await self.bus.subscribe(s.KM_REVOKED_EVENT, self._on_revoked)
                self.app.ocsp_cache = OcspCache(good_for=self._superseded_grace)
            if self.app.observer is not None:
                await self.app.observer.start()
        except BaseException:
            await self.stop()
            raise

    async def _listen(
        self, app: web.Application, port: int, tls: ssl.SSLContext | None, handshake_timeout: float
    ) -> TlsSite:
        runner = self.app.runner(app)
        await runner.setup()
        assert runner.server is not None
        self.app.watch(runner.server)
        self._runners.append(runner)
        site = TlsSite(runner, self.config.host, port, ssl_context=tls, handshake_timeout=handshake_timeout)
        await site.start()
        return site

    async def _answer_ping(self, m: Message) -> bytes:
        return json.dumps({"module": "cm", "since": self._started_at, "listeners": self.urls()}).encode()

    async def _on_revoked(self, m: Message) -> None:
        """km revoked a certificate (``{"issuer": ..., "serial": "<hex>"}``): drop cm's answers for it;
        an event that does not read empties the whole cache (never keep what may be stale)."""
        cache = self.app.ocsp_cache
        if cache is None:
            return
        serial = revoked_serial(m.data)
        if serial is None:
            log.warning("cm: a revocation event from km does not read; dropping every kept OCSP answer")
            cache.clear()
            return
        cache.revoked(serial)

    async def stop(self) -> None:
        task, self._factory_task = self._factory_task, None
        if task is not None:
            await cancel_and_wait([task], what="cm factory CA task")
        if self.app.observer is not None:
            await self.app.observer.stop()
        for sub in (self._ping, self._revocations):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._ping = self._revocations = None
        self.app.ocsp_cache = None
        if self.egress is not None:
            await self.egress.stop()
        if self.coap is not None:
            with contextlib.suppress(Exception):
                await self.coap.stop()
        guard, self.guard = self.guard, None
        if guard is not None:
            await guard.stop()
        runners, self._runners = self._runners, []
        for runner in runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._https = self._http = None
        bus, self.bus = self.bus, None
        if bus is not None:
            with contextlib.suppress(Exception):
                await bus.close()
