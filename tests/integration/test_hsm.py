"""CA keys in a SoftHSM2 token over PKCS#11 (ADR 0025): the keys cannot leave the token, its
signatures are what cryptography verifies, and a deployment made with ``--ca-key pkcs11:...``
issues over the real km (a real nats-server), signs CRLs and OCSP responses in the token, and
pkilint and openssl accept all of it."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pkcs11
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from pkcs11 import Attribute, ObjectClass

from iotdlm.bus.server import free_port
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import CA_NAMES, Deployment, hsm_settings, init_deployment
from iotdlm.errors import BadRequestError, ConflictError, NotFoundError
from iotdlm.hsm.ca_keys import CaKeyRing
from iotdlm.hsm.signer import Pkcs11Signer
from iotdlm.hsm.token import PIN_ENV, Token, open_token
from iotdlm.hsm.uri import parse_pkcs11_uri
from iotdlm.km import KmService
from iotdlm.pki import ocsp as pki_ocsp
from iotdlm.pki.ca import crl_partition
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.runtime import (
    build_km,
    connect_identity,
    km_identity,
    km_on_loop,
    km_trust,
    nats_server,
    open_store,
    sealer_for,
)
from iotdlm.supervisor.preflight import _check_passphrase
from tests.fixtures_hsm import PIN, SoftHsm, needs_softhsm
from tests.helpers import make_csr
from tests.tools import attime
from tests.unit.test_pkilint_certs import _allowed, _findings
from tests.unit.test_pkilint_crl_ocsp import crl_findings, ocsp_findings

pytestmark = needs_softhsm


def _token(hsm: SoftHsm) -> Token:
    uri = parse_pkcs11_uri(f"pkcs11:token={hsm.token}")
    return open_token(uri, module_path=hsm.module, pin=PIN)


def _signer(hsm: SoftHsm, token: Token, alg: Algorithm, label: str) -> Pkcs11Signer:
    token.generate(alg, label, os.urandom(8))
    return Pkcs11Signer(token, parse_pkcs11_uri(f"pkcs11:token={hsm.token};object={label}"))


@pytest.mark.parametrize("alg", [Algorithm.P256, Algorithm.P384, Algorithm.RSA3072], ids=str)
def test_token_signatures_verify_with_cryptography(softhsm: SoftHsm, alg: Algorithm) -> None:
    """Host hash + CKM_ECDSA, raw r||s DER-encoded: cryptography's own verify accepts it (and
    rejects it over other data); RSA by CKM_SHA256_RSA_PKCS."""
    signer = _signer(softhsm, _token(softhsm), alg, f"sig-{alg.value}")
    data = b"to be signed by the HSM"
    signature = signer.sign(data)
    pub = signer.public_key
    if isinstance(pub, ec.EllipticCurvePublicKey):
        h = hashes.SHA384() if alg is Algorithm.P384 else hashes.SHA256()
        pub.verify(signature, data, ec.ECDSA(h))
        with pytest.raises(InvalidSignature):
            pub.verify(signature, data + b"!", ec.ECDSA(h))
    else:
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    assert signer.algorithm is alg


def test_the_key_cannot_be_exported(softhsm: SoftHsm) -> None:
    token = _token(softhsm)
    signer = _signer(softhsm, token, Algorithm.P256, "no-export")
    private = token._session.get_key(ObjectClass.PRIVATE_KEY, label="no-export")
    assert private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.SENSITIVE] is True
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        private[Attribute.VALUE]  # the private scalar: the token will not read it out
    assert signer.public_key is not None


def test_an_exportable_key_is_refused(softhsm: SoftHsm) -> None:
    token = _token(softhsm)
    token._session.generate_keypair(
        pkcs11.KeyType.RSA, 2048, store=True, label="exportable",
        private_template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
    )  # fmt: skip
    with pytest.raises(BadRequestError, match="can be exported"):
        Pkcs11Signer(token, parse_pkcs11_uri(f"pkcs11:token={softhsm.token};object=exportable"))


def test_refusals_in_words(softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> None:
    token = _token(softhsm)
    token.generate(Algorithm.P256, "taken", os.urandom(8))
    with pytest.raises(ConflictError, match="already holds an object labelled 'taken'"):
        token.generate(Algorithm.P256, "taken", os.urandom(8))
    with pytest.raises(NotFoundError, match="no private key"):
        Pkcs11Signer(token, parse_pkcs11_uri(f"pkcs11:token={softhsm.token};object=absent"))
    with pytest.raises(NotFoundError, match="no token with token=nope"):
        open_token(parse_pkcs11_uri("pkcs11:token=nope"), module_path=softhsm.module, pin=PIN)
    with pytest.raises(NotFoundError, match="cannot load the PKCS#11 library"):
        open_token(parse_pkcs11_uri("pkcs11:token=x"), module_path="/nonexistent/libp11.so", pin=PIN)
    with pytest.raises(BadRequestError, match="no pin-value= here"):
        hsm_settings(f"pkcs11:token={softhsm.token};object=x?pin-value=1234", module_path=softhsm.module)
    monkeypatch.delenv(PIN_ENV, raising=False)
    settings = hsm_settings(f"pkcs11:token={softhsm.token};object=nopin", module_path=softhsm.module)
    with pytest.raises(NotFoundError, match=f"no HSM PIN: set \\${PIN_ENV}"):
        CaKeyRing(settings).signer("root")


def _iotdlm(*args: str, pin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != PIN_ENV} | ({PIN_ENV: pin} if pin else {})
    return subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", *args], capture_output=True, text=True, env=env, check=False
    )


def test_init_cli_refuses_a_pin_on_the_command_line_and_a_wrong_pin(softhsm: SoftHsm, tmp_path: Path) -> None:
    """In a process of its own (PKCS#11 logs in per process: this one already is)."""
    uri = softhsm.uri("cli")
    done = _iotdlm("init", "--data", str(tmp_path / "a"), "--ca-key", uri + "&pin-value=" + PIN)
    assert done.returncode == 4, done.stderr
    assert "no pin-value= here" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("11112222\n")
    done = _iotdlm("init", "--data", str(tmp_path / "b"), "--ca-key", uri, "--hsm-pin-file", str(wrong))
    assert done.returncode == 4, done.stderr
    assert "the HSM PIN does not open the HSM token 'iotdlm-test'" in " ".join((done.stderr + done.stdout).split())
    assert "Traceback" not in done.stderr


def test_init_and_issue_through_the_cli(softhsm: SoftHsm, tmp_path: Path) -> None:
    """The operator's path: `init --ca-key` with a PIN file, then `ca issue` (km in process, the PIN
    read from the file iotdlm.toml names), in processes of their own; the PIN never on a command line."""
    data = tmp_path / "site"
    done = _iotdlm(
        "init", "--data", str(data), "--dtype", "b", "--algorithm", "ecdsa-p384",
        "--ca-key", f"pkcs11:token={softhsm.token};object=clisite",
        "--hsm-module", softhsm.module, "--hsm-pin-file", str(softhsm.pin_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert "object=clisite-root" in done.stdout
    assert not list((data / "ca").glob("*.key.pem"))
    csr = tmp_path / "dev.csr"
    csr.write_bytes(make_csr(generate_key(Algorithm.P256), "dev-9"))
    out = tmp_path / "dev.pem"
    done = _iotdlm(
        "ca", "issue", "--data", str(data), "--csr", str(csr), "--device-id", "dev-9",
        "--profile", "operational", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    device = x509.load_pem_x509_certificate(out.read_bytes())
    issuer = x509.load_pem_x509_certificate((data / "ca" / "operational.pem").read_bytes())
    device.verify_directly_issued_by(issuer)
    assert device.signature_hash_algorithm is not None
    assert device.signature_hash_algorithm.name == "sha384"  # P-384: hashed on the host with SHA-384


def _openssl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *argv], capture_output=True, text=True, check=False)


@pytest.mark.nats
@pytest.mark.openssl
async def test_deployment_with_ca_keys_in_the_token(softhsm: SoftHsm, tmp_path: Path) -> None:
    clock = SystemClock()
    settings = hsm_settings(softhsm.uri("site1"), pin_file=str(softhsm.pin_file))
    made, _ = init_deployment(
        tmp_path / "d", organization="T", algorithm=Algorithm.P256, dtypes=["b"],
        nats_port=free_port(), hsm=settings, now=clock.now(),
    )  # fmt: skip
    assert not list((made.root / "ca").glob("*.key.pem")), "no CA key may be written to a file"
    assert not (made.root / "secrets" / "ca-passphrase").exists()
    dep = Deployment.load(made.root)  # a km worker's view: URIs from iotdlm.toml, the PIN from its file
    assert dep.config.hsm is not None
    assert set(dep.config.hsm.ca_keys) == set(CA_NAMES)
    server = nats_server(dep)
    server.start()
    store = open_store(dep)
    try:
        km = build_km(dep, store, clock)
        assert all(isinstance(ca.signer, Pkcs11Signer) for ca in km.cas.values())
        assert not km_on_loop(dep, store)  # a signature may take an HSM's time: km keeps its threads
        km_bus, _ = await connect_identity(dep, "km")
        service = KmService(km, km_bus, identity=km_identity(dep))
        await service.start()
        pm_bus, pm = await connect_identity(dep, "pm-b")
        out = await KmClient(pm_bus, sealer_for(pm), clock, trust=km_trust(dep)).issue(
            "dev-1", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-1")
        )
        await service.stop()
        await pm_bus.close()
        device = x509.load_der_x509_certificate(out.certificate)
        ca = km.cas["operational"]
        device.verify_directly_issued_by(ca.certificate)
        assert km.va is not None
        km.va.revoke(device.serial_number, issuer="operational", reason="keyCompromise", actor="test")
        crl = km.va.current_crl("operational", crl_partition(device.serial_number, dep.config.crl_partitions))
        assert x509.load_der_x509_crl(crl.der).is_signature_valid(ca.signer.public_key)  # type: ignore[arg-type]
        # OCSP signed in the token by the CA itself (the responder km makes is a delegated key whose
        # certificate the token signed: checked by openssl below)
        req = ocsp.OCSPRequestBuilder().add_certificate(device, ca.certificate, hashes.SHA256()).build()
        query = pki_ocsp.parse_request(req.public_bytes(serialization.Encoding.DER))
        responder = pki_ocsp.Responder(ca=ca, certificate=ca.certificate, signer=ca.signer)
        now = clock.now()
        revoked = pki_ocsp.CertStatus("revoked", revoked_at=now, reason="keyCompromise")
        answer = pki_ocsp.build_response(
            responder, query, revoked, this_update=now, next_update=now + dt.timedelta(hours=1), include_nonce=False
        )
        parsed = ocsp.load_der_ocsp_response(answer)
        assert parsed.certificate_status == ocsp.OCSPCertStatus.REVOKED
        ca.certificate.public_key().verify(  # type: ignore[union-attr,call-arg]
            parsed.signature, parsed.tbs_response_bytes, ec.ECDSA(hashes.SHA256())
        )
        delegated = ocsp.load_der_ocsp_response(km.va.ocsp(req.public_bytes(serialization.Encoding.DER)))
        assert delegated.certificate_status == ocsp.OCSPCertStatus.REVOKED

        for cert in (dep.ca_certificate("root"), ca.certificate, device, delegated.certificates[0]):
            assert [f for f in _findings(cert) if not _allowed(f[1], f[2])] == [], cert.subject
        assert crl_findings(crl.der) == []
        assert ocsp_findings(answer) == []

        chain = tmp_path / "chain.pem"
        chain.write_bytes(certs_to_pem([ca.certificate, dep.ca_certificate("root")]))
        leaf = tmp_path / "dev.pem"
        leaf.write_bytes(certs_to_pem([device]))
        done = _openssl("verify", *attime(clock.now()), "-CAfile", str(chain), str(leaf))
        assert done.returncode == 0, done.stderr
        crl_pem = tmp_path / "crl.pem"
        crl_pem.write_bytes(x509.load_der_x509_crl(crl.der).public_bytes(serialization.Encoding.PEM))
        issuer = tmp_path / "ca.pem"
        issuer.write_bytes(certs_to_pem([ca.certificate]))
        done = _openssl("crl", "-in", str(crl_pem), "-CAfile", str(issuer), "-noout")
        assert done.returncode == 0, done.stderr
        assert "verify OK" in done.stderr + done.stdout

        # `iotdlm up` looks before it starts km: the token holds every CA key; a key it lacks is named
        assert _check_passphrase(dep, km_runs=True) == []
        keys = dict(dep.config.hsm.ca_keys, service=dep.config.hsm.ca_keys["service"].replace("site1-", "gone-"))
        broken = Deployment(dep.root, msgspec.structs.replace(dep.config, hsm=msgspec.structs.replace(
            dep.config.hsm, ca_keys=keys)))  # fmt: skip
        problems = _check_passphrase(broken, km_runs=True)
        assert [p.what for p in problems] == ["CA keys in the HSM"]
        assert "object=gone-service" in problems[0].message
        assert _check_passphrase(broken, km_runs=False) == []
    finally:
        store.close()
        server.stop()
