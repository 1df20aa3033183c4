"""The only package that talks NATS. See :mod:`iotdlm.bus.api` for the contract.

Only the contract and the in-memory bus are exported here: importing this package never imports
``nats``. The NATS implementation is :mod:`iotdlm.bus.nats` (``connect``), the embedded server
launcher :mod:`iotdlm.bus.server`.
"""

from iotdlm.bus.api import ERROR_HEADER, Bus, EventHandler, Message, RequestHandler, Subscription
from iotdlm.bus.memory import MemoryBus, MemoryHub

__all__ = [
    "ERROR_HEADER",
    "Bus",
    "EventHandler",
    "MemoryBus",
    "MemoryHub",
    "Message",
    "RequestHandler",
    "Subscription",
]
