"""sm against the vendor repository served on loopback (RepositoryServer, real HTTP and HTTPS),
through HttpFetcher: Algorithm 2 end to end, every attack of 3.1.3 refused with nothing stored,
Req.6 proven on the requests the server received, pm's API on a real nats-server, the CLI."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from securesystemslib.signer import CryptoSigner
from tuf.api._payload import Targets

from iotdlm import software
from iotdlm.bus import subjects as s
from iotdlm.cli.sm import sm as sm_cli
from iotdlm.client.sm import SmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.errors import BadSignatureError, ReplayError, TooLargeError, UnavailableError, UntrustedError
from iotdlm.pki.keys import Algorithm
from iotdlm.repository import VendorRepository
from iotdlm.repository.server import RepositoryServer
from iotdlm.sm import HttpFetcher, NoEgressFetcher, SoftwareManager
from iotdlm.sm.fetcher import EGRESS_CLOSED
from iotdlm.sm.service import SmService
from tests.fixtures_nats import NatsBusFactory
from tests.helpers import make_pki, pem
from tests.unit.test_software_check import add_target, forge_role

NOW = SystemClock().now().replace(microsecond=0)
PKI = make_pki(now=NOW - dt.timedelta(days=1))
SM = PKI.module("sm", now=NOW - dt.timedelta(days=1))
DTYPE = "boardA"
KEY = os.urandom(32)


@dataclass
class Served:
    tmp: Path
    repo: VendorRepository
    server: RepositoryServer
    image: Path

    def manager(self, *, fetcher: Any = None, trusted_root: bytes | None = None) -> SoftwareManager:
        return SoftwareManager(
            self.tmp / "sm",
            repository_url=self.server.url,
            trusted_root=trusted_root if trusted_root is not None else self.repo.trusted_root(),
            fetcher=fetcher if fetcher is not None else HttpFetcher(),
            key=SM.key,
            sealer=SM.sealer,
            meta_key=KEY,
            clock=SystemClock(),
        )

    def publish(self, counter: int, data: bytes | None = None, name: str = "fw.bin") -> bytes:
        data = data if data is not None else os.urandom(300_000 + counter % 1000)
        self.image.write_bytes(data)
        self.repo.publish(DTYPE, counter, self.image, now=NOW, name=name)
        return data

    def stored(self) -> list[int]:
        folder = self.tmp / "sm" / DTYPE
        return sorted(int(p.name) for p in folder.iterdir()) if folder.is_dir() else []

    def nothing_staged(self) -> bool:
        tmp = self.tmp / "sm" / "_tmp"
        return not tmp.exists() or not any(tmp.iterdir())


def _repo(tmp: Path, name: str = "repo") -> VendorRepository:
    ca = tmp / f"{name}-report-ca.pem"
    ca.write_bytes(pem(PKI.cas["service"].certificate))
    return VendorRepository.init(tmp / name, now=NOW, report_ca=ca)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    repo = _repo(tmp_path)
    async with RepositoryServer(repo) as server:
        yield Served(tmp_path, repo, server, tmp_path / "fw.bin")


async def check(sm: SoftwareManager, dtype: str = DTYPE) -> Any:
    """sm is synchronous (urllib3): run it off the loop that serves the repository."""
    return await asyncio.to_thread(sm.check, dtype)


# --- Algorithm 2 over HTTP --------------------------------------------------------------------------
async def test_newer_release_is_found_verified_stored_and_reported(served: Served) -> None:
    data = served.publish(3)
    result = await check(served.manager())
    assert (result.outcome, result.latest, result.reported) == ("stored", 3, True)
    folder = served.tmp / "sm" / DTYPE / "3"
    assert (folder / "image").read_bytes() == data
    assert {p.name for p in folder.iterdir()} == {"image", "meta.enc", "sig_sm", "info.json"}
    meta = software.decrypt_meta((folder / "meta.enc").read_bytes(), KEY, DTYPE, 3)
    out = software.verify_software(
        folder / "image", meta, (folder / "sig_sm").read_bytes(), SM.key.public_key(), served.repo.trusted_root(),
        dtype=DTYPE,
    )  # fmt: skip
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    (report,) = served.repo.reports()
    assert (report.dtype, report.release_counter, report.target_path) == (DTYPE, 3, f"{DTYPE}/fw.bin")
    assert (report.sha256, report.length, report.reporter) == (out.sha256, len(data), "sm")
    posts = [r for r in served.server.requests if r.method == "POST"]
    assert [(r.path, dict(r.headers).get("Content-Type")) for r in posts] == [("/reports", "application/jose")]


async def test_same_or_older_is_ignored(served: Served) -> None:
    served.publish(3)
    sm = served.manager()
    assert (await check(sm)).outcome == "stored"
    assert (await check(sm)).outcome == "up_to_date"
    forge_role(served.repo, DTYPE, add_target(f"{DTYPE}/old.bin", b"old", {"hardware_id": DTYPE, "release_counter": 1}))
    result = await check(sm)
    assert (result.outcome, result.latest, result.current) == ("up_to_date", 3, 3)
    assert served.stored() == [3]
    assert len(served.repo.reports()) == 1


async def test_check_requests_reveal_no_installed_version(served: Served) -> None:
    """Req.6: with release 424242 installed, a check (and the download of 424243) sends nothing
    that carries 424242: no URL, query, header or body -- the signed report's payload included."""
    served.publish(424242)
    sm = served.manager()
    assert (await check(sm)).current == 424242
    served.publish(424243)
    served.server.requests.clear()
    result = await check(sm)
    assert (result.outcome, result.current) == ("stored", 424243)
    seen: list[str] = []
    for r in served.server.requests:
        seen += [r.method, r.path, r.query, *(f"{k}: {v}" for k, v in r.headers)]
        seen.append(r.body.decode("latin-1"))
        if r.method == "POST":  # the JWS: look inside its header and payload too
            for part in r.body.split(b".")[:2]:
                seen.append(base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4)).decode("latin-1"))
    assert not [x for x in seen if "424242" in x]
    # and what was asked for: TUF metadata, the new image, the report -- nothing else
    gets = [r.path for r in served.server.requests if r.method == "GET"]
    assert all(p.startswith("/metadata/") or p.startswith(f"/targets/{DTYPE}/") for p in gets)
    assert [p for p in gets if p.startswith("/targets/")] == [f"/targets/{DTYPE}/{result.stored.sha256}.fw.bin"]
    assert all(r.query == "" for r in served.server.requests)
    assert all(r.body == b"" for r in served.server.requests if r.method == "GET")
    assert {k.lower() for r in served.server.requests if r.method == "GET" for k, _ in r.headers} <= {
        "host", "user-agent", "accept-encoding",
    }  # fmt: skip


