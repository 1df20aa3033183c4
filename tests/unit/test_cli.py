"""The operator's CLI on a real deployment folder: init, ca issue/list/show/chain, and errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from iotdlm.cli.main import main
from iotdlm.deployment import Deployment
from iotdlm.pki.chain import verify_issued_by
from iotdlm.pki.keys import Algorithm, generate_key
from tests.helpers import make_csr
from tests.tools import attime

PASS = {"IOTDLM_CA_PASSPHRASE": "correct horse battery staple"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("site") / "data"
    r = CliRunner().invoke(main, ["init", "--data", str(data), "--dtype", "boardA", "--dtype", "boardB"], env=PASS)
    assert r.exit_code == 0, r.output
    return data


def test_init_creates_everything(site: Path) -> None:
    dep = Deployment.load(site)
    assert dep.identity_names() == ["admin", "cm", "km", "modes", "pm-boardA", "pm-boardB", "sm"]
    for name in ("root", "factory", "operational", "service"):
        key_pem = (site / "ca" / f"{name}.key.pem").read_bytes()
        assert b"ENCRYPTED PRIVATE KEY" in key_pem
        assert (site / "ca" / f"{name}.key.pem").stat().st_mode & 0o077 == 0
    assert not (site / "secrets").exists()  # passphrase came from the environment
    pm = dep.identity("pm-boardA")
    verify_issued_by(pm.certificate, dep.ca_certificate("service"), now=pm.certificate.not_valid_before_utc)


def test_init_refuses_existing_folder(site: Path) -> None:
    r = CliRunner().invoke(main, ["init", "--data", str(site)], env=PASS)
    assert r.exit_code == 4
    assert "already holds a deployment" in r.output


def test_wrong_passphrase_is_a_clear_error(site: Path, tmp_path: Path) -> None:
    csr = tmp_path / "d.csr"
    csr.write_bytes(make_csr(generate_key(Algorithm.P256), "dev-1"))
    r = CliRunner().invoke(
        main,
        [
            "ca",
            "issue",
            "--data",
            str(site),
            "--csr",
            str(csr),
            "--device-id",
            "dev-1",
            "--profile",
            "factory",
            "--out",
            str(tmp_path / "o.pem"),
        ],
        env={"IOTDLM_CA_PASSPHRASE": "wrong"},
    )
    assert r.exit_code == 4
    assert "passphrase" in r.output
    assert "Traceback" not in r.output


def test_issue_list_show_chain(site: Path, tmp_path: Path) -> None:
    csr = tmp_path / "d.csr"
    csr.write_bytes(make_csr(generate_key(Algorithm.P256), "dev-cli"))
    out = tmp_path / "dev.pem"
    runner = CliRunner()
    r = runner.invoke(
        main,
        [
            "ca",
            "issue",
            "--data",
            str(site),
            "--csr",
            str(csr),
            "--device-id",
            "dev-cli",
            "--profile",
            "operational",
            "--dtype",
            "boardA",
            "--out",
            str(out),
        ],
        env=PASS,
    )
    assert r.exit_code == 0, r.output
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    serial = format(cert.serial_number, "x")
    r = runner.invoke(main, ["ca", "list", "--data", str(site), "--device-id", "dev-cli"], env=PASS)
    assert r.exit_code == 0
    assert serial[:8] in r.output
    r = runner.invoke(main, ["ca", "show", "--data", str(site), serial, "--pem"], env=PASS)
    assert r.exit_code == 0
    assert x509.load_pem_x509_certificate(r.output.encode()) == cert
    chain = tmp_path / "chain.pem"
    r = runner.invoke(main, ["ca", "chain", "--data", str(site), "--out", str(chain)], env=PASS)
    assert r.exit_code == 0
    if shutil.which("openssl"):
        root = tmp_path / "root.pem"
        r = runner.invoke(main, ["ca", "chain", "--data", str(site), "--issuer", "root", "--out", str(root)])
        v = subprocess.run(
            ["openssl", "verify", *attime(), "-CAfile", str(root), "-untrusted", str(chain), str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert v.returncode == 0, v.stdout + v.stderr


def test_issue_whole_folder_lists_failures(site: Path, tmp_path: Path) -> None:
    d = tmp_path / "csrs"
    d.mkdir()
    for i in range(3):
        (d / f"line-{i}.csr").write_bytes(make_csr(generate_key(Algorithm.P256), f"line-{i}"))
    (d / "broken.csr").write_bytes(b"not a csr")
    r = CliRunner().invoke(
        main,
        ["ca", "issue", "--data", str(site), "--csr-dir", str(d), "--profile", "factory", "--out", str(tmp_path / "o")],
        env=PASS,
    )
    assert r.exit_code == 4
    assert "bad_request" in r.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["line-0.pem", "line-1.pem", "line-2.pem"]


@pytest.mark.parametrize(
    "args",
    [
        ["ca", "show", "zz-not-hex"],
        ["ca", "show", "abcdef0123"],
        ["ca", "list", "--data", "/nonexistent/iotdlm"],
    ],
    ids=["bad-serial", "unknown-serial", "no-deployment"],
)
def test_errors_are_one_line_not_tracebacks(site: Path, args: list[str]) -> None:
    if "--data" not in args:
        args = [*args[:2], "--data", str(site), *args[2:]]
    r = CliRunner().invoke(main, args, env=PASS)
    assert r.exit_code == 4
    assert "Traceback" not in r.output
    assert r.output.strip()


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for args in (
        [],
        ["init"],
        ["nats", "serve"],
        ["km", "serve"],
        ["ca", "issue"],
        ["ca", "list"],
        ["ca", "show"],
        ["ca", "chain"],
        ["demo"],
    ):
        r = runner.invoke(main, [*args, "--help"])
        assert r.exit_code == 0, args
        assert "Usage:" in r.output
