"""pm: the provisioning module (paper 4.1.1, 4.2, Algorithm 1, Figs 3-5), one per device type.

- :mod:`iotdlm.pm.provisioner` -- :class:`Provisioner`, the run in order: preflight, plan,
  Algorithm 1, the truststore, certificates, flashing, read-back, a provisioning record per device;
- :mod:`iotdlm.pm.plan` -- what to do for each device, from the bench, its record and the mode (pure);
- :mod:`iotdlm.pm.algorithm1` -- Algorithm 1 on a staged copy of the software (HALT on failure);
- :mod:`iotdlm.pm.alarm` -- the alarm that halts pm until an operator clears it;
- :mod:`iotdlm.pm.certificates` -- the truststore and the device certificates from km (CSR made on
  the device, or CRMF with raVerified built by pm);
- :mod:`iotdlm.pm.flashing` -- flashing a device and verifying it by reading back;
- :mod:`iotdlm.pm.provisioning_records` -- pm's provisioning record per device, and its result;
- :mod:`iotdlm.pm.settings` -- settings, trust anchors, the steps of a device;
  :mod:`iotdlm.pm.workers` -- the worker threads;
- :mod:`iotdlm.pm.flasher` -- the flasher plug-ins (simulated bench, vendor tool by command templates);
- :mod:`iotdlm.pm.service` -- pm on the bus (``iotdlm.v1.pm.<dtype>.provision`` / ``.status``);
- :mod:`iotdlm.pm.config` -- configuration in a deployment folder, wiring a Provisioner;
- :mod:`iotdlm.wire.pm` -- requests, reports, the alarm; ``iotdlm pm`` is :mod:`iotdlm.cli.pm`.
"""

from iotdlm.pm.alarm import HaltedError, clear_alarm, read_alarm
from iotdlm.pm.flasher import CommandFlasher, DeviceOnBench, Flasher, SimulatedFlasher
from iotdlm.pm.provisioner import Provisioner
from iotdlm.pm.settings import Anchors, PmSettings, Progress
from iotdlm.wire.pm import Alarm, DeviceResult, ProvisionReport, ProvisionRequest

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
