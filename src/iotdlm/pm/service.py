"""pm on the bus, one service per dtype (the paper: "by adding multiple pms, multiple different
types of devices can be supported").

- ``iotdlm.v1.pm.<dtype>.provision`` :class:`~iotdlm.wire.pm.ProvisionRequest` (devices: flasher
  references or device ids, or none for every device discovered; operator; force) -> the
  :class:`~iotdlm.wire.pm.ProvisionReport`. Refusals of the whole run come back as errors:
  halted by an alarm (``halted``, a ConflictError; field = the failed check), cm running or wrong mode
  (``wrong_mode``), sm or km not answering (``unavailable``).
- ``iotdlm.v1.pm.<dtype>.status`` (empty body) -> :class:`~iotdlm.wire.pm.StatusReply`.

Events: ``iotdlm.v1.events.pm.alarm`` when Algorithm 1 fails, ``iotdlm.v1.events.pm.provisioned``
after every run. One run at a time per process (a second request waits its turn). Alarms are
cleared with ``iotdlm pm clear-alarm`` at the deployment, never over the bus.
"""

from __future__ import annotations

import logging

from iotdlm.bus import Bus, Message, Subscription
from iotdlm.bus import subjects as s
from iotdlm.pki.names import check_id
from iotdlm.pm.provisioner import Provisioner
from iotdlm.wire import pm as m

log = logging.getLogger(__name__)

#: pm's subjects: ``iotdlm.v1.pm.<dtype>.<operation>`` (pm's NATS user subscribes to iotdlm.v1.pm.>)
PM_PREFIX = f"{s.PREFIX}.pm"


def provision_subject(dtype: str) -> str:
    return f"{PM_PREFIX}.{check_id(dtype, 'dtype')}.provision"


def status_subject(dtype: str) -> str:
    return f"{PM_PREFIX}.{check_id(dtype, 'dtype')}.status"


def queue_group(dtype: str) -> str:
    """Workers of one dtype share its requests."""
    return f"{s.queue_group('pm')}.{dtype}"


class PmService:
    def __init__(self, provisioner: Provisioner, bus: Bus) -> None:
        self.provisioner = provisioner
        self.bus = bus
        self.dtype = provisioner.dtype
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        queue = queue_group(self.dtype)
        self._subs.append(await self.bus.serve(provision_subject(self.dtype), self._provision, queue=queue))
        self._subs.append(await self.bus.serve(status_subject(self.dtype), self._status, queue=queue))
        log.info("pm-%s serving %s", self.dtype, provision_subject(self.dtype))

    async def _provision(self, msg: Message) -> bytes:
        req = m.decode(msg.data, m.ProvisionRequest)
        report = await self.provisioner.provision_batch(req.devices, req.operator, force=req.force)
        return m.encode(report)

    async def _status(self, _msg: Message) -> bytes:
        return m.encode(await self.provisioner.status())

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()


class PmClient:
    """The operator's side (admin identity): ask a running pm to provision, or for its status."""

    def __init__(self, bus: Bus, dtype: str, *, timeout: float = 3600.0) -> None:
        self.bus = bus
        self.dtype = check_id(dtype, "dtype")
        self.timeout = timeout

    async def provision(
        self, devices: list[str] | None = None, *, operator: str, force: bool = False
    ) -> m.ProvisionReport:
        body = m.encode(m.ProvisionRequest(devices=devices, operator=operator, force=force))
        reply = await self.bus.request(provision_subject(self.dtype), body, timeout=self.timeout)
        return m.decode(reply, m.ProvisionReport, what="pm reply")

    async def status(self) -> m.StatusReply:
        reply = await self.bus.request(status_subject(self.dtype), b"{}", timeout=10.0)
        return m.decode(reply, m.StatusReply, what="pm reply")