async def test_rollback_to_a_lower_release_is_refused(served: Served) -> None:
    served.publish(3, name="a.bin")
    served.publish(5, name="b.bin")
    sm = served.manager()
    assert (await check(sm)).latest == 5

    def drop(t: Targets) -> None:
        del t.targets[f"{DTYPE}/b.bin"]

    forge_role(served.repo, DTYPE, drop)
    with pytest.raises(ReplayError, match="rollback attempt"):
        await check(sm)
    assert served.stored() == [5]


async def test_expired_metadata_is_refused(served: Served) -> None:
    """Freeze attack: the repository keeps serving metadata that has expired."""
    served.publish(3)
    served.repo.set_expiry("timestamp", dt.timedelta(minutes=-1))
    served.repo.refresh(now=NOW)
    with pytest.raises(UntrustedError) as info:
        await check(served.manager())
    assert info.value.field == "meta_repo"
    assert "timestamp.json is expired" in info.value.message
    assert served.stored() == []
    assert not [r for r in served.server.requests if r.path.startswith("/targets/")]


async def test_image_altered_at_the_repository_is_refused(served: Served) -> None:
    served.publish(3)
    (file,) = (served.repo.targets_dir / DTYPE).iterdir()
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(BadSignatureError) as info:
        await check(served.manager())
    assert info.value.field == "image"
    assert "altered" in info.value.message
    assert served.stored() == []
    assert served.nothing_staged()
    assert served.repo.reports() == []


async def test_server_sending_more_than_the_signed_length_is_cut_off(served: Served) -> None:
    served.publish(3)
    (file,) = (served.repo.targets_dir / DTYPE).iterdir()
    with file.open("ab") as f:
        f.write(os.urandom(4 * 1024 * 1024))
    with pytest.raises(TooLargeError) as info:
        await check(served.manager())
    assert info.value.field == "image"
    assert served.stored() == []
    assert served.nothing_staged()


