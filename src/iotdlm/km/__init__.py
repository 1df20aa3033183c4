"""km: the certificate & key management module (CA + RA, and VA in a later part)."""

from iotdlm.km.core import Km, KmSettings
from iotdlm.km.service import KmService

__all__ = ["Km", "KmService", "KmSettings"]
