"""`iotdlm backup` / `iotdlm restore` (issue 14): back up, change, restore -- the state is the backed-up
one and the audit log verifies; damaged or hostile archives are refused before anything is replaced."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.cli import backup_archive as arc
from iotdlm.cli.main import main
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError
from iotdlm.runtime import open_store
from iotdlm.store.backup import check_sqlite, snapshot

PASS = {"IOTDLM_CA_PASSPHRASE": "correct horse battery staple"}
SRC = Path(__file__).resolve().parents[2] / "src"


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args), env=PASS)
    assert "Traceback" not in r.output
    return r.exit_code, r.output


def _iotdlm(*args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, in a fresh interpreter."""
    env = {**os.environ, **PASS, "PYTHONPATH": str(SRC)}
    argv = [sys.executable, "-m", "iotdlm.cli.main", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    code, out = _cli("init", "--data", str(data), "--dtype", "boardA")
    assert code == 0, out
    return data


def _issue(site: Path, tmp: Path, device: str) -> str:
    code, out = _cli(
        "ca", "certificate", "--data", str(site), "--device-id", device, "--profile", "operational",
        "--key-out", str(tmp / f"{device}.key"), "--out", str(tmp / f"{device}.pem"), "--json",
    )  # fmt: skip
    assert code == 0, out
    serial: str = json.loads(out)["serial"]
    return serial


def _state(site: Path) -> tuple[list[tuple[str, str]], int]:
    """(serial, status) of every certificate, and the number of audit records."""
    store = open_store(Deployment.load(site))
    try:
        certs = sorted((format(r.serial, "x"), r.status) for r in store.list_certificates(limit=1000))
        return certs, store.count_audit()
    finally:
        store.close()


def test_backup_change_restore(site: Path, tmp_path: Path) -> None:
    _issue(site, tmp_path, "dev-1")
    before = _state(site)
    archive = tmp_path / "site.tar.gz"
    done = _iotdlm("backup", "--data", str(site), "--out", str(archive), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["database"] == "sqlite"
    assert archive.stat().st_mode & 0o777 == 0o600
    # change: a new certificate, a renewal, a revocation, a file
    revoked = _issue(site, tmp_path, "dev-2")
    serial = _issue(site, tmp_path, "dev-3")
    assert _cli("ca", "renew", "--data", str(site), serial)[0] == 0
    code, out = _cli("ca", "revoke", "--data", str(site), revoked)
    assert code == 0, out
    (site / "modules" / "extra.txt").write_text("after the backup")
    changed = _state(site)
    assert changed != before

    done = _iotdlm("restore", "--data", str(site), str(archive))
    assert done.returncode == 4
    assert "is not empty; give --force" in done.stderr
    assert _state(site) == changed

    done = _iotdlm("restore", "--data", str(site), str(archive), "--force", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert _state(site) == before
    assert report["audit_records"] == before[1]
    assert not (site / "modules" / "extra.txt").exists()
    assert (site / "db" / "iotdlm.db").stat().st_mode & 0o777 == 0o600
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in [site, *site.rglob("*")] if p.is_dir())
    moved = Path(report["moved_aside"])
    assert _state(moved) == changed  # the replaced folder is kept, not deleted
    verify = _iotdlm("audit", "verify", "--data", str(site), "--no-bus")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "audit log intact" in verify.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_restore_into_a_new_folder(site: Path, tmp_path: Path) -> None:
    _issue(site, tmp_path, "dev-1")
    archive = tmp_path / "b.tar.gz"
    assert _cli("backup", "--data", str(site), "--out", str(archive))[0] == 0
    code, out = _cli("restore", "--data", str(tmp_path / "copy"), str(archive))
    assert code == 0, out
    assert _state(tmp_path / "copy") == _state(site)
    assert (tmp_path / "copy" / "ca" / "root.key.pem").read_bytes() == (site / "ca" / "root.key.pem").read_bytes()


def test_backup_refuses_bad_outputs(site: Path, tmp_path: Path) -> None:
    code, out = _cli("backup", "--data", str(site), "--out", str(site / "inside.tar.gz"))
    assert code == 4
    assert "outside the data folder" in out
    (tmp_path / "taken").write_bytes(b"x")
    code, out = _cli("backup", "--data", str(site), "--out", str(tmp_path / "taken"))
    assert code == 4
    assert "give --force" in out
    code, out = _cli("backup", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "b.tgz"))
    assert code == 4
    assert "not a deployment's data folder" in out


def _rewrite(archive: Path, out: Path, change: dict[str, bytes], *, manifest: bytes | None = None) -> None:
    """A copy of ``archive`` with some members' bytes changed (the manifest kept unless given)."""
    with tarfile.open(archive, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            f = src.extractfile(member)
            assert f is not None
            data = manifest if member.name == arc.MANIFEST and manifest is not None else f.read()
            data = change.get(member.name, data)
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("damage", ["edited-key", "edited-database", "truncated", "not-gzip", "extra-member"])
def test_restore_refuses_a_damaged_archive(site: Path, tmp_path: Path, damage: str) -> None:
    archive = tmp_path / "b.tar.gz"
    assert _cli("backup", "--data", str(site), "--out", str(archive))[0] == 0
    bad = tmp_path / "bad.tar.gz"
    if damage == "edited-key":
        _rewrite(archive, bad, {"data/ca/root.key.pem": b"-----BEGIN NOTHING-----\n"})
    elif damage == "edited-database":
        _rewrite(archive, bad, {arc.DATABASE_MEMBER: b"SQLite format 3\x00" + b"\x00" * 100})
    elif damage == "truncated":
        bad.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    elif damage == "not-gzip":
        bad.write_bytes(b"PK\x03\x04 a zip file")
    else:
        with tarfile.open(archive, "r:gz") as src, tarfile.open(bad, "w:gz") as dst:
            for member in src.getmembers():
                dst.addfile(member, src.extractfile(member))
            evil = tarfile.TarInfo("data/../../escaped")
            evil.size = 3
            dst.addfile(evil, io.BytesIO(b"bad"))
    target = tmp_path / "target"
    code, out = _cli("restore", "--data", str(target), str(bad))
    assert code == 4
    assert "archive" in out
    assert not target.exists()
    assert not (tmp_path.parent / "escaped").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_restore_refuses_a_damaged_audit_chain(site: Path, tmp_path: Path) -> None:
    _issue(site, tmp_path, "dev-1")
    db = tmp_path / "edited.db"
    snapshot(Deployment.load(site).database_url, db)
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("UPDATE audit_log SET actor = 'someone else' WHERE seq = 1")
    conn.commit()
    conn.close()
    archive = tmp_path / "b.tar.gz"
    assert _cli("backup", "--data", str(site), "--out", str(archive))[0] == 0
    with tarfile.open(archive, "r:gz") as src:
        f = src.extractfile(arc.MANIFEST)
        assert f is not None
        manifest = msgspec.json.decode(f.read(), type=arc.Manifest)
    entries = [arc.file_entry(e.path, db) if e.path == arc.DATABASE_MEMBER else e for e in manifest.files]
    edited = msgspec.structs.replace(manifest, files=entries).to_bytes()
    bad = tmp_path / "bad.tar.gz"
    _rewrite(archive, bad, {arc.DATABASE_MEMBER: db.read_bytes()}, manifest=edited)
    code, out = _cli("restore", "--data", str(tmp_path / "target"), str(bad))
    assert code == 4
    assert "audit log is damaged" in out
    assert not (tmp_path / "target").exists()


def test_snapshot_while_km_writes(site: Path, tmp_path: Path) -> None:
    """The online backup API copies one consistent state while another connection commits."""
    url = Deployment.load(site).database_url
    stop = threading.Event()
    issued: list[str] = []
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                issued.append(_issue(site, tmp_path, f"w-{len(issued)}"))
        except BaseException as exc:  # reported below: a thread's failure would pass unseen
            failed.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        snaps = 0
        while (len(issued) < 3 or snaps < 3) and not failed:  # snapshots while certificates are committed
            snapshot(url, tmp_path / f"snap-{snaps}.db")
            check_sqlite(tmp_path / f"snap-{snaps}.db")
            snaps += 1
    finally:
        stop.set()
        thread.join()
    assert failed == []
    assert issued


def test_snapshot_refuses_postgresql(tmp_path: Path) -> None:
    from iotdlm.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="pg_dump"):
        snapshot("postgresql+psycopg://u@127.0.0.1:5432/db", tmp_path / "x.db")


# --- the manifest parser -----------------------------------------------------------------------
def _manifest(**change: object) -> bytes:
    good = {
        "format": arc.FORMAT,
        "version": arc.VERSION,
        "created_at": "2026-01-01T00:00:00+00:00",
        "iotdlm_version": "0",
        "database": "sqlite",
        "files": [
            {"path": "data/iotdlm.toml", "size": 1, "sha256": "0" * 64, "mode": 0o644},
            {"path": arc.DATABASE_MEMBER, "size": 1, "sha256": "0" * 64},
        ],
    }
    return json.dumps({**good, **change}).encode()


def test_manifest_accepts_a_good_one() -> None:
    assert [e.path for e in arc.parse_manifest(_manifest()).files] == ["data/iotdlm.toml", arc.DATABASE_MEMBER]


def _with_path(path: str) -> bytes:
    files = [
        {"path": "data/iotdlm.toml", "size": 1, "sha256": "0" * 64},
        {"path": arc.DATABASE_MEMBER, "size": 1, "sha256": "0" * 64},
        {"path": path, "size": 1, "sha256": "0" * 64},
    ]
    return _manifest(files=files)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", "unreadable"),
        (b"{", "unreadable"),
        (_manifest(format="tar"), "not an iotdlm backup"),
        (_manifest(version=2), "version 2"),
        (_manifest(database="mysql"), "unknown database"),
        (_manifest(database="postgresql"), "disagree"),
        (_manifest(files=[]), "disagree"),
        (_with_path("data/../../etc/passwd"), "does not write"),
        (_with_path("/etc/passwd"), "does not write"),
        (_with_path("data/./x"), "does not write"),
        (_with_path("other/x"), "does not write"),
        (_with_path("data"), "does not write"),
        (_with_path("data/a\x00b"), "does not write"),
        (_with_path("data/iotdlm.toml"), "twice"),
        (_manifest(files=[{"path": arc.DATABASE_MEMBER, "size": 1, "sha256": "0" * 64}]), "no iotdlm.toml"),
        (_manifest(unknown=1), "unreadable"),
        (b"x" * (arc.MAX_MANIFEST_BYTES + 1), "too large"),
    ],
    ids=[
        "empty", "truncated", "format", "version", "database", "pg-with-db", "sqlite-without-db", "dotdot",
        "absolute", "dot", "outside-data", "bare-data", "nul", "twice", "no-config", "unknown-field", "huge",
    ],
)  # fmt: skip
def test_manifest_refusals(raw: bytes, error: str) -> None:
    with pytest.raises(BadRequestError, match=error):
        arc.parse_manifest(raw)