async def test_metadata_of_another_repository_is_refused(served: Served) -> None:
    """The trust anchor is a second repository's root: everything the first signs is refused."""
    served.publish(3)
    other = _repo(served.tmp, "other")
    with pytest.raises(BadSignatureError) as info:
        await check(served.manager(trusted_root=other.trusted_root()))
    assert info.value.field == "meta_repo"
    assert "wrong key" in info.value.message
    assert served.stored() == []


async def test_role_rewritten_with_another_key_is_refused(served: Served) -> None:
    served.publish(3)
    forge_role(served.repo, DTYPE, lambda t: None, signers=[CryptoSigner.generate_ecdsa()])
    with pytest.raises(BadSignatureError, match="dtype-boardA was signed by 0/1 keys"):
        await check(served.manager())
    assert served.stored() == []


async def test_wrong_hardware_id_is_refused(served: Served) -> None:
    served.publish(3)
    forge_role(served.repo, DTYPE, add_target(f"{DTYPE}/x.bin", b"x", {"hardware_id": "boardB", "release_counter": 4}))
    with pytest.raises(UntrustedError) as info:
        await check(served.manager())
    assert info.value.field == "hardware_id"
    assert served.stored() == []


async def test_no_egress_stores_nothing(served: Served) -> None:
    served.publish(3)
    with pytest.raises(UnavailableError) as info:
        await check(served.manager(fetcher=NoEgressFetcher()))
    assert info.value.message == EGRESS_CLOSED
    assert served.server.requests == []
    assert served.stored() == []


