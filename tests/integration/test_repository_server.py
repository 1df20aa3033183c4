"""The vendor repository over real HTTP on a random loopback port, with python-tuf's OWN client
(ngclient's Updater): interoperability with the reference TUF client, root rotation, expiry,
tampered images; then the server's own duties: no path traversal, bounded reports, a request log.

ngclient checks expiry against the wall clock, so these repositories are signed at the real time.
ngclient is synchronous (urllib3): it runs in a thread while the server runs on the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from tuf.api.exceptions import (
    DownloadLengthMismatchError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
)
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater  # type: ignore[attr-defined]  # re-exported, no __all__

from iotdlm.clock import FixedClock, SystemClock
from iotdlm.pki.keys import private_key_to_pem
from iotdlm.repository import PublishedTarget, VendorRepository, report_body
from iotdlm.repository.server import RepositoryServer
from iotdlm.wire.report import OP_REPORT, REPORT_AUDIENCE
from tests.helpers import NOW, make_pki, pem

PKI = make_pki()
SM = PKI.module("sm")
IMAGE = b"\x7fELF firmware for boardA\n" * 4000


@pytest.fixture
def now() -> dt.datetime:
    return SystemClock().now()


@pytest.fixture
def repo(tmp_path: Path, now: dt.datetime) -> VendorRepository:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pem(PKI.cas["service"].certificate))
    repo = VendorRepository.init(tmp_path / "repo", now=now, report_ca=ca)
    image = tmp_path / "fw.bin"
    image.write_bytes(IMAGE)
    repo.publish("boardA", 1, image, now=now)
    return repo


@pytest.fixture
async def server(repo: VendorRepository) -> AsyncIterator[RepositoryServer]:
    # the report envelope's time window is checked against this clock
    async with RepositoryServer(repo, clock=FixedClock(NOW)) as srv:
        yield srv


def updater(server: RepositoryServer, workdir: Path, bootstrap: bytes) -> Updater:
    (workdir / "metadata").mkdir(parents=True, exist_ok=True)
    return Updater(
        str(workdir / "metadata"),
        metadata_base_url=server.url + "/metadata/",
        target_dir=str(workdir / "targets"),
        target_base_url=server.url + "/targets/",
        bootstrap=bootstrap,
    )


def fetch(server: RepositoryServer, workdir: Path, bootstrap: bytes, path: str) -> bytes:
    """The whole TUF client workflow, in ngclient: refresh, find the target, download and verify it."""
    client = updater(server, workdir, bootstrap)
    client.refresh()
    info = client.get_targetinfo(path)
    assert info is not None, f"{path} not found"
    return Path(client.download_target(info)).read_bytes()


async def raw_get(server: RepositoryServer, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as given (no client-side normalisation of '..' or escapes)."""
    port = urlsplit(server.url).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# --- interoperability with python-tuf's ngclient -----------------------------------------------
async def test_ngclient_finds_the_release_through_the_delegation_and_verifies_it(
    server: RepositoryServer, repo: VendorRepository, tmp_path: Path
) -> None:
    def run() -> tuple[Any, bytes, Any]:
        client = updater(server, tmp_path / "client", repo.trusted_root())
        client.refresh()
        info = client.get_targetinfo("boardA/fw.bin")
        assert info is not None
        data = Path(client.download_target(info)).read_bytes()
        return info.custom, data, client.get_targetinfo("boardB/fw.bin")

    custom, data, missing = await asyncio.to_thread(run)
    assert custom == {"hardware_id": "boardA", "release_counter": 1}
    assert data == IMAGE
    assert missing is None
    # the delegated role was fetched by version, the image by its consistent-snapshot name
    paths = [r.path for r in server.requests]
    assert "/metadata/1.dtype-boardA.json" in paths
    latest = repo.latest("boardA")
    assert latest is not None
    assert f"/targets/{latest.url_path}" in paths


