"""iotdlm.repository: the software vendor's remote repository ``repo`` (paper 4.4) on python-tuf.

A separate program from the factory's modules: the vendor publishes signed releases per device type
(:class:`VendorRepository`), serves them over HTTP(S) (:class:`RepositoryServer`, in
``iotdlm.repository.server``) and records sm's signed download reports. Clients (sm) use any TUF
client, python-tuf's ngclient included, bootstrapped with :meth:`VendorRepository.trusted_root`.
"""

from iotdlm.repository.repo import (
    KEY_ROLES,
    RELEASES,
    TOP_LEVEL_ROLES,
    PublishedTarget,
    Report,
    RoleInfo,
    VendorRepository,
    dtype_role,
    report_body,
    target_path,
)

__all__ = [
    "KEY_ROLES",
    "RELEASES",
    "TOP_LEVEL_ROLES",
    "PublishedTarget",
    "Report",
    "RoleInfo",
    "VendorRepository",
    "dtype_role",
    "report_body",
    "target_path",
]
