"""Issue 11 section 3, server-generated keys (RFC 7030 4.4.2, ADR 0009): a device that cannot make
keys enrolls with ``serverkeygen`` through the real cm over HTTPS, km behind it on the real
nats-server. km makes the key and encrypts it to the key of the certificate the device presented;
cm relays ciphertext only. Spies on both of cm's sides -- every reply body km sends cm over NATS,
and every HTTP response cm sends the device -- show the private key in neither, in any encoding the
bodies use; the device decrypts it with its own key, and the certificate is for that key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.cm import est as cm_est
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.keys import Algorithm, generate_key, private_key_to_pem
from iotdlm.wire import km as msg
from tests.helpers import make_csr
from tests.integration.test_cm import WELL_KNOWN, Site, _curl_proof, open_site

pytestmark = pytest.mark.nats


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path) as s:  # est_serverkeygen left at the deployment's default
        yield s


def _decodings(body: bytes) -> list[bytes]:
    """``body`` and what its parts decode to: JSON string values and base64 runs (MIME parts,
    JSON bytes fields), so a key hidden in one encoding layer is still found."""
    out = [body]
    texts: list[str] = []
    try:
        doc = json.loads(body)
    except ValueError:
        texts.extend(body.decode("latin-1").replace("\r", "").split("\n\n"))  # MIME part bodies
    else:
        stack = [doc]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
            elif isinstance(v, str):
                texts.append(v)
    for text in texts:
        compact = "".join(line for line in text.split() if not line.startswith("--"))
        try:
            out.append(base64.b64decode(compact + "=" * (-len(compact) % 4)))
        except (binascii.Error, ValueError):
            continue
    return out


def _secret(key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pkcs8, key.private_numbers().private_value.to_bytes(32, "big")


@pytest.mark.real_clock  # the device's TLS to cm checks cm's certificate at the machine's time
async def test_device_enrolls_by_serverkeygen_and_only_it_can_read_its_key(site: Site) -> None:
    """The device, holding only its factory key and certificate, asks for a server-generated key;
    it gets an operational certificate and the key to it, which cm never held in the clear."""
    bus_replies: list[bytes] = []
    relay = site.cm.app.km
    call = relay._call  # type: ignore[attr-defined]

    async def spy_bus(subject: str, request: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
        body: bytes = await call(subject, request, timeout)
        bus_replies.append(body)
        return body

    relay._call = spy_bus  # type: ignore[attr-defined]

    http_responses: list[tuple[str, bytes]] = []
    fkey, factory = await site.factory("dev-sk")
    async with site.est(fkey, factory) as device:
        request = device._request

        async def spy_http(*args: object, **kwargs: object) -> tuple[str, bytes]:
            got = await request(*args, **kwargs)  # type: ignore[arg-type]
            http_responses.append(got)
            return got

        device._request = spy_http  # type: ignore[method-assign]
        key, cert = await device.serverkeygen(make_csr(generate_key(Algorithm.P256), "dev-sk"))

    # the device decrypted it, and the certificate is for that key, from the operational CA
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(site.dep.ca_certificate("operational"))

    # cm's response: the key part is RFC 7030 4.4.2's encrypted key, not application/pkcs8
    ctype, body = http_responses[-1]
    assert cm_est.media_type(ctype) == "multipart/mixed"
    assert b"Content-Type: application/pkcs7-mime; smime-type=server-generated-key" in body
    assert b"application/pkcs8" not in body

    # neither side of cm ever carried the private key
    assert bus_replies
    assert http_responses
    pkcs8, scalar = _secret(key)
    for seen in [*bus_replies, *(b for _, b in http_responses)]:
        for layer in _decodings(seen):
            assert pkcs8 not in layer
            assert scalar not in layer


async def test_the_spy_would_see_a_clear_key() -> None:
    """The spy is not blind: the same decodings find a clear key (est_serverkeygen = "cleartext")
    in km's JSON reply and in cm's multipart response -- what the encrypted default prevents."""
    key = ec.generate_private_key(ec.SECP256R1())
    pkcs8, scalar = _secret(key)
    issued = msg.IssuedCertificate(
        serial="1", issuer="operational", profile="operational", device_id="d", not_after="t", certificate=b"c"
    )
    bus_body = msg.encode(msg.EstResponse(certificate=issued, private_key=pkcs8))
    _, http_body = cm_est.serverkeygen_multipart(pkcs8, b"\x30\x00", encrypted=False)
    for body in (bus_body, http_body):
        assert any(pkcs8 in layer for layer in _decodings(body))
        assert any(scalar in layer for layer in _decodings(body))


#: docs/operations.md's serverkeygen recipe for curl + openssl, after the proof (PROOF_RECIPE in
#: tests/integration/test_cm.py, operation "serverkeygen"): post, split the multipart, decrypt.
#: $1 EST base URL, $2 client certificate, $3 its key, $4 the proof header's value; in the cwd:
#: root.pem, csr.b64. Leaves key.der (PKCS#8) and cert.pem.
SERVERKEYGEN_RECIPE = r"""
set -euo pipefail
EST=$1
curl -sS --fail --cacert root.pem --cert "$2" --key "$3" -H "Content-Type: application/pkcs10" \
     -H "Iotdlm-Est-Proof: $4" --data-binary @csr.b64 -o reply.txt "$EST/serverkeygen"
part() { tr -d '\r' < reply.txt | awk -v n="$1" '/^--/ {p++; h=1; next} h && /^$/ {h=0; next} !h && p == n'; }
part 1 | openssl base64 -d > key.p7         # application/pkcs7-mime; smime-type=server-generated-key
part 2 | openssl base64 -d > cert.p7        # application/pkcs7-mime; smime-type=certs-only
openssl pkcs7 -inform DER -in cert.p7 -print_certs -out cert.pem
openssl cms -decrypt -binary -inform DER -inkey "$3" -in key.p7 -out package.der
hl=$(openssl asn1parse -inform DER -in package.der | head -1 | sed -E 's/.*hl= *([0-9]+).*/\1/')
tail -c +$((hl + 1)) package.der > key.der  # the one key of the AsymmetricKeyPackage: PKCS#8
"""


@pytest.mark.real_clock  # curl checks cm's certificate at the machine's time
@pytest.mark.openssl
@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None, reason="needs curl and openssl")
async def test_curl_and_openssl_get_and_decrypt_a_server_generated_key(site: Site) -> None:
    """The operator's recipe (docs/operations.md): a client made of curl and openssl asks for a
    server-generated key, and ``openssl cms -decrypt`` with its factory key recovers it."""
    files = site.files
    fkey, factory = await site.factory("dev-curl-sk")
    site.write("root.pem", site.root_pem)
    site.write("factory.pem", certs_to_pem([factory]))
    site.write("factory.key", private_key_to_pem(fkey, None))
    csr = make_csr(generate_key(Algorithm.P256), "dev-curl-sk")
    site.write("csr.b64", base64.encodebytes(csr))
    base = f"{site.https}{WELL_KNOWN}"
    proof = await _curl_proof(
        base, "serverkeygen", files / "factory.pem", files / "factory.key", site.write("csr.der", csr),
        f"--cacert {files / 'root.pem'}",
    )  # fmt: skip
    r = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", SERVERKEYGEN_RECIPE, "recipe", base, "factory.pem", "factory.key", proof],
        cwd=files, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    key = serialization.load_der_private_key((files / "key.der").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((files / "cert.pem").read_bytes())
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(site.dep.ca_certificate("operational"))
