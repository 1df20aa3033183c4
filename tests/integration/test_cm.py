"""cm, the only door to the outside, end to end: a deployment made by ``init_deployment``, a real
nats-server with the deployment's users and permissions (cm connects as its own NATS user), a
real km over a SQLite store, and cm on random loopback ports. Judged by curl and openssl where the
machine has them, and by the device's EST client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotdlm.bus import Bus, subjects
from iotdlm.bus.server import NatsUser
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.cm import CmConfig, CmService, EgressConfig, Limits
from iotdlm.cm.config import CoapConfig
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.device.est_client import EstClient, EstUnavailableError
from iotdlm.errors import (
    ModeError,
    NotAuthorizedError,
    UnavailableError,
    UntrustedError,
)
from iotdlm.km import KmService
from iotdlm.modes.guard import ModeGuard
from iotdlm.modes.signed import ModeVerifier, seal_record
from iotdlm.pki.chain import certs_to_pem, der
from iotdlm.pki.keys import Algorithm, PrivateKey, generate_key, private_key_to_pem
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_subject, device_uri
from iotdlm.runtime import build_km, km_identity, km_trust, open_store, record_identities, sealer_for
from iotdlm.store import Store
from iotdlm.wire.modes import ModeRecord
from tests.fixtures_nats import RunningNats, start_nats
from tests.helpers import make_csr
from tests.tools import attime, ocsp_window

pytestmark = pytest.mark.nats

DTYPE = "boardA"
PASSPHRASE = b"pw"
WELL_KNOWN = "/.well-known/est"
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


class ShiftClock:
    """The system clock, moved forward on demand (TLS checks validity with the real time; km with this)."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def now(self) -> dt.datetime:
        return SystemClock().now() + self.offset


@dataclass
class Site:
    dep: Deployment
    files: Path
    clock: ShiftClock
    store: Store
    nats: RunningNats
    cm: CmService
    buses: list[Bus]
    km: KmService

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.cm.https_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.cm.http_port}"

    @property
    def root_pem(self) -> bytes:
        return (self.dep.root / "ca" / "root.pem").read_bytes()

    async def client(self, name: str) -> KmClient:
        bus = await self.nats.connect(name.partition("-")[0])
        self.buses.append(bus)
        return KmClient(bus, sealer_for(self.dep.identity(name)), self.clock, trust=km_trust(self.dep))

    async def factory(self, device_id: str) -> tuple[PrivateKey, x509.Certificate]:
        """A factory certificate issued through pm's path (pm-<dtype>, profile factory)."""
        key = generate_key(Algorithm.P256)
        pm = await self.client(f"pm-{DTYPE}")
        out = await pm.issue(device_id, "factory", csr=make_csr(key, device_id))
        return key, x509.load_der_x509_certificate(out.certificate)

    def est(self, key: PrivateKey | None = None, cert: x509.Certificate | None = None) -> EstClient:
        return EstClient(
            self.https,
            trust_anchor_pem=self.root_pem,
            client_cert_pem=certs_to_pem([cert]) if cert is not None else None,
            client_key_pem=private_key_to_pem(key, None) if key is not None else None,
        )

    def write(self, name: str, data: bytes) -> Path:
        path = self.files / name
        path.write_bytes(data)
        return path


LIMITS = Limits(idle_timeout=0.5, body_timeout=0.5, handshake_timeout=2.0, lingering_time=0.2, retry_after=7)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path) as s:
        yield s


@contextlib.asynccontextmanager
async def open_site(
    tmp_path: Path,
    *,
    public_url: str = "http://127.0.0.1:8080",
    cm_names: tuple[str, ...] = (),
    tls_files: tuple[Path, Path] | None = None,
    http_port: int = 0,
    est_serverkeygen: str | None = None,
    coap: CoapConfig | None = None,
) -> AsyncIterator[Site]:
    """A deployment, nats-server, km and cm (``tls_files``: an operator's HTTPS pair for cm;
    ``http_port``: cm's plain-HTTP port, for a ``public_url`` that names it; ``est_serverkeygen``:
    None keeps the deployment's default)."""
    clock = ShiftClock()
    made, _ = init_deployment(
        tmp_path / "d",
        organization="T",
        algorithm=Algorithm.P256,
        dtypes=[DTYPE],
        passphrase=PASSPHRASE,
        public_url=public_url,
        cm_names=cm_names,
        now=clock.now(),
    )
    users = [NatsUser(module=m, user=c.user, password=c.password) for m, c in made.nats_users()]
    nats = start_nats(tmp_path, users=users, jetstream_dir=tmp_path / "js")
    config = made.config
    dep = Deployment(
        made.root,
        msgspec.structs.replace(
            config,
            nats=msgspec.structs.replace(config.nats, port=nats.server.config.port),
            est_serverkeygen=est_serverkeygen or config.est_serverkeygen,
        ),
    )
    store = open_store(dep)
    record_identities(dep, store, clock.now())
    km_bus = await nats.connect("km")
    km = KmService(build_km(dep, store, clock, passphrase=PASSPHRASE), km_bus, identity=km_identity(dep))
    await km.start()
    # the supervisor's part: the operation mode in the JetStream bucket every service watches
    modes_bus = await nats.connect("modes")
    await set_mode(modes_bus, "certificate-management", dep)
    config = CmConfig(
        https_port=0,
        http_port=http_port,
        limits=LIMITS,
        egress=EgressConfig(("http://127.0.0.1:1",), port=0),
        tls_cert=tls_files[0] if tls_files else None,
        tls_key=tls_files[1] if tls_files else None,
        coap=coap,
    )
    cm = await CmService.from_deployment(dep, config, clock=clock)
    await cm.start()
    assert isinstance(cm.app.mode, ModeGuard)
    await cm.app.mode.wait_for("certificate-management")
    files = tmp_path / "files"
    files.mkdir()
    s = Site(dep=dep, files=files, clock=clock, store=store, nats=nats, cm=cm, buses=[km_bus, modes_bus], km=km)
    try:
        yield s
    finally:
        await cm.stop()
        await km.stop()
        for b in s.buses:
            await b.close()
        nats.server.stop()
        store.close()


async def set_mode(bus: Bus, mode: str, dep: Deployment) -> None:
    """Publish the operation mode as the supervisor does (only the modes identity may write it,
    signed with the modes identity); make the audit heads stream too, as `iotdlm up` does."""
    kv = await bus.key_value(subjects.MODE_BUCKET, create=True)
    await bus.append_only_stream(subjects.AUDIT_HEADS_STREAM, subjects.AUDIT_TREE_HEAD, create=True)
    now = SystemClock().now()
    record = ModeRecord(mode=mode, since=now.isoformat(), by="test")
    await kv.put(subjects.MODE_KEY, seal_record(sealer_for(dep.identity(subjects.SUPERVISOR)), record, now=now))


async def _run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """A command line tool, off the event loop (cm answers on this loop meanwhile)."""
    return await asyncio.to_thread(subprocess.run, list(argv), capture_output=True, timeout=60, check=False)


def _csr_b64(key: PrivateKey, cn: str) -> bytes:
    return base64.encodebytes(make_csr(key, cn))


