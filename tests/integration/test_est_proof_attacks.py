"""Issue 11 item 3: cm's credentials are stolen. Can they mint a device's operational certificate?

Each scenario runs a whole site (deployment, the real nats-server with each module's own user, km,
cm) and plays the attacker with cm's login: cm's NATS user and cm's service identity, signing EST
requests to km exactly as cm does. The attacker knows every device's *public* certificates, and
sees every request cm relays. Each refused attack is in km's audit log (kind "refused").
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from iotdlm.bus import subjects
from iotdlm.client.km import KmClient
from iotdlm.errors import BadRequestError, NotAuthorizedError, RejectedError, ReplayError, UntrustedError
from iotdlm.pki import cms_envelope, est_proof
from iotdlm.pki.chain import der
from iotdlm.pki.keys import Algorithm, PrivateKey, check_public_key, generate_key
from iotdlm.wire import audit as fmt
from tests.helpers import make_csr
from tests.integration.test_cm import Site, open_site


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path) as s:
        yield s


def refusals(site: Site, device_id: str) -> list[dict[str, object]]:
    """km's audit records of refused requests about ``device_id`` (newest first)."""
    return [r.data for r in site.store.list_audit(kind=fmt.REFUSED, limit=1000) if r.subject == device_id]


def operational_keys(site: Site, device_id: str) -> list[object]:
    return [
        x509.load_der_x509_certificate(c.der).public_key()
        for c in site.store.list_certificates(device_id=device_id)
        if c.profile == "operational"
    ]


async def refused(
    site: Site, device_id: str, subject: str, error: type[RejectedError], match: str, attempt: object
) -> None:
    """``attempt`` (an awaitable) is refused with ``error``, and km audited the refusal."""
    before = len(refusals(site, device_id))
    with pytest.raises(error, match=match):
        await attempt  # type: ignore[misc]
    after = refusals(site, device_id)
    assert len(after) == before + 1, after
    assert after[0]["bus_subject"] == subject
    assert after[0]["code"] == error.code


async def enrolled(site: Site, cm: KmClient, device_id: str) -> tuple[PrivateKey, x509.Certificate, PrivateKey]:
    """A device enrolled the honest way (its own proof, relayed by cm): factory key, operational
    certificate, operational key."""
    fkey, factory = await site.factory(device_id)
    okey = generate_key(Algorithm.P256)
    nonce = (await cm.est_nonce(der(factory))).nonce
    proof = est_proof.make(fkey, "simpleenroll", nonce, okey.public_key())
    out = await cm.est("simpleenroll", der(factory), make_csr(okey, device_id), proof=proof)
    return fkey, x509.load_der_x509_certificate(out.certificate.certificate), okey


async def test_cm_cannot_enroll_a_device_with_an_attackers_key(site: Site) -> None:
    """Attack (a), simpleenroll: with cm's login, the device's public factory certificate and a CSR
    for the attacker's key, km issues nothing -- without a proof, with a proof signed by the
    attacker's key, with the device's genuine proof lifted from a request cm relayed (for the
    device's own key), with a used proof replayed, and with an expired nonce. Each is audited."""
    cm = await site.client("cm")
    fkey, factory = await site.factory("dev-a")
    attacker = generate_key(Algorithm.P256)
    evil_csr = make_csr(attacker, "dev-a")
    sub = subjects.KM_EST_SIMPLEENROLL

    # no proof at all: what cm alone could send before
    await refused(site, "dev-a", sub, NotAuthorizedError, "no proof", cm.est("simpleenroll", der(factory), evil_csr))
    # a real km nonce, signed by the attacker's key (cm can fetch nonces; it cannot sign as the device)
    nonce = (await cm.est_nonce(der(factory))).nonce
    forged = est_proof.make(attacker, "simpleenroll", nonce, attacker.public_key())
    await refused(
        site, "dev-a", sub, UntrustedError, "does not verify",
        cm.est("simpleenroll", der(factory), evil_csr, proof=forged),
    )  # fmt: skip
    # the device's genuine proof, from a request cm relays, moved onto the attacker's CSR
    device_key = generate_key(Algorithm.P256)
    nonce = (await cm.est_nonce(der(factory))).nonce
    genuine = est_proof.make(fkey, "simpleenroll", nonce, device_key.public_key())
    await refused(
        site, "dev-a", sub, UntrustedError, "does not verify",
        cm.est("simpleenroll", der(factory), evil_csr, proof=genuine),
    )  # fmt: skip
    # a proof for another operation does not carry over either
    nonce = (await cm.est_nonce(der(factory))).nonce
    other_op = est_proof.make(fkey, "simplereenroll", nonce, attacker.public_key())
    await refused(
        site, "dev-a", sub, UntrustedError, "does not verify",
        cm.est("simpleenroll", der(factory), evil_csr, proof=other_op),
    )  # fmt: skip
    # the honest request goes through; replaying it (same proof, same CSR) is refused
    honest_csr = make_csr(device_key, "dev-a")
    nonce = (await cm.est_nonce(der(factory))).nonce
    genuine = est_proof.make(fkey, "simpleenroll", nonce, device_key.public_key())
    await cm.est("simpleenroll", der(factory), honest_csr, proof=genuine)
    await refused(
        site, "dev-a", sub, ReplayError, "already used", cm.est("simpleenroll", der(factory), honest_csr, proof=genuine)
    )
    # a nonce km issued for another device's certificate does not serve this one
    _fkey_b, factory_b = await site.factory("dev-b")
    nonce_b = (await cm.est_nonce(der(factory_b))).nonce
    await refused(
        site, "dev-a", sub, UntrustedError, "not one km issued for the client certificate",
        cm.est("simpleenroll", der(factory), honest_csr, proof=est_proof.make(fkey, "simpleenroll", nonce_b,
                                                                              device_key.public_key())),
    )  # fmt: skip
    # an expired nonce (km's clock 6 minutes on)
    nonce = (await cm.est_nonce(der(factory))).nonce
    site.clock.offset += dt.timedelta(minutes=6)
    late = est_proof.make(fkey, "simpleenroll", nonce, device_key.public_key())
    await refused(
        site, "dev-a", sub, UntrustedError, "expired", cm.est("simpleenroll", der(factory), honest_csr, proof=late)
    )
    assert operational_keys(site, "dev-a") == [device_key.public_key()]


