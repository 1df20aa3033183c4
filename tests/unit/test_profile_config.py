"""Certificate profiles configured in iotdlm.toml (issue 14): validity, key usages, extended key usages and
name rules, checked at load against what the RA denies by default, applied by the CA and the RA, and
linted clean by pkilint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.cli.main import main
from iotdlm.deployment import CONFIG_FILE, Deployment
from iotdlm.errors import BadRequestError, NotAuthorizedError
from iotdlm.km.ra import Authorizer, CertRequestFacts, DeviceState, ModulePrincipal
from iotdlm.pki import profile_config
from iotdlm.pki.chain import load_certificates_pem
from iotdlm.pki.profiles import DEFAULT_PROFILES
from tests.unit.test_pkilint_certs import _allowed, _findings

PASS = {"IOTDLM_CA_PASSPHRASE": "correct horse battery staple"}
SRC = Path(__file__).resolve().parents[2] / "src"


# --- the pure rules --------------------------------------------------------------------------------
def _configure(name: str, **settings: Any) -> Any:
    return profile_config.configure(DEFAULT_PROFILES[name], **settings)


def test_settings_change_the_profile() -> None:
    p = _configure(
        "operational",
        validity_days=7,
        key_usage_names=["digitalSignature"],
        extended_key_usage_names=["clientAuth", "serverAuth"],
        allow_server_auth=True,
    )
    assert p.validity.days == 7
    assert (p.key_usage.digital_signature, p.key_usage.key_agreement) == (True, False)
    assert p.eku == (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)
    assert p.policy_oid == DEFAULT_PROFILES["operational"].policy_oid  # what is not set stays built in
    assert _configure("operational") == DEFAULT_PROFILES["operational"]


@pytest.mark.parametrize(
    ("name", "settings", "error"),
    [
        ("operational", {"key_usage_names": ["digitalSignature", "keyCertSign"]}, "a profile cannot make a CA"),
        ("service", {"key_usage_names": ["digitalSignature", "cRLSign"]}, "only iotdlm's CAs sign CRLs"),
        ("operational", {"key_usage_names": ["keyAgreement"]}, "must include digitalSignature"),
        ("operational", {"key_usage_names": ["digitalsignature"]}, "unknown key usage"),
        ("operational", {"key_usage_names": ["digitalSignature", "nonRepudiation"]}, "not offered"),
        ("operational", {"extended_key_usage_names": ["clientAuth", "serverAuth"]}, "allow_server_auth = true"),
        ("factory", {"extended_key_usage_names": ["serverAuth"], "allow_server_auth": True}, "keep clientAuth"),
        ("operational", {"extended_key_usage_names": ["clientAuth", "anyExtendedKeyUsage"]}, "is not offered"),
        ("operational", {"extended_key_usage_names": ["clientAuth", "1.3.6.1.5.5.7.3.3"]}, "is not offered"),
        ("operational", {"extended_key_usage_names": ["clientAuth", "OCSPSigning"]}, "ocsp profile alone"),
        ("ocsp", {"extended_key_usage_names": ["OCSPSigning", "clientAuth"]}, "OCSPSigning alone"),
        ("tls-server", {"extended_key_usage_names": ["serverAuth", "clientAuth"]}, "serverAuth alone"),
        ("operational", {"extended_key_usage_names": []}, "at least one"),
        ("operational", {"extended_key_usage_names": ["clientAuth", "clientAuth"]}, "once"),
        ("operational", {"validity_days": 0}, "between 1 and"),
        ("factory", {"validity_days": 36501}, "between 1 and"),
        ("operational", {"allow_server_auth": True}, "set extended_key_usage too"),
    ],
    ids=[
        "ca-cert-sign", "crl-sign", "no-signature", "ku-case", "non-repudiation", "server-auth-device",
        "factory-no-client", "any-eku", "dotted-eku", "ocsp-elsewhere", "ocsp-extra", "tls-server-client",
        "empty-eku", "twice", "validity-zero", "validity-huge", "allow-alone",
    ],
)  # fmt: skip
def test_refused_settings(name: str, settings: dict[str, Any], error: str) -> None:
    with pytest.raises(BadRequestError, match=re.escape(error)) as caught:
        _configure(name, **settings)
    assert caught.value.field is not None
    assert caught.value.field.startswith(f"profiles.{name}.")


KU = st.sampled_from([*profile_config.KEY_USAGES, *profile_config.KEY_USAGES_DENIED, "x", ""])
EKU = st.sampled_from([*profile_config.EXTENDED_KEY_USAGES, "anyExtendedKeyUsage", "codeSigning", "2.5.29.37.0"])


@given(
    st.sampled_from(sorted(DEFAULT_PROFILES)),
    st.one_of(st.none(), st.integers(min_value=-5, max_value=40000)),
    st.one_of(st.none(), st.lists(KU, max_size=5)),
    st.one_of(st.none(), st.lists(EKU, max_size=4)),
    st.booleans(),
)
def test_no_setting_grants_what_the_ra_denies(
    name: str, days: int | None, ku: list[str] | None, eku: list[str] | None, allow: bool
) -> None:
    try:
        p = _configure(
            name, validity_days=days, key_usage_names=ku, extended_key_usage_names=eku, allow_server_auth=allow
        )
    except BadRequestError:
        return
    assert not p.key_usage.key_cert_sign
    assert not p.key_usage.crl_sign
    assert p.key_usage.digital_signature
    assert set(p.eku) <= set(profile_config.EXTENDED_KEY_USAGES.values())
    if ExtendedKeyUsageOID.SERVER_AUTH in p.eku:
        assert allow or name == "tls-server"
    if name in profile_config.CLIENT_PROFILES:
        assert ExtendedKeyUsageOID.CLIENT_AUTH in p.eku
    assert (ExtendedKeyUsageOID.OCSP_SIGNING in p.eku) == (name == "ocsp")


@given(st.text(max_size=250))
def test_name_rules_compile_or_say_why(pattern: str) -> None:
    try:
        rule = profile_config.device_id_rule("operational", pattern)
    except BadRequestError as exc:
        assert exc.field == "profiles.operational.device_id_pattern"  # noqa: PT017 -- anything else fails
        return
    assert rule.pattern == pattern


def test_the_ra_holds_every_grant_to_the_name_rule() -> None:
    authorizer = Authorizer(name_rules={"operational": re.compile("line7-[0-9]{4}")})
    pm = ModulePrincipal("pm", "boardA", "fp-pm")

    def ask(device: str, profile: str = "operational") -> str:
        facts = CertRequestFacts("issue", profile, device, "ra_verified", DeviceState(None, None))
        return authorizer.authorize(pm, facts).device_id

    assert ask("line7-0001") == "line7-0001"
    assert ask("anything", "factory") == "anything"  # no rule for factory
    for device in ("line7-1", "xline7-0001", "line7-00012"):
        with pytest.raises(NotAuthorizedError, match="does not match the operational profile's name rule"):
            ask(device)


# --- in a deployment ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("site") / "data"
    r = CliRunner().invoke(main, ["init", "--data", str(data), "--dtype", "boardA"], env=PASS)
    assert r.exit_code == 0, r.output
    return data


def _set_profiles(site: Path, profiles: dict[str, dict[str, Any]]) -> None:
    path = site / CONFIG_FILE
    config = tomllib.loads(path.read_text())
    config["profiles"] = profiles
    path.write_text(tomli_w.dumps(config))


def _iotdlm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **PASS, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", *args], capture_output=True, text=True, env=env, check=False
    )


def _certificate(site: Path, tmp: Path, device: str, profile: str = "operational") -> subprocess.CompletedProcess[str]:
    return _iotdlm(
        "ca", "certificate", "--data", str(site), "--device-id", device, "--profile", profile,
        "--key-out", str(tmp / f"{device}.key"), "--out", str(tmp / f"{device}.pem"), "--json",
    )  # fmt: skip


def test_a_configured_profile_is_issued_and_lints_clean(site: Path, tmp_path: Path) -> None:
    _set_profiles(
        site,
        {
            "operational": {
                "validity_days": 7,
                "key_usage": ["digitalSignature"],
                "extended_key_usage": ["clientAuth", "serverAuth"],
                "allow_server_auth": True,
                "device_id_pattern": "line7-[0-9]{4}",
            }
        },
    )
    done = _certificate(site, tmp_path, "line7-0042")
    assert done.returncode == 0, done.stderr
    cert = load_certificates_pem((tmp_path / "line7-0042.pem").read_bytes())[0]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 7
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert not ku.key_agreement
    eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    real = [f for f in _findings(cert) if not _allowed(f[1], f[2])]
    assert real == []

    refused = _certificate(site, tmp_path, "line8-0042")
    assert refused.returncode == 4
    assert "does not match the operational profile's name rule" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    ("profiles", "error"),
    [
        ({"operational": {"key_usage": ["digitalSignature", "keyCertSign"]}}, "profiles.operational.key_usage"),
        ({"factory": {"extended_key_usage": ["clientAuth", "serverAuth"]}}, "allow_server_auth = true"),
        ({"operational": {"device_id_pattern": "line7-("}}, "not a regular expression"),
        ({"gateway": {"validity_days": 3}}, "profiles.gateway: unknown profile"),
        ({"operational": {"key_usages": ["digitalSignature"]}}, "key_usages"),
    ],
    ids=["ca-bit", "server-auth", "bad-regex", "unknown-profile", "misspelt-key"],
)
def test_a_bad_profile_is_refused_at_load(
    site: Path, tmp_path: Path, profiles: dict[str, dict[str, Any]], error: str
) -> None:
    _set_profiles(site, profiles)
    try:
        done = _iotdlm("ca", "list", "--data", str(site))
        assert done.returncode == 4
        assert error in done.stderr
        assert "Traceback" not in done.stderr
        with pytest.raises(BadRequestError, match=re.escape(error)):
            Deployment.load(site)
    finally:
        _set_profiles(site, {})


def test_defaults_are_the_built_in_profiles(site: Path) -> None:
    _set_profiles(site, {})
    assert Deployment.load(site).profiles() == DEFAULT_PROFILES
    assert Deployment.load(site).name_rules() == {}
