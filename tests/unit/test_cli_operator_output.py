"""What the operator reads and scripts parse (issue 14, stumbles 4, 9 and 11, and --json), on a
real deployment folder through the real ``iotdlm`` entry point: whole serials at 80 columns when
piped, every spelling of a serial, output paths checked before the work, the CRL partition in
``ca show``, one list of revocation reasons, a retired device named as such, JSON keys."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from iotdlm.cli.main import main
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.runtime import open_store
from iotdlm.sm.local import LocalRepository
from iotdlm.store import ProvisioningRecord
from iotdlm.wire.software import StoredSoftware
from tests.helpers import make_csr

PW = "pw"
ENV = {"IOTDLM_CA_PASSPHRASE": PW, "COLUMNS": "80"}
DEVICES = ("boardA-00001", "boardA-00002", "boardA-00003")
CERT_KEYS = {
    "serial", "issuer", "subject", "device_id", "profile", "status", "not_before", "not_after", "requested_by",
    "issued_at", "revoked_at", "revocation_reason", "sha256", "crl_partition",
}  # fmt: skip
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def iotdlm(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    """The real entry point in a child process, its output piped (not a terminal)."""
    env = {**os.environ, **ENV, "COLUMNS": str(columns)}
    return subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", *args], capture_output=True, text=True, env=env, check=False
    )


def invoke(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args), env=ENV)
    return r.exit_code, r.output


def _issue(data: Path, tmp: Path, device_id: str, out: Path) -> None:
    csr = tmp / f"{device_id}.csr"
    csr.write_bytes(make_csr(generate_key(Algorithm.P256), device_id))
    code, output = invoke("ca", "issue", "--data", str(data), "--csr", str(csr), "--device-id", device_id,
                          "--profile", "operational", "--dtype", "boardA", "--out", str(out))  # fmt: skip
    assert code == 0, output


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, x509.Certificate]]:
    tmp = tmp_path_factory.mktemp("operator")
    data = tmp / "data"
    # port 1: km never answers, so revocations are made directly in the store (and say so)
    code, output = invoke("init", "--data", str(data), "--dtype", "boardA", "--nats-port", "1")
    assert code == 0, output
    certs = {}
    for d in DEVICES:
        _issue(data, tmp, d, tmp / f"{d}.pem")
        certs[d] = x509.load_pem_x509_certificate((tmp / f"{d}.pem").read_bytes())
    code, output = invoke("device", "decommission", "--data", str(data), DEVICES[2])
    assert code == 0, output
    return data, certs


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _openssl_form(cert: x509.Certificate) -> str:
    """The serial as ``openssl x509 -text`` prints it: upper-case byte pairs with colons."""
    text = format(cert.serial_number, "x")
    text = "0" * (len(text) % 2) + text
    return ":".join(text[i : i + 2] for i in range(0, len(text), 2)).upper()


# --- stumble 4: whole serials, any spelling, 80 columns --------------------------------------------
def test_ca_list_piped_at_80_columns_prints_whole_serials(site: tuple[Path, dict[str, x509.Certificate]]) -> None:
    data, certs = site
    r = iotdlm("ca", "list", "--data", str(data))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for d, cert in certs.items():
        assert any(_serial(cert) in line and d in line for line in lines), (d, r.stdout)
    assert "…" not in r.stdout


def test_ca_show_takes_the_serial_as_openssl_prints_it(site: tuple[Path, dict[str, x509.Certificate]]) -> None:
    data, certs = site
    cert = certs[DEVICES[0]]
    r = iotdlm("ca", "show", "--data", str(data), _openssl_form(cert))
    assert r.returncode == 0, r.stderr
    assert _serial(cert) in r.stdout
    # and says which CRL lists it once revoked: the URL in the certificate's CRL distribution point
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    url = next(n.value for p in cdp for n in p.full_name or () if isinstance(n, x509.UniformResourceIdentifier))
    partition = int(url.rsplit("/", 1)[1].split(".")[0])
    assert re.search(rf"CRL partition\s+.*{partition} of the operational CA", r.stdout)
    assert url in r.stdout
    for spelling in ("0x" + _serial(cert).upper(), "serial=" + _serial(cert).upper(), _openssl_form(cert).lower()):
        code, output = invoke("ca", "show", "--data", str(data), spelling, "--pem")
        assert code == 0, output
        assert x509.load_pem_x509_certificate(output.encode()) == cert


def test_a_serial_that_is_not_one_is_refused_saying_what_to_give(
    site: tuple[Path, dict[str, x509.Certificate]],
) -> None:
    data, certs = site
    cut = _serial(certs[DEVICES[0]])[:28] + "…"  # what the old tables printed
    r = iotdlm("ca", "revoke", "--data", str(data), cut)
    assert r.returncode == 4
    assert "not a certificate serial" in r.stderr
    assert "openssl" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_ca_revoke_takes_the_colon_form(site: tuple[Path, dict[str, x509.Certificate]]) -> None:
    data, certs = site
    cert = certs[DEVICES[1]]
    code, output = invoke("ca", "revoke", "--data", str(data), _openssl_form(cert), "--reason", "keyCompromise")
    assert code == 0, output
    assert _serial(cert) in output
    code, output = invoke("ca", "show", "--data", str(data), _serial(cert), "--json")
    shown = json.loads(output)
    assert (shown["status"], shown["revocation_reason"]) == ("revoked", "keyCompromise")


def test_audit_list_fits_80_columns_piped(site: tuple[Path, dict[str, x509.Certificate]]) -> None:
    data, certs = site
    r = iotdlm("audit", "list", "--data", str(data), "--limit", "100")
    assert r.returncode == 0, r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    assert "issuance" in r.stdout
    assert _serial(certs[DEVICES[0]]) in r.stdout  # the subject's serial, whole


# --- stumble 11: reasons, CRL partition, retired devices -----------------------------------------
def _reasons_after(text: str, marker: str) -> list[str]:
    flat = " ".join(text.split())
    tail = flat.split(marker, 1)[1]
    return [w.strip(" .") for w in re.split(r"[,;]", tail.split(".", 1)[0])]


def test_revoke_help_and_refusal_list_the_same_reasons(site: tuple[Path, dict[str, x509.Certificate]]) -> None:
    data, certs = site
    code, help_text = invoke("ca", "revoke", "--help")
    assert code == 0
    in_help = _reasons_after(help_text, "Why (RFC 5280 reason):")
    code, output = invoke("ca", "revoke", "--data", str(data), _serial(certs[DEVICES[0]]), "--reason", "bogus")
    assert code == 4
    in_refusal = _reasons_after(output, "give one of:")
    assert in_help == in_refusal
    assert "keyCompromise" in in_help
    assert "certificateHold" not in in_help
    assert "removeFromCRL" not in in_help


def test_device_revoke_on_a_retired_device_says_so(site: tuple[Path, dict[str, x509.Certificate]]) -> None:
    data, _certs = site
    r = iotdlm("device", "revoke", "--data", str(data), DEVICES[2])
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"device {DEVICES[2]} is retired" in " ".join(r.stderr.split())
    assert "serial" not in r.stdout  # no empty table
    r = iotdlm("device", "revoke", "--data", str(data), "no-such-device")
    assert r.returncode == 4
    assert "no device" in r.stderr


# --- stumble 9: output paths --------------------------------------------------------------------
def _count(data: Path) -> int:
    code, output = invoke("ca", "list", "--data", str(data), "--json")
    assert code == 0, output
    return int(json.loads(output)["total"])


@pytest.mark.parametrize(
    "args",
    [
        ["ca", "issue", "--profile", "operational", "--device-id", DEVICES[0], "--force", "--out", "{missing}/x.pem"],
        ["ca", "issue", "--profile", "operational", "--device-id", DEVICES[0], "--force", "--out", "{folder}"],
        ["ca", "chain", "--out", "{missing}/chain.pem"],
        ["ca", "crl", "--partition", "0", "--out", "{missing}/0.crl"],
        ["ca", "crl", "--out", "{file}"],
    ],
    ids=["issue-missing-folder", "issue-into-a-folder", "chain", "crl-file", "crl-folder-is-a-file"],
)
def test_output_path_is_checked_before_the_work(
    site: tuple[Path, dict[str, x509.Certificate]], tmp_path: Path, args: list[str]
) -> None:
    data, _certs = site
    (tmp_path / "a-file").write_text("x")
    csr = tmp_path / "d.csr"
    csr.write_bytes(make_csr(generate_key(Algorithm.P256), DEVICES[0]))
    paths = {"missing": str(tmp_path / "no" / "such"), "folder": str(tmp_path), "file": str(tmp_path / "a-file")}
    argv = [a.format(**paths) for a in args] + ["--data", str(data)]
    if args[1] == "issue":
        argv += ["--csr", str(csr)]
    before = _count(data)
    r = iotdlm(*argv)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "--out" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert _count(data) == before  # nothing issued


def test_a_write_that_fails_after_issuing_names_the_serial(
    site: tuple[Path, dict[str, x509.Certificate]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _certs = site
    out = tmp_path / "cert.pem"
    real = Path.write_bytes

    def disk_full(self: Path, raw: bytes) -> int:  # type: ignore[override]
        if self == out:
            raise OSError(28, "No space left on device")
        return real(self, raw)

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    csr = tmp_path / "d.csr"
    csr.write_bytes(make_csr(generate_key(Algorithm.P256), DEVICES[0]))
    r = CliRunner().invoke(main, ["ca", "issue", "--data", str(data), "--csr", str(csr), "--device-id", DEVICES[0],
                                  "--profile", "operational", "--force", "--out", str(out)], env=ENV)  # fmt: skip
    monkeypatch.undo()
    assert r.exit_code == 1, r.output
    assert r.exc_info is None or r.exc_info[0] is SystemExit
    code, listed = invoke("ca", "list", "--data", str(data), "--device-id", DEVICES[0], "--limit", "1", "--json")
    assert code == 0, listed
    newest = json.loads(listed)["certificates"][0]["serial"]
    flat = " ".join(r.output.split())
    assert f"certificate {newest} for {DEVICES[0]} was issued" in flat
    assert "No space left on device" in flat
    assert f"iotdlm ca show {newest} --pem" in flat


# --- --json -------------------------------------------------------------------------------------
def test_ca_list_and_show_json(site: tuple[Path, dict[str, x509.Certificate]]) -> None:
    data, certs = site
    r = iotdlm("ca", "list", "--data", str(data), "--device-id", DEVICES[0], "--json", columns=40)
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert set(listed) == {"certificates", "total", "offset"}
    first = listed["certificates"][-1]
    assert set(first) == CERT_KEYS
    assert first["serial"] == _serial(certs[DEVICES[0]])  # whole, however narrow the terminal
    assert ISO_UTC.fullmatch(first["not_after"])
    code, output = invoke("ca", "show", "--data", str(data), _serial(certs[DEVICES[2]]), "--json")
    assert code == 0, output
    shown = json.loads(output)
    assert set(shown) == CERT_KEYS | {"crl_url", "pem"}
    assert shown["status"] == "revoked"
    assert ISO_UTC.fullmatch(shown["revoked_at"])
    assert shown["crl_url"].endswith(f"/crl/operational/{shown['crl_partition']}.crl")


def test_audit_and_device_list_json(site: tuple[Path, dict[str, x509.Certificate]]) -> None:
    data, _certs = site
    code, output = invoke("audit", "list", "--data", str(data), "--json", "--kind", "decommission")
    assert code == 0, output
    audit = json.loads(output)
    assert set(audit) == {"records", "total", "offset"}
    (rec,) = audit["records"]
    assert set(rec) == {"seq", "at", "kind", "actor", "subject", "details", "hash"}
    assert rec["kind"] == "decommission"
    assert isinstance(rec["details"], dict)
    assert ISO_UTC.fullmatch(rec["at"])
    r = iotdlm("device", "list", "--data", str(data), "--json")
    assert r.returncode == 0, r.stderr
    devices = {d["device_id"]: d for d in json.loads(r.stdout)["devices"]}
    assert set(devices) == set(DEVICES)
    assert set(devices[DEVICES[0]]) == {"device_id", "dtype", "status", "registered_at", "updated_at"}
    assert devices[DEVICES[2]]["status"] == "retired"
    assert devices[DEVICES[0]]["status"] == "active"
    code, output = invoke("device", "list", "--data", str(data), "--status", "retired")
    assert DEVICES[2] in output
    assert DEVICES[0] not in output


def test_pm_records_json_and_80_columns(site: tuple[Path, dict[str, x509.Certificate]]) -> None:
    data, certs = site
    now = SystemClock().now()
    store = open_store(Deployment.load(data))
    try:
        store.save_provisioning(
            [
                ProvisioningRecord(
                    device_id=DEVICES[0], dtype="boardA", status="complete", operator="ops@line-3.factory.example",
                    started_at=now, updated_at=now, completed_at=now, steps_done=("software", "truststore", "certs"),
                    release_counter=7, image_sha256="ab" * 32,
                    certificates=(("factory", _serial(certs[DEVICES[1]])), ("operational", _serial(certs[DEVICES[0]]))),
                ),
                ProvisioningRecord(
                    device_id=DEVICES[1], dtype="boardA", status="failed", operator="ops@line-3.factory.example",
                    started_at=now, updated_at=now, failed_step="flash_software",
                    message="the flasher did not answer within 30 s; check the cable and provision again",
                ),
            ]
        )  # fmt: skip
    finally:
        store.close()
    r = iotdlm("pm", "records", "--data", str(data))
    assert r.returncode == 0, r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    assert _serial(certs[DEVICES[0]]) in r.stdout
    assert _serial(certs[DEVICES[1]]) in r.stdout
    assert "flash_software" in r.stdout
    code, output = invoke("pm", "records", "--data", str(data), "--json")
    recs = {x["device_id"]: x for x in json.loads(output)["records"]}
    assert set(recs[DEVICES[0]]) == {
        "device_id", "dtype", "status", "operator", "started_at", "updated_at", "completed_at", "flasher_ref",
        "steps_done", "release_counter", "image_sha256", "certificates", "failed_step", "message", "attempts",
    }  # fmt: skip
    assert recs[DEVICES[0]]["certificates"]["operational"] == _serial(certs[DEVICES[0]])
    assert recs[DEVICES[1]]["failed_step"] == "flash_software"
    code, output = invoke("pm", "status", "--data", str(data), "--dtype", "boardA", "--json")
    assert code == 0, output
    assert json.loads(output) == {
        "dtype": "boardA", "state": "ready", "alarm": None,
        "records": {"complete": 1, "failed": 1, "in-progress": 0},
    }  # fmt: skip


def test_sm_list_and_show_json(site: tuple[Path, dict[str, x509.Certificate]]) -> None:
    data, _certs = site
    local = LocalRepository(data / "sm")
    if not any(v.release_counter == 3 for v in local.list("boardA")):
        with local.staging("boardA", 3) as stage:
            stage.write("image", b"firmware 3")
            stage.commit(StoredSoftware("boardA", 3, "boardA/fw-3.bin", 10, "cd" * 32, "2026-12-05T03:00:00+00:00"))
    code, output = invoke("sm", "list", "--data", str(data), "--json")
    assert code == 0, output
    (v,) = json.loads(output)["versions"]
    assert v == {"dtype": "boardA", "release_counter": 3, "target_path": "boardA/fw-3.bin", "length": 10,
                 "sha256": "cd" * 32, "stored_at": "2026-12-05T03:00:00Z"}  # fmt: skip
    code, output = invoke("sm", "show", "--data", str(data), "boardA", "--no-verify", "--json")
    assert code == 0, output
    shown = json.loads(output)
    assert (shown["verified"], shown["verify_error"]) == (None, None)
    # without its signed metadata, the version does not verify: said in the JSON, exit code 4
    code, output = invoke("sm", "show", "--data", str(data), "boardA", "--json")
    assert code == 4
    shown = json.loads(output)
    assert shown["verified"] is False
    assert set(shown["verify_error"]) == {"code", "field", "message"}


def test_pm_request_report_fits_80_columns_with_whole_serials(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from iotdlm.cli import pm as pm_cli
    from iotdlm.wire import pm as wire_pm

    serials = [format((0x5A << 152) + i * 0x1234567, "x") for i in range(4)]
    devices = [
        wire_pm.DeviceResult(device_id="boardA-00001", status=wire_pm.COMPLETE, request="crmf",
                             steps_done=["software", "truststore", "config", "certificates", "verify"],
                             certificates={"factory": serials[0], "operational": serials[1]}),
        wire_pm.DeviceResult(device_id="boardA-00002", status=wire_pm.FAILED, failed_step="flash_software",
                             code="unavailable", message="the flasher did not answer within 30 s"),
        wire_pm.DeviceResult(device_id="boardA-00003", status=wire_pm.IN_PROGRESS, request="csr",
                             steps_pending=["certificates"], certificates={"factory": serials[2]}),
    ]  # fmt: skip
    report = wire_pm.ProvisionReport(
        dtype="boardA", operator="ops@line-3", started_at="2026-12-05T03:00:00Z", finished_at="2026-12-05T03:00:09Z",
        devices=devices, release_counter=7, image_sha256="ab" * 32, mode="provisioning-certificate",
    )  # fmt: skip
    out = io.StringIO()
    monkeypatch.setattr(pm_cli, "console", Console(file=out, width=80, color_system=None))
    pm_cli._summary(report, 9.0, Path("/srv/iotdlm"))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for sn in serials[:3]:
        assert sn in text
    assert "flash_software" in text
    assert "crmf" in text