async def test_cm_cannot_reenroll_a_device_onto_an_attackers_key(site: Site) -> None:
    """Attack (b), simplereenroll: with cm's login and the device's public operational certificate,
    km re-keys nothing onto the attacker's key -- no proof, a proof by the attacker's key, the
    device's genuine proof moved onto the attacker's CSR, or replayed. Each is audited."""
    cm = await site.client("cm")
    _fkey, op, okey = await enrolled(site, cm, "dev-r")
    attacker = generate_key(Algorithm.P256)
    evil_csr = make_csr(attacker, "dev-r")
    sub = subjects.KM_EST_SIMPLEREENROLL

    await refused(site, "dev-r", sub, NotAuthorizedError, "no proof", cm.est("simplereenroll", der(op), evil_csr))
    nonce = (await cm.est_nonce(der(op))).nonce
    forged = est_proof.make(attacker, "simplereenroll", nonce, attacker.public_key())
    await refused(
        site, "dev-r", sub, UntrustedError, "does not verify", cm.est("simplereenroll", der(op), evil_csr, proof=forged)
    )
    new_key = generate_key(Algorithm.P256)
    nonce = (await cm.est_nonce(der(op))).nonce
    genuine = est_proof.make(okey, "simplereenroll", nonce, new_key.public_key())
    await refused(
        site, "dev-r", sub, UntrustedError, "does not verify",
        cm.est("simplereenroll", der(op), evil_csr, proof=genuine),
    )  # fmt: skip
    # the nonce was not spent by the refusals: the device's own request still goes through once
    out = await cm.est("simplereenroll", der(op), make_csr(new_key, "dev-r"), proof=genuine)
    new_op = x509.load_der_x509_certificate(out.certificate.certificate)
    assert new_op.public_key() == new_key.public_key()
    # replayed onto the new certificate's session: refused (the proof names the old certificate's nonce)
    await refused(
        site, "dev-r", sub, UntrustedError, "not one km issued",
        cm.est("simplereenroll", der(new_op), make_csr(new_key, "dev-r"), proof=genuine),
    )  # fmt: skip
    assert attacker.public_key() not in operational_keys(site, "dev-r")


