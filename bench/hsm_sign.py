"""CA keys in an HSM (issue 16, ADR 0025): issuance and OCSP signing with the CA key in a SoftHSM2
token, beside the same with the CA key in memory (a file key) and beside raw signing, in one run.

What is measured (single thread, in process, P-256 and P-384):

- issuance: ``IssuingCA.issue`` of a device certificate (profile ``operational``, the extensions
  km writes), once with a :class:`~iotdlm.pki.keys.KeySigner` (the file key, the yardstick), once
  with a :class:`~iotdlm.hsm.Pkcs11Signer` (the key in the token: cryptography builds the TBS with a
  template key, the token signs, pki/signed_der puts the signature in and checks it);
- OCSP signing: ``pki.ocsp.build_response`` for one CertID with a nonce, the CA as its own
  responder, same two signers;
- raw signing: python-pkcs11 ``key.sign(digest, mechanism=CKM_ECDSA)`` in a loop (what the token
  itself costs) beside cryptography's ``key.sign`` (ECDSA, in memory).

The token: a fresh SoftHSM2 token in a temporary folder (``SOFTHSM2_CONF``), initialised with
``softhsm2-util``. Each rate is the median of ``--repeats`` runs of ``--seconds`` each, the kinds
interleaved so a noisy machine slows them alike. Figures are ratios to the yardstick of the same run.

Run: ``.venv/bin/python bench/hsm_sign.py [--quick]``.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from common import Headline, emit, loadavg, log, md_table, parse_args, rate
from iotdlm.clock import SystemClock
from iotdlm.pki import ca as pki_ca
from iotdlm.pki import ocsp as pki_ocsp
from iotdlm.pki.keys import Algorithm, KeySigner, Signer, generate_key
from iotdlm.pki.profiles import DEFAULT_PROFILES

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "24681357"
ALGS = (Algorithm.P256, Algorithm.P384)


def _token_dir() -> Path:
    """A SoftHSM2 token of its own (before python-pkcs11 loads the library, which reads the conf once)."""
    root = Path(tempfile.mkdtemp(prefix="bench-softhsm-"))
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin", "13572468"],
        check=True,
        capture_output=True,
    )
    return root


def _rate(fn: Callable[[], object], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def _ca(signer: Signer, now: dt.datetime) -> pki_ca.IssuingCA:
    name = pki_ca.ca_name("Bench Operational CA", "Bench")
    cert = pki_ca.make_root(signer, name, now=now, validity=dt.timedelta(days=365))
    return pki_ca.IssuingCA(name="operational", certificate=cert, signer=signer, chain=(cert,))


class Kind:
    """One thing to time, named, with its rates over the repeats."""

    def __init__(self, name: str, fn: Callable[[], object]) -> None:
        self.name = name
        self.fn = fn
        self.rates: list[float] = []

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def _kinds(
    alg: Algorithm, file_signer: KeySigner, hsm_signer: Signer, raw_token_sign: Callable[[], object]
) -> list[Kind]:
    now = SystemClock().now()
    profile = DEFAULT_PROFILES["operational"]
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "dev-000001")])
    device_key = generate_key(Algorithm.P256).public_key()
    file_ca, hsm_ca = _ca(file_signer, now), _ca(hsm_signer, now)
    leaf = file_ca.issue(profile, device_key, subject, now=now, serial=x509.random_serial_number())

    def issue(ca: pki_ca.IssuingCA) -> Callable[[], object]:
        return lambda: ca.issue(profile, device_key, subject, now=now, serial=x509.random_serial_number())

    def ocsp_sign(ca: pki_ca.IssuingCA) -> Callable[[], object]:
        # the CertID takes the issuer's name and key from the certificate given as issuer: ca's
        req = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca.certificate, hashes.SHA256())
        req = req.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
        query = pki_ocsp.parse_request(req.build().public_bytes(serialization.Encoding.DER))
        responder = pki_ocsp.Responder(ca=ca, certificate=ca.certificate, signer=ca.signer)
        good = pki_ocsp.CertStatus("good")
        return lambda: pki_ocsp.build_response(
            responder, query, good, this_update=now, next_update=now + dt.timedelta(hours=1), include_nonce=True
        )

    in_memory = file_signer.private_key
    assert isinstance(in_memory, ec.EllipticCurvePrivateKey)
    h = hashes.SHA384() if alg is Algorithm.P384 else hashes.SHA256()
    tbs = os.urandom(300)
    return [
        Kind("issuance, file key", issue(file_ca)),
        Kind("issuance, key in SoftHSM", issue(hsm_ca)),
        Kind("OCSP signing, file key", ocsp_sign(file_ca)),
        Kind("OCSP signing, key in SoftHSM", ocsp_sign(hsm_ca)),
        Kind("raw sign, cryptography in memory", lambda: in_memory.sign(tbs, ec.ECDSA(h))),
        Kind("raw sign, python-pkcs11 CKM_ECDSA in SoftHSM", raw_token_sign),
    ]


def _measure(alg: Algorithm, repeats: int, seconds: float) -> dict[str, Kind]:
    from iotdlm.hsm.signer import Pkcs11Signer
    from iotdlm.hsm.token import open_token
    from iotdlm.hsm.uri import parse_pkcs11_uri

    token = open_token(parse_pkcs11_uri("pkcs11:token=bench"), module_path=MODULE, pin=PIN)
    label = f"bench-{alg.value}"
    token.generate(alg, label, os.urandom(8))
    hsm_signer = Pkcs11Signer(token, parse_pkcs11_uri(f"pkcs11:token=bench;object={label}"))
    from pkcs11 import Mechanism

    private = token.find(parse_pkcs11_uri(f"pkcs11:token=bench;object={label}")).private
    digest = os.urandom(48 if alg is Algorithm.P384 else 32)
    raw = lambda: private.sign(digest, mechanism=Mechanism.ECDSA)  # noqa: E731
    kinds = _kinds(alg, KeySigner(generate_key(alg)), hsm_signer, raw)
    for _ in range(repeats):
        for kind in kinds:
            kind.rates.append(_rate(kind.fn, seconds))
    return {k.name: k for k in kinds}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "")
    if not (Path(MODULE).is_file() and shutil.which("softhsm2-util")):
        sys.exit("SoftHSM2 is not installed (Debian package softhsm2; `make sysdeps`)")
    repeats, seconds = (1, 0.2) if args.quick else (5, 1.0)
    folder = _token_dir()
    try:
        results = {}
        for alg in ALGS:
            log(f"measuring {alg.value}: {repeats} x {seconds} s per kind")
            results[alg] = _measure(alg, repeats, seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load = loadavg()
    rows, headlines = [], []
    pairs = [
        ("issuance, key in SoftHSM", "issuance, file key"),
        ("OCSP signing, key in SoftHSM", "OCSP signing, file key"),
        ("raw sign, python-pkcs11 CKM_ECDSA in SoftHSM", "raw sign, cryptography in memory"),
        ("issuance, key in SoftHSM", "raw sign, python-pkcs11 CKM_ECDSA in SoftHSM"),
    ]
    for alg, kinds in results.items():
        for kind in kinds.values():
            spread = f"{rate(min(kind.rates))}-{rate(max(kind.rates))}"
            rows.append([alg.value, kind.name, rate(kind.median), spread])
        for what, yardstick in pairs:
            ratio = kinds[what].median / kinds[yardstick].median
            headlines.append(
                Headline(
                    what=f"HSM {alg.value}: {what} / {yardstick}",
                    paper="-",
                    target="-",
                    measured=f"{rate(kinds[what].median)}/s ({yardstick}: {rate(kinds[yardstick].median)}/s)",
                    verdict="measured",
                    yardstick=yardstick,
                    ratio=round(ratio, 3),
                    load=load,
                )
            )
    ratio_rows = [[h.what, h.measured, f"{h.ratio:.2f}x"] for h in headlines]
    section = "\n".join(
        [
            "## CA keys in an HSM: SoftHSM2 beside file keys (bench/hsm_sign.py)",
            "",
            f"Single thread, in process; median of {repeats} x {seconds} s per kind, interleaved; load {load}.",
            "",
            md_table(["algorithm", "what", "per second (median)", "min-max"], rows),
            "",
            md_table(["ratio", "measured", "ratio"], ratio_rows),
        ]
    )
    emit(section, args, headlines)


if __name__ == "__main__":
    main()
