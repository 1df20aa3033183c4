"""pm's configuration in a deployment folder: settings, anchors (pk_sm from the deployment, sm's
pinned root and the sm-pm key), the flasher choice, and the commands that need no running services."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from iotdlm import errors
from iotdlm.cli.pm import pm as pm_cli
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.pki.keys import Algorithm
from iotdlm.pm import config as pmconfig
from iotdlm.pm.flasher import SimulatedFlasher
from iotdlm.repository import VendorRepository
from iotdlm.sm import config as smconfig

DTYPE = "boardA"
NOW = SystemClock().now()


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("pmcfg") / "data"
    deployment, _ = init_deployment(
        root, organization="Cfg", algorithm=Algorithm.P256, dtypes=[DTYPE], passphrase=b"pw",
        public_url="http://pki.example.org:8080", now=NOW - dt.timedelta(hours=1),
    )  # fmt: skip
    return deployment


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(pm_cli, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


def test_defaults_come_from_the_deployment(dep: Deployment) -> None:
    settings = pmconfig.settings_from(dep, DTYPE, pmconfig.PmConfig())
    assert settings.profiles == ("factory", "operational")
    assert settings.enroll_uri == "https://pki.example.org:8443/.well-known/est"
    assert settings.update_uri is None
    assert settings.organization == "Cfg"
    assert settings.staging_dir == dep.root / "pm" / DTYPE / "staging"
    with pytest.raises(errors.NotFoundError, match="not one of this deployment's device types"):
        pmconfig.settings_from(dep, "boardZ", pmconfig.PmConfig())


def test_config_round_trips_and_is_validated(dep: Deployment, tmp_path: Path) -> None:
    cfg = pmconfig.PmConfig(profiles=["factory"], enroll_uri="https://ca.example/.well-known/est", bench=str(tmp_path))
    pmconfig.save_config(dep.root, DTYPE, cfg)
    assert pmconfig.load_config(dep.root, DTYPE) == cfg
    for bad, field in (
        (pmconfig.PmConfig(profiles=["service"]), "profiles"),
        (pmconfig.PmConfig(profiles=[]), "profiles"),
        (pmconfig.PmConfig(enroll_uri="ftp://x"), "enroll_uri"),
        (pmconfig.PmConfig(bench="a", flasher_config="b"), "bench"),
        (pmconfig.PmConfig(batch_size=0), "batch_size"),
    ):
        with pytest.raises(errors.BadRequestError) as info:
            bad.validate()
        assert info.value.field == field
    pmconfig.config_path(dep.root, DTYPE).write_text("profiles = 3\n")
    with pytest.raises(errors.BadRequestError, match=r"config\.toml"):
        pmconfig.load_config(dep.root, DTYPE)
    pmconfig.config_path(dep.root, DTYPE).unlink()


def test_flasher_choice(dep: Deployment, tmp_path: Path) -> None:
    cfg = pmconfig.PmConfig()
    with pytest.raises(errors.BadRequestError, match="no flasher"):
        pmconfig.make_flasher(dep, DTYPE, cfg)
    with pytest.raises(errors.NotFoundError, match="bench make"):
        pmconfig.make_flasher(dep, DTYPE, cfg, bench=tmp_path / "nope")
    flasher = pmconfig.make_flasher(dep, DTYPE, pmconfig.PmConfig(bench=str(tmp_path)))
    assert isinstance(flasher, SimulatedFlasher)
    stand_in = pmconfig.UnconfiguredFlasher(DTYPE, dep.root)
    with pytest.raises(errors.BadRequestError, match=r"iotdlm pm setup"):
        stand_in.discover()


def test_anchors_come_from_the_deployment_not_from_sm(dep: Deployment, tmp_path: Path) -> None:
    anchors = pmconfig.load_anchors(dep, NOW)
    sm_cert = dep.identity("sm").certificate
    assert anchors.pk_sm == sm_cert.public_key()
    assert anchors.root_ca == dep.ca_certificate("root")
    assert (anchors.trusted_root, anchors.meta_key) == (None, None)  # sm not set up: no software
    repo = VendorRepository.init(tmp_path / "repo", now=NOW)
    smconfig.setup(dep.root, repository_url="http://127.0.0.1:9", root=repo.trusted_root(), dtypes=[DTYPE])
    anchors = pmconfig.load_anchors(dep, NOW)
    assert anchors.trusted_root == repo.trusted_root()
    assert anchors.meta_key == (dep.root / "secrets" / "sm-pm.key").read_bytes()
    # a certificate that is not sm's (here: km's) is not accepted as pk_sm
    cert_file = dep.root / "modules" / "sm" / "cert.pem"
    original = cert_file.read_bytes()
    cert_file.write_bytes((dep.root / "modules" / "km" / "cert.pem").read_bytes())
    try:
        with pytest.raises(errors.UntrustedError, match="not sm's service certificate"):
            pmconfig.load_pk_sm(dep, NOW)
    finally:
        cert_file.write_bytes(original)


def test_cli_setup_bench_make_and_offline_commands(dep: Deployment, tmp_path: Path) -> None:
    data = str(dep.root)
    bench = tmp_path / "bench"
    r = _invoke("bench", "make", "--dir", str(bench), "--dtype", DTYPE, "--count", "4", "--no-csr-every", "2")
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # the bench's path is in the sentence: it wraps where the path ends
    assert "manufactured 4 blank boardA device(s)" in said
    assert "(2 that cannot make CSRs)" in said
    r = _invoke("bench", "make", "--dir", str(bench), "--dtype", DTYPE, "--count", "1")
    assert r.exit_code == 4
    assert "already holds a device" in r.output
    r = _invoke("setup", "--data", data, "--dtype", DTYPE, "--profiles", "operational", "--bench", str(bench))
    assert r.exit_code == 0, r.output
    assert pmconfig.load_config(dep.root, DTYPE).profiles == ["operational"]
    r = _invoke("setup", "--data", data, "--dtype", DTYPE, "--profiles", "service")
    assert r.exit_code == 4
    assert "not a device profile" in r.output
    r = _invoke("status", "--data", data, "--dtype", DTYPE)
    assert r.exit_code == 0, r.output
    assert "ready" in r.output
    r = _invoke("clear-alarm", "--data", data, "--dtype", DTYPE, "--operator", "bob")
    assert r.exit_code == 4
    assert "no alarm raised" in r.output
    r = _invoke("records", "--data", data)
    assert r.exit_code == 0
    assert "0 record(s)" in r.output
    pmconfig.config_path(dep.root, DTYPE).unlink()
