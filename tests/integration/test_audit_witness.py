"""The audit log's anchors outside the database, end to end (issue 11 section 2, ADR 0005): a
deployment, a real nats-server with the deployment's users (the append-only stream made as
`iotdlm up` makes it), a real km and cm over HTTPS.

- km appends every tree head it signs to the append-only stream, and `audit verify` (as admin)
  reads them: with the newest records deleted together with their database checkpoints AND the
  anchor folder's copies, the stream's head still fails verify, naming the stream.
- `iotdlm audit witness` fetches km's signed tree head from cm, checks it against the service CA,
  and checks that each new head extends the one it kept with the consistency proof cm serves; a
  truncated and a rewritten log are caught, naming both sizes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import tomli_w
from click.testing import CliRunner, Result

from iotdlm.cli.main import main
from iotdlm.deployment import CONFIG_FILE
from iotdlm.errors import UntrustedError
from iotdlm.km import audit as km_audit
from iotdlm.km.witness import LogInconsistentError, tls_context, witness
from iotdlm.pki.chain import load_certificate
from iotdlm.runtime import km_identity
from iotdlm.wire import audit as fmt
from tests.integration.test_cm import Site, open_site

pytestmark = pytest.mark.nats

ENV = {"COLUMNS": "300"}


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path) as s:
        # what the CLI reads from disk: the deployment's NATS port is the test server's
        config = msgspec.to_builtins(s.dep.config)
        (s.dep.root / CONFIG_FILE).write_bytes(tomli_w.dumps(config).encode())
        yield s


async def _grow(site: Site, n: int, tag: str) -> None:
    """n more audit records (each issuance at km adds some)."""
    for i in range(n):
        await site.factory(f"dev-{tag}-{i}")


def _db(site: Site) -> Path:
    return site.dep.root / "db" / "iotdlm.db"


def _cut(site: Site, after: int) -> None:
    """What someone with write access to the database does: delete the records after ``after``
    and the checkpoints that name them."""
    with sqlite3.connect(_db(site)) as c:
        c.execute("DELETE FROM audit_log WHERE seq > ?", (after,))
        c.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (after,))


async def _cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), env=ENV)


def _flat(r: Result) -> str:
    return " ".join(r.output.split())  # rich wraps long lines at spaces


async def test_km_appends_each_tree_head_it_signs_to_the_stream(site: Site) -> None:
    admin = await site.nats.connect("admin")
    site.buses.append(admin)
    await _grow(site, 1, "a")
    await site.km.checkpoint_now()
    await site.km.checkpoint_now()  # nothing new: nothing signed, nothing appended
    await _grow(site, 1, "b")
    await site.km.checkpoint_now()
    heads, bad = await km_audit.read_stream_heads(admin)
    assert bad == []
    in_db = site.store.list_audit_checkpoints()
    assert [(a.head.size, a.head.root) for a in heads] == [(cp.seq, cp.root) for cp in in_db]
    assert len(heads) == 2
    assert heads[0].source == "stream IOTDLM_AUDIT_HEADS message #1"
    report = km_audit.verify(site.store, lambda fp: km_identity(site.dep)[1].public_key(), anchors=heads)
    assert report.ok, report.problems


async def test_the_stream_catches_a_cut_the_database_and_the_anchor_folder_no_longer_show(
    site: Site, tmp_path: Path
) -> None:
    anchors = tmp_path / "anchors"
    site.km.anchor_dir = anchors
    await _grow(site, 1, "a")
    await site.km.checkpoint_now()
    cut = site.store.latest_audit_checkpoint()
    assert cut is not None
    await _grow(site, 2, "b")
    await site.km.checkpoint_now()
    newest = site.store.latest_audit_checkpoint()
    assert newest is not None
    assert newest.seq > cut.seq
    data = str(site.dep.root)

    r = await _cli("audit", "verify", "--data", data, "--anchor-dir", str(anchors))
    assert r.exit_code == 0, r.output
    assert "4 kept outside it (2 in the append-only NATS stream)" in _flat(r)
    assert "audit log intact" in r.output

    _cut(site, cut.seq)
    for path in anchors.glob("tree-head-*.json"):  # the anchor folder's copies after the cut, too
        if fmt.decode_tree_head(path.read_bytes()).size > cut.seq:
            path.unlink()
    r = await _cli("audit", "verify", "--data", data, "--anchor-dir", str(anchors), "--no-bus")
    assert r.exit_code == 0, r.output  # the database and the anchor folder alone: nothing to see
    assert "--no-bus: the tree heads in the append-only NATS stream were not read" in _flat(r)

    r = await _cli("audit", "verify", "--data", data, "--anchor-dir", str(anchors))
    assert r.exit_code == 4, r.output
    n = newest.seq - cut.seq
    assert (
        f"the store has {cut.seq} records; the checkpoint of {newest.at.isoformat(timespec='seconds')} from "
        f"stream IOTDLM_AUDIT_HEADS message #2 commits to {newest.seq}: {n} records after #{cut.seq} were deleted"
    ) in _flat(r)
    assert "Traceback" not in r.output


async def test_audit_verify_says_so_when_nats_does_not_answer(site: Site) -> None:
    site.nats.server.stop()
    r = await _cli("audit", "verify", "--data", str(site.dep.root))
    assert r.exit_code == 0, r.output
    assert "the append-only NATS stream was not read" in _flat(r)


# --- the outside witness ---------------------------------------------------------------------------


def _files(site: Site) -> tuple[Path, Path]:
    return site.dep.root / "ca" / "service.pem", site.dep.root / "ca" / "root.pem"


async def _witness(site: Site, state: Path) -> Result:
    service_ca, root = _files(site)
    return await _cli(
        "audit", "witness", "--url", site.https, "--state", str(state), "--service-ca", str(service_ca),
        "--tls-ca", str(root),
    )  # fmt: skip


@pytest.mark.real_clock  # the witness checks cm's HTTPS certificate with OpenSSL, at the real time
async def test_a_witness_follows_a_growing_log_and_catches_truncation(site: Site, tmp_path: Path) -> None:
    state = tmp_path / "witness"
    await _grow(site, 1, "a")
    await site.km.checkpoint_now()
    first = site.store.latest_audit_checkpoint()
    assert first is not None
    r = await _witness(site, state)
    assert r.exit_code == 0, r.output
    assert f"first visit: kept the signed tree head of {first.seq} records" in _flat(r)

    await _grow(site, 2, "b")
    await site.km.checkpoint_now()
    second = site.store.latest_audit_checkpoint()
    assert second is not None
    r = await _witness(site, state)
    assert r.exit_code == 0, r.output
    assert f"consistent: the log of {second.seq} records" in _flat(r)
    assert f"extends the {first.seq} records kept before" in _flat(r)
    r = await _witness(site, state)
    assert f"unchanged since the last visit: {second.seq} records" in _flat(r)
    # the state folder is an anchor folder: audit verify reads it
    assert sorted(p.name for p in state.iterdir()) == [f"tree-head-{n:012d}.json" for n in (first.seq, second.seq)]

    _cut(site, first.seq)  # cm now serves the older head
    r = await _witness(site, state)
    assert r.exit_code == 4, r.output
    flat = _flat(r)
    assert f"the audit log was truncated: cm serves a signed tree head of {first.seq} records" in flat
    assert f"smaller than the signed tree head of {second.seq} records this witness kept" in flat
    assert "Traceback" not in r.output


@pytest.mark.real_clock  # the witness checks cm's HTTPS certificate with OpenSSL, at the real time
async def test_a_witness_catches_a_rewritten_log(site: Site, tmp_path: Path) -> None:
    """Record #2 rewritten in the database, the chain recomputed and the checkpoints after it
    dropped; km (restarted: it no longer holds the tree it had read) signs the rewritten log. The
    new head's signature is good, but the consistency proof from the head the witness kept fails."""
    state = tmp_path / "witness"
    await _grow(site, 1, "a")
    await site.km.checkpoint_now()
    kept = site.store.latest_audit_checkpoint()
    assert kept is not None
    assert (await _witness(site, state)).exit_code == 0
    with sqlite3.connect(_db(site)) as c:
        rows = c.execute("SELECT seq, at, kind, actor, subject, data FROM audit_log ORDER BY seq").fetchall()
        prev = c.execute("SELECT hash FROM audit_log WHERE seq = 1").fetchone()[0]
        for seq, at, kind, actor, subject, data in rows[1:]:
            actor = "mallory" if seq == 2 else actor
            when = dt.datetime.fromisoformat(at).replace(tzinfo=dt.UTC) if isinstance(at, str) else at
            h = fmt.record_hash(prev, seq, when, kind, actor, subject, data)
            c.execute("UPDATE audit_log SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?", (actor, prev, h, seq))
            prev = h
        c.execute("DELETE FROM audit_checkpoints")
    assert km_audit.verify(site.store, lambda fp: None).problems == []  # a consistent chain again
    await _grow(site, 1, "b")
    key, cert = km_identity(site.dep)
    assert km_audit.checkpoint(site.store, key, cert, site.clock.now()) is not None  # a km without cache
    new = site.store.latest_audit_checkpoint()
    assert new is not None

    service_ca, root = _files(site)
    with pytest.raises(LogInconsistentError) as exc:
        await witness(site.https, state, load_certificate(service_ca.read_bytes()), tls=tls_context(root))
    assert exc.value.message.startswith("the audit log was rewritten")
    assert f"the consistency proof between {kept.seq} and {new.seq} records fails" in exc.value.message
    r = await _witness(site, state)
    assert r.exit_code == 4, r.output
    assert "the audit log was rewritten" in _flat(r)
    assert len(list(state.iterdir())) == 1  # nothing kept from a rewritten log


@pytest.mark.real_clock  # the witness checks cm's HTTPS certificate with OpenSSL, at the real time
async def test_a_witness_refuses_a_head_not_signed_under_the_service_ca_given(site: Site, tmp_path: Path) -> None:
    await _grow(site, 1, "a")
    await site.km.checkpoint_now()
    _service_ca, root = _files(site)
    other = load_certificate((site.dep.root / "ca" / "operational.pem").read_bytes())
    with pytest.raises(UntrustedError, match="not issued by the service CA given"):
        await witness(site.https, tmp_path / "w", other, tls=tls_context(root))
    assert not (tmp_path / "w").exists()
