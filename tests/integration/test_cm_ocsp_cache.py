"""cm keeps km's pre-signed OCSP answers (cm/ocsp_cache.py) and still says "revoked" at once: a real
nats-server, km and cm (the fixtures of test_cm.py), plain-HTTP GETs and POSTs through cm."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from iotdlm.cm.ocsp_cache import OcspCache
from tests.integration.test_cm import Site, open_site, set_mode


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path) as s:
        yield s


Answer = tuple[ocsp.OCSPResponseStatus, ocsp.OCSPCertStatus | None]


def _request(site: Site, leaf: x509.Certificate) -> bytes:
    issuer = site.dep.ca_certificate("factory")
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1())  # noqa: S303 -- RFC 5019
    return req.build().public_bytes(serialization.Encoding.DER)


async def _get(http: aiohttp.ClientSession, site: Site, der: bytes) -> Answer:
    path = base64.b64encode(der).decode().replace("/", "%2F")
    async with http.get(f"{site.http}/ocsp/{path}") as resp:
        assert resp.status == 200
        answer = ocsp.load_der_ocsp_response(await resp.read())
    if answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return answer.response_status, None
    return answer.response_status, answer.certificate_status


async def _post(http: aiohttp.ClientSession, site: Site, der: bytes) -> ocsp.OCSPCertStatus:
    headers = {"Content-Type": "application/ocsp-request"}
    async with http.post(f"{site.http}/ocsp", data=der, headers=headers) as resp:
        assert resp.status == 200
        return ocsp.load_der_ocsp_response(await resp.read()).certificate_status


def _cache(site: Site) -> OcspCache:
    cache = site.cm.app.ocsp_cache
    assert cache is not None, "cm with a bus keeps OCSP answers"
    return cache


OK = ocsp.OCSPResponseStatus.SUCCESSFUL


async def test_cm_keeps_answers_and_a_revocation_drops_them_at_once(site: Site) -> None:
    _, one = await site.factory("dev-cache-1")
    _, two = await site.factory("dev-cache-2")
    cache = _cache(site)
    async with aiohttp.ClientSession() as http:
        for leaf in (one, two):
            assert await _get(http, site, _request(site, leaf)) == (OK, ocsp.OCSPCertStatus.GOOD)
        assert len(cache) == 2
        hits = cache.hits
        assert await _get(http, site, _request(site, one)) == (OK, ocsp.OCSPCertStatus.GOOD)
        assert await _post(http, site, _request(site, one)) is ocsp.OCSPCertStatus.GOOD
        assert cache.hits == hits + 2  # answered by cm, without asking km

        admin = await site.client("admin")
        await admin.revoke(serial=format(one.serial_number, "x"), reason="keyCompromise")
        # the very next request says revoked: km's event dropped cm's good answer
        assert await _post(http, site, _request(site, one)) is ocsp.OCSPCertStatus.REVOKED
        assert await _get(http, site, _request(site, one)) == (OK, ocsp.OCSPCertStatus.REVOKED)
        # the other certificate's answer is still kept and still good
        hits = cache.hits
        assert await _get(http, site, _request(site, two)) == (OK, ocsp.OCSPCertStatus.GOOD)
        assert cache.hits == hits + 1


async def test_a_mode_without_cm_is_refused_even_for_a_kept_answer(site: Site) -> None:
    _, leaf = await site.factory("dev-cache-3")
    der = _request(site, leaf)
    async with aiohttp.ClientSession() as http:
        assert await _get(http, site, der) == (OK, ocsp.OCSPCertStatus.GOOD)
        assert await _get(http, site, der) == (OK, ocsp.OCSPCertStatus.GOOD)
        modes_bus = await site.nats.connect("modes")
        site.buses.append(modes_bus)
        guard = site.cm.app.mode
        assert guard is not None
        await set_mode(modes_bus, "provisioning-certificate", site.dep)
        await guard.wait_for("provisioning-certificate")  # type: ignore[attr-defined]
        assert await _get(http, site, der) == (ocsp.OCSPResponseStatus.TRY_LATER, None)
        await set_mode(modes_bus, "software-management", site.dep)
        await guard.wait_for("software-management")  # type: ignore[attr-defined]
        assert await _get(http, site, der) == (OK, ocsp.OCSPCertStatus.GOOD)
