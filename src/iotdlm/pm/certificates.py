"""Device certificates from km (Scenario 2, Figs 4-5; seed 003 VI-B) and the truststore.

- :meth:`Certificates.chain` -- the truststore: root and issuing CA certificates from km's chain,
  whose root must be the deployment's own;
- what each device hands over for its certificates: a CSR made on the device (Scenario 2a,
  Fig. 4) or, for a device that cannot make one, its public key, from which pm builds a CRMF
  request with ``raVerified`` (Scenario 2b, Fig. 5);
- ONE signed batch request to km per certificate profile and chunk (seed 003 VI-B: factory and/or
  operational, as the deployment's policy says); each certificate is checked before it is flashed
  (names the device, certifies the device's key, chains to the root: :func:`path_validate`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from iotdlm import errors
from iotdlm.client.km import KmClient
from iotdlm.clock import Clock
from iotdlm.pki import crmf
from iotdlm.pki.chain import der, load_certificate, verify_issued_by
from iotdlm.pki.csr import parse_csr
from iotdlm.pki.names import device_id_of, device_subject
from iotdlm.pm.flasher import Flasher
from iotdlm.pm.plan import Job, chunks
from iotdlm.pm.settings import CERTIFICATE_STEP_PREFIX, Anchors, PmSettings, certificate_step
from iotdlm.pm.workers import Workers
from iotdlm.wire import km as kmsg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chain:
    """km's root and issuing CAs: the truststore flashed into the devices."""

    root: x509.Certificate
    cas: tuple[x509.Certificate, ...]

    @property
    def truststore(self) -> list[x509.Certificate]:
        return [self.root, *self.cas]


def spki(key: Any) -> bytes:
    """A public key's SubjectPublicKeyInfo (DER), to compare keys."""
    out: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return out


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # InvalidSignature, ValueError, TypeError: not self-signed
        return False
    return True


def path_validate(
    cert: x509.Certificate, root: x509.Certificate, intermediates: list[x509.Certificate], now: dt.datetime
) -> None:
    """RFC 5280 path validation (cryptography's verifier) from ``cert`` to ``root``. A
    certificate km has just issued may start a moment after pm's clock (km runs elsewhere):
    validity is checked at the later of ``now`` and its notBefore."""
    at = max(now, cert.not_valid_before_utc)
    verifier = verification.PolicyBuilder().store(verification.Store([root])).time(at).build_client_verifier()
    try:
        verifier.verify(cert, intermediates)
    except verification.VerificationError as exc:
        raise errors.UntrustedError(
            f"certificate {cert.subject.rfc4514_string()} does not chain to {root.subject.rfc4514_string()}: {exc}"
        ) from exc


