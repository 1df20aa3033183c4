"""km's side of EST (RFC 7030) as cm relays it: initial enrollment with the factory certificate,
re-enrollment with the operational one, server-side key generation, and the refusals."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.bus import Bus
from iotdlm.bus.memory import MemoryHub
from iotdlm.client.km import KmClient
from iotdlm.clock import FixedClock
from iotdlm.errors import BadRequestError, NotAuthorizedError, UnsupportedError, UntrustedError
from iotdlm.km import Km, KmService, KmSettings
from iotdlm.km.va import Va, VaSettings
from iotdlm.pki import cms_envelope, est_proof
from iotdlm.pki.ca import PublicUrls
from iotdlm.pki.chain import der, verify_issued_by
from iotdlm.pki.keys import Algorithm, PrivateKey, generate_key
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_id_of, device_subject, device_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.store import Store
from iotdlm.wire import km as msg
from tests.fixtures_nats import start_nats
from tests.helpers import NOW, ORG, make_csr, make_pki

PKI = make_pki()
URLS = PublicUrls("http://127.0.0.1:8080", crl_partitions=4)


@dataclasses.dataclass
class Env:
    store: Store
    clock: FixedClock
    buses: dict[str, Bus]
    km: Km

    def client(self, identity: str) -> KmClient:
        return KmClient(
            self.buses[identity.split("-")[0]],
            PKI.module(*identity.split("-", 1)).sealer,
            self.clock,
            trust=PKI.km_trust(),
        )

    async def factory_cert(self, device_id: str) -> tuple[object, x509.Certificate]:
        key = generate_key(Algorithm.P256)
        out = await self.client("pm-boardA").issue(device_id, "factory", csr=make_csr(key, device_id))
        return key, x509.load_der_x509_certificate(out.certificate)

    async def est(
        self, operation: str, current: tuple[PrivateKey, bytes], new_key: PrivateKey, cn: str
    ) -> msg.EstResponse:
        """What a device does through cm: fetch a nonce, prove its current key (ADR 0008), enroll."""
        cm = self.client("cm")
        key, cert_der = current
        nonce = (await cm.est_nonce(cert_der)).nonce
        proof = est_proof.make(key, operation, nonce, new_key.public_key())
        return await cm.est(operation, cert_der, make_csr(new_key, cn), proof=proof)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("nats-on-loop", marks=pytest.mark.nats),
    ]
)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    """km on the in-memory bus and on a real nats-server; there also with EST's nonce and enrollments
    answered on km's event loop, as ``km serve`` runs them on a SQLite store (ADR 0032)."""
    clock = FixedClock(NOW)
    store = Store.open(f"sqlite:///{tmp_path / 'km.db'}")
    va = Va(cas=PKI.cas, profiles=DEFAULT_PROFILES, store=store, clock=clock, settings=VaSettings(urls=URLS))
    km = Km(
        cas=PKI.cas,
        profiles=DEFAULT_PROFILES,
        store=store,
        clock=clock,
        settings=KmSettings(organization=ORG, urls=URLS),
        va=va,
    )
    server = None
    if request.param == "memory":
        hub = MemoryHub()
        buses: dict[str, Bus] = {m: hub.bus(m) for m in ("km", "pm", "cm", "admin")}
    else:
        server = start_nats(tmp_path)
        buses = {m: await server.connect(m) for m in ("km", "pm", "cm", "admin")}
    service = KmService(km, buses["km"], identity=PKI.km_identity(), on_loop=request.param == "nats-on-loop")
    await service.start()
    try:
        yield Env(store, clock, buses, km)
    finally:
        await service.stop()
        for b in buses.values():
            await b.close()
        if server is not None:
            server.server.stop()
        store.close()


async def test_enroll_with_factory_then_reenroll_with_operational(env: Env) -> None:
    fkey, factory = await env.factory_cert("dev-1")
    cm = env.client("cm")
    key1 = generate_key(Algorithm.P256)
    first = await env.est("simpleenroll", (fkey, der(factory)), key1, "dev-1")
    op1 = x509.load_der_x509_certificate(first.certificate.certificate)
    verify_issued_by(op1, PKI.cas["operational"].certificate, now=NOW)
    assert device_id_of(op1) == "dev-1"
    assert first.private_key is None
    key2 = generate_key(Algorithm.P256)
    second = await env.est("simplereenroll", (key1, der(op1)), key2, "dev-1")
    old = env.store.get_certificate("operational", op1.serial_number)
    assert old is not None
    assert old.status == "superseded"
    with pytest.raises(NotAuthorizedError, match="superseded"):
        await cm.est("simplereenroll", der(op1), make_csr(generate_key(Algorithm.P256), "dev-1"))
    assert second.certificate.device_id == "dev-1"


def _scalar(key: object) -> bytes:
    """The secret itself (an EC private value), whatever encoding carries it."""
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")


