"""Writing a file whole: a reader sees the old content or the new, never half of it.

One helper for every file a module replaces in place (repository metadata and settings, sm's state,
the operation mode, a simulated device's flash, a device agent's state, the HTTPS pair).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    The bytes go to a new hidden file in the same folder (created with ``mode``, subject to the
    umask), are fsynced, and the file is renamed over ``path``. If anything fails, the temporary
    file is removed and ``path`` keeps its old content. The folder must exist.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


__all__ = ["atomic_write"]