async def test_cm_gets_no_server_generated_key(site: Site) -> None:
    """Attack (c), serverkeygen (est_serverkeygen = "encrypted", the default, ADR 0009): with cm's
    login and a device's public factory certificate, cm asks km to make the device a key. Without
    the device's proof: refused and audited. Relaying a genuine request (the device's proof): km
    answers with the key encrypted to the device's factory key, which cm does not hold -- the
    reply carries no private key, and cm's own key does not open it."""
    cm = await site.client("cm")
    fkey, factory = await site.factory("dev-k")
    sub = subjects.KM_EST_SERVERKEYGEN
    csr = make_csr(generate_key(Algorithm.P256), "dev-k")
    await refused(site, "dev-k", sub, NotAuthorizedError, "no proof", cm.est("serverkeygen", der(factory), csr))
    assert operational_keys(site, "dev-k") == []
    nonce = (await cm.est_nonce(der(factory))).nonce
    proof = est_proof.make(fkey, "serverkeygen", nonce, check_public_key(x509.load_der_x509_csr(csr).public_key()))
    out = await cm.est("serverkeygen", der(factory), csr, proof=proof)
    assert out.private_key is None
    assert out.encrypted_key is not None
    cm_key = site.dep.identity("cm").key
    with pytest.raises(BadRequestError, match="not encrypted to this device's key"):
        cms_envelope.decrypt_key(out.encrypted_key, cm_key)
    (key_der,) = [cms_envelope.decrypt_key(out.encrypted_key, fkey)]  # only the device opens it
    assert operational_keys(site, "dev-k") == [x509.load_der_x509_certificate(out.certificate.certificate).public_key()]
    assert key_der not in out.encrypted_key


async def test_with_serverkeygen_off_cm_gets_nothing(tmp_path: Path) -> None:
    """Attack (c) where the operator turned serverkeygen off: refused with or without a proof, audited."""
    async with open_site(tmp_path, est_serverkeygen="off") as site:
        cm = await site.client("cm")
        fkey, factory = await site.factory("dev-k")
        sub = subjects.KM_EST_SERVERKEYGEN
        csr = make_csr(generate_key(Algorithm.P256), "dev-k")
        await refused(
            site, "dev-k", sub, NotAuthorizedError, "serverkeygen is off", cm.est("serverkeygen", der(factory), csr)
        )
        nonce = (await cm.est_nonce(der(factory))).nonce
        proof = est_proof.make(fkey, "serverkeygen", nonce, check_public_key(x509.load_der_x509_csr(csr).public_key()))
        await refused(
            site, "dev-k", sub, NotAuthorizedError, "serverkeygen is off",
            cm.est("serverkeygen", der(factory), csr, proof=proof),
        )  # fmt: skip
        assert operational_keys(site, "dev-k") == []


async def test_with_serverkeygen_on_cm_still_needs_the_devices_proof(tmp_path: Path) -> None:
    """Attack (c) where the operator turned serverkeygen on (est_serverkeygen = "cleartext", cm sees
    keys it relays): cm alone still cannot have km generate a device's key -- it needs the device's
    proof, which it cannot make. Audited."""
    async with open_site(tmp_path, est_serverkeygen="cleartext") as site:
        cm = await site.client("cm")
        _fkey, factory = await site.factory("dev-c")
        attacker = generate_key(Algorithm.P256)
        csr = make_csr(attacker, "dev-c")
        sub = subjects.KM_EST_SERVERKEYGEN
        await refused(site, "dev-c", sub, NotAuthorizedError, "no proof", cm.est("serverkeygen", der(factory), csr))
        nonce = (await cm.est_nonce(der(factory))).nonce
        forged = est_proof.make(attacker, "serverkeygen", nonce, attacker.public_key())
        await refused(
            site, "dev-c", sub, UntrustedError, "does not verify",
            cm.est("serverkeygen", der(factory), csr, proof=forged),
        )  # fmt: skip
        assert operational_keys(site, "dev-c") == []


async def test_only_cm_gets_nonces_and_only_for_known_credentials(site: Site) -> None:
    """The nonce route is cm's (another module's signed request is refused) and only for a
    certificate km knows (an unknown one is refused and audited like an EST request)."""
    admin = await site.client("admin")
    _fkey, factory = await site.factory("dev-n")
    with pytest.raises(NotAuthorizedError, match="nonces"):
        await admin.est_nonce(der(factory))
    cm = await site.client("cm")
    stranger = generate_key(Algorithm.P256)
    with pytest.raises(RejectedError):
        await cm.est_nonce(make_csr(stranger, "x"))  # not a certificate at all
    assert [
        r for r in site.store.list_audit(kind=fmt.REFUSED, limit=100) if r.data["bus_subject"] == subjects.KM_EST_NONCE
    ]


@pytest.mark.real_clock
async def test_the_nonce_route_wants_the_client_certificate(site: Site) -> None:
    """GET /.well-known/est/iotdlm-nonce without a client certificate: 401 (a nonce is for the
    certificate the device enrolls with); with one, a nonce km accepts for that certificate only."""
    async with site.est() as anonymous:
        with pytest.raises(UntrustedError, match="client certificate"):
            await anonymous.nonce()
    fkey, factory = await site.factory("dev-h")
    # the route's nonce is km's, for this certificate (expiry checked by km's own rule)
    async with site.est(fkey, factory) as est:
        nonce = await est.nonce()
    assert len(nonce) == est_proof.NONCE_CHARS
