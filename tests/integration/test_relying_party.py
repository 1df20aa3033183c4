"""A standard relying party checks what we issue the way it would in the field: ``openssl verify
-crl_check_all -crl_download`` follows the CRL distribution points in the certificates (the
issuing CA's partition, and the root's CRL for the issuing CA itself) and fetches every CRL over
HTTP from cm -- nothing handed to it by the test. For a device certificate and for a module
certificate (a stolen cm key must be revocable where anyone can check it)."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from iotdlm.bus.server import free_port
from iotdlm.deployment import certs_to_pem
from tests.integration.test_cm import Site, _run, open_site
from tests.tools import attime

pytestmark = [
    pytest.mark.nats,
    pytest.mark.openssl,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed"),
]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    port = free_port()
    async with open_site(tmp_path, public_url=f"http://127.0.0.1:{port}", http_port=port) as s:
        yield s


async def _verify(site: Site, leaf: x509.Certificate, issuer: str, *, deltas: bool = False) -> str:
    root = site.write("root.pem", site.root_pem)
    ca = site.write(f"{issuer}-ca.pem", certs_to_pem([site.dep.ca_certificate(issuer)]))
    cert = site.write("leaf.pem", certs_to_pem([leaf]))
    r = await _run(
        # at a moment just after the CRLs openssl fetches are made (km makes them when asked;
        # -attime has whole seconds): a CRL made in the next second is not "not yet valid"
        "openssl", "verify", *attime(site.clock.now() + dt.timedelta(seconds=5)), "-crl_check_all", "-crl_download",
        *(["-use_deltas"] if deltas else []),
        "-CAfile", str(root), "-untrusted", str(ca), str(cert),
    )  # fmt: skip
    return (r.stdout + r.stderr).decode()


def _cdp(cert: x509.Certificate) -> str:
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    (point,) = cdp
    assert point.full_name is not None
    return str(point.full_name[0].value)


async def _revoked_on_its_crl(site: Site, cert: x509.Certificate, issuer: str) -> str:
    """Revoke as the operator does, then see it as openssl does through cm. km publishes a
    revocation at once in the partition's delta CRL (the full CRL follows on its schedule), so the
    relying party uses deltas: openssl follows the certificate's FreshestCRL pointer."""
    admin = await site.client("admin")
    await admin.revoke(serial=format(cert.serial_number, "x"), reason="keyCompromise")
    out = ""
    for _ in range(50):
        out = await _verify(site, cert, issuer, deltas=True)
        if "certificate revoked" in out:
            return out
        await asyncio.sleep(0.1)
    return out


async def test_a_device_certificate_is_checked_and_revoked_through_its_distribution_points(site: Site) -> None:
    _key, cert = await site.factory("dev-rp")
    assert _cdp(cert).startswith(f"{site.http}/crl/factory/")
    ca = site.dep.ca_certificate("factory")
    assert _cdp(ca) == f"{site.http}/crl/root/0.crl"
    out = await _verify(site, cert, "factory")
    assert ": OK" in out, out
    out = await _revoked_on_its_crl(site, cert, "factory")
    assert "certificate revoked" in out, out


async def test_a_module_certificate_is_checked_and_revoked_through_its_distribution_points(site: Site) -> None:
    cert = site.dep.identity("cm").certificate
    assert _cdp(cert).startswith(f"{site.http}/crl/service/")
    out = await _verify(site, cert, "service")
    assert ": OK" in out, out
    out = await _revoked_on_its_crl(site, cert, "service")
    assert "certificate revoked" in out, out
