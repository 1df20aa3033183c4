"""`iotdlm ca issue|certificate|chain --format c509` on a real deployment folder: what is written
decodes (iotdlm.c509) back to the DER the CA signed, and verifies against the deployment's CAs."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from iotdlm.c509 import decode_c509, decode_c509_bag
from iotdlm.deployment import Deployment
from iotdlm.errors import UnsupportedError
from iotdlm.pki.chain import load_certificates_pem
from iotdlm.pki.keys import Algorithm, generate_key
from tests.helpers import make_csr
from tests.unit.test_cli_ca_renew import _cli, site  # one deployment folder per module, as there

__all__ = ["site"]  # the fixture, used by name


def test_ca_certificate_writes_a_c509_bag_of_the_certificate_and_its_ca(site: Path, tmp_path: Path) -> None:
    out = tmp_path / "dev-c1.c509"
    code, text = _cli(
        "ca", "certificate", "--data", str(site), "--device-id", "dev-c1", "--profile", "operational",
        "--key-out", str(tmp_path / "dev-c1.key"), "--out", str(out), "--format", "c509",
    )  # fmt: skip
    assert code == 0, text
    cert_der, ca_der = decode_c509_bag(out.read_bytes())
    cert, ca = x509.load_der_x509_certificate(cert_der), x509.load_der_x509_certificate(ca_der)
    cert.verify_directly_issued_by(ca)
    assert ca == Deployment.load(site).ca_certificate("operational")
    assert len(out.read_bytes()) < len(cert_der) + len(ca_der)


def test_ca_issue_writes_one_c509_certificate_and_a_folder_of_them(site: Path, tmp_path: Path) -> None:
    csr = tmp_path / "dev-c2.csr"
    csr.write_bytes(make_csr(generate_key(Algorithm.P256), "dev-c2"))
    out = tmp_path / "dev-c2.c509"
    code, text = _cli(
        "ca", "issue", "--data", str(site), "--csr", str(csr), "--device-id", "dev-c2",
        "--profile", "factory", "--out", str(out), "--format", "c509",
    )  # fmt: skip
    assert code == 0, text
    cert = x509.load_der_x509_certificate(decode_c509(out.read_bytes()))
    cert.verify_directly_issued_by(Deployment.load(site).ca_certificate("factory"))

    folder, outdir = tmp_path / "csrs", tmp_path / "issued"
    folder.mkdir()
    (folder / "dev-c3.csr").write_bytes(make_csr(generate_key(Algorithm.P256), "dev-c3"))
    code, text = _cli(
        "ca", "issue", "--data", str(site), "--csr-dir", str(folder), "--profile", "operational",
        "--out", str(outdir), "--format", "c509",
    )  # fmt: skip
    assert code == 0, text
    assert [p.name for p in outdir.iterdir()] == ["dev-c3.c509"]
    decode_c509((outdir / "dev-c3.c509").read_bytes())


def test_ca_chain_as_a_c509_truststore_holds_the_pem_chain(site: Path, tmp_path: Path) -> None:
    code, pem = _cli("ca", "chain", "--data", str(site))
    assert code == 0
    out = tmp_path / "truststore.c509"
    code, text = _cli("ca", "chain", "--data", str(site), "--format", "c509", "--out", str(out))
    assert code == 0, text
    expected = [c.public_bytes(Encoding.DER) for c in load_certificates_pem(pem.encode())]
    assert decode_c509_bag(out.read_bytes()) == expected


def test_ca_chain_c509_to_the_terminal_says_to_give_out(site: Path) -> None:
    code, text = _cli("ca", "chain", "--data", str(site), "--format", "c509")
    assert code != 0
    assert "give --out" in text


def test_a_certificate_without_a_c509_form_is_issued_kept_and_named(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import iotdlm.c509

    def refuse(der: bytes) -> bytes:
        raise UnsupportedError("a relative distinguished name with more than one attribute has no C509 form")

    monkeypatch.setattr(iotdlm.c509, "encode_c509", refuse)
    csr = tmp_path / "dev-c4.csr"
    csr.write_bytes(make_csr(generate_key(Algorithm.P256), "dev-c4"))
    code, text = _cli(
        "ca", "issue", "--data", str(site), "--csr", str(csr), "--device-id", "dev-c4",
        "--profile", "operational", "--out", str(tmp_path / "dev-c4.c509"), "--format", "c509",
    )  # fmt: skip
    assert code == 1, text
    assert "was issued but not written" in " ".join(text.split())
    assert "ca show" in text
    assert not (tmp_path / "dev-c4.c509").exists()