def _carries(body: bytes, secret: bytes) -> bool:
    """Whether a JSON reply body carries ``secret``: raw, or in any string that is base64."""
    if secret in body:
        return True
    found: list[bytes] = []

    def walk(v: object) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str):
            with contextlib.suppress(ValueError):
                found.append(
                    base64.b64decode(v + "=" * (-len(v) % 4), altchars=b"-_" if "-" in v or "_" in v else None)
                )

    walk(json.loads(body))
    return any(secret in b for b in found)


async def test_serverkeygen_key_reaches_cm_only_encrypted_to_the_device(env: Env) -> None:
    """ADR 0009, by default: km encrypts the key it made to the key of the certificate the device
    presented (the factory key to enroll, the operational key to re-enroll). A spy on cm's side of
    the bus sees every reply body cm receives: none carries the private key, in any encoding; the
    device decrypts it with its own key, and the certificate is for that key."""
    replies: list[bytes] = []
    cm = env.client("cm")
    call = cm._call

    async def spy(subject: str, request: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
        body = await call(subject, request, timeout)
        replies.append(body)
        return body

    cm._call = spy  # type: ignore[method-assign]
    fkey, factory = await env.factory_cert("dev-k")
    nonce = (await cm.est_nonce(der(factory))).nonce
    request_key = generate_key(Algorithm.P256)
    proof = est_proof.make(fkey, "serverkeygen", nonce, request_key.public_key())  # type: ignore[arg-type]
    out = await cm.est("serverkeygen", der(factory), make_csr(request_key, "dev-k"), proof=proof)
    assert out.private_key is None
    assert out.encrypted_key is not None
    pkcs8 = cms_envelope.decrypt_key(out.encrypted_key, fkey)  # type: ignore[arg-type]
    key = serialization.load_der_private_key(pkcs8, None)
    cert = x509.load_der_x509_certificate(out.certificate.certificate)
    assert cert.public_key() == key.public_key()
    assert device_id_of(cert) == "dev-k"
    assert replies
    for body in replies:
        assert not _carries(body, pkcs8)
        assert not _carries(body, _scalar(key))
    assert _scalar(key) not in out.encrypted_key

    # re-enrollment by serverkeygen: now encrypted to the operational key, which the factory key cannot open
    again = await env.est("serverkeygen", (key, der(cert)), generate_key(Algorithm.P256), "dev-k")  # type: ignore[arg-type]
    assert again.encrypted_key is not None
    with pytest.raises(BadRequestError, match="not encrypted to this device's key"):
        cms_envelope.decrypt_key(again.encrypted_key, fkey)  # type: ignore[arg-type]
    key2 = serialization.load_der_private_key(cms_envelope.decrypt_key(again.encrypted_key, key), None)  # type: ignore[arg-type]
    assert x509.load_der_x509_certificate(again.certificate.certificate).public_key() == key2.public_key()


async def test_serverkeygen_off_and_cleartext_are_the_operators_choice(env: Env) -> None:
    """ "off": refused; "cleartext": km sends the key through cm in the clear (ADR 0008), knowingly."""
    fkey, factory = await env.factory_cert("dev-k")
    env.km.settings = dataclasses.replace(env.km.settings, serverkeygen="off")
    with pytest.raises(NotAuthorizedError, match="serverkeygen is off"):
        await env.est("serverkeygen", (fkey, der(factory)), generate_key(Algorithm.P256), "dev-k")
    assert env.store.count_certificates(profile="operational") == 0
    env.km.settings = dataclasses.replace(env.km.settings, serverkeygen="cleartext")
    out = await env.est("serverkeygen", (fkey, der(factory)), generate_key(Algorithm.P256), "dev-k")
    assert out.private_key is not None
    assert out.encrypted_key is None
    key = serialization.load_der_private_key(out.private_key, None)
    cert = x509.load_der_x509_certificate(out.certificate.certificate)
    assert cert.public_key() == key.public_key()


async def test_serverkeygen_to_an_ed25519_credential_is_refused_before_issuing(env: Env) -> None:
    """An Ed25519 key cannot agree a key, so km cannot encrypt to it: refused with the reason, and
    no certificate is issued (such a deployment keeps serverkeygen off)."""
    fkey = generate_key(Algorithm.ED25519)
    out = await env.client("pm-boardA").issue("dev-e", "factory", csr=make_csr(fkey, "dev-e"))
    with pytest.raises(UnsupportedError, match="signature-only key"):
        await env.est("serverkeygen", (fkey, out.certificate), generate_key(Algorithm.P256), "dev-e")
    assert env.store.count_certificates(profile="operational") == 0


async def test_unregistered_factory_certificate_is_refused(env: Env) -> None:
    """Signed by our factory CA but never issued through km (not recorded): km does not know it."""
    key = generate_key(Algorithm.P256)
    rogue = PKI.cas["factory"].issue(
        DEFAULT_PROFILES["factory"],
        key.public_key(),
        device_subject("dev-r", ORG, "x"),
        now=NOW,
        serial=x509.random_serial_number(),
        uris=[device_uri("dev-r", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )
    with pytest.raises(UntrustedError, match="not registered"):
        await env.client("cm").est("simpleenroll", der(rogue), make_csr(key, "dev-r"))
    foreign = (
        make_pki()
        .cas["factory"]
        .issue(
            DEFAULT_PROFILES["factory"],
            key.public_key(),
            device_subject("dev-f", ORG, "x"),
            now=NOW,
            serial=x509.random_serial_number(),
            uris=[device_uri("dev-f", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
        )
    )
    with pytest.raises(UntrustedError):
        await env.client("cm").est("simpleenroll", der(foreign), make_csr(key, "dev-f"))
    assert env.store.count_certificates(profile="operational") == 0


async def test_revoked_or_expired_credentials_cannot_enroll(env: Env) -> None:
    _k, factory = await env.factory_cert("dev-x")
    await env.client("admin").revoke(serial=format(factory.serial_number, "x"), reason="keyCompromise")
    with pytest.raises(NotAuthorizedError, match="revoked"):
        await env.client("cm").est("simpleenroll", der(factory), make_csr(generate_key(Algorithm.P256), "dev-x"))
    k2, factory2 = await env.factory_cert("dev-y")
    op = await env.est("simpleenroll", (k2, der(factory2)), generate_key(Algorithm.P256), "dev-y")
    env.clock.advance(dt.timedelta(days=91))  # the operational certificate has expired
    with pytest.raises(UntrustedError, match="not valid"):
        await env.client("cm").est(
            "simplereenroll", op.certificate.certificate, make_csr(generate_key(Algorithm.P256), "dev-y")
        )


async def test_wrong_credential_kind_name_or_relay(env: Env) -> None:
    _k, factory = await env.factory_cert("dev-z")
    cm = env.client("cm")
    with pytest.raises(NotAuthorizedError, match="operational certificate"):
        await cm.est("simplereenroll", der(factory), make_csr(generate_key(Algorithm.P256), "dev-z"))
    with pytest.raises(BadRequestError, match="does not match"):
        await cm.est("simpleenroll", der(factory), make_csr(generate_key(Algorithm.P256), "someone-else"))
    # only cm relays EST: an admin-signed EST request is refused by the RA
    admin_relay = env.client("admin")
    with pytest.raises(NotAuthorizedError):
        await admin_relay.est("simpleenroll", der(factory), make_csr(generate_key(Algorithm.P256), "dev-z"))
    assert env.store.count_certificates(profile="operational") == 0


async def test_proof_policy_optional_lets_a_plain_client_enroll_but_never_a_bad_proof(env: Env) -> None:
    """[profiles.factory] est_proof = "optional": an enrollment without a proof (plain curl) is
    accepted; one WITH a bad proof is refused; re-enrollment (operational: required) still needs one."""
    env.km.settings = dataclasses.replace(env.km.settings, est_proof_optional=frozenset({"factory"}))
    fkey, factory = await env.factory_cert("dev-p")
    cm = env.client("cm")
    key = generate_key(Algorithm.P256)
    nonce = (await cm.est_nonce(der(factory))).nonce
    wrong = est_proof.make(generate_key(Algorithm.P256), "simpleenroll", nonce, key.public_key())
    with pytest.raises(UntrustedError, match="does not verify"):
        await cm.est("simpleenroll", der(factory), make_csr(key, "dev-p"), proof=wrong)
    with pytest.raises(BadRequestError, match="Iotdlm-Est-Proof"):
        await cm.est("simpleenroll", der(factory), make_csr(key, "dev-p"), proof="garbage")
    out = await cm.est("simpleenroll", der(factory), make_csr(key, "dev-p"))
    op = x509.load_der_x509_certificate(out.certificate.certificate)
    with pytest.raises(NotAuthorizedError, match="no proof"):
        await cm.est("simplereenroll", der(op), make_csr(generate_key(Algorithm.P256), "dev-p"))
    assert fkey is not None


def test_deployment_reads_the_proof_policy(tmp_path: Path) -> None:
    from iotdlm.deployment import Deployment, DeploymentConfig, ProfileSettings

    base = DeploymentConfig(organization="T", algorithm="ecdsa-p256", public_url="http://x", dtypes=[])
    ok = msgspec.structs.replace(base, profiles={"factory": ProfileSettings(est_proof="optional")})
    ok.validate()
    assert Deployment(tmp_path, ok).est_proof_optional() == frozenset({"factory"})
    assert Deployment(tmp_path, base).est_proof_optional() == frozenset()
    assert base.est_serverkeygen == "encrypted"  # ADR 0009: the default
    for mode in ("off", "encrypted", "cleartext"):
        msgspec.structs.replace(base, est_serverkeygen=mode).validate()
    for bad in (
        msgspec.structs.replace(base, profiles={"factory": ProfileSettings(est_proof="sometimes")}),
        msgspec.structs.replace(base, est_serverkeygen="yes"),
    ):
        with pytest.raises(BadRequestError, match="est_"):
            bad.validate()
