"""The operator console in a real browser (issue 18): Debian's chromium driven by Playwright, logged
in with the deployment's admin client certificate, against `iotdlm up` as its own process.

The 3 a.m. path: find a device by its serial as openssl prints it, revoke it (reason, confirmation),
see OCSP through cm say revoked (fetched as a relying party does, over HTTP from cm), switch the mode
(confirmation), verify the audit log. And a browser without the certificate is refused. Then the
Software page (sm is off in this mode: it says so), a live page reloading itself, and `iotdlm
status` naming the console.

Screenshots go to the test's folder; with ``IOTDLM_CONSOLE_SCREENSHOTS=1`` also to docs/img/ (how the
README's are made). Playwright never downloads a browser here: it is pointed at /usr/bin/chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from iotdlm.bus.server import free_port
from iotdlm.clock import SystemClock
from iotdlm.cm.config import CM_FILE
from iotdlm.deployment import PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.pki.keys import Algorithm
from iotdlm.runtime import open_store, record_identities

CHROMIUM = "/usr/bin/chromium"
PW = "console-test-passphrase"
DEVICE = "demo-board-7"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "img"

pytestmark = [
    pytest.mark.nats,
    pytest.mark.real_clock,  # chromium (through Playwright) and OpenSSL check the console's certificate
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make sysdeps)"),
]


def _deployment(root: Path) -> tuple[Deployment, int, int]:
    """A deployment with cm and the console on free loopback ports; (dep, cm's HTTP port, console port)."""
    https_port, http_port, egress_port, console_port = free_port(), free_port(), free_port(), free_port()
    dep, _ = init_deployment(
        root, organization="Console Test", algorithm=Algorithm.P256, dtypes=["board-a"], passphrase=PW.encode(),
        nats_port=free_port(), metrics_port=free_port(), public_url=f"http://127.0.0.1:{http_port}",
        now=SystemClock().now(),
    )  # fmt: skip
    (root / CM_FILE).write_bytes(
        tomli_w.dumps({"https_port": https_port, "http_port": http_port, "egress_port": egress_port}).encode()
    )
    with (root / "iotdlm.toml").open("a", encoding="utf-8") as f:
        f.write(f"\n[console]\nport = {console_port}\n")
    store = open_store(dep)
    try:
        record_identities(dep, store, SystemClock().now())  # as `iotdlm init` does: km's key signs checkpoints
    finally:
        store.close()
    return Deployment.load(root), http_port, console_port


def _iotdlm(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", *args], capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, PASSPHRASE_ENV: PW, "COLUMNS": "200"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _issue_device_certificate(dep: Deployment, tmp: Path) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .sign(key, hashes.SHA256())
    )
    (tmp / "dev.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    _iotdlm("ca", "issue", "--data", str(dep.root), "--csr", str(tmp / "dev.csr"), "--device-id", DEVICE,
            "--profile", "operational", "--out", str(tmp / "dev.pem"))  # fmt: skip
    return x509.load_pem_x509_certificate((tmp / "dev.pem").read_bytes())


@contextlib.asynccontextmanager
async def _up(root: Path) -> AsyncIterator[None]:
    with (root / "up.out").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "iotdlm.cli.main", "up", "--data", str(root), "--mode", "certificate-management",
            stdout=out, stderr=asyncio.subprocess.STDOUT, env={**os.environ, PASSPHRASE_ENV: PW},
            start_new_session=True,
        )  # fmt: skip
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _until_answers(url: str, ctx: ssl.SSLContext | None, what: str, wait: float = 45.0) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(int(wait / 0.25)):
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url, ssl=ctx if ctx is not None else False) as resp:
                    if resp.status < 500:
                        return
            await asyncio.sleep(0.25)
    raise AssertionError(f"{what} did not answer at {url}")


async def _ocsp_through_cm(dep: Deployment, http_port: int, cert: x509.Certificate) -> str:
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, dep.ca_certificate("operational"), hashes.SHA256()).build()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{http_port}/ocsp",
            data=req.public_bytes(serialization.Encoding.DER),
            headers={"Content-Type": "application/ocsp-request"},
        ) as resp,
    ):
        return ocsp.load_der_ocsp_response(await resp.read()).certificate_status.name.lower()


def _colon_serial(cert: x509.Certificate) -> str:
    """The serial as ``openssl x509 -text`` prints it (upper case, colons between bytes)."""
    raw = format(cert.serial_number, "x")
    raw = raw if len(raw) % 2 == 0 else "0" + raw
    return ":".join(raw[i : i + 2] for i in range(0, len(raw), 2)).upper()


