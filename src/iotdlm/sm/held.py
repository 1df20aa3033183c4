"""What sm holds, for the operator (``sm.software.held``, the console's Software page).

Each stored release is verified again as pm will verify it before flashing (Algorithm 1: sig_sm
with sm's own public key over meta and the image, then meta_repo against the pinned root, then the
image's length and hashes): a release altered on disk since sm stored it shows as ``failed`` with
the reason, before pm halts on it. Read-only: nothing here writes the local repository.
"""

from __future__ import annotations

from iotdlm import software
from iotdlm.errors import IotdlmError
from iotdlm.pki.keys import check_public_key
from iotdlm.sm.updater import SoftwareManager
from iotdlm.wire import software as sw


def _verify(manager: SoftwareManager, info: sw.StoredSoftware) -> str | None:
    """Algorithm 1 on one stored release; why it fails, or None."""
    try:
        paths = manager.local.paths(info.dtype, info.release_counter)
        meta = software.decrypt_meta(paths.meta_enc.read_bytes(), manager.meta_key, info.dtype, info.release_counter)
        pk_sm = check_public_key(manager.key.public_key())
        software.verify_software(
            paths.image, meta, paths.sig_sm.read_bytes(), pk_sm, manager.trusted_root, dtype=info.dtype
        )
    except IotdlmError as exc:
        return f"{exc.message} ({exc.code}, {exc.field or 'release'})"
    except OSError as exc:
        return f"cannot read {exc.filename}: {exc.strerror} (the stored release is incomplete)"
    return None


def held(manager: SoftwareManager, dtype: str | None = None) -> sw.HeldResponse:
    """Every release sm holds (of ``dtype``, or all), each verified now."""
    releases = []
    for info in manager.list(dtype):
        problem = _verify(manager, info)
        releases.append(
            sw.HeldRelease(
                dtype=info.dtype,
                release_counter=info.release_counter,
                target_path=info.target_path,
                length=info.length,
                sha256=info.sha256,
                stored_at=info.stored_at,
                sig_sm="verified" if problem is None else "failed",
                problem=problem,
            )
        )
    state = manager.local.load_state()
    checked = {d: s.checked_at for d, s in state.dtypes.items() if s.checked_at and (dtype is None or d == dtype)}
    return sw.HeldResponse(releases=releases, checked_at=checked)
