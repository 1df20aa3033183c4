"""cm, the communication module: the only door to the outside.

Ingress: EST (RFC 7030) over HTTPS with TLS client certificates, OCSP (RFC 6960 A.1 / RFC 5019)
and CRL distribution over HTTP(S); every request relayed to km over NATS as the cm identity.
Egress: a forward proxy restricted to the repository origins sm may reach.
"""

from iotdlm.cm.cacerts import CaCerts
from iotdlm.cm.config import CmConfig, EgressConfig, Limits
from iotdlm.cm.egress import EgressProxy
from iotdlm.cm.server import CmApp, KmRelay, status_for
from iotdlm.cm.service import CmService, CmTls, deployment_tls
from iotdlm.cm.tls import server_tls_context

__all__ = [
    "CaCerts",
    "CmApp",
    "CmConfig",
    "CmService",
    "CmTls",
    "EgressConfig",
    "EgressProxy",
    "KmRelay",
    "Limits",
    "deployment_tls",
    "server_tls_context",
    "status_for",
]
