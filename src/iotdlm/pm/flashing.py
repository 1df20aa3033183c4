"""Flashing a device and verifying it by reading back (paper 4.1.1, 4.2; Figs 3-5).

Per device, in a worker thread (:meth:`Flashing.work`): flash the staged software, the
truststore, the config (device id, dtype, enroll URI = CA-URI, update URI), the certificates -- a
device whose certificates could not be issued is not touched at all. Then verify by reading back
from the device (:meth:`Flashing.read_back`): the truststore is the one flashed and holds the
deployment's root, each certificate is the one flashed, chains through that truststore to the root
(RFC 5280 path validation) and certifies the key the device holds, and the image's SHA-256 is the
verified one. A device stops at its first failure; the others go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from iotdlm import errors
from iotdlm.clock import Clock
from iotdlm.pki.chain import der
from iotdlm.pm.algorithm1 import StagedSoftware
from iotdlm.pm.certificates import Chain, is_self_signed, path_validate, spki
from iotdlm.pm.flasher import Flasher
from iotdlm.pm.plan import Job
from iotdlm.pm.settings import (
    CERTIFICATE_STEP_PREFIX,
    STEP_CONFIG,
    STEP_SOFTWARE,
    STEP_TRUSTSTORE,
    STEP_VERIFY,
    Anchors,
    PmSettings,
)
from iotdlm.pm.workers import Workers
from iotdlm.store import records as rec

log = logging.getLogger(__name__)


def device_config(settings: PmSettings, device_id: str) -> dict[str, Any]:
    """The config flashed into a device: its id, dtype, the CA-URI (cm's EST URL), the update URI."""
    config: dict[str, Any] = {
        "device_id": device_id,
        "dtype": settings.dtype,
        "enroll_uri": settings.enroll_uri,
        "provisioned_by": f"pm-{settings.dtype}",
    }
    if settings.update_uri is not None:
        config["update_uri"] = settings.update_uri
    return config


class Flashing:
    """Flashes the devices of a chunk through the dtype's flasher plug-in, and reads them back."""

    def __init__(
        self, settings: PmSettings, *, flasher: Flasher, anchors: Anchors, clock: Clock, workers: Workers
    ) -> None:
        self.settings = settings
        self.dtype = settings.dtype
        self.flasher = flasher
        self.anchors = anchors
        self.clock = clock
        self.workers = workers

    async def flash(
        self, chunk: Sequence[Job], software: StagedSoftware | None, chain: Chain | None
    ) -> AsyncIterator[Job]:
        """The jobs of ``chunk`` as they finish: first those that failed before anything was
        flashed (no certificate from km), then the others as their worker threads are done."""

        async def work(job: Job) -> Job:
            await self.workers.run(self.work, job, software, chain)
            return job

        for job in chunk:
            if not job.ok:
                yield job
        for next_done in asyncio.as_completed([work(j) for j in chunk if j.ok]):
            yield await next_done

    def work(self, job: Job, software: StagedSoftware | None, chain: Chain | None) -> None:
        """Flash and verify one device, step by step, in a worker thread; stops at the first failure."""
        for step in job.todo:
            if not job.ok:
                return
            t0 = time.perf_counter()
            phase = "verify" if step == STEP_VERIFY else "flash_software" if step == STEP_SOFTWARE else "flash_other"
            try:
                self._step(job, step, software, chain)
            except Exception as exc:
                log.warning("pm-%s: device %s failed at %s: %s", self.dtype, job.device_id, step, exc)
                job.fail(step, exc)
                return
            finally:
                job.timings[phase] += time.perf_counter() - t0
            job.done.append(step)

    def _step(self, job: Job, step: str, software: StagedSoftware | None, chain: Chain | None) -> None:
        ref = job.device.ref
        if step == STEP_SOFTWARE:
            assert software is not None
            self.flasher.flash_image(ref, software.path, software.info)
            job.release_counter, job.image_sha256 = software.release_counter, software.sha256
        elif step == STEP_TRUSTSTORE:
            assert chain is not None
            self.flasher.flash_truststore(ref, chain.truststore)
        elif step == STEP_CONFIG:
            self.flasher.flash_config(ref, device_config(self.settings, job.device_id))
        elif step.startswith(CERTIFICATE_STEP_PREFIX):
            profile = step[len(CERTIFICATE_STEP_PREFIX) :]
            cert = job.issued[profile]
            self.flasher.flash_certificate(ref, profile, cert)
            job.certificates[profile] = rec.serial_to_hex(cert.serial_number)
        elif step == STEP_VERIFY:
            self.read_back(job, chain)
        else:  # pragma: no cover - the plan only holds known steps
            raise RuntimeError(f"unknown step {step!r}")

    def read_back(self, job: Job, chain: Chain | None) -> None:
        """Read back from the device: truststore, certificates, key, image hash."""
        ref = job.device.ref
        root = self.anchors.root_ca
        truststore = self.flasher.read_truststore(ref)
        held = {der(c) for c in truststore}
        if chain is not None and held != {der(c) for c in chain.truststore}:
            raise errors.UntrustedError(
                "the truststore read back from the device is not the one flashed", field="truststore"
            )
        if der(root) not in held:
            raise errors.UntrustedError(
                "the device's truststore does not hold the deployment's root CA", field="truststore"
            )
        intermediates = [c for c in truststore if not is_self_signed(c)]
        device_key = spki(self.flasher.device_public_key(ref))
        for profile in self.settings.profiles:
            serial = job.certificates.get(profile)
            cert = self.flasher.read_certificate(ref, profile)
            if cert is None or serial is None or rec.serial_to_hex(cert.serial_number) != serial:
                raise errors.UntrustedError(
                    f"the {profile} certificate read back from the device is not the one flashed", field=profile
                )
            path_validate(cert, root, intermediates, self.clock.now())  # through the truststore on the device
            if spki(cert.public_key()) != device_key:
                raise errors.UntrustedError(
                    f"the {profile} certificate does not certify the key the device holds", field=profile
                )
        got = self.flasher.read_image_sha256(ref)
        if job.image_sha256 is None or got != job.image_sha256:
            raise errors.BadSignatureError(
                f"the image read back from the device has SHA-256 {got}, the verified software has {job.image_sha256}",
                field="image",
            )
