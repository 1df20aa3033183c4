"""pm's settings, the trust anchors it is given, and the steps of a device (paper 4.1.1, 4.2).

- :class:`PmSettings` -- how pm provisions one dtype; ``profiles`` is the deployment's policy
  (seed 003 VI-B: a factory certificate, an operational one, or both);
- :class:`Anchors` -- what pm trusts, none of it taken from the modules it checks: pk_sm, the
  repository's pinned TUF root (pk_repo), the sm-pm key, the deployment's root CA;
- the steps recorded per device (``software``, ``truststore``, ``config``,
  ``certificate:<profile>``, ``verify``), in the order a device goes through them;
- :class:`Progress` -- what a run tells its ``progress`` callback.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509

from iotdlm import errors, software
from iotdlm.pki.keys import PublicKey
from iotdlm.pki.names import check_id
from iotdlm.pki.profiles import DEVICE_PROFILES
from iotdlm.wire import km as kmsg
from iotdlm.wire import pm as m
from iotdlm.wire import software as sw

# --- steps ---------------------------------------------------------------------------------------
STEP_SOFTWARE: Final = "software"
STEP_TRUSTSTORE: Final = "truststore"
STEP_CONFIG: Final = "config"
STEP_VERIFY: Final = "verify"
CERTIFICATE_STEP_PREFIX: Final = "certificate:"
#: where a device that is not on the bench (or cannot be addressed) fails
STEP_DISCOVER: Final = "discover"
#: who runs the line, as the records and the audit log keep it
OPERATOR_RE: Final = re.compile(r"^[^\x00-\x1f\x7f]{1,255}$")


def certificate_step(profile: str) -> str:
    return f"{CERTIFICATE_STEP_PREFIX}{profile}"


def check_operator(operator: str) -> str:
    """The operator's name as the records and the audit log keep it: 1-255 printable characters."""
    if not isinstance(operator, str) or not OPERATOR_RE.match(operator) or not operator.strip():
        raise errors.BadRequestError(
            "operator must be a name of 1-255 printable characters (who runs the line)", field="operator"
        )
    return operator


# --- settings and trust anchors --------------------------------------------------------------------


@dataclass(frozen=True)
class PmSettings:
    """How pm provisions one dtype. ``profiles`` is the deployment's policy: which device
    certificates to issue (seed 003 VI-B: a factory certificate, an operational one, or both);
    required, never defaulted."""

    dtype: str
    profiles: tuple[str, ...]
    #: O= of the names in the CRMF requests pm builds (km names the certificate from its profile)
    organization: str
    #: the CA-URI flashed into the device config: cm's EST URL (seed 003 VI-B)
    enroll_uri: str
    #: where the device asks for software updates (None: not written to the config)
    update_uri: str | None
    #: pm's own folder for the staged image (created 0700)
    staging_dir: Path
    #: the release to flash (None: the latest sm stores)
    release_counter: int | None = None
    #: devices per chunk: one km request per profile per chunk, one store write per chunk
    batch_size: int = 100
    #: devices flashed at once (worker threads)
    concurrency: int = 8
    #: how long pm waits for cm's answer to the ping before concluding it is off
    cm_ping_timeout: float = 1.0

    def __post_init__(self) -> None:
        check_id(self.dtype, "dtype")
        if not self.profiles:
            raise ValueError("PmSettings.profiles must name at least one certificate profile")
        if len(set(self.profiles)) != len(self.profiles):
            raise ValueError(f"PmSettings.profiles repeats a profile: {self.profiles}")
        unknown = [p for p in self.profiles if p not in DEVICE_PROFILES]
        if unknown:
            raise ValueError(f"PmSettings.profiles: {unknown} are not device profiles ({', '.join(DEVICE_PROFILES)})")
        if not 1 <= self.batch_size <= kmsg.MAX_BATCH:
            raise ValueError(f"PmSettings.batch_size must be 1..{kmsg.MAX_BATCH}")
        if self.concurrency < 1:
            raise ValueError("PmSettings.concurrency must be at least 1")
        if self.release_counter is not None:
            sw.check_release_counter(self.release_counter)
        if self.cm_ping_timeout <= 0:
            raise ValueError("PmSettings.cm_ping_timeout must be positive")

    @property
    def steps(self) -> tuple[str, ...]:
        """Every step of a device, in order."""
        return (
            STEP_SOFTWARE,
            STEP_TRUSTSTORE,
            STEP_CONFIG,
            *(certificate_step(p) for p in self.profiles),
            STEP_VERIFY,
        )


@dataclass(frozen=True)
class Anchors:
    """What pm trusts, none of it taken from the modules it checks."""

    #: sm's public key, from the deployment's modules/sm/cert.pem (never from sm's answers)
    pk_sm: PublicKey
    #: the repository's pinned TUF root (pk_repo), as sm was set up with it; None: sm is not set
    #: up, so pm cannot flash software (it can still provision certificates)
    trusted_root: bytes | None
    #: the key shared by sm and pm only, that encrypts metadata at rest (section 5.2.4); None as above
    meta_key: bytes | None
    #: the deployment's root CA: km's chain must start here, devices' certificates must chain to it
    root_ca: x509.Certificate

    def __post_init__(self) -> None:
        if (self.trusted_root is None) != (self.meta_key is None):
            raise ValueError("trusted_root and meta_key go together (both from sm's setup)")
        if self.meta_key is not None and len(self.meta_key) != software.KEY_BYTES:
            raise ValueError(f"the sm-pm key must be {software.KEY_BYTES} bytes")
        if self.trusted_root is not None:
            software.load_trusted_root(self.trusted_root)


@dataclass(frozen=True)
class Progress:
    """Told to a run's ``progress`` callback: after planning (``device`` None) and per device done."""

    total: int
    done: int
    phase: str
    device: m.DeviceResult | None = None


ProgressCallback = Callable[[Progress], None]
