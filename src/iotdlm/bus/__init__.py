"""The only package that talks NATS. See :mod:`iotdlm.bus.api` for the contract."""

from iotdlm.bus.api import ERROR_HEADER, Bus, EventHandler, Message, RequestHandler, Subscription

__all__ = ["ERROR_HEADER", "Bus", "EventHandler", "Message", "RequestHandler", "Subscription"]
