"""Algorithm 1 (Scenario 1, Fig. 3): pm verifies the software bundle before it flashes anything.

Once per run (:func:`load_software`): load sw, meta.enc and sig_sm from sm; copy the image into
pm's own staging file FIRST and verify that copy -- the bytes verified are the bytes flashed
(:func:`stage`); decrypt meta with the sm-pm key; verify sig_sm with pk_sm, then the repository's
metadata with pk_repo, then the image's hash and length (:func:`verify_staged`, on
:mod:`iotdlm.wire.software`). Any failure HALTS pm (:class:`~iotdlm.pm.alarm.PmAlarm`) and
nothing is flashed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from iotdlm import errors, software
from iotdlm.client.sm import SmClient
from iotdlm.pm.alarm import PmAlarm
from iotdlm.pm.settings import Anchors, PmSettings
from iotdlm.pm.workers import Workers
from iotdlm.wire import software as sw

#: what Algorithm 1 can find wrong (the ``field`` of its errors); each one halts pm
HALT_CHECKS: Final = ("meta_enc", "sig_sm", "meta_repo", "image")


@dataclass(frozen=True)
class StagedSoftware:
    """Verified software, staged in pm's own file (the bytes verified are the bytes flashed)."""

    path: Path
    release_counter: int
    sha256: str
    info: dict[str, Any]


def stage(loaded: sw.LoadResponse, staging_dir: Path, dtype: str) -> Path:
    """Copy sm's image into pm's staging folder (0700 folder, 0400 file): what is verified next
    is this copy, and this copy is what is flashed -- sm's file may change, the copy does not."""
    source = Path(loaded.image_path)
    if not source.is_absolute():
        raise errors.BadRequestError(f"sm named a relative image path {loaded.image_path!r}", field="image_path")
    folder = staging_dir
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    target = folder / f"{dtype}-{loaded.release_counter}-{secrets.token_hex(8)}.image"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as dst:
            try:
                with source.open("rb") as src:
                    shutil.copyfileobj(src, dst, software.CHUNK)
            except FileNotFoundError:
                raise errors.NotFoundError(
                    f"the image sm names for {dtype}/{loaded.release_counter} does not exist: {loaded.image_path}",
                    field="image",
                ) from None
        os.chmod(target, 0o400)
    except BaseException:
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    return target


def verify_staged(staged: Path, loaded: sw.LoadResponse, anchors: Anchors, dtype: str) -> software.VerifiedSoftware:
    """Algorithm 1 on the staged copy: decrypt meta, verify sig_sm, the repository's metadata,
    the image; the release sm loaded must be the one the repository signs."""
    assert anchors.meta_key is not None
    assert anchors.trusted_root is not None
    meta = software.decrypt_meta(loaded.meta_enc, anchors.meta_key, dtype, loaded.release_counter)
    verified = software.verify_software(staged, meta, loaded.sig_sm, anchors.pk_sm, anchors.trusted_root, dtype=dtype)
    if verified.release_counter != loaded.release_counter:
        raise errors.UntrustedError(
            f"sm loaded release {loaded.release_counter}, the repository's metadata signs it as release "
            f"{verified.release_counter}",
            field="meta_repo",
        )
    return verified


async def load_software(
    settings: PmSettings,
    *,
    sm: SmClient,
    anchors: Anchors,
    workers: Workers,
    alarm: PmAlarm,
    operator: str,
) -> StagedSoftware:
    """Scenario 1 / Algorithm 1 on pm's own staged copy; any failure halts pm."""
    dtype = settings.dtype
    if anchors.trusted_root is None or anchors.meta_key is None:
        raise errors.NotFoundError(
            f"pm-{dtype} cannot flash software: sm is not set up in this deployment, so pm has neither "
            "the repository's root (pk_repo) nor the sm-pm key; run `iotdlm sm setup` and restart pm",
            field="software",
        )
    loaded = await sm.load(dtype, settings.release_counter)
    try:
        staged = await workers.run(stage, loaded, settings.staging_dir, dtype)
    except errors.NotFoundError as exc:  # sm names an image that is not there: the repository was altered
        raise await alarm.raise_alarm(exc, "image", loaded.release_counter, operator) from exc
    try:
        verified = await workers.run(verify_staged, staged, loaded, anchors, dtype)
    except errors.RejectedError as exc:
        with contextlib.suppress(OSError):
            staged.unlink()
        check = exc.field if exc.field in HALT_CHECKS else "image"
        raise await alarm.raise_alarm(exc, check, loaded.release_counter, operator) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            staged.unlink()
        raise
    info = {
        "dtype": verified.dtype,
        "release_counter": verified.release_counter,
        "target_path": verified.target_path,
        "length": verified.length,
        "sha256": verified.sha256,
    }
    return StagedSoftware(path=staged, release_counter=verified.release_counter, sha256=verified.sha256, info=info)
