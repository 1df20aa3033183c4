"""atomic_write: the one way a module replaces a file (old content or new, never half)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from iotdlm import files
from iotdlm.files import atomic_write


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def _umask_022() -> object:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_writes_new_file_private_by_default(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"{}")
    assert path.read_bytes() == b"{}"
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644], ids=oct)
def test_mode_is_the_one_asked(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o666)
    atomic_write(path, b"new", mode=mode)
    assert path.read_bytes() == b"new"
    assert _mode(path) == mode


def test_replaces_whole(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a much longer old content")
    atomic_write(path, b"short")
    assert path.read_bytes() == b"short"


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mode.json"
    path.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["mode.json"]  # no temporary file left behind


def test_failed_rename_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "inside").write_bytes(b"x")
    with pytest.raises(IsADirectoryError):
        atomic_write(target, b"new")  # cannot replace a non-empty folder
    assert (target / "inside").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "f", b"x")