async def test_repository_down_is_unavailable(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    async with RepositoryServer(repo) as server:
        url = server.url
    sm = SoftwareManager(
        tmp_path / "sm", repository_url=url, trusted_root=repo.trusted_root(), fetcher=HttpFetcher(retries=0),
        key=SM.key, sealer=SM.sealer, meta_key=KEY, clock=SystemClock(),
    )  # fmt: skip
    with pytest.raises(UnavailableError, match=r"cannot reach http://127\.0\.0\.1"):
        await check(sm)


async def test_local_repository_alterations_are_named_by_algorithm_1(served: Served) -> None:
    served.publish(3)
    await check(served.manager())
    folder = served.tmp / "sm" / DTYPE / "3"
    image, enc, sig = (
        (folder / "image").read_bytes(),
        (folder / "meta.enc").read_bytes(),
        (folder / "sig_sm").read_bytes(),
    )
    root, pk = served.repo.trusted_root(), SM.key.public_key()
    meta = software.decrypt_meta(enc, KEY, DTYPE, 3)

    bad_image = bytearray(image)
    bad_image[12345] ^= 0x80
    (folder / "image").write_bytes(bytes(bad_image))
    with pytest.raises(BadSignatureError) as info:
        software.verify_software(folder / "image", meta, sig, pk, root, dtype=DTYPE)
    assert info.value.field == "sig_sm"
    assert "the image was altered" in info.value.message
    (folder / "image").write_bytes(image)

    bad_enc = bytearray(enc)
    bad_enc[40] ^= 1
    with pytest.raises(BadSignatureError) as info:
        software.decrypt_meta(bytes(bad_enc), KEY, DTYPE, 3)
    assert info.value.field == "meta_enc"

    bad_sig = bytearray(sig)
    bad_sig[10] ^= 1
    with pytest.raises(BadSignatureError) as info:
        software.verify_software(folder / "image", meta, bytes(bad_sig), pk, root, dtype=DTYPE)
    assert info.value.field == "sig_sm"
    assert software.verify_software(folder / "image", meta, sig, pk, root, dtype=DTYPE).release_counter == 3


# --- HttpFetcher: TLS and its own length cap --------------------------------------------------------------
def _tls(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    ident = PKI.tls_server("repository", now=NOW - dt.timedelta(days=1))  # SAN 127.0.0.1, serverAuth
    from iotdlm.pki.keys import private_key_to_pem

    cert, key = tmp / "repo-cert.pem", tmp / "repo-key.pem"
    cert.write_bytes(pem(ident.cert) + pem(PKI.cas["service"].certificate))
    key.write_bytes(private_key_to_pem(ident.key, None))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    bundle = tmp / "ca-bundle.pem"
    bundle.write_bytes(pem(PKI.root))
    return ctx, bundle


@pytest.mark.real_clock
async def test_https_with_a_ca_bundle(tmp_path: Path) -> None:
    ctx, bundle = _tls(tmp_path)
    repo = _repo(tmp_path)
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(100_000))
    repo.publish(DTYPE, 2, image, now=NOW)
    async with RepositoryServer(repo, ssl_context=ctx) as server:
        assert server.url.startswith("https://127.0.0.1:")

        def manager(fetcher: HttpFetcher) -> SoftwareManager:
            return SoftwareManager(
                tmp_path / "sm", repository_url=server.url, trusted_root=repo.trusted_root(), fetcher=fetcher,
                key=SM.key, sealer=SM.sealer, meta_key=KEY, clock=SystemClock(),
            )  # fmt: skip

        stranger = tmp_path / "stranger.pem"
        stranger.write_bytes(pem(make_pki().root))
        with pytest.raises(UnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await check(manager(HttpFetcher(ca_bundle=stranger, retries=0)))
        result = await check(manager(HttpFetcher(ca_bundle=bundle)))
        assert (result.outcome, result.reported) == ("stored", True)


@pytest.mark.real_clock
async def test_through_cms_egress_proxy_and_not_without_it(tmp_path: Path) -> None:
    """Paper 4.4.1: sm reaches the repository through cm. http is forwarded, https tunnelled
    (TLS end to end); with cm's proxy stopped, sm cannot reach out at all."""
    from iotdlm.cm.config import EgressConfig
    from iotdlm.cm.egress import EgressProxy

    ctx, bundle = _tls(tmp_path)
    repo = _repo(tmp_path)
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(500_000))
    repo.publish(DTYPE, 2, image, now=NOW)
    async with RepositoryServer(repo) as plain, RepositoryServer(repo, ssl_context=ctx) as tls:
        proxy = EgressProxy(EgressConfig((plain.url, tls.url), port=0))
        await proxy.start()
        try:
            for n, (server, ca) in enumerate(((plain, None), (tls, bundle))):
                sm = SoftwareManager(
                    tmp_path / f"sm{n}", repository_url=server.url, trusted_root=repo.trusted_root(),
                    fetcher=HttpFetcher(ca_bundle=ca, proxy_url=proxy.url), key=SM.key, sealer=SM.sealer,
                    meta_key=KEY, clock=SystemClock(),
                )  # fmt: skip
                result = await check(sm)
                assert (result.outcome, result.reported) == ("stored", True)
        finally:
            await proxy.stop()
        sm = SoftwareManager(
            tmp_path / "sm-off", repository_url=plain.url, trusted_root=repo.trusted_root(),
            fetcher=HttpFetcher(proxy_url=proxy.url, retries=0), key=SM.key, sealer=SM.sealer, meta_key=KEY,
            clock=SystemClock(),
        )  # fmt: skip
        before = len(plain.requests)
        with pytest.raises(UnavailableError, match="is cm running"):
            await check(sm)
        assert len(plain.requests) == before
    assert len(repo.reports()) == 2


@pytest.fixture
async def hostile() -> AsyncIterator[str]:
    """A server that streams 8 MiB without Content-Length, and one that announces 8 MiB."""
    sent = {"chunked": 0}

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for _ in range(128):
                await resp.write(b"\0" * 65536)
                sent["chunked"] += 65536
        except ConnectionError:
            pass
        return resp

    async def announced(request: web.Request) -> web.Response:
        return web.Response(body=b"\0" * (8 * 1024 * 1024))

    app = web.Application()
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/announced", announced)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_http_fetcher_cuts_off_what_exceeds_the_cap(hostile: str) -> None:
    fetcher = HttpFetcher(chunk_size=65536)

    def read(path: str) -> int:
        got = 0
        with fetcher.stream(f"{hostile}{path}", max_length=100_000) as chunks:
            for c in chunks:
                got += len(c)
        return got

    with pytest.raises(TooLargeError, match="more than the 100000 bytes allowed; cut off"):
        await asyncio.to_thread(read, "/chunked")
    with pytest.raises(TooLargeError, match="announced as 8388608 bytes"):
        await asyncio.to_thread(read, "/announced")
    with pytest.raises(UnavailableError, match="HTTP 404"):
        await asyncio.to_thread(read, "/nothing")


# --- pm's API on a real nats-server -----------------------------------------------------------------------
@pytest.mark.nats
async def test_list_and_load_over_nats(served: Served, nats_bus_factory: NatsBusFactory) -> None:
    served.publish(3)
    service = SmService(served.manager(), await nats_bus_factory("sm"), dtypes=[DTYPE], poll_interval=None)
    stored: asyncio.Queue[bytes] = asyncio.Queue()
    admin = await nats_bus_factory("admin")

    async def on_event(m: Any) -> None:
        stored.put_nowait(m.data)

    await admin.subscribe(f"{s.EVENTS}.sm.>", on_event)
    await service.start()
    try:
        event = json.loads(await asyncio.wait_for(stored.get(), 20))
        assert (event["kind"], event["release_counter"]) == ("stored", 3)
        pm = SmClient(await nats_bus_factory("pm"))
        (v,) = await pm.list(DTYPE)
        loaded = await pm.load(DTYPE, 3)
        meta = software.decrypt_meta(loaded.meta_enc, KEY, DTYPE, 3)
        out = software.verify_software(
            Path(loaded.image_path), meta, loaded.sig_sm, SM.key.public_key(), served.repo.trusted_root(), dtype=DTYPE
        )
        assert out.sha256 == v.sha256
    finally:
        await service.stop()


# --- the CLI ------------------------------------------------------------------------------------------------
@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    dep, _cas = init_deployment(
        tmp_path / "data", organization="Test", algorithm=Algorithm.P256, dtypes=[DTYPE], passphrase=b"pw",
        now=NOW - dt.timedelta(hours=1),
    )  # fmt: skip
    return dep


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(sm_cli, list(args), catch_exceptions=False, env={"COLUMNS": "240"})


async def test_cli_setup_check_list_show(tmp_path: Path, deployment: Deployment) -> None:
    ca = tmp_path / "dep-service-ca.pem"
    ca.write_bytes(pem(deployment.ca_certificate("service")))
    repo = VendorRepository.init(tmp_path / "repo", now=NOW, report_ca=ca)
    root_file = tmp_path / "1.root.json"
    root_file.write_bytes(repo.trusted_root())
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(2_000_000))
    repo.publish(DTYPE, 11, image, now=NOW)
    data = str(deployment.root)
    async with RepositoryServer(repo) as server:
        r = _invoke("setup", "--data", data, "--repository", server.url, "--root", str(root_file), "--direct")
        assert r.exit_code == 0, r.output
        assert "sm set up" in r.output
        key = deployment.root / "secrets" / "sm-pm.key"
        assert key.stat().st_mode & 0o777 == 0o600
        assert len(key.read_bytes()) == 32
        r = await asyncio.to_thread(_invoke, "check", "--data", data)
        assert r.exit_code == 0, r.output
        assert "stored" in r.output
        assert "reported to the repository" in r.output
        assert [x.reporter for x in repo.reports()] == ["sm"]
        r = await asyncio.to_thread(_invoke, "check", "--data", data)
        assert "up to date" in r.output
        r = _invoke("list", "--data", data)
        assert r.exit_code == 0
        assert f"{DTYPE}/fw.bin" in r.output
        r = _invoke("show", "--data", data, DTYPE)
        assert r.exit_code == 0, r.output
        assert "sig_sm, meta_repo and image verify" in r.output
        (deployment.root / "sm" / DTYPE / "11" / "sig_sm").write_bytes(b"\x30\x06\x02\x01\x01\x02\x01\x01")
        r = _invoke("show", "--data", data, DTYPE, "11")
        assert r.exit_code == 4
        assert "FAILED" in r.output
        assert "sig_sm" in r.output
        # python-tuf's refusal, as one line and an exit code
        repo.set_expiry("timestamp", dt.timedelta(minutes=-1))
        repo.refresh(now=NOW)
        image.write_bytes(os.urandom(1000))
        r = await asyncio.to_thread(_invoke, "check", "--data", data)
        assert r.exit_code == 4
        assert "refused (untrusted)" in r.output
        assert "timestamp.json is expired" in r.output
        assert "[field: meta_repo]" in r.output
        assert "Traceback" not in r.output


def test_cli_errors_are_one_line(tmp_path: Path, deployment: Deployment) -> None:
    data = str(deployment.root)
    r = _invoke("check", "--data", data)
    assert r.exit_code == 4
    assert "sm is not set up" in r.output
    bad = tmp_path / "bad-root.json"
    bad.write_bytes(b"{}")
    r = _invoke("setup", "--data", data, "--repository", "http://127.0.0.1:9", "--root", str(bad))
    assert r.exit_code == 4
    assert "the trusted root is not TUF metadata" in r.output
    assert "Traceback" not in r.output
    for cmd in ("setup", "check", "list", "show", "serve"):
        assert _invoke(cmd, "--help").exit_code == 0