class Certificates:
    """pm's side of Scenario 2: the truststore and the device certificates, from km."""

    def __init__(
        self, settings: PmSettings, *, km: KmClient, flasher: Flasher, anchors: Anchors, clock: Clock, workers: Workers
    ) -> None:
        self.settings = settings
        self.dtype = settings.dtype
        self.km = km
        self.flasher = flasher
        self.anchors = anchors
        self.clock = clock
        self.workers = workers

    async def chain(self) -> Chain:
        """Root and issuing CA certificates from km; the root must be the deployment's own."""
        reply = await self.km.chain()
        root = load_certificate(reply.root)
        if der(root) != der(self.anchors.root_ca):
            raise errors.UntrustedError(
                f"km's root CA ({root.subject.rfc4514_string()}) is not this deployment's root "
                f"({self.anchors.root_ca.subject.rfc4514_string()}); refusing its chain",
                field="chain",
            )
        now = self.clock.now()
        cas: list[x509.Certificate] = []
        for name in sorted(reply.chains):
            chain = reply.chains[name]
            if not chain:
                raise errors.BadRequestError(f"km's chain of {name} is empty", field="chain")
            ca = load_certificate(chain[0])
            verify_issued_by(ca, root, now=now, eku=None)
            if der(ca) not in {der(c) for c in cas}:
                cas.append(ca)
        return Chain(root=root, cas=tuple(cas))

    def device_request(self, job: Job) -> None:
        """What the device hands over: a CSR made on it (Fig. 4), else its public key, from which
        pm builds CRMF with raVerified (Fig. 5). Runs in a worker thread."""
        t0 = time.perf_counter()
        try:
            ref = job.device.ref
            csr = self.flasher.device_csr(ref)
            if csr is not None:
                req = parse_csr(csr)
                job.csr, job.public_key, job.request = csr, req.public_key, "csr"
            else:
                pub = self.flasher.device_public_key(ref)
                subject = device_subject(job.device_id, self.settings.organization, self.dtype)
                job.crmf = crmf.build_ra_verified(0, subject, pub)
                job.public_key, job.request = pub, "crmf"
        finally:
            job.timings["device_requests"] += time.perf_counter() - t0

    def check_issued(self, job: Job, profile: str, issued: kmsg.IssuedCertificate, chain: Chain) -> x509.Certificate:
        """Before flashing it: the certificate km sent names the device, certifies the key the
        device handed over, and chains to the deployment's root."""
        cert = load_certificate(issued.certificate)
        if device_id_of(cert) != job.device_id:
            raise errors.UntrustedError(
                f"km's {profile} certificate names device {device_id_of(cert)!r}, not {job.device_id}",
                device_id=job.device_id,
            )
        assert job.public_key is not None
        if spki(cert.public_key()) != spki(job.public_key):
            raise errors.UntrustedError(
                f"km's {profile} certificate does not certify the key device {job.device_id} handed over",
                device_id=job.device_id,
            )
        path_validate(cert, chain.root, list(chain.cas), self.clock.now())
        return cert

    async def request(self, chunk: Sequence[Job], chain: Chain | None, timings: dict[str, float]) -> None:
        """The certificates of a chunk: each device's request, then one km batch per profile.
        A device that cannot have one is failed at its certificate step (and is not flashed)."""
        need = [j for j in chunk if j.ok and j.wants_certificates()]
        if not need:
            return
        assert chain is not None
        first_step = {j.device_id: next(st for st in j.todo if st.startswith(CERTIFICATE_STEP_PREFIX)) for j in need}

        async def ask(job: Job) -> None:
            try:
                await self.workers.run(self.device_request, job)
            except Exception as exc:
                log.warning("pm-%s: device %s handed over no request: %s", self.dtype, job.device_id, exc)
                job.fail(first_step[job.device_id], exc)

        await asyncio.gather(*(ask(j) for j in need))
        for profile in self.settings.profiles:
            step = certificate_step(profile)
            asking = [j for j in need if j.ok and step in j.todo]
            for part in chunks(asking, kmsg.MAX_BATCH):
                await self._issue(profile, part, chain, timings)

    async def _issue(self, profile: str, part: Sequence[Job], chain: Chain, timings: dict[str, float]) -> None:
        """One signed batch request to km for ``profile``; each certificate checked on its way in."""
        step = certificate_step(profile)
        items = [kmsg.IssueItem(device_id=j.device_id, profile=profile, csr=j.csr, crmf=j.crmf) for j in part]
        t0 = time.perf_counter()
        try:
            results = await self.km.issue_batch(items)
        except errors.IotdlmError as exc:
            log.error("pm-%s: km refused the %s batch of %d: %s", self.dtype, profile, len(items), exc)
            for j in part:
                j.fail(step, exc)
            return
        finally:
            timings["km"] += time.perf_counter() - t0
        by_id = {r.device_id: r for r in results}
        for j in part:
            r = by_id.get(j.device_id)
            if r is None:
                j.fail_with(step, errors.InternalError.code, f"km's answer has no result for {j.device_id}")
            elif r.error is not None:
                j.fail_with(step, r.error.code, f"km refused the {profile} certificate: {r.error.message}")
            elif r.certificate is None:
                j.fail_with(step, errors.InternalError.code, f"km sent no {profile} certificate")
            else:
                try:
                    j.issued[profile] = self.check_issued(j, profile, r.certificate, chain)
                except errors.IotdlmError as exc:
                    j.fail(step, exc)
