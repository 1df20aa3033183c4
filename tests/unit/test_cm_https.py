"""cm's HTTPS certificate (iotdlm.cm_https): its names, issuing it at init and with
``iotdlm cm certificate``, and the checks on an operator-supplied pair. All on a FixedClock; the
TLS clients (curl) that judge the served certificate run in tests/integration/test_cm.py."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from iotdlm import cm_https
from iotdlm.cm_https import ServerCertificateError, https_names, load_server_pair, parse_name
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.errors import BadRequestError, NotFoundError
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.keys import Algorithm, PrivateKey, generate_key, private_key_to_pem
from tests.helpers import NOW

PASSPHRASE = b"pw"


# --- names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("public_url", "extra", "dns", "ips"),
    [
        ("http://127.0.0.1:8080", [], ["localhost"], ["127.0.0.1"]),
        ("https://cm.example.test:8443/x", [], ["cm.example.test", "localhost"], ["127.0.0.1"]),
        ("https://CM.Example.Test.", ["alt.example.test", "10.0.0.7"], ["cm.example.test", "localhost",
         "alt.example.test"], ["127.0.0.1", "10.0.0.7"]),
        ("http://[2001:db8::5]:8080", ["::1", "localhost"], ["localhost"], ["2001:db8::5", "127.0.0.1", "::1"]),
        ("http://xn--bcher-kva.example", [], ["xn--bcher-kva.example", "localhost"], ["127.0.0.1"]),
    ],
)  # fmt: skip
def test_https_names(public_url: str, extra: list[str], dns: list[str], ips: list[str]) -> None:
    got_dns, got_ips = https_names(public_url, extra)
    assert got_dns == dns
    assert got_ips == [ipaddress.ip_address(i) for i in ips]


@pytest.mark.parametrize(
    "bad",
    ["", "a..b", "-a.example", "a-.example", "under_score.example", "bücher.example", "*.example.test",
     "1.2.3", "999.1.1.1", "fe80::1%eth0", "a" * 64 + ".example", "x y", "host:8443", "a/b", "a\nb"],
)  # fmt: skip
def test_parse_name_refuses(bad: str) -> None:
    with pytest.raises(ServerCertificateError) as info:
        parse_name(bad)
    assert "\n" not in info.value.message


@pytest.mark.parametrize("url", ["http://", "file:///etc/passwd", "http://[::1", "https://bad_host.example"])
def test_public_host_refuses(url: str) -> None:
    with pytest.raises(ServerCertificateError):
        cm_https.public_host(url)


@given(st.text(max_size=300))
def test_parse_name_takes_any_text(text: str) -> None:
    """Any text: a ServerCertificateError, or a name cryptography puts in a subjectAltName as is."""
    try:
        name = parse_name(text)
    except ServerCertificateError:
        return
    general = x509.DNSName(name) if isinstance(name, str) else x509.IPAddress(name)
    x509.SubjectAlternativeName([general])
    if isinstance(name, str):
        assert name == name.lower()
        assert name.isascii()


@given(st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,4}\Z"))
def test_parse_name_takes_every_ldh_name(name: str) -> None:
    if all(label.isdigit() for label in name.split(".")):
        return  # a dotted number is an IP address or nothing
    assert parse_name(name) == name
    assert parse_name(name.upper() + ".") == name


# --- an operator's pair -----------------------------------------------------------------------------
def _self_signed(
    key: PrivateKey, *, eku: list[x509.ObjectIdentifier] | None, days: tuple[int, int]
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cm.example.test")])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + dt.timedelta(days=days[0]))
        .not_valid_after(NOW + dt.timedelta(days=days[1]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("cm.example.test")]), critical=False)
    )
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(key, hashes.SHA256())  # type: ignore[arg-type]


def test_load_server_pair_takes_a_good_pair() -> None:
    key = generate_key(Algorithm.P256)
    cert = _self_signed(key, eku=[ExtendedKeyUsageOID.SERVER_AUTH], days=(-1, 90))
    chain, loaded = load_server_pair(certs_to_pem([cert]), private_key_to_pem(key, None), now=NOW, source="f.pem")
    assert chain == [cert]
    assert loaded.public_key() == key.public_key()


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("other key", "does not belong to the certificate"),
        ("clientAuth only", "lacks serverAuth"),
        ("no EKU", "lacks serverAuth"),
        ("expired", "expired on"),
        ("not yet valid", "not valid before"),
        ("encrypted key", "not an unencrypted PEM private key"),
        ("garbage certificate", "no PEM certificate"),
        ("garbage key", "not an unencrypted PEM private key"),
        ("chain in the wrong order", "does not belong to the certificate"),
    ],
)
def test_load_server_pair_refuses(case: str, match: str) -> None:
    key = generate_key(Algorithm.P256)
    eku = [ExtendedKeyUsageOID.SERVER_AUTH]
    cert = _self_signed(key, eku=eku, days=(-1, 90))
    chain_pem, key_pem = certs_to_pem([cert]), private_key_to_pem(key, None)
    if case == "other key":
        key_pem = private_key_to_pem(generate_key(Algorithm.P256), None)
    elif case == "clientAuth only":
        chain_pem = certs_to_pem([_self_signed(key, eku=[ExtendedKeyUsageOID.CLIENT_AUTH], days=(-1, 90))])
    elif case == "no EKU":
        chain_pem = certs_to_pem([_self_signed(key, eku=None, days=(-1, 90))])
    elif case == "expired":
        chain_pem = certs_to_pem([_self_signed(key, eku=eku, days=(-90, -1))])
    elif case == "not yet valid":
        chain_pem = certs_to_pem([_self_signed(key, eku=eku, days=(1, 90))])
    elif case == "encrypted key":
        key_pem = private_key_to_pem(key, b"secret")
    elif case == "garbage certificate":
        chain_pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    elif case == "garbage key":
        key_pem = b"not a key"
    elif case == "chain in the wrong order":
        other = generate_key(Algorithm.P256)
        chain_pem = certs_to_pem([_self_signed(other, eku=eku, days=(-1, 90)), cert])
    with pytest.raises(ServerCertificateError, match=match) as info:
        load_server_pair(chain_pem, key_pem, now=NOW, source="/etc/cm.pem")
    assert info.value.message.startswith("/etc/cm.pem: ")
    assert "Traceback" not in info.value.message


@given(st.binary(max_size=2000), st.binary(max_size=2000))
def test_load_server_pair_takes_any_bytes(chain_pem: bytes, key_pem: bytes) -> None:
    with pytest.raises(ServerCertificateError):
        load_server_pair(chain_pem, key_pem, now=NOW, source="x")


# --- issuing: at init, and again with `iotdlm cm certificate` ------------------------------------------
def _sans(cert: x509.Certificate) -> set[str]:
    dns, ips = cm_https.names_of(cert)
    return {*dns, *(str(ip) for ip in ips)}


def test_init_issues_cms_https_certificate(tmp_path: Path) -> None:
    dep, _cas = init_deployment(
        tmp_path / "d", organization="T", algorithm=Algorithm.P256, dtypes=[], passphrase=PASSPHRASE,
        public_url="https://cm.example.test:8443", cm_names=["alt.example.test", "192.0.2.7"], now=NOW,
    )  # fmt: skip
    chain, _key = cm_https.load_issued_pair(dep.root, now=NOW)
    leaf = chain[0]
    assert _sans(leaf) == {"cm.example.test", "alt.example.test", "localhost", "127.0.0.1", "192.0.2.7"}
    assert chain[1] == dep.ca_certificate("service")
    leaf.verify_directly_issued_by(dep.ca_certificate("service"))
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert stat.S_IMODE(os.stat(dep.root / cm_https.HTTPS_KEY).st_mode) == 0o600
    # cm's module identity is a certificate of its own, untouched
    assert dep.identity("cm").certificate != leaf
    assert cm_https.missing_public_host(leaf, dep.config.public_url) is None
    assert cm_https.missing_public_host(leaf, "https://elsewhere.example") == "elsewhere.example"


def test_init_refuses_a_bad_cm_name_before_making_anything(tmp_path: Path) -> None:
    with pytest.raises(BadRequestError, match="not a DNS name"):
        init_deployment(
            tmp_path / "d", organization="T", algorithm=Algorithm.P256, dtypes=[], passphrase=PASSPHRASE,
            cm_names=["no_such host"], now=NOW,
        )  # fmt: skip
    assert not (tmp_path / "d").exists()


def test_a_deployment_without_the_pair_says_what_to_do(tmp_path: Path) -> None:
    dep, _ = init_deployment(
        tmp_path / "d", organization="T", algorithm=Algorithm.P256, dtypes=[], passphrase=PASSPHRASE, now=NOW
    )
    (dep.root / cm_https.HTTPS_CERT).unlink()
    with pytest.raises(NotFoundError, match="iotdlm cm certificate"):
        cm_https.load_issued_pair(dep.root, now=NOW)


def test_cli_init_cm_name_and_cm_certificate(tmp_path: Path) -> None:
    from iotdlm.cli.main import main
    from iotdlm.runtime import open_store

    data = tmp_path / "d"
    env = {"IOTDLM_CA_PASSPHRASE": "pw", "COLUMNS": "200"}
    out = CliRunner().invoke(
        main,
        ["init", "--data", str(data), "--public-url", "https://cm.example.test", "--cm-name", "alt.example.test"],
        env=env,
    )
    assert out.exit_code == 0, out.output
    dep = Deployment.load(data)
    first = cm_https.load_issued_pair(data, now=dep_now())[0][0]
    assert _sans(first) == {"cm.example.test", "alt.example.test", "localhost", "127.0.0.1"}
    store = open_store(dep)
    try:
        rec = store.get_certificate("service", first.serial_number)
        assert rec is not None  # recorded at init: OCSP knows it, `ca revoke` can revoke it
        assert rec.profile == cm_https.https_profile(dep.profiles()).name
    finally:
        store.close()

    # a bad name: refused, the pair untouched
    before = (data / cm_https.HTTPS_CERT).read_bytes()
    bad = CliRunner().invoke(main, ["cm", "certificate", "--data", str(data), "--name", "bad name"], env=env)
    assert bad.exit_code == 4, bad.output
    assert "not a DNS name" in bad.output
    assert "Traceback" not in bad.output
    assert (data / cm_https.HTTPS_CERT).read_bytes() == before

    # re-issued with other names; recorded; cm's identity untouched
    ident = (data / "modules" / "cm" / "cert.pem").read_bytes()
    again = CliRunner().invoke(
        main, ["cm", "certificate", "--data", str(data), "--name", "new.example.test", "--name", "192.0.2.9"], env=env
    )
    assert again.exit_code == 0, again.output
    assert "new.example.test" in again.output
    second = cm_https.load_issued_pair(data, now=dep_now())[0][0]
    assert second.serial_number != first.serial_number
    assert _sans(second) == {"cm.example.test", "new.example.test", "localhost", "127.0.0.1", "192.0.2.9"}
    assert (data / "modules" / "cm" / "cert.pem").read_bytes() == ident
    store = open_store(dep)
    try:
        assert store.get_certificate("service", second.serial_number) is not None
    finally:
        store.close()

    # without the CA passphrase: a clear refusal
    nopw = CliRunner().invoke(main, ["cm", "certificate", "--data", str(data)], env={"IOTDLM_CA_PASSPHRASE": "wrong"})
    assert nopw.exit_code == 4, nopw.output
    assert "passphrase" in nopw.output


def dep_now() -> dt.datetime:
    """The CLI issues at the system clock (IOTDLM_CLOCK_OFFSET moves it); check at the same clock."""
    from iotdlm.clock import SystemClock

    return SystemClock().now()
