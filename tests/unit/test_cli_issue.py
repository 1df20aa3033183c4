"""`iotdlm ca issue` and what it tells the operator (issue 10 items 10, 12, 15, 16): CMP messages given
to --crmf, repeated runs over a folder, clear errors for bad files, what a request asked for and lost."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from iotdlm.cli.main import main
from iotdlm.deployment import Deployment
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.runtime import open_store
from tests.helpers import make_csr

PASS = {"IOTDLM_CA_PASSPHRASE": "correct horse battery staple"}
VECTORS = Path(__file__).resolve().parent.parent / "vectors"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("site") / "data"
    r = CliRunner().invoke(main, ["init", "--data", str(data), "--dtype", "boardA"], env=PASS)
    assert r.exit_code == 0, r.output
    return data


def _issue(site: Path, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["ca", "issue", "--data", str(site), *args], env=PASS)
    return r.exit_code, r.output


def _count(site: Path, device_id: str) -> int:
    store = open_store(Deployment.load(site))
    try:
        return store.count_certificates(device_id=device_id)
    finally:
        store.close()


def test_crmf_given_a_cmp_ir_message(site: Path, tmp_path: Path) -> None:
    code, out = _issue(
        site,
        "--crmf",
        str(VECTORS / "cmp_openssl_ir_p256.der"),
        "--device-id",
        "dev-cmp",
        "--profile",
        "operational",
        "--out",
        str(tmp_path / "c.pem"),
    )
    assert code == 0, out
    assert "a CMP ir message" in out
    assert "CMP protection (password-based MAC) is not verified" in out
    assert "proof of possession still is checked" in out
    assert "dev-cmp: dropped from the request: subject O=Example" in out
    assert (tmp_path / "c.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_crmf_given_a_p10cr_says_use_csr(site: Path, tmp_path: Path) -> None:
    code, out = _issue(
        site,
        "--crmf",
        str(VECTORS / "cmp_openssl_p10cr.der"),
        "--device-id",
        "dev-p10",
        "--profile",
        "operational",
        "--out",
        str(tmp_path / "c.pem"),
    )
    assert code == 4
    assert "p10cr" in out
    assert "--csr" in out
    assert "Traceback" not in out


def test_csr_extensions_dropped_are_printed(site: Path, tmp_path: Path) -> None:
    code, out = _issue(
        site,
        "--csr",
        str(VECTORS / "csr_openssl_ext.der"),
        "--device-id",
        "dev-ext",
        "--profile",
        "operational",
        "--out",
        str(tmp_path / "e.pem"),
    )
    assert code == 0, out
    assert "dev-ext: dropped from the request:" in out
    for what in ("subject L=Plant 4", "subjectAltName DNS:dev-ext.example.com", "extension basicConstraints"):
        assert what in out


def test_truncated_csr_file_is_named_and_described(site: Path, tmp_path: Path) -> None:
    csr = tmp_path / "cut.csr"
    full = make_csr(generate_key(Algorithm.P256), "dev-cut")
    csr.write_bytes(full[:60])
    code, out = _issue(
        site, "--csr", str(csr), "--device-id", "dev-cut", "--profile", "factory", "--out", str(tmp_path / "o.pem")
    )
    assert code == 4
    assert f"cut.csr: CSR: truncated: the DER says {len(full)} bytes, 60 given" in " ".join(out.split())
    assert "ParseError" not in out


def test_csr_dir_twice_skips_devices_that_hold_a_valid_certificate(site: Path, tmp_path: Path) -> None:
    d = tmp_path / "line"
    d.mkdir()
    for i in range(3):
        (d / f"line-{i}.csr").write_bytes(make_csr(generate_key(Algorithm.P256), f"line-{i}"))
    args = ["--csr-dir", str(d), "--profile", "factory", "--out", str(tmp_path / "o")]
    code, out = _issue(site, *args)
    assert code == 0, out
    assert "issued 3, failed 0, skipped 0" in out
    code, out = _issue(site, *args)
    assert code == 0, out
    assert "issued 0, failed 0, skipped 3" in " ".join(out.split())
    assert [_count(site, f"line-{i}") for i in range(3)] == [1, 1, 1]
    code, out = _issue(site, *args, "--force")
    assert code == 0, out
    assert "issued 3, failed 0, skipped 0" in out
    assert [_count(site, f"line-{i}") for i in range(3)] == [2, 2, 2]


def test_single_csr_twice_is_refused_unless_forced(site: Path, tmp_path: Path) -> None:
    csr = tmp_path / "one.csr"
    csr.write_bytes(make_csr(generate_key(Algorithm.P256), "dev-once"))
    args = ["--csr", str(csr), "--device-id", "dev-once", "--profile", "factory", "--out", str(tmp_path / "o.pem")]
    assert _issue(site, *args)[0] == 0
    code, out = _issue(site, *args)
    assert code == 4
    assert "already holds a valid factory certificate" in " ".join(out.split())
    assert _issue(site, *args, "--force")[0] == 0
    assert _count(site, "dev-once") == 2