@given(st.binary(max_size=600))
def test_manifest_parser_never_crashes_on_bytes(raw: bytes) -> None:
    try:
        arc.parse_manifest(raw)
    except BadRequestError as exc:
        assert exc.field == "archive"  # noqa: PT017 -- any other exception fails the test


@given(st.text(max_size=80))
def test_member_paths_stay_inside(path: str) -> None:
    try:
        checked = arc.check_member_path(path)
    except BadRequestError:
        return
    parts = checked.split("/")
    assert ".." not in parts
    assert not checked.startswith("/")
    assert parts[0] in ("data", "database")


def test_gzip_bomb_guard_manifest_size(tmp_path: Path) -> None:
    """A manifest member claiming more than the limit is refused before it is read."""
    bad = tmp_path / "bomb.tar.gz"
    with gzip.open(bad, "wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo(arc.MANIFEST)
        info.size = arc.MAX_MANIFEST_BYTES + 1
        tar.addfile(info, io.BytesIO(b" " * info.size))
    with pytest.raises(BadRequestError, match="too large"):
        arc.extract_verified(bad, tmp_path / "out")


def test_restore_refuses_while_the_deployment_runs(site: Path, tmp_path: Path) -> None:
    archive = tmp_path / "b.tar.gz"
    assert _cli("backup", "--data", str(site), "--out", str(archive))[0] == 0
    (site / "nats" / "nats-server.pid").write_text(f"{os.getpid()}\n")  # a live process
    code, out = _cli("restore", "--data", str(site), str(archive), "--force")
    assert code == 4
    assert "is running" in out
    (site / "nats" / "nats-server.pid").unlink()


@pytest.mark.postgres
def test_postgresql_is_left_to_its_own_tools(tmp_path: Path, postgres_url: str) -> None:
    data = tmp_path / "data"
    code, out = _cli("init", "--data", str(data), "--dtype", "boardA", "--database-url", postgres_url)
    assert code == 0, out
    done = _iotdlm("backup", "--data", str(data), "--out", str(tmp_path / "b.tar.gz"))
    assert done.returncode == 0, done.stderr
    assert "back it up with pg_dump" in done.stdout
    with tarfile.open(tmp_path / "b.tar.gz", "r:gz") as tar:
        names = tar.getnames()
    assert arc.DATABASE_MEMBER not in names
    assert "data/ca/root.key.pem" in names
    code, out = _cli("restore", "--data", str(tmp_path / "copy"), str(tmp_path / "b.tar.gz"))
    assert code == 0, out
    assert "pg_restore" in out
    assert (tmp_path / "copy" / "ca" / "root.key.pem").read_bytes() == (data / "ca" / "root.key.pem").read_bytes()
