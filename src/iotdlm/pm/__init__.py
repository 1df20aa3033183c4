"""pm: the provisioning module (paper 4.1.1, 4.2, Algorithm 1, Figs 3-5), one per device type.

- :mod:`iotdlm.pm.core` -- :class:`Provisioner`: Algorithm 1 on a staged copy (HALT and alarm on
  failure), the truststore, the config, device certificates from km (CSR made on the device, or
  CRMF with raVerified built by pm), read-back verification, a provisioning record per device;
- :mod:`iotdlm.pm.flasher` -- the flasher plug-ins (simulated bench, vendor tool by command templates);
- :mod:`iotdlm.pm.service` -- pm on the bus (``iotdlm.v1.pm.<dtype>.provision`` / ``.status``);
- :mod:`iotdlm.pm.config` -- configuration in a deployment folder, wiring a Provisioner;
- :mod:`iotdlm.pm.messages` -- requests, reports, the alarm; ``iotdlm pm`` is :mod:`iotdlm.cli.pm`.
"""

from iotdlm.pm.core import (
    Anchors,
    HaltedError,
    PmSettings,
    Progress,
    Provisioner,
    clear_alarm,
    read_alarm,
)
from iotdlm.pm.flasher import CommandFlasher, DeviceOnBench, Flasher, SimulatedFlasher
from iotdlm.pm.messages import Alarm, DeviceResult, ProvisionReport, ProvisionRequest

__all__ = [
    "Alarm",
    "Anchors",
    "CommandFlasher",
    "DeviceOnBench",
    "DeviceResult",
    "Flasher",
    "HaltedError",
    "PmSettings",
    "Progress",
    "ProvisionReport",
    "ProvisionRequest",
    "Provisioner",
    "SimulatedFlasher",
    "clear_alarm",
    "read_alarm",
]
