"""Seed 003 section VIII-A, TABLE I: every trust-transfer message's size beside the paper's figures.

Two real deployments (``init_deployment``, P-256 by default) and their transfer identities; one
factory certificate from SP1's factory CA. Sizes are deterministic (no time is measured): COSE
P-256 signatures are 64 bytes, CBOR is canonical. Two sets of URIs: short ones (the reference
configuration of ``tests/unit/test_transfer_sizes.py``) and the longer ones ``bench/transfer.py``
uses, so what depends on the deployment's URIs shows.

Run: ``PYTHONPATH=src .venv/bin/python bench/transfer_sizes.py [--algorithm ecdsa-p256|ecdsa-p384|ed25519]``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import tempfile
from pathlib import Path

from cryptography import x509

from common import Headline, emit, md_table, parse_args
from iotdlm.deployment import init_deployment
from iotdlm.pki.chain import der
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import device_subject, device_uri
from iotdlm.transfer import cose
from iotdlm.transfer import messages as m
from iotdlm.transfer.identity import TransferIdentity, TransferSettings, create_identity

PW = b"bench"
URIS = {
    "short": ("https://sp2.example/ra", "https://sp2.example/est", "https://sp1.example/fb"),
    "bench/transfer.py": (
        "https://ra.sp2.example/verifier",
        "https://ca2.sp2.example:8443/.well-known/est",
        "https://updates.sp1.example/fallback",
    ),
}
#: issue 13, before this change (P-256, bench/transfer.py's URIs)
BEFORE = {"TransferMessage": 808, "per-device message": 1775}


def provider(root: Path, org: str, provider_id: str, algorithm: Algorithm, now: dt.datetime) -> tuple:  # type: ignore[type-arg]
    dep, cas = init_deployment(root, organization=org, algorithm=algorithm, dtypes=["sensor"], passphrase=PW, now=now)
    service = next(c for c in cas if c.name == "service")
    ident = create_identity(dep, TransferSettings(provider_id=provider_id), now=now, service_ca=service)
    return dep, cas, ident


def sizes(
    uris: tuple[str, str, str], sp1: TransferIdentity, sp2: TransferIdentity, sp2_root: x509.Certificate,
    factory: x509.Certificate, now: dt.datetime,
) -> dict[str, int]:  # fmt: skip
    ra, enroll, fallback = uris
    claims = m.TransferClaims(
        now, now + dt.timedelta(days=7), ra, "", False, enroll, "", (cose.cert_hash(der(sp2_root)),)
    )
    listing2 = dataclasses.replace(claims, trust_anchors=())
    ref = b"r" * 32

    def tm(c: m.TransferClaims) -> bytes:
        hdr = m.CwtHeader(sp2.provider_id, sp1.provider_id, b"c" * 16, now, now, now + dt.timedelta(days=7))
        return m.sign_transfer_message(m.TransferMessage(hdr, ref, c), sp2.signer(with_chain=False))

    def device(*, with_chain: bool) -> bytes:
        hdr = m.CwtHeader(None, "dev-00042", b"c" * 16, now, now, now + dt.timedelta(days=7))
        c = dataclasses.replace(claims, fallback_uri=fallback)
        return m.sign_device_message(m.TransferMessage(hdr, ref, c), sp1.signer(with_chain=with_chain))

    def confirmation(n: int) -> bytes:
        hdr = m.CwtHeader(sp2.provider_id, sp1.provider_id, b"c" * 16, now, now, now + dt.timedelta(days=7))
        enrolled = tuple(m.Enrolled(f"dev-{i:05d}", b"h" * 32) for i in range(n))
        return m.sign_confirmation(m.Confirmation(hdr, ref, enrolled), sp2.signer(with_chain=False))

    info = m.DeviceUpdateInfo(
        factory.tbs_certificate_bytes, now, now + dt.timedelta(days=30), m.VersionInfo(7, "https://sp1.example/suit/7")
    )
    with_ref = dataclasses.replace(info, ra_reference=b"h" * 32)
    n = 100
    export = m.UpdateInfoExport((with_ref,) * n, (der(factory),) * n, sp2.provider_id, now)
    jws = m.sign_update_info(export, sp1.key, sp1.certificate)
    dev = device(with_chain=False)
    return {
        "DeviceUpdateInfo": len(info.to_bytes()),
        "DeviceUpdateInfo+ra": len(with_ref.to_bytes()),
        "factory": len(der(factory)),
        "tbs": len(factory.tbs_certificate_bytes),
        "uil_per_device": len(jws) // n,
        "uil_payload_per_device": len(base64.urlsafe_b64decode(jws.split(b".")[1] + b"==")) // n,
        "tm_listing2": len(tm(listing2)),
        "tm": len(tm(claims)),
        "device": len(dev),
        "device_payload": len(cose.parse_sign1(dev, what="d", max_bytes=1 << 16).payload),
        "device_chain": len(device(with_chain=True)),
        "confirmation1": len(confirmation(1)),
        "confirmation_per_device": (len(confirmation(101)) - len(confirmation(1))) // 100,
        "uri_bytes": len(ra) + len(enroll) + len(fallback),
    }


def run(algorithm: Algorithm) -> tuple[str, list[Headline]]:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    with tempfile.TemporaryDirectory(prefix="iotdlm-bench-sizes-") as d:
        dep1, cas1, sp1 = provider(Path(d) / "sp1", "SP1", "sp1.example", algorithm, now)
        dep2, _cas2, sp2 = provider(Path(d) / "sp2", "SP2", "sp2.example", algorithm, now)
        factory_ca = next(c for c in cas1 if c.name == "factory")
        key = generate_key(algorithm)
        pen = dep1.config.enterprise_number
        factory = factory_ca.issue(
            dep1.profiles()["factory"], key.public_key(), device_subject("dev-00042", "SP1", "sensor"), now=now,
            serial=x509.random_serial_number(), uris=[device_uri("dev-00042", enterprise_number=pen)],
        )  # fmt: skip
        sp2_root = dep2.ca_certificate("root")
        got = {name: sizes(u, sp1, sp2, sp2_root, factory, now) for name, u in URIS.items()}
    s, b = got["short"], got["bench/transfer.py"]
    rows = [
        ["DeviceUpdateInfo (TBSCertificate, 2 times, versionInfo)", s["DeviceUpdateInfo"], "> 400 (C509: > 230)",
         "format unchanged"],
        ["  with raReference (+ SHA-256)", s["DeviceUpdateInfo+ra"], "", ""],
        ["Factory certificate (DER)", s["factory"], "> 320 (C509: > 150)", ""],
        ["  its TBSCertificate", s["tbs"], "", ""],
        ["UpdateInfoList JWS, per device (100 devices, x5bag, base64url)", s["uil_per_device"], "", ""],
        ["  its CBOR payload, per device", s["uil_payload_per_device"], "", ""],
        ["**TransferMessage**, Listing 2 only (x5t, iss, aud, cti, times, transferRef)",
         f"**{s['tm_listing2']}** / {b['tm_listing2']}", "> 216", ""],
        ["TransferMessage as sent (+ trustAnchors: SHA-256 of SP2's root)", f"{s['tm']} / {b['tm']}", "",
         BEFORE["TransferMessage"]],
        ["**Per-device message** (x5t to SP1's transfer certificate, anchor hash)",
         f"**{s['device']}** / {b['device']}", "(> 216)", BEFORE["per-device message"]],
        ["  its claims payload", f"{s['device_payload']} / {b['device_payload']}", "", ""],
        ["  the same with x5chain (SP1's transfer certificate + service CA)",
         f"{s['device_chain']} / {b['device_chain']}", "", ""],
        ["Confirmation, 1 device", s["confirmation1"], "", ""],
        ["  each further device", s["confirmation_per_device"], "", ""],
    ]  # fmt: skip
    table = md_table(
        ["message", f"bytes here ({algorithm.value}; short / bench URIs)", "Table I (DTLS, X.509)",
         "before (issue 13)"],
        rows,
    )  # fmt: skip
    table += (
        f"\n\nURIs in the per-device message: {s['uri_bytes']} bytes (short: `{'`, `'.join(URIS['short'])}`) or "
        f"{b['uri_bytes']} bytes (bench/transfer.py's); everything else is the same. Without its URIs the "
        f"per-device message is {s['device'] - s['uri_bytes']} bytes. The signature is 64 bytes of it (P-256)."
    )
    target_dev = s["device"] <= 300 if algorithm is Algorithm.P256 else None
    target_tm = s["tm_listing2"] <= 250 if algorithm is Algorithm.P256 else None
    heads = [
        Headline("per-device transfer message", "> 216 B", "<= 300 B (P-256)", f"{s['device']} B",
                 "n/a" if target_dev is None else ("met" if target_dev else "missed")),
        Headline("TransferMessage (Listing 2)", "> 216 B", "<= 250 B (P-256)", f"{s['tm_listing2']} B",
                 "n/a" if target_tm is None else ("met" if target_tm else "missed")),
    ]  # fmt: skip
    return table, heads


def main(args: argparse.Namespace) -> None:
    table, heads = run(Algorithm(args.algorithm))
    section = "\n\n".join(["## Trust-transfer message sizes beside Table I (seed 003, VIII-A)", table])
    emit(section, args, heads)


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--algorithm",
        default="ecdsa-p256",
        choices=[a.value for a in Algorithm if not a.value.startswith("rsa")],
        help="key algorithm",
    )


if __name__ == "__main__":
    main(parse_args(__doc__.splitlines()[0], _extra))