async def test_client_with_the_old_root_follows_rotations(
    server: RepositoryServer, repo: VendorRepository, tmp_path: Path, now: dt.datetime
) -> None:
    old_root = repo.trusted_root()
    workdir = tmp_path / "client"
    assert await asyncio.to_thread(fetch, server, workdir, old_root, "boardA/fw.bin") == IMAGE
    for role in ("root", "timestamp", "snapshot", "targets", "releases", "root"):
        repo.rotate(role, now=now)
    image = tmp_path / "fw-2.bin"
    image.write_bytes(b"release two")
    repo.publish("boardA", 2, image, now=now)

    # same cache, and a fresh client that only has root v1: both update through the chain
    assert await asyncio.to_thread(fetch, server, workdir, old_root, "boardA/fw-2.bin") == b"release two"
    fresh = tmp_path / "fresh"
    assert await asyncio.to_thread(fetch, server, fresh, old_root, "boardA/fw-2.bin") == b"release two"
    trusted = Metadata.from_bytes((fresh / "metadata" / "root.json").read_bytes())
    assert trusted.signed.version == 6  # root, timestamp, snapshot, targets, root: a new root each


@pytest.mark.real_clock
async def test_expired_timestamp_is_refused_by_ngclient(
    server: RepositoryServer, repo: VendorRepository, tmp_path: Path, now: dt.datetime
) -> None:
    repo.set_expiry("timestamp", dt.timedelta(days=-1))
    repo.refresh(now=now)
    with pytest.raises(ExpiredMetadataError):
        await asyncio.to_thread(fetch, server, tmp_path / "client", repo.trusted_root(), "boardA/fw.bin")
    repo.set_expiry("timestamp", dt.timedelta(days=1))
    repo.refresh(now=now)
    assert await asyncio.to_thread(fetch, server, tmp_path / "client2", repo.trusted_root(), "boardA/fw.bin")


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (lambda data: bytes([data[0] ^ 1]) + data[1:], LengthOrHashMismatchError),
        (lambda data: data + b"more", DownloadLengthMismatchError),
    ],
    ids=["same-length", "longer"],
)
async def test_image_altered_at_the_repository_fails_verification(
    server: RepositoryServer, repo: VendorRepository, tmp_path: Path, tamper: Any, error: type[Exception]
) -> None:
    latest = repo.latest("boardA")
    assert latest is not None
    stored = repo.targets_dir / latest.url_path
    stored.write_bytes(tamper(stored.read_bytes()))
    with pytest.raises(error):
        await asyncio.to_thread(fetch, server, tmp_path / "client", repo.trusted_root(), "boardA/fw.bin")
    assert not (tmp_path / "client" / "targets").exists() or not any((tmp_path / "client" / "targets").iterdir())


# --- the server's own checks --------------------------------------------------------------------
async def test_files_outside_the_served_folders_are_404(server: RepositoryServer, repo: VendorRepository) -> None:
    latest = repo.latest("boardA")
    assert latest is not None
    status, body = await raw_get(server, f"/targets/{latest.url_path}")
    assert (status, body) == (200, IMAGE)  # the same request shape does reach real files
    (repo.targets_dir / "boardA" / ".tmp-upload").write_bytes(b"half an image")
    os.symlink(repo.keys_dir, repo.targets_dir / "escape")
    for path in [
        "/targets/../repo.toml",
        "/targets/..%2frepo.toml",
        "/targets/%2e%2e/repo.toml",
        "/targets/%2e%2e%2fkeys%2froot-0.pem",
        "/targets/boardA/../../keys/root-0.pem",
        "/targets/boardA/..%2f..%2fkeys%2froot-0.pem",
        "/targets//etc/passwd",
        "/targets/escape/root-0.pem",
        "/targets/boardA/.tmp-upload",
        "/targets/boardA",
        "/targets/",
        "/targets/boardA/%00",
        "/metadata/../repo.toml",
        "/metadata/..%2frepo.toml",
        "/metadata/%2e%2e%2frepo.toml",
        "/metadata/.lock",
        "/metadata/nope.json",
        "/keys/root-0.pem",
        "/repo.toml",
        "/reports.jsonl",
    ]:
        status, body = await raw_get(server, path)
        assert status == 404, f"{path} -> {status} {body[:80]!r}"
        assert b"BEGIN PRIVATE KEY" not in body


