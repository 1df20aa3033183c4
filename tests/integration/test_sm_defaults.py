"""Issue 14, stumble 6, through the real ``iotdlm`` entry point: a vendor repository that would
refuse every report says so when it is created; ``sm setup`` without a proxy goes through cm's
egress proxy (as the README says) and opens it for the repository in cm.toml; ``--direct`` is the
explicit way around cm; ``sm check`` says why a report was refused and keeps it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from iotdlm.repository import VendorRepository
from iotdlm.repository.server import RepositoryServer
from iotdlm.sm import config as smconfig

DTYPE = "boardA"


def iotdlm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "IOTDLM_CA_PASSPHRASE": "correct horse"}
    return subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    done = iotdlm("init", "--data", "site", "--dtype", DTYPE, cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    return tmp_path / "site"


def _vendor(tmp_path: Path, site: Path) -> Path:
    done = iotdlm("repo", "init", "--dir", "vendor", "--report-ca", str(site / "ca" / "service.pem"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    return tmp_path / "vendor"


def test_repo_init_must_say_whose_reports_it_takes(tmp_path: Path, site: Path) -> None:
    done = iotdlm("repo", "init", "--dir", "vendor", cwd=tmp_path)
    assert done.returncode == 4
    out = done.stdout + done.stderr
    assert "--report-ca DATA/ca/service.pem" in out
    assert "--no-reports" in out
    assert "Traceback" not in out
    assert not (tmp_path / "vendor").exists()
    done = iotdlm("repo", "init", "--dir", "vendor", "--no-reports", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "No report CA yet" in done.stdout
    assert VendorRepository(tmp_path / "vendor").report_cas() == []
    (tmp_path / "other").mkdir()
    _vendor(tmp_path / "other", site)
    assert len(VendorRepository(tmp_path / "other" / "vendor").report_cas()) == 1


def test_sm_setup_goes_through_cms_egress_proxy_by_default(tmp_path: Path, site: Path) -> None:
    vendor = _vendor(tmp_path, site)
    root = str(vendor / "metadata" / "1.root.json")
    done = iotdlm(
        "sm", "setup", "--data", "site", "--repository", "http://127.0.0.1:18443", "--root", root, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "through cm's proxy http://127.0.0.1:3128" in done.stdout
    assert smconfig.load_config(site).egress_proxy == "http://127.0.0.1:3128"
    cm_toml = tomllib.loads((site / "cm.toml").read_text())
    assert cm_toml["allow_origins"] == ["http://127.0.0.1:18443"]
    # cm.toml's own egress port is followed; the origin is not added twice; other settings are kept
    (site / "cm.toml").write_text(
        'https_port = 9443\negress_port = 13128\nallow_origins = ["http://127.0.0.1:18443"]\n'
    )
    done = iotdlm(
        "sm", "setup", "--data", "site", "--repository", "http://127.0.0.1:18443/", "--root", root, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert smconfig.load_config(site).egress_proxy == "http://127.0.0.1:13128"
    cm_toml = tomllib.loads((site / "cm.toml").read_text())
    assert cm_toml == {"https_port": 9443, "egress_port": 13128, "allow_origins": ["http://127.0.0.1:18443"]}
    # going around cm is explicit
    done = iotdlm(
        "sm",
        "setup",
        "--data",
        "site",
        "--repository",
        "http://127.0.0.1:18443",
        "--root",
        root,
        "--direct",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "direct (--direct)" in done.stdout
    assert smconfig.load_config(site).egress_proxy is None
    both = iotdlm(
        "sm",
        "setup",
        "--data",
        "site",
        "--repository",
        "http://x",
        "--root",
        root,
        "--direct",
        "--egress-proxy",
        "http://127.0.0.1:1",
        cwd=tmp_path,
    )
    assert both.returncode == 4
    assert "not both" in both.stdout + both.stderr


async def test_sm_check_keeps_a_refused_report_and_says_what_to_do(tmp_path: Path, site: Path) -> None:
    done = await asyncio.to_thread(iotdlm, "repo", "init", "--dir", "vendor", "--no-reports", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    vendor = VendorRepository(tmp_path / "vendor")
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(5000))
    done = await asyncio.to_thread(
        iotdlm, "repo", "publish", "--dir", "vendor", "--dtype", DTYPE, "--version", "3", str(image), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    async with RepositoryServer(vendor) as server:
        root = str(vendor.metadata_dir / "1.root.json")
        done = await asyncio.to_thread(
            iotdlm,
            "sm",
            "setup",
            "--data",
            "site",
            "--repository",
            server.url,
            "--root",
            root,
            "--direct",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        done = await asyncio.to_thread(iotdlm, "sm", "check", "--data", "site", cwd=tmp_path)
        assert done.returncode == 0, done.stderr + done.stdout
        flat = " ".join(done.stdout.split())
        assert "report refused, kept and resent at the next check" in flat
        assert "HTTP 403" in flat
        assert "iotdlm repo trust" in flat
        assert vendor.reports() == []
        vendor.trust_report_ca((site / "ca" / "service.pem").read_bytes())
        done = await asyncio.to_thread(iotdlm, "sm", "check", "--data", "site", cwd=tmp_path)
        assert done.returncode == 0, done.stderr + done.stdout
        assert [r.release_counter for r in vendor.reports()] == [3]


async def test_sm_check_through_cm_when_cm_is_not_up_waits_then_says_unavailable(tmp_path: Path, site: Path) -> None:
    vendor = _vendor(tmp_path, site)
    (site / "cm.toml").write_text("egress_port = 9\n")  # nothing listens there
    root = str(vendor / "metadata" / "1.root.json")
    done = await asyncio.to_thread(
        iotdlm, "sm", "setup", "--data", "site", "--repository", "http://127.0.0.1:18443", "--root", root, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    done = await asyncio.to_thread(iotdlm, "sm", "check", "--data", "site", "--wait", "2", cwd=tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    flat = " ".join(done.stdout.split())
    assert "does not answer through cm's proxy yet; again in 1 s" in flat  # cm may still be starting
    assert "unavailable" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