#: docs/operations.md's recipe (ADR 0008) for an EST client that is curl + openssl: fetch km's nonce
#: with the client certificate, sign it, the operation and the CSR's public key with the client
#: certificate's key (P-256: SHA-256), print the Iotdlm-Est-Proof header's value.
#: $1 EST base URL, $2 operation, $3 client certificate, $4 its key, $5 the CSR (DER); $CURL_OPTS
PROOF_RECIPE = r"""
set -euo pipefail
nonce=$(curl -sS --fail $CURL_OPTS --cert "$3" --key "$4" "$1/iotdlm-nonce" | sed -E 's/.*"nonce": *"([^"]+)".*/\1/')
spki=$(openssl req -inform DER -in "$5" -noout -pubkey | openssl pkey -pubin -outform DER \
  | openssl dgst -sha256 -r | cut -d' ' -f1)
printf 'iotdlm-est-proof-v1\n%s\n%s\n%s\n' "$2" "$nonce" "$spki" > "$5.proof"
printf '%s %s' "$nonce" "$(openssl dgst -sha256 -sign "$4" "$5.proof" | openssl base64 -A)"
"""


async def _curl_proof(base: str, operation: str, cert: Path, key: Path, csr_der: Path, curl_opts: str) -> str:
    """The Iotdlm-Est-Proof header value, made by :data:`PROOF_RECIPE` (curl and openssl only)."""
    r = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", PROOF_RECIPE, "recipe", base, operation, str(cert), str(key), str(csr_der)],
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ, "CURL_OPTS": curl_opts},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


# --- curl and openssl as the outside world --------------------------------------------------------
@pytest.mark.real_clock
@needs_curl
@needs_openssl
@pytest.mark.openssl
async def test_curl_simpleenroll_and_openssl_verify(site: Site) -> None:
    fkey, factory = await site.factory("dev-curl")
    root = site.write("root.pem", site.root_pem)
    site.write("operational.pem", (site.dep.root / "ca" / "operational.pem").read_bytes())
    site.write("factory.pem", certs_to_pem([factory]))
    site.write("factory.key", private_key_to_pem(fkey, None))
    csr_der = make_csr(generate_key(Algorithm.P256), "dev-curl")
    site.write("csr.b64", base64.encodebytes(csr_der))
    out = site.files / "out.b64"
    enroll = (
        "curl", "-sS", "-o", str(out), "-w", "%{http_code}", "--cacert", str(root),
        "--cert", str(site.files / "factory.pem"), "--key", str(site.files / "factory.key"),
        "--data-binary", f"@{site.files / 'csr.b64'}", "-H", "Content-Type: application/pkcs10",
    )  # fmt: skip
    # without the device's proof of its factory key: refused (ADR 0008), in one line
    r = await _run(*enroll, f"{site.https}{WELL_KNOWN}/simpleenroll")
    assert r.stdout == b"403", (r.stdout, r.stderr)
    assert b"Iotdlm-Est-Proof" in out.read_bytes()
    proof = await _curl_proof(
        f"{site.https}{WELL_KNOWN}", "simpleenroll", site.files / "factory.pem", site.files / "factory.key",
        site.write("csr.der", csr_der), f"--cacert {root}",
    )  # fmt: skip
    r = await _run(*enroll, "-H", f"Iotdlm-Est-Proof: {proof}", f"{site.https}{WELL_KNOWN}/simpleenroll")
    assert r.stdout == b"200", (r.stdout, r.stderr, out.read_bytes() if out.exists() else b"")
    site.write("out.p7", base64.b64decode(out.read_bytes()))
    r = await _run("openssl", "pkcs7", "-inform", "DER", "-in", str(site.files / "out.p7"), "-print_certs",
                   "-out", str(site.files / "issued.pem"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = await _run("openssl", "verify", "-CAfile", str(root), "-untrusted", str(site.files / "operational.pem"),
                   str(site.files / "issued.pem"))  # fmt: skip
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert b"OK" in r.stdout
    issued = x509.load_pem_x509_certificate((site.files / "issued.pem").read_bytes())
    assert issued.subject.rfc4514_string().find("dev-curl") >= 0

    # no client certificate: 401, a one-line text body, no traceback
    r = await _run(
        "curl", "-sS", "-i", "--cacert", str(root), "--data-binary", f"@{site.files / 'csr.b64'}",
        "-H", "Content-Type: application/pkcs10", f"{site.https}{WELL_KNOWN}/simpleenroll",
    )  # fmt: skip
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), r.stdout
    assert b"www-authenticate: certificate" in head.lower()
    assert b"client certificate" in body
    assert b"Traceback" not in body
    assert body.count(b"\n") == 1

    # /cacerts without a client certificate: every CA of the deployment, root included
    r = await _run("curl", "-sS", "--fail", "--cacert", str(root), f"{site.https}{WELL_KNOWN}/cacerts")
    assert r.returncode == 0, r.stderr
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(r.stdout))
    assert {c.subject.rfc4514_string() for c in certs} == {
        site.dep.ca_certificate(n).subject.rfc4514_string() for n in ("root", "factory", "operational", "service")
    }