async def test_health(server: RepositoryServer) -> None:
    async with aiohttp.ClientSession() as http, http.get(server.url + "/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


def _token(target: PublishedTarget, nonce: str | None = None) -> bytes:
    return SM.sealer.seal(OP_REPORT, report_body(target, verified_at=NOW), aud=REPORT_AUDIENCE, now=NOW, nonce=nonce)


async def test_reports_over_http(server: RepositoryServer, repo: VendorRepository) -> None:
    target = repo.latest("boardA")
    assert target is not None
    token = _token(target)
    headers = {"Content-Type": "application/jose"}
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/reports", data=token, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["target_path"] == "boardA/fw.bin"
        async with http.post(server.url + "/reports", data=token, headers=headers) as resp:
            assert resp.status == 409
            assert (await resp.json())["code"] == "replay"
        async with http.post(server.url + "/reports", data=b"garbage", headers=headers) as resp:
            assert resp.status == 400
            assert (await resp.json())["code"] == "bad_request"
        other = make_pki().module("sm")
        forged = other.sealer.seal(OP_REPORT, report_body(target, verified_at=NOW), aud=REPORT_AUDIENCE, now=NOW)
        async with http.post(server.url + "/reports", data=forged, headers=headers) as resp:
            assert resp.status == 403
            assert (await resp.json())["code"] == "untrusted"
        async with http.post(server.url + "/reports", data=_token(target), headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
    assert len(repo.reports()) == 1
    assert repo.reports()[0].reporter == "sm"


async def test_oversize_report_is_413(server: RepositoryServer, repo: VendorRepository) -> None:
    big = b"x" * (64 * 1024 + 1)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    async with aiohttp.ClientSession() as http:
        for data in (big, chunked()):
            async with http.post(
                server.url + "/reports", data=data, headers={"Content-Type": "application/jose"}
            ) as resp:
                assert resp.status == 413
                assert (await resp.json())["code"] == "too_large"
        async with http.post(
            server.url + "/reports", data=b"x" * (64 * 1024), headers={"Content-Type": "application/jose"}
        ) as resp:
            assert resp.status == 400  # at the limit: read, then refused as garbage
    assert repo.reports() == []


async def test_request_log_records_what_clients_sent(
    server: RepositoryServer, repo: VendorRepository, tmp_path: Path
) -> None:
    await asyncio.to_thread(fetch, server, tmp_path / "client", repo.trusted_root(), "boardA/fw.bin")
    target = repo.latest("boardA")
    assert target is not None
    token = _token(target, nonce="logged-nonce-1")
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + "/reports?via=test", data=token, headers={"Content-Type": "application/jose"}) as resp,
    ):
        assert resp.status == 201
    gets = [(r.method, r.path) for r in server.requests if r.method == "GET"]
    assert gets[:4] == [
        ("GET", "/metadata/2.root.json"),  # 404: root v1 is the newest
        ("GET", "/metadata/timestamp.json"),
        ("GET", "/metadata/2.snapshot.json"),
        ("GET", "/metadata/2.targets.json"),
    ]
    ua = dict(server.requests[0].headers).get("User-Agent", "")
    assert ua.startswith("python-tuf/")
    assert all(r.body == b"" and r.query == "" for r in server.requests if r.method == "GET")
    post = server.requests[-1]
    assert (post.method, post.path, post.query, post.body) == ("POST", "/reports", "via=test", token)


@pytest.mark.real_clock
async def test_https(repo: VendorRepository, tmp_path: Path, now: dt.datetime) -> None:
    pki = make_pki(now=now - dt.timedelta(hours=1))  # TLS checks validity against the wall clock
    ident = pki.tls_server("repository", now=now - dt.timedelta(hours=1))
    (tmp_path / "tls.pem").write_bytes(pem(ident.cert) + pem(pki.cas["service"].certificate))
    (tmp_path / "tls.key").write_bytes(private_key_to_pem(ident.key, None))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "tls.pem", tmp_path / "tls.key")
    client_ctx = ssl.create_default_context(cadata=pem(pki.root).decode())
    async with RepositoryServer(repo, ssl_context=server_ctx) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        async with aiohttp.ClientSession() as http, http.get(srv.url + "/metadata/1.root.json", ssl=client_ctx) as r:
            assert r.status == 200
            assert await r.read() == repo.trusted_root()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "example.com", "::"])  # noqa: S104 -- refusing them is the test
def test_only_loopback_hosts(repo: VendorRepository, host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        RepositoryServer(repo, host=host)