async def _shot(page: object, tmp: Path, name: str) -> None:
    path = tmp / f"console-{name}.png"
    await page.screenshot(path=str(path))  # type: ignore[attr-defined]
    if os.environ.get("IOTDLM_CONSOLE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SHOTS / path.name)


async def test_the_3am_path_in_a_browser(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    dep, http_port, console_port = await asyncio.to_thread(_deployment, tmp_path / "site")
    cert = await asyncio.to_thread(_issue_device_certificate, dep, tmp_path)
    url = f"https://127.0.0.1:{console_port}"
    admin = dep.root / "modules" / "admin"
    async with _up(dep.root), async_playwright() as pw:
        await _until_answers(f"{url}/static/console.css", None, "the console")
        await _until_answers(f"http://127.0.0.1:{http_port}/health", None, "cm")
        browser = await pw.chromium.launch(executable_path=CHROMIUM)
        try:
            # no certificate: refused with a page that says what to do
            anonymous = await browser.new_context(ignore_https_errors=True)
            page = await anonymous.new_page()
            await page.goto(f"{url}/fleet")
            await expect(page.locator("h1")).to_have_text("Not logged in")
            await expect(page.get_by_role("alert")).to_contain_text("no client certificate")
            await _shot(page, tmp_path, "refused")
            await anonymous.close()

            ctx = await browser.new_context(
                ignore_https_errors=True,  # the console's certificate is under the deployment's own root
                viewport={"width": 1100, "height": 640},
                client_certificates=[
                    {"origin": url, "certPath": str(admin / "cert.pem"), "keyPath": str(admin / "key.pem")}
                ],
            )
            page = await ctx.new_page()
            # find the device by its serial, as openssl prints it
            await page.goto(f"{url}/")
            await page.get_by_label("Device id or certificate serial").fill(_colon_serial(cert))
            await page.keyboard.press("Enter")
            await expect(page.get_by_role("link", name=DEVICE)).to_be_visible()
            await _shot(page, tmp_path, "fleet")
            await page.get_by_role("link", name=DEVICE).click()
            await expect(page.locator("td.ocsp")).to_have_text("good")
            # revoke: reason, review, confirm
            await page.get_by_label("Reason").select_option("keyCompromise")
            await page.get_by_role("button", name="Review").click()
            await expect(page.locator("h1")).to_contain_text(f"Revoke {DEVICE}?")
            await _shot(page, tmp_path, "revoke-confirm")
            await page.get_by_label(f"Yes, revoke {DEVICE}").check()
            await page.get_by_role("button", name="Revoke").click()
            await expect(page.get_by_role("status")).to_contain_text("1 certificate(s) revoked")
            await expect(page.locator("td.ocsp")).to_have_text("revoked")
            await _shot(page, tmp_path, "device-revoked")
            # a relying party asks cm: revoked
            assert await _ocsp_through_cm(dep, http_port, cert) == "revoked"
            # switch the mode, with a confirmation
            await page.get_by_role("link", name="Mode").click()
            await page.get_by_label("New mode").select_option("provisioning-certificate")
            await page.get_by_role("button", name="Review").click()
            await page.get_by_label("Yes, switch to provisioning-certificate").check()
            await page.get_by_role("button", name="Switch").click()
            await expect(page.locator("#current-mode")).to_have_text("provisioning-certificate")
            await expect(page.get_by_role("status")).to_contain_text("stopped cm")
            await _shot(page, tmp_path, "mode")
            # verify the audit log; the revocation and the switch are in it, by admin
            await page.get_by_role("link", name="Audit log").click()
            await expect(page.locator("tbody tr").first).to_contain_text("mode_switch")
            await page.get_by_role("button", name="Verify the whole log").click()
            await expect(page.locator("#verdict")).to_have_text("Audit log intact.")
            await _shot(page, tmp_path, "audit-verified")
            # the other pages answer from the live deployment (store, supervisor, /metrics)
            for link, heading in (("CAs", "Certificate authorities"), ("Transfers", "Trust transfers"),
                                  ("Health", "Health and metrics")):  # fmt: skip
                await page.get_by_role("link", name=link, exact=True).click()
                await expect(page.locator("h1")).to_have_text(heading)
            await expect(page.locator("pre")).to_contain_text("iotdlm_")  # the supervisor's Prometheus lines
            # sm's releases: sm does not run in provisioning-certificate, and the page says so
            await page.get_by_role("link", name="Software", exact=True).click()
            await expect(page.locator("h1")).to_have_text("Software releases held by sm")
            await expect(page.get_by_role("alert")).to_contain_text("sm did not answer")
            await _shot(page, tmp_path, "software")
            # a live page reloads itself, without JavaScript (the CSP allows no script at all)
            await page.get_by_role("link", name="Provisioning", exact=True).click()
            await expect(page.locator("h1")).to_have_text("Provisioning runs")
            await expect(page.locator("progress").first).to_be_visible()
            first = await page.locator("#updated").get_attribute("datetime")
            await expect(page.locator("#updated")).not_to_have_attribute("datetime", first or "", timeout=15_000)
            await _shot(page, tmp_path, "provisioning")
        finally:
            await browser.close()
        # `iotdlm status` names the console, where it answers and that it runs
        status = _iotdlm("status", "--data", str(dep.root))
        assert f"console: {url}/ (running;" in status
    assert "console:" in _iotdlm("audit", "list", "--data", str(dep.root), "--kind", "mode_switch", "--json")