@pytest.mark.real_clock
@needs_curl
async def test_what_the_csr_asked_for_and_did_not_get_is_named_in_a_header(site: Site) -> None:
    """EST has no field for it; the reply names what the profile dropped (issue 10 item 16)."""
    fkey, factory = await site.factory("dev-asks")
    key = generate_key(Algorithm.P256)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "dev-asks"),
                                 x509.NameAttribute(x509.NameOID.LOCALITY_NAME, "Plant 4")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("printer.example")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    site.write("asks.b64", base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)))
    site.write("factory.pem", certs_to_pem([factory]))
    site.write("factory.key", private_key_to_pem(fkey, None))
    root = site.write("root.pem", site.root_pem)
    proof = await _curl_proof(
        f"{site.https}{WELL_KNOWN}", "simpleenroll", site.files / "factory.pem", site.files / "factory.key",
        site.write("asks.der", csr.public_bytes(serialization.Encoding.DER)), f"--cacert {root}",
    )  # fmt: skip
    r = await _run(
        "curl", "-sS", "-i", "--cacert", str(root), "-H", f"Iotdlm-Est-Proof: {proof}",
        "--cert", str(site.files / "factory.pem"), "--key", str(site.files / "factory.key"),
        "--data-binary", f"@{site.files / 'asks.b64'}", "-H", "Content-Type: application/pkcs10",
        f"{site.https}{WELL_KNOWN}/simpleenroll",
    )  # fmt: skip
    head = r.stdout.partition(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 200"), r.stdout
    (line,) = [h for h in head.split("\r\n") if h.lower().startswith("iotdlm-dropped:")]
    assert "DNS:printer.example" in line
    assert "Plant 4" in line


def test_the_dropped_header_is_one_safe_line() -> None:
    from iotdlm.cm.server import dropped_header

    value = dropped_header(["subjectAltName DNS:a.example", "subject L=x\r\nSet-Cookie: y; z", "caf\u00e9"])
    assert value == "subjectAltName DNS:a.example; subject L=x%0D%0ASet-Cookie: y%3B z; caf%C3%A9"


@pytest.mark.real_clock
@needs_openssl
@pytest.mark.openssl
async def test_openssl_ocsp_good_then_revoked_and_crl(site: Site) -> None:
    fkey, factory = await site.factory("dev-o")
    async with site.est(fkey, factory) as est:
        leaf = await est.simpleenroll(make_csr(generate_key(Algorithm.P256), "dev-o"))
    issuer = site.write("ca.pem", (site.dep.root / "ca" / "operational.pem").read_bytes())
    chain = site.write("chain.pem", site.root_pem + issuer.read_bytes())
    leaf_path = site.write("leaf.pem", certs_to_pem([leaf]))
    argv = ("openssl", "ocsp", "-url", f"{site.http}/ocsp", "-issuer", str(issuer), "-cert", str(leaf_path),
            "-CAfile", str(chain))  # fmt: skip
    r = await _run(*argv)
    assert b": good" in r.stdout, (r.stdout, r.stderr)
    assert b"Response verify OK" in r.stderr

    admin = await site.client("admin")
    await admin.revoke(serial=format(leaf.serial_number, "x"), reason="keyCompromise")
    r = await _run(*argv)
    assert b": revoked" in r.stdout, (r.stdout, r.stderr)

    # the GET form (RFC 5019), with caching headers from nextUpdate
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf, site.dep.ca_certificate("operational"), _sha1()).build()
    path = base64.b64encode(req.public_bytes(serialization.Encoding.DER)).decode()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{site.http}/ocsp/{path.replace('/', '%2F')}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/ocsp-response"
            assert resp.headers["Cache-Control"].startswith("max-age=")
            assert int(resp.headers["Cache-Control"].split("=")[1].split(",")[0]) > 0
            etag = resp.headers["ETag"]
            answer = ocsp.load_der_ocsp_response(await resp.read())
            assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
        async with http.get(f"{site.http}/ocsp/{path.replace('/', '%2F')}", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304

        # the CRL partition named in the certificate, served by cm
        dp = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        names = dp[0].full_name
        assert names is not None
        url = str(names[0].value)
        crl_path = "/crl/" + url.split("/crl/", 1)[1]
        async with http.get(site.http + crl_path) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/pkix-crl"
            assert "max-age=" in resp.headers["Cache-Control"]
            crl = x509.load_der_x509_crl(await resp.read())
        assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
        async with http.get(site.http + crl_path.replace(".crl", ".delta")) as resp:
            assert resp.status == 200
        for bad in ("/crl/operational/99999.crl", "/crl/nobody/1.crl", "/crl/operational/x.crl", "/crl/../etc"):
            async with http.get(site.http + bad) as resp:
                assert resp.status == 404, bad
                assert "Traceback" not in await resp.text()
        # OCSP over HTTPS too, POST form, without a client certificate
        ctx = ssl.create_default_context(cadata=site.root_pem.decode())
        async with http.post(
            f"{site.https}/ocsp",
            data=req.public_bytes(serialization.Encoding.DER),
            headers={"Content-Type": "application/ocsp-request"},
            ssl=ctx,
        ) as resp:
            assert resp.status == 200
            assert ocsp.load_der_ocsp_response(await resp.read()).certificate_status is ocsp.OCSPCertStatus.REVOKED


def _sha1() -> hashes.HashAlgorithm:
    return hashes.SHA1()  # noqa: S303 -- RFC 5019 CertIDs are SHA-1


# --- the device's EST client ----------------------------------------------------------------------
@pytest.mark.real_clock
async def test_device_enrolls_reenrolls_refreshes_and_serverkeygen(site: Site) -> None:
    fkey, factory = await site.factory("dev-1")
    async with site.est() as anonymous:
        cas = await anonymous.cacerts()
        attrs = await anonymous.csrattrs()
    assert site.dep.ca_certificate("operational") in cas
    assert site.dep.ca_certificate("root") in cas
    assert [a.oid for a in attrs] == ["1.2.840.10045.4.3.2", "1.2.840.10045.2.1"]

    key1 = generate_key(Algorithm.P256)
    async with site.est(fkey, factory) as est:
        op1 = await est.simpleenroll(make_csr(key1, "dev-1"))
    op1.verify_directly_issued_by(site.dep.ca_certificate("operational"))
    assert op1.public_key() == key1.public_key()

    key2 = generate_key(Algorithm.P256)
    async with site.est(key1, op1) as est:
        op2 = await est.simplereenroll(make_csr(key2, "dev-1"))
        assert op2.public_key() == key2.public_key()
        # the superseded certificate cannot re-enroll again
        with pytest.raises(NotAuthorizedError, match="superseded"):
            await est.simplereenroll(make_csr(generate_key(Algorithm.P256), "dev-1"))
    rec = site.store.get_certificate("operational", op1.serial_number)
    assert rec is not None
    assert rec.status == "superseded"

    # a device that cannot make keys: the server makes it, encrypted to the factory key (ADR 0009)
    fkey_k, factory_k = await site.factory("dev-k")
    async with site.est(fkey_k, factory_k) as est:
        key_k, cert_k = await est.serverkeygen(make_csr(generate_key(Algorithm.P256), "dev-k"))
    assert cert_k.public_key() == key_k.public_key()
    cert_k.verify_directly_issued_by(site.dep.ca_certificate("operational"))


@pytest.mark.real_clock
async def test_serverkeygen_off_is_refused(tmp_path: Path) -> None:
    """est_serverkeygen = "off": a device that cannot make keys is refused, and nothing is issued."""
    async with open_site(tmp_path, est_serverkeygen="off") as site:
        fkey_k, factory_k = await site.factory("dev-k")
        async with site.est(fkey_k, factory_k) as est:
            with pytest.raises(NotAuthorizedError, match="serverkeygen is off"):
                await est.serverkeygen(make_csr(generate_key(Algorithm.P256), "dev-k"))
        assert site.store.get_device("dev-k") is not None
        assert not [c for c in site.store.list_certificates(device_id="dev-k") if c.profile == "operational"]


@pytest.mark.real_clock
async def test_serverkeygen_when_the_operator_accepts_that_cm_sees_the_key(tmp_path: Path) -> None:
    """est_serverkeygen = "cleartext": the server generates the key and sends it through cm."""
    async with open_site(tmp_path, est_serverkeygen="cleartext") as site:
        fkey_k, factory_k = await site.factory("dev-k")
        async with site.est(fkey_k, factory_k) as est:
            key, cert = await est.serverkeygen(make_csr(generate_key(Algorithm.P256), "dev-k"))
        assert cert.public_key() == key.public_key()
        cert.verify_directly_issued_by(site.dep.ca_certificate("operational"))


# --- refusals -------------------------------------------------------------------------------------
@pytest.mark.real_clock
async def test_refusals(site: Site) -> None:
    # an unregistered factory certificate (signed by our factory CA, never issued through km): 403
    cas = site.dep.load_cas(PASSPHRASE)
    rkey = generate_key(Algorithm.P256)
    now = site.clock.now()
    from iotdlm.pki.profiles import DEFAULT_PROFILES

    rogue = cas["factory"].issue(
        DEFAULT_PROFILES["factory"],
        rkey.public_key(),
        device_subject("dev-r", "T", DTYPE),
        now=now,
        serial=x509.random_serial_number(),
        uris=[device_uri("dev-r", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )
    async with site.est(rkey, rogue) as est:
        with pytest.raises(NotAuthorizedError, match="not registered"):
            await est.simpleenroll(make_csr(generate_key(Algorithm.P256), "dev-r"))

    # no client certificate on an enrollment endpoint: 401
    async with site.est() as est:
        with pytest.raises(UntrustedError, match="client certificate"):
            await est.simpleenroll(make_csr(generate_key(Algorithm.P256), "dev-r"))

    # expired at the TLS layer (OpenSSL refuses it before any handler runs)
    old = cas["operational"].issue(
        DEFAULT_PROFILES["operational"],
        rkey.public_key(),
        device_subject("dev-old", "T", DTYPE),
        now=now - dt.timedelta(days=200),
        serial=x509.random_serial_number(),
        uris=[device_uri("dev-old", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )
    async with site.est(rkey, old) as est:
        with pytest.raises(UntrustedError):
            await est.simplereenroll(make_csr(generate_key(Algorithm.P256), "dev-old"))

    # revoked: TLS accepts it, km refuses it (403)
    fkey, factory = await site.factory("dev-x")
    async with site.est(fkey, factory) as est:
        op = await est.simpleenroll(make_csr(fkey, "dev-x"))
    admin = await site.client("admin")
    await admin.revoke(serial=format(op.serial_number, "x"), reason="keyCompromise")
    async with site.est(fkey, op) as est:
        with pytest.raises(NotAuthorizedError, match="revoked"):
            await est.simplereenroll(make_csr(generate_key(Algorithm.P256), "dev-x"))

    # expired by km's clock (OpenSSL still accepts it): km checks the certificate itself
    ykey, yfactory = await site.factory("dev-y")
    async with site.est(ykey, yfactory) as est:
        op_y = await est.simpleenroll(make_csr(ykey, "dev-y"))
    site.clock.offset = dt.timedelta(days=91)
    async with site.est(ykey, op_y) as est:
        with pytest.raises(NotAuthorizedError, match="not valid"):
            await est.simplereenroll(make_csr(generate_key(Algorithm.P256), "dev-y"))
    site.clock.offset = dt.timedelta()

    # the HTTP-level refusals, with the raw client
    ctx = ssl.create_default_context(cadata=site.root_pem.decode())
    with_cert = ssl.create_default_context(cadata=site.root_pem.decode())
    site.write("f.pem", certs_to_pem([yfactory]))
    site.write("f.key", private_key_to_pem(ykey, None))
    with_cert.load_cert_chain(str(site.files / "f.pem"), str(site.files / "f.key"))
    url = f"{site.https}{WELL_KNOWN}/simpleenroll"
    good = _csr_b64(generate_key(Algorithm.P256), "dev-y")
    cases = [
        ("wrong content type", {"Content-Type": "application/json"}, good, 415),
        ("no content type", {}, good, 415),
        ("garbage base64", {"Content-Type": "application/pkcs10"}, b"@@not base64@@", 400),
        ("base64 of garbage", {"Content-Type": "application/pkcs10"}, base64.b64encode(b"\x30\x03abc"), 400),
        ("giant body", {"Content-Type": "application/pkcs10"}, b"A" * (128 * 1024), 413),
        ("CN of another device", {"Content-Type": "application/pkcs10"}, _csr_b64(ykey, "dev-other"), 400),
    ]
    async with aiohttp.ClientSession() as http:
        for name, headers, body, status in cases:
            async with http.post(url, data=body, headers=headers, ssl=with_cert) as resp:
                text = await resp.text()
                assert resp.status == status, (name, text)
                assert resp.headers["Content-Type"].startswith("text/plain"), name
                assert text.count("\n") == 1, (name, text)
                assert "Traceback" not in text
        # EST over plain HTTP: refused
        async with http.post(f"{site.http}{WELL_KNOWN}/simpleenroll", data=good) as resp:
            assert resp.status == 403
            assert "HTTPS" in await resp.text()
        # unknown paths and methods: one line, no traceback
        async with http.get(f"{site.https}/nothing", ssl=ctx) as resp:
            assert resp.status == 404
        async with http.get(url, ssl=ctx) as resp:
            assert resp.status == 405
        # OCSP, one rule for GET and POST: wrong content type, garbage GET path, too large, not DER
        # -- an OCSPResponse malformedRequest with HTTP 200, on both listeners
        for base, tls in ((site.http, None), (site.https, ctx)):
            for method, path, headers, body in (
                ("POST", "/ocsp", {"Content-Type": "text/plain"}, b"x"),
                ("POST", "/ocsp", {}, b"x"),
                ("GET", "/ocsp/@@@", {}, None),
                ("GET", "/ocsp/" + base64.b64encode(b"garbage").decode(), {}, None),
                ("POST", "/ocsp", {"Content-Type": "application/ocsp-request"}, b"0" * 9000),
                ("POST", "/ocsp", {"Content-Type": "application/ocsp-request"}, b"garbage"),
            ):
                async with http.request(method, base + path, data=body, headers=headers, ssl=tls) as resp:
                    assert resp.status == 200, (base, method, path, headers)
                    assert resp.headers["Content-Type"] == "application/ocsp-response"
                    answer = ocsp.load_der_ocsp_response(await resp.read())
                    assert answer.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST, (method, path)
    # a foreign client certificate does not get past TLS
    from tests.helpers import make_pki

    foreign = make_pki().cas["factory"]
    fk = generate_key(Algorithm.P256)
    stranger = foreign.issue(
        DEFAULT_PROFILES["factory"], fk.public_key(), device_subject("dev-s", "T", DTYPE),
        now=now, serial=x509.random_serial_number(),
        uris=[device_uri("dev-s", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )  # fmt: skip
    async with site.est(fk, stranger) as est:
        with pytest.raises(UntrustedError):
            await est.simpleenroll(make_csr(fk, "dev-s"))
    # and cm is still serving
    async with site.est() as est:
        assert await est.cacerts()


@pytest.mark.real_clock
async def test_km_down_means_503_with_retry_after(site: Site) -> None:
    fkey, factory = await site.factory("dev-d")
    # km leaves: cm answers 503 with Retry-After (EST) and tryLater (OCSP)
    km_bus = site.buses[0]
    await km_bus.close()
    async with site.est(fkey, factory) as est:
        with pytest.raises(EstUnavailableError) as info:
            await est.simpleenroll(make_csr(fkey, "dev-d"))
    assert info.value.retry_after == 7
    leaf_req = ocsp.OCSPRequestBuilder().add_certificate(factory, site.dep.ca_certificate("factory"), _sha1()).build()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{site.http}/ocsp",
            data=leaf_req.public_bytes(serialization.Encoding.DER),
            headers={"Content-Type": "application/ocsp-request"},
        ) as resp,
    ):
        assert resp.status == 200  # the refusal is the OCSP status (cm.server's module doc)
        assert resp.headers["Retry-After"] == "7"
        answer = ocsp.load_der_ocsp_response(await resp.read())
        assert answer.response_status is ocsp.OCSPResponseStatus.TRY_LATER
    # /cacerts still answers from what cm knows
    async with site.est() as est:
        assert len(await est.cacerts()) == 4


# --- slow clients ---------------------------------------------------------------------------------
async def _tls_connect(site: Site) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = ssl.create_default_context(cadata=site.root_pem.decode())
    return await asyncio.open_connection("127.0.0.1", site.cm.https_port, ssl=ctx)


async def _dribble(writer: asyncio.StreamWriter, data: bytes) -> None:
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()
        await asyncio.sleep(0.1)


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sent until it closed the connection (generous bound: not a timing test)."""
    out = b""
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(4096)
            except (ConnectionError, ssl.SSLError):
                return out
            if not chunk:
                return out
            out += chunk


@pytest.mark.real_clock
async def test_slowloris_head_is_cut_off(site: Site) -> None:
    reader, writer = await _tls_connect(site)
    head = b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: cm\r\nX-Slow: " + b"a" * 200
    task = asyncio.create_task(_dribble(writer, head))
    try:
        await _closed_by_server(reader, within=15)
    finally:
        task.cancel()
        with pytest.raises((asyncio.CancelledError, ConnectionError, ssl.SSLError)):
            await task
        writer.close()
    assert not task.done() or task.cancelled() or task.exception() is not None


async def _slow_body(site: Site, head: bytes, ctx: ssl.SSLContext | None = None) -> bytes:
    if ctx is None:
        reader, writer = await _tls_connect(site)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", site.cm.https_port, ssl=ctx)
    writer.write(head)
    task = asyncio.create_task(_dribble(writer, b"0" * 400))
    try:
        return await _closed_by_server(reader, within=15)
    finally:
        task.cancel()
        with pytest.raises((asyncio.CancelledError, ConnectionError, ssl.SSLError)):
            await task
        writer.close()


@pytest.mark.real_clock
async def test_slow_body_gets_408_and_is_closed(site: Site) -> None:
    fkey, factory = await site.factory("dev-slow")
    ctx = ssl.create_default_context(cadata=site.root_pem.decode())
    ctx.load_cert_chain(
        site.write("slow.pem", certs_to_pem([factory])), site.write("slow.key", private_key_to_pem(fkey, None))
    )
    sent = await _slow_body(
        site,
        b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: cm\r\nContent-Type: application/pkcs10\r\n"
        b"Content-Length: 400\r\n\r\n",
        ctx,
    )
    assert sent.startswith(b"HTTP/1.1 408"), sent
    assert b"Traceback" not in sent
    # OCSP keeps its wire format: malformedRequest (HTTP 200), and the connection is closed too
    sent = await _slow_body(
        site,
        b"POST /ocsp HTTP/1.1\r\nHost: cm\r\nContent-Type: application/ocsp-request\r\nContent-Length: 400\r\n\r\n",
    )
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), sent
    assert ocsp.load_der_ocsp_response(body).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@pytest.mark.real_clock
async def test_too_large_declared_body_is_refused_without_reading(site: Site) -> None:
    reader, writer = await _tls_connect(site)
    writer.write(
        b"POST /.well-known/est/cacerts HTTP/1.1\r\nHost: cm\r\nContent-Length: 10000000\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    )
    sent = await _closed_by_server(reader, within=15)
    writer.close()
    assert sent.startswith(b"HTTP/1.1 405") or sent.startswith(b"HTTP/1.1 413"), sent
    reader, writer = await _tls_connect(site)
    writer.write(
        b"POST /ocsp HTTP/1.1\r\nHost: cm\r\nContent-Type: application/ocsp-request\r\nContent-Length: 9999999\r\n\r\n"
    )
    sent = await _closed_by_server(reader, within=15)
    writer.close()
    # OCSP keeps its wire format: malformedRequest (HTTP 200), and the connection is closed
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), sent
    assert b"application/ocsp-response" in head
    assert ocsp.load_der_ocsp_response(body).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


# --- wiring ---------------------------------------------------------------------------------------
async def test_cm_uses_its_own_nats_user(site: Site) -> None:
    """cm's NATS user may relay EST, OCSP, CRLs and the chain, and nothing else (the server says so)."""
    from iotdlm.errors import PermissionDeniedError

    km_client = site.cm.app.km
    assert isinstance(km_client, KmClient)
    with pytest.raises((PermissionDeniedError, UnavailableError)):
        await km_client.issue("dev-z", "factory", csr=make_csr(generate_key(Algorithm.P256), "dev-z"))
    chain = await km_client.chain()
    assert chain.root == der(site.dep.ca_certificate("root"))
    # pm asks whether cm runs (pm refuses to work while the door is open)
    pm = await site.client(f"pm-{DTYPE}")
    answer = json.loads(await pm.bus.request(subjects.CM_PING, b"{}", timeout=2))
    assert answer["module"] == "cm"
    assert answer["listeners"]["https"] == site.https
    http_url = site.http
    await site.cm.stop()
    with pytest.raises(UnavailableError):
        await pm.bus.request(subjects.CM_PING, b"{}", timeout=1)
    # with cm off, nothing answers outside
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http, http.get(f"{http_url}/crl/operational/0.crl"):
            pass


@pytest.mark.real_clock
async def test_garbage_after_the_handshake_is_a_400_not_a_crash(site: Site) -> None:
    reader, writer = await _tls_connect(site)
    writer.write(b"\x00\x01\x02garbage\r\n\r\n")
    sent = await _closed_by_server(reader, within=15)
    writer.close()
    assert sent.startswith(b"HTTP/1."), sent
    assert b" 400 " in sent.split(b"\r\n", 1)[0], sent
    assert b"Traceback" not in sent
    async with site.est() as est:  # still serving
        assert await est.cacerts()


# --- the command line -----------------------------------------------------------------------------
def test_cm_cli_help() -> None:
    from click.testing import CliRunner

    from iotdlm.cli.cm import cm

    out = CliRunner().invoke(cm, ["serve", "--help"])
    assert out.exit_code == 0
    for option in (
        "--https-port",
        "--http-port",
        "--egress-port",
        "--allow-origin",
        "--data",
        "--tls-cert",
        "--tls-key",
    ):
        assert option in out.output
    bad = CliRunner().invoke(cm, ["serve", "--data", "/nonexistent", "--allow-origin", "ftp://x"])
    assert bad.exit_code == 4
    assert "scheme must be http or https" in bad.output
    missing = CliRunner().invoke(cm, ["serve", "--data", "/nonexistent"])
    assert missing.exit_code == 4
    assert "iotdlm init" in missing.output


def test_cm_file(tmp_path: Path) -> None:
    from iotdlm.cm.config import CmFile, limits_from, load_cm_file
    from iotdlm.errors import BadRequestError

    assert load_cm_file(tmp_path) == CmFile()
    (tmp_path / "cm.toml").write_text("https_port = 9443\nhttp = false\n[limits]\nidle_timeout = 2\nretry_after = 5\n")
    f = load_cm_file(tmp_path)
    assert f.https_port == 9443
    assert f.http is False
    limits = limits_from(f.limits)
    assert limits.idle_timeout == 2.0
    assert limits.retry_after == 5
    assert isinstance(limits.retry_after, int)
    for bad, match in [
        ("nonsense = 1\n", "nonsense"),
        ("[limits]\nspeed = 1\n", "unknown limits"),
        ("https_port = 'x'\n", "https_port"),
        ("= broken", "cm.toml"),
    ]:
        (tmp_path / "cm.toml").write_text(bad)
        with pytest.raises(BadRequestError, match=match):
            load_cm_file(tmp_path)
    with pytest.raises(BadRequestError, match="positive"):
        limits_from({"idle_timeout": 0})


@pytest.mark.real_clock
async def test_cm_serve_process(tmp_path: Path) -> None:
    """`python -m iotdlm.cli.cm serve --data DIR`, as the supervisor starts it (settings from
    DIR/cm.toml), against the deployment's own embedded NATS server."""
    import os
    import signal
    import sys

    from iotdlm.bus.server import free_port
    from iotdlm.runtime import nats_server

    clock = ShiftClock()
    dep, _ = init_deployment(
        tmp_path / "d",
        organization="T",
        algorithm=Algorithm.P256,
        dtypes=[DTYPE],
        passphrase=PASSPHRASE,
        nats_port=free_port(),
        now=clock.now(),
    )
    server = nats_server(dep)
    server.start()
    store = open_store(dep)
    km_bus = modes_bus = None
    proc = None
    try:
        modes_bus = await server_connect(dep, "modes")
        await set_mode(modes_bus, "certificate-management", dep)
        km_bus = await server_connect(dep, "km")
        km = KmService(build_km(dep, store, clock, passphrase=PASSPHRASE), km_bus, identity=km_identity(dep))
        await km.start()
        https, http, egress = free_port(), free_port(), free_port()
        (dep.root / "cm.toml").write_text(
            f"https_port = {https}\nhttp_port = {http}\negress_port = {egress}\n"
            'allow_origins = ["https://repo.example.com"]\n[limits]\nidle_timeout = 5\nretry_after = 3\n'
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "iotdlm.cli.cm", "serve", "--data", str(dep.root),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        assert proc.stdout is not None
        seen = b""
        async with asyncio.timeout(30):
            while b"egress proxy" not in seen:
                line = await proc.stdout.readline()
                assert line, seen
                seen += line
        async with EstClient(
            f"https://127.0.0.1:{https}", trust_anchor_pem=(dep.root / "ca" / "root.pem").read_bytes()
        ) as c:
            assert len(await c.cacerts()) == 4
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{http}/crl/operational/3.crl") as resp:
                assert resp.status == 200
            # the egress proxy answers, and refuses what is not allowed (and sm's mode is not on)
            async with s.get("http://127.0.0.1:1/", proxy=f"http://127.0.0.1:{egress}") as resp:
                assert resp.status in (403, 503)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        await km.stop()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        for bus in (km_bus, modes_bus):
            if bus is not None:
                await bus.close()
        store.close()
        server.stop()


async def server_connect(dep: Deployment, name: str) -> Bus:
    from iotdlm.runtime import connect_identity

    bus, _ident = await connect_identity(dep, name)
    return bus


@pytest.mark.real_clock
async def test_a_port_in_use_fails_start_and_releases_everything(site: Site) -> None:
    config = CmConfig(https_port=site.cm.https_port, http_port=None)
    other = await CmService.from_deployment(site.dep, config)
    with pytest.raises(OSError, match="address already in use"):
        await other.start()
    assert other.bus is None  # closed by the failed start
    async with site.est() as est:  # the first cm is unaffected
        assert await est.cacerts()


@pytest.mark.real_clock
async def test_cm_refuses_what_the_operation_mode_forbids(site: Site) -> None:
    """Defence in depth (Table 1): cm watches the mode itself. EST only in certificate-management,
    egress for sm only in software-management, nothing at all in the provisioning modes."""
    fkey, factory = await site.factory("dev-m")
    guard = site.cm.app.mode
    assert isinstance(guard, ModeGuard)
    modes_bus = site.buses[1]
    assert site.cm.egress is not None
    proxy = site.cm.egress.url

    async def egress_status() -> int:
        async with aiohttp.ClientSession() as http, http.get("http://127.0.0.1:1/x", proxy=proxy) as resp:
            return resp.status

    # certificate-management: devices enroll; sm may not reach out
    assert await egress_status() == 503
    async with site.est(fkey, factory) as est:
        await est.simpleenroll(make_csr(generate_key(Algorithm.P256), "dev-m"))

    # software-management: sm reaches out (the allowed origin is unreachable: 502, but admitted);
    # devices cannot enroll; OCSP, CRLs and /cacerts are still served
    await set_mode(modes_bus, "software-management", site.dep)
    await guard.wait_for("software-management")
    assert await egress_status() == 502
    async with site.est(fkey, factory) as est:
        with pytest.raises(EstUnavailableError, match="software-management"):
            await est.simpleenroll(make_csr(generate_key(Algorithm.P256), "dev-m"))
        assert await est.cacerts()

    # a provisioning mode: cm should not run at all; if it does, it refuses everything
    await set_mode(modes_bus, "provisioning-certificate", site.dep)
    await guard.wait_for("provisioning-certificate")
    async with site.est() as est:
        with pytest.raises(EstUnavailableError, match="provisioning-certificate"):
            await est.cacerts()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{site.http}/crl/operational/0.crl") as resp:
            assert resp.status == 503
        req = ocsp.OCSPRequestBuilder().add_certificate(factory, site.dep.ca_certificate("factory"), _sha1()).build()
        async with http.post(
            f"{site.http}/ocsp",
            data=req.public_bytes(serialization.Encoding.DER),
            headers={"Content-Type": "application/ocsp-request"},
        ) as resp:
            assert resp.status == 200
            assert ocsp.load_der_ocsp_response(await resp.read()).response_status is ocsp.OCSPResponseStatus.TRY_LATER
    assert await egress_status() == 503

    # no mode at all (the supervisor stopped): deny by default
    kv = await modes_bus.key_value(subjects.MODE_BUCKET)
    await kv.delete(subjects.MODE_KEY)
    await guard.wait_for(None)
    async with site.est() as est:
        with pytest.raises(EstUnavailableError, match="unknown"):
            await est.cacerts()


# --- TLS alerts (RFC 8446 6.2) --------------------------------------------------------------------
def _client_certificates(site: Site) -> dict[str, tuple[PrivateKey, x509.Certificate]]:
    """An expired operational certificate of ours, and a certificate from a foreign CA."""
    from iotdlm.pki.profiles import DEFAULT_PROFILES
    from tests.helpers import make_pki

    cas = site.dep.load_cas(PASSPHRASE)
    now = site.clock.now()
    key = generate_key(Algorithm.P256)
    expired = cas["operational"].issue(
        DEFAULT_PROFILES["operational"], key.public_key(), device_subject("dev-old", "T", DTYPE),
        now=now - dt.timedelta(days=200), serial=x509.random_serial_number(),
        uris=[device_uri("dev-old", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )  # fmt: skip
    foreign = make_pki().cas["factory"].issue(
        DEFAULT_PROFILES["factory"], key.public_key(), device_subject("dev-s", "T", DTYPE),
        now=now, serial=x509.random_serial_number(),
        uris=[device_uri("dev-s", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )  # fmt: skip
    return {"expired": (key, expired), "foreign": (key, foreign)}


@pytest.mark.real_clock
@needs_openssl
@pytest.mark.openssl
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
async def test_a_refused_client_certificate_gets_a_tls_alert_openssl(site: Site, version: str) -> None:
    """openssl s_client prints the alert it received; a dropped connection prints none."""
    root = site.write("root.pem", site.root_pem)
    expected = {"expired": b"alert certificate expired", "foreign": b"alert unknown ca"}
    for kind, (key, cert) in _client_certificates(site).items():
        site.write(f"{kind}.pem", certs_to_pem([cert]))
        site.write(f"{kind}.key", private_key_to_pem(key, None))
        r = await asyncio.to_thread(
            subprocess.run,
            ["openssl", "s_client", version, "-connect", f"127.0.0.1:{site.cm.https_port}", "-CAfile", str(root),
             "-cert", str(site.files / f"{kind}.pem"), "-key", str(site.files / f"{kind}.key"), "-ign_eof"],
            input=b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: cm\r\nConnection: close\r\n\r\n",
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        out = r.stdout + r.stderr
        assert expected[kind] in out, (kind, version, out.decode(errors="replace")[-2000:])


async def _first_byte(site: Site, ctx: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", site.cm.https_port, ssl=ctx)
    try:
        writer.write(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: cm\r\n\r\n")
        await writer.drain()
        return await reader.read(1)  # TLS 1.3: the client learns of the refusal on its first read
    finally:
        writer.close()


@pytest.mark.real_clock
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_refused_client_certificate_gets_a_tls_alert_python(site: Site, version: ssl.TLSVersion) -> None:
    """Python's ssl as the client: an SSLError naming the alert, not an EOF."""
    for kind, (key, cert) in _client_certificates(site).items():
        ctx = ssl.create_default_context(cadata=site.root_pem.decode())
        ctx.check_hostname = False
        ctx.minimum_version = ctx.maximum_version = version
        site.write(f"{kind}.pem", certs_to_pem([cert]))
        site.write(f"{kind}.key", private_key_to_pem(key, None))
        ctx.load_cert_chain(str(site.files / f"{kind}.pem"), str(site.files / f"{kind}.key"))
        with pytest.raises(ssl.SSLError) as info:
            await _first_byte(site, ctx)
        alert = {"expired": "CERTIFICATE_EXPIRED", "foreign": "UNKNOWN_CA"}[kind]
        assert alert in str(info.value), (kind, version, info.value)


# --- HTTP versions ---------------------------------------------------------------------------------
async def _raw_exchange(site: Site, listener: str, request: bytes) -> bytes:
    """Send ``request`` on a raw connection to one listener; everything cm sends until it closes."""
    if listener == "https":
        ctx = ssl.create_default_context(cadata=site.root_pem.decode())
        ctx.check_hostname = False
        reader, writer = await asyncio.open_connection("127.0.0.1", site.cm.https_port, ssl=ctx)
    else:
        assert site.cm.http_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", site.cm.http_port)
    writer.write(request)
    await writer.drain()
    try:
        return await _closed_by_server(reader, within=15)
    finally:
        writer.close()


@pytest.mark.real_clock
@pytest.mark.parametrize("listener", ["http", "https"])
async def test_http_0_9_and_unknown_versions_are_refused(site: Site, listener: str) -> None:
    """An HTTP/0.9 request line (no version) or a version cm does not speak: 505 in HTTP/1.1, then
    the connection is closed (RFC 9110 15.6.6). HTTP/1.0 and 1.1 are served."""
    path = "/crl/operational/0.crl"
    for line in (f"GET {path}\r\n\r\n", f"GET {path} HTTP/0.9\r\n\r\n", f"GET {path} HTTP/2.0\r\n\r\n"):
        sent = await _raw_exchange(site, listener, line.encode())
        assert sent.startswith(b"HTTP/1.1 505 "), (line, sent[:200])
        head, _, body = sent.partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower(), head
        assert b"HTTP/1.0" in body
        assert b"Traceback" not in body
    for version in (b"1.0", b"1.1"):
        sent = await _raw_exchange(
            site, listener, b"GET " + path.encode() + b" HTTP/" + version + b"\r\nHost: cm\r\nConnection: close\r\n\r\n"
        )
        assert sent.startswith(b"HTTP/" + version + b" 200 "), sent[:200]


# --- OCSP errors as OCSP clients see them -------------------------------------------------------------
@pytest.mark.real_clock
@needs_openssl
@pytest.mark.openssl
async def test_openssl_ocsp_reads_try_later_when_km_is_away(site: Site) -> None:
    """With HTTP 503 (before) openssl ocsp reported a transport error and never read the OCSP
    status; with 200 it prints the responder's tryLater, over both listeners."""
    _fkey, factory = await site.factory("dev-t")
    issuer = site.write("factory-ca.pem", (site.dep.root / "ca" / "factory.pem").read_bytes())
    leaf = site.write("leaf.pem", certs_to_pem([factory]))
    await site.buses[0].close()  # km leaves
    for base in (site.http, site.https):
        r = await _run(
            "openssl", "ocsp", "-url", f"{base}/ocsp", "-issuer", str(issuer), "-cert", str(leaf),
            "-CAfile", str(site.write("root.pem", site.root_pem)), *attime(), *ocsp_window(),
        )  # fmt: skip
        out = r.stdout + r.stderr
        assert b"Responder Error: trylater (3)" in out, (base, out)


# --- AIA caIssuers ------------------------------------------------------------------------------------
@pytest.mark.real_clock
@needs_curl
@needs_openssl
@pytest.mark.openssl
async def test_ca_certificates_at_their_ca_issuers_urls(site: Site) -> None:
    """``{public_url}/ca/{name}.crt`` over both listeners: the DER certificate (RFC 5280
    4.2.2.1, application/pkix-cert) that openssl reads; an unknown name is 404."""
    root = site.write("root.pem", site.root_pem)
    for base in (site.http, site.https):
        for name in ("root", "factory", "operational", "service"):
            out = site.files / f"{name}.der"
            r = await _run(
                "curl", "-sS", "--fail", "--cacert", str(root), "-o", str(out), "-w", "%{content_type}",
                f"{base}/ca/{name}.crt",
            )  # fmt: skip
            assert r.returncode == 0, (base, name, r.stderr)
            assert r.stdout == b"application/pkix-cert"
            assert out.read_bytes() == der(site.dep.ca_certificate(name))
            r = await _run("openssl", "x509", "-inform", "DER", "-in", str(out), "-noout", "-subject")
            assert r.returncode == 0, r.stderr
        r = await _run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(root),
                       f"{base}/ca/nobody.crt")  # fmt: skip
        assert r.stdout == b"404"


# --- cm's HTTPS certificate names its public host ----------------------------------------------------
async def _curl_status(site: Site, host: str, cacert: Path) -> subprocess.CompletedProcess[bytes]:
    """curl WITHOUT -k: it checks the chain against ``cacert`` and the host name against the certificate."""
    port = site.cm.https_port
    return await _run(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(cacert),
        "--resolve", f"{host}:{port}:127.0.0.1", f"https://{host}:{port}{WELL_KNOWN}/cacerts",
    )  # fmt: skip


@pytest.mark.real_clock
@needs_curl
async def test_curl_checks_the_host_name_of_cms_certificate(tmp_path: Path) -> None:
    """The deployment's public URL names cm.example.test (and init --cm-name alt.example.test): curl
    reaches cm by those names, with no -k; a name not in the certificate fails the host-name check."""
    async with open_site(tmp_path, public_url="https://cm.example.test:8443", cm_names=("alt.example.test",)) as site:
        root = site.write("root.pem", site.root_pem)
        for host in ("cm.example.test", "alt.example.test", "localhost"):
            r = await _curl_status(site, host, root)
            assert r.stdout == b"200", (host, r.stderr)
        r = await _curl_status(site, "other.example.test", root)
        assert r.returncode == 60, (r.returncode, r.stderr)  # CURLE_PEER_FAILED_VERIFICATION
        assert b"other.example.test" in r.stderr
        assert b"200" not in r.stdout


def _public_ca_pair(files: Path, host: str, *, eku: ExtendedKeyUsageOID | None = None) -> tuple[Path, Path, Path]:
    """A separate "public" CA (root + intermediate) and a server certificate for ``host`` from it:
    (its root, the chain file cm serves, the key file)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = SystemClock().now()

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject: str, issuer: str, key: PrivateKey, signer: PrivateKey, *, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if ca:
            b = b.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([eku or ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return b.sign(signer, hashes.SHA256())  # type: ignore[arg-type]

    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = build("Public Root", "Public Root", root_key, root_key, ca=True)
    mid = build("Public Issuing CA", "Public Root", mid_key, root_key, ca=True)
    leaf = build(host, "Public Issuing CA", leaf_key, mid_key, ca=False)
    root_path = files / "public-root.pem"
    root_path.write_bytes(certs_to_pem([root]))
    chain_path = files / "public-chain.pem"
    chain_path.write_bytes(certs_to_pem([leaf, mid]))
    key_path = files / "public-key.pem"
    key_path.write_bytes(private_key_to_pem(leaf_key, None))
    return root_path, chain_path, key_path


@pytest.mark.real_clock
@needs_curl
async def test_cm_serves_an_operator_supplied_certificate(tmp_path: Path) -> None:
    """cm with a chain and key from a separate "public" CA: curl trusts that CA's root only and
    checks the name; devices still present client certificates of our own CAs."""
    files = tmp_path / "public"
    files.mkdir()
    public_root, chain, key = _public_ca_pair(files, "est.public.test")
    async with open_site(tmp_path, public_url="https://est.public.test", tls_files=(chain, key)) as site:
        r = await _curl_status(site, "est.public.test", public_root)
        assert r.stdout == b"200", r.stderr
        r = await _curl_status(site, "est.public.test", site.write("root.pem", site.root_pem))
        assert r.returncode == 60, r.stderr  # our root does not vouch for the public certificate
        # a device enrolls over it with its factory certificate (checked against our CAs)
        fkey, factory = await site.factory("dev-pub")
        site.write("f.pem", certs_to_pem([factory]))
        site.write("f.key", private_key_to_pem(fkey, None))
        csr_der = make_csr(generate_key(Algorithm.P256), "dev-pub")
        site.write("csr.b64", base64.encodebytes(csr_der))
        port = site.cm.https_port
        proof = await _curl_proof(
            f"https://est.public.test:{port}{WELL_KNOWN}", "simpleenroll", site.files / "f.pem", site.files / "f.key",
            site.write("csr.der", csr_der), f"--cacert {public_root} --resolve est.public.test:{port}:127.0.0.1",
        )  # fmt: skip
        r = await _run(
            "curl", "-H", f"Iotdlm-Est-Proof: {proof}", "-sS", "-o", str(site.files / "out.b64"), "-w", "%{http_code}",
            "--cacert", str(public_root),
            "--resolve", f"est.public.test:{port}:127.0.0.1", "--cert", str(site.files / "f.pem"),
            "--key", str(site.files / "f.key"), "--data-binary", f"@{site.files / 'csr.b64'}",
            "-H", "Content-Type: application/pkcs10", f"https://est.public.test:{port}{WELL_KNOWN}/simpleenroll",
        )  # fmt: skip
        assert r.stdout == b"200", (r.stderr, (site.files / "out.b64").read_bytes())
        issued = pkcs7.load_der_pkcs7_certificates(base64.b64decode((site.files / "out.b64").read_bytes()))
        issued[0].verify_directly_issued_by(site.dep.ca_certificate("operational"))


def _unservable_pairs(tmp_path: Path) -> tuple[Deployment, Path, Path, Path]:
    """A deployment; a pair from a public CA without serverAuth; a good chain; a key of nothing."""
    files = tmp_path / "public"
    files.mkdir()
    _root, chain, key = _public_ca_pair(files, "est.public.test", eku=ExtendedKeyUsageOID.CLIENT_AUTH)
    (files / "client-chain.pem").write_bytes(chain.read_bytes())
    (files / "client-key.pem").write_bytes(key.read_bytes())
    _root, good_chain, _good_key = _public_ca_pair(files, "est.public.test")
    other = files / "other-key.pem"
    other.write_bytes(private_key_to_pem(generate_key(Algorithm.P256), None))
    dep, _ = init_deployment(
        tmp_path / "d", organization="T", algorithm=Algorithm.P256, dtypes=[], passphrase=PASSPHRASE,
        now=SystemClock().now(),
    )  # fmt: skip
    return dep, files / "client-chain.pem", good_chain, other


def test_cm_serve_refuses_an_operator_pair_it_cannot_serve(tmp_path: Path) -> None:
    """`cm serve --tls-cert --tls-key` with a certificate without serverAuth: exit 4, one clear line."""
    from click.testing import CliRunner

    from iotdlm.cli.cm import cm

    dep, client_chain, _good, _other = _unservable_pairs(tmp_path)
    key = client_chain.with_name("client-key.pem")
    out = CliRunner().invoke(
        cm, ["serve", "--data", str(dep.root), "--tls-cert", str(client_chain), "--tls-key", str(key)],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert out.exit_code == 4, out.output
    assert "lacks serverAuth" in out.output
    assert "Traceback" not in out.output
    half = CliRunner().invoke(cm, ["serve", "--data", str(dep.root), "--tls-cert", str(client_chain)])
    assert half.exit_code == 4
    assert "both --tls-cert and --tls-key" in half.output
    # the same from cm.toml (paths relative to the data folder)
    (dep.root / "cm.toml").write_text(f'tls_cert = "{client_chain}"\ntls_key = "{key}"\n')
    out = CliRunner().invoke(cm, ["serve", "--data", str(dep.root)], env={"COLUMNS": "200"})
    assert out.exit_code == 4, out.output
    assert "lacks serverAuth" in out.output


async def test_cm_refuses_an_operator_pair_it_cannot_serve(tmp_path: Path) -> None:
    """A certificate without serverAuth, a key of another certificate, a missing file: cm does not
    start, and says why (ServerCertificateError)."""
    from iotdlm.cm_https import ServerCertificateError

    dep, client_chain, good_chain, other = _unservable_pairs(tmp_path)
    key = client_chain.with_name("client-key.pem")
    with pytest.raises(ServerCertificateError, match="lacks serverAuth"):
        await CmService.from_deployment(dep, CmConfig(tls_cert=client_chain, tls_key=key))
    with pytest.raises(ServerCertificateError, match="does not belong"):
        await CmService.from_deployment(dep, CmConfig(tls_cert=good_chain, tls_key=other))
    with pytest.raises(ServerCertificateError, match="--tls-key"):
        await CmService.from_deployment(dep, CmConfig(tls_cert=good_chain, tls_key=tmp_path / "missing.pem"))


@pytest.mark.real_clock
async def test_cm_asks_km_for_the_registered_factory_cas(site: Site) -> None:
    """The external factory CAs registered for a trust transfer reach cm's TLS trust through km's
    signed reply on ``km.ca.factory_cas`` (cm imports neither km nor the store: lint-imports keeps
    it so); a CA registered after cm started needs a cm restart."""
    from iotdlm.km.registry import FactoryRegistry
    from tests.helpers import make_pki

    external = make_pki().root
    assert der(external) not in site.cm.tls.get_ca_certs(binary_form=True)
    FactoryRegistry(site.store, site.clock).register_cas([external], actor="test")
    km = await site.client("cm")
    assert [der(c) for c in await km.factory_cas()] == [der(external)]
    restarted = await CmService.from_deployment(site.dep, CmConfig(https_port=0, http_port=None), clock=site.clock)
    try:
        await restarted.start()

        async def trusted() -> None:
            while der(external) not in restarted.tls.get_ca_certs(binary_form=True):  # noqa: ASYNC110 - set by cm
                await asyncio.sleep(0.02)

        await asyncio.wait_for(trusted(), 10)
    finally:
        await restarted.stop()


@pytest.mark.real_clock
async def test_attack_revoked_supervisor_and_km_certificates_are_refused(site: Site) -> None:
    """Issue 11 leftover: the supervisor's (modes) key and km's key are stolen, and the operator
    revokes their certificates. A service that checks the mode afterwards refuses the mode record
    signed by the revoked supervisor certificate, and a client refuses km's replies signed by the
    revoked km certificate: both fetch the service CA's CRLs from km's VA (full and delta of the
    certificate's partition, verified against the service CA) and publish a signer alarm, which
    the supervisor writes to the audit log."""
    alarms: asyncio.Queue[tuple[str, dict[str, str]]] = asyncio.Queue()
    listener = await site.nats.connect("admin")
    site.buses.append(listener)

    async def on_alarm(m: object) -> None:
        alarms.put_nowait((m.subject, json.loads(m.data)))  # type: ignore[attr-defined]

    await listener.subscribe(subjects.events("*", subjects.SIGNER_ALARM), on_alarm)  # type: ignore[arg-type]
    admin = await site.client("admin")
    supervisor = site.dep.identity(subjects.SUPERVISOR).certificate
    await admin.revoke(serial=format(supervisor.serial_number, "x"), issuer="service", reason="keyCompromise")

    bus = await site.nats.connect("cm")
    site.buses.append(bus)
    async with ModeGuard(bus, ModeVerifier.for_deployment(site.dep, site.clock)) as guard:
        assert guard.mode is None
        assert guard.problem is not None
        assert "is revoked" in guard.problem
        with pytest.raises(ModeError, match="cannot be trusted"):
            guard.require({"certificate-management"}, "serving EST")
    subject, alarm = await asyncio.wait_for(alarms.get(), 10)
    assert subject == subjects.events("cm", subjects.SIGNER_ALARM)
    assert alarm["signer"] == subjects.SUPERVISOR
    assert format(supervisor.serial_number, "x") in alarm["reason"]

    km_cert = site.dep.identity("km").certificate
    await admin.revoke(serial=format(km_cert.serial_number, "x"), issuer="service", reason="keyCompromise")
    fresh = await site.client("admin")  # a client started after the revocation (no CRL cached)
    with pytest.raises(UntrustedError, match="is revoked"):
        await fresh.chain()
    subject, alarm = await asyncio.wait_for(alarms.get(), 10)
    assert alarm["signer"] == "km"
    assert format(km_cert.serial_number, "x") in alarm["reason"]
