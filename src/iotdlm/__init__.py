"""iotdlm: device-lifecycle security for IoT and industrial fleets.

Modules follow the papers' names: pm (provisioning), km (certificates and keys: CA, RA, VA),
sm (software management), cm (the only door to the outside), all over NATS.
"""

__version__ = "0.1.0"
