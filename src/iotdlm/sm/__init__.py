"""sm: the software management module (paper 4.1.3, 4.4, Algorithm 2), an Uptane-primary-style client.

- :mod:`iotdlm.sm.updater` -- :class:`SoftwareManager`: check the vendor repository with python-tuf's
  ngclient without revealing the installed version, verify, download, store with ``sig_sm`` and
  encrypted metadata, report;
- :mod:`iotdlm.sm.fetcher` -- the egress seam (:class:`Fetcher`; :class:`HttpFetcher`,
  :class:`NoEgressFetcher`) that cm will own;
- :mod:`iotdlm.sm.local` -- the local repository shared with pm;
- :mod:`iotdlm.sm.service` -- sm on the bus (pm's API, poll schedule, notifications);
- :mod:`iotdlm.sm.config` -- configuration in a deployment folder; ``iotdlm sm`` is :mod:`iotdlm.cli.sm`.

pm's side of the contract (Algorithm 1, formats) is pure and lives in :mod:`iotdlm.software`.
"""

from iotdlm.sm.fetcher import Fetcher, HttpFetcher, NoEgressFetcher, PostResponse, TufFetcher
from iotdlm.sm.local import LocalRepository
from iotdlm.sm.updater import CheckResult, SoftwareManager, map_error

__all__ = [
    "CheckResult",
    "Fetcher",
    "HttpFetcher",
    "LocalRepository",
    "NoEgressFetcher",
    "PostResponse",
    "SoftwareManager",
    "TufFetcher",
    "map_error",
]
