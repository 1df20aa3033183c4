"""``iotdlm backup`` and ``iotdlm restore``: the data folder and the database in one archive.

The archive (:mod:`iotdlm.cli.backup_archive`) holds the data folder's files and a consistent
snapshot of an SQLite store, taken with SQLite's online backup API while services may run
(:mod:`iotdlm.store.backup`). A PostgreSQL store is backed up with PostgreSQL's own tools; the
archive then holds the data folder only, and says so.

Restore checks the whole archive against its manifest and the database's audit chain in a
folder beside the target before it replaces anything; a non-empty target is moved aside (never
deleted), and only with --force.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import click

from iotdlm import __version__
from iotdlm.cli import backup_archive as arc
from iotdlm.cli.common import console, data_option, handle_errors
from iotdlm.deployment import CONFIG_FILE, Deployment
from iotdlm.errors import BadRequestError, ConflictError, IotdlmError, NotFoundError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes


@click.command("backup")
@data_option
@click.option(
    "--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="The archive to write (.tar.gz)."
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
@handle_errors
def backup(data: Path, out: Path, force: bool, as_json: bool) -> None:
    """Back up the data folder and its database into one archive (services may keep running).

    The archive holds the CA keys (encrypted) and every module's key: keep it as safe as the data
    folder. A PostgreSQL database is not in it: back it up with pg_dump at the same time.
    """
    from iotdlm.store.backup import snapshot, sqlite_path

    if not (data / CONFIG_FILE).is_file():
        raise NotFoundError(f"{data} is not a deployment's data folder (no {CONFIG_FILE}); give --data")
    _check_out(data, out, force)
    dep = Deployment.load(data)
    url = dep.database_url
    contents: dict[str, bytes] = {}
    entries: list[arc.Entry] = []
    for name, path in arc.data_files(data):
        raw = path.read_bytes()
        contents[name] = raw
        entries.append(arc.entry_for(name, raw, path.stat().st_mode))
    files: dict[str, Path] = {}
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    db_tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.db")
    try:
        kind = "postgresql" if sqlite_path(url) is None else "sqlite"
        if kind == "sqlite":
            snapshot(url, db_tmp)
            files[arc.DATABASE_MEMBER] = db_tmp
            entries.append(arc.file_entry(arc.DATABASE_MEMBER, db_tmp))
        manifest = arc.Manifest(
            format=arc.FORMAT,
            version=arc.VERSION,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            iotdlm_version=__version__,
            database=kind,
            files=entries,
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            arc.write_archive(f, manifest, contents, files)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
        db_tmp.unlink(missing_ok=True)
    size = out.stat().st_size
    summary = {"archive": str(out), "bytes": size, "files": len(entries), "database": kind}
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    console.print(f"wrote {out}: {len(entries)} files, {size} bytes (mode 0600)")
    if kind == "postgresql":
        console.print("the database is PostgreSQL and is not in the archive: back it up with pg_dump now")


def _check_out(data: Path, out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConflictError(f"{out} exists; give --force to overwrite it", field="out")
    if not out.parent.is_dir():
        raise BadRequestError(f"folder {out.parent} does not exist; create it first", field="out")
    if out.resolve().is_relative_to(data.resolve()):
        raise BadRequestError("write the archive outside the data folder it backs up", field="out")


@click.command("restore")
@data_option
@click.argument("archive", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--force", is_flag=True, help="Replace a data folder that is not empty (it is moved aside, not deleted).")
@click.option("--json", "as_json", is_flag=True, help="Print what was restored as one JSON object.")
@handle_errors
def restore(data: Path, archive: Path, force: bool, as_json: bool) -> None:
    """Restore a data folder and its database from an archive made by `iotdlm backup`.

    Stop the deployment first. The whole archive and the database's audit chain are checked
    before anything is replaced. A data folder that is not empty is refused unless --force, and
    then moved aside to DIR.before-restore-TIME.
    """
    _refuse_running(data)
    occupied = data.exists() and any(data.iterdir())
    if occupied and not force:
        raise ConflictError(
            f"{data} is not empty; give --force to replace it (it is moved aside, not deleted)", field="data"
        )
    if not data.parent.is_dir():
        raise BadRequestError(f"folder {data.parent} does not exist; create it first", field="data")
    staging = data.parent / f".{data.name}.restoring-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        manifest = arc.extract_verified(archive, staging)
        dep = Deployment.load(staging / "data")
        external, records = _stage_database(dep, manifest, staging, force)
        moved = _swap(data, staging / "data", occupied)
        if external is not None:
            (staging / arc.DATABASE_MEMBER).replace(external)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {
        "data": str(data),
        "files": len(manifest.files),
        "backed_up_at": manifest.created_at,
        "database": manifest.database,
        "audit_records": records,
        "moved_aside": None if moved is None else str(moved),
    }
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    console.print(f"restored {data} as it was at {manifest.created_at} ({len(manifest.files)} files)")
    if moved is not None:
        console.print(f"what was in {data} before is in {moved}")
    if records is not None:
        console.print(f"audit log intact in the restored database: {records} records")
    else:
        console.print("the database is PostgreSQL: restore it with pg_restore from the dump taken with this backup")
    console.print(f"check it against the checkpoints kept outside it: iotdlm audit verify --data {data}")


def _refuse_running(data: Path) -> None:
    pid_file = data / "nats" / "nats-server.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return
    raise ConflictError(f"the deployment in {data} is running (NATS pid {pid}); stop it (Ctrl-C on `iotdlm up`) first")


def _stage_database(
    dep: Deployment, manifest: arc.Manifest, staging: Path, force: bool
) -> tuple[Path | None, int | None]:
    """Check the snapshot (and migrate it to this iotdlm's schema) where it was extracted; put it
    in the staged data folder. Returns the database file outside the data folder the snapshot
    goes to (None: inside it) and the number of audit records checked (None: PostgreSQL)."""
    from iotdlm.store.backup import check_sqlite, sqlite_path

    if manifest.database == "postgresql":
        return None, None
    target = sqlite_path(dep.database_url)
    if target is None:
        raise BadRequestError("the archive holds an SQLite database but the restored iotdlm.toml names PostgreSQL")
    snap = staging / arc.DATABASE_MEMBER
    check_sqlite(snap)
    records = _verify_audit(dep, f"sqlite:///{snap}")
    inside = dep.config.database_url is None
    if inside:
        (dep.root / "db").mkdir(mode=0o700, exist_ok=True)
        snap.replace(dep.root / "db" / "iotdlm.db")
        return None, records
    if target.exists() and not force:
        raise ConflictError(f"the database file {target} exists; give --force to replace it", field="data")
    return target, records


def _verify_audit(dep: Deployment, url: str) -> int:
    """Migrate the snapshot and walk its audit chain and signed checkpoints; raise if damaged."""
    from iotdlm.km import audit as km_audit
    from iotdlm.pki.chain import load_certificate, verify_issued_by
    from iotdlm.pki.keys import check_public_key
    from iotdlm.store import Store

    service_ca = dep.ca_certificate("service")
    store = Store.open(url)

    def signer_key(fp: str) -> CertificateIssuerPublicKeyTypes | None:
        rec = store.get_by_fingerprint(fp)
        if rec is None or rec.status != "valid" or rec.issuer != "service":
            return None
        cert = load_certificate(rec.der)
        try:
            verify_issued_by(cert, service_ca, now=cert.not_valid_before_utc, eku=None)
            return check_public_key(cert.public_key())
        except IotdlmError:
            return None

    try:
        report = km_audit.verify(store, signer_key)
    finally:
        store.close()
    if not report.ok:
        raise BadRequestError(
            f"the archive's audit log is damaged ({len(report.problems)} problem(s), first at record "
            f"{report.first_bad_seq}: {report.problems[0]}); nothing was restored",
            field="archive",
        )
    return report.records


def _swap(data: Path, staged: Path, occupied: bool) -> Path | None:
    """Put the staged folder in place of ``data``; an occupied ``data`` is moved aside first."""
    for name in ("logs", "nats"):  # the folders a backup leaves empty
        (staged / name).mkdir(exist_ok=True)
    for folder in [staged, *(p for p in staged.rglob("*") if p.is_dir())]:
        folder.chmod(0o700)  # as `iotdlm init` makes every folder
    moved = None
    if occupied:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        moved = data.with_name(f"{data.name}.before-restore-{stamp}")
        data.rename(moved)
    elif data.exists():
        data.rmdir()
    staged.rename(data)
    return moved
