"""km: the certificate & key management module (CA + RA, and VA in a later part)."""

from iotdlm.km.core import AUDIENCE, OP_ISSUE, OP_ISSUE_BATCH, OP_RENEW, Km, KmSettings
from iotdlm.km.service import KmService

__all__ = ["AUDIENCE", "OP_ISSUE", "OP_ISSUE_BATCH", "OP_RENEW", "Km", "KmService", "KmSettings"]
