"""C509 vs DER: the size of every kind of certificate we issue, beside seed 003 Table I's EDHOC/C509 column.

A real deployment (``init_deployment``): its root and issuing CAs, and one certificate per profile
(factory, operational, service, tls-server, ocsp) issued by them. Each is re-encoded as C509
(c509CertificateType 3, :mod:`iotdlm.c509`), decoded back and checked byte-identical. The yardstick
is the same certificate's DER size in the same run: the figure is the ratio C509 / DER. The draft's
own example (Appendix A.1, RFC 7925 profile: 316 B DER, 141 B C509) is a second yardstick row.
Table I gives "factory certificate > 150 B" and "DeviceUpdateInfo > 230 B" for EDHOC/C509; the
DeviceUpdateInfo with a C509 TBSCertificate is computed (the DER TBSCertificate swapped for the C509
certificate without its issuerSignatureValue), not a message we send.

Sizes are exact, not timed. Run: ``PYTHONPATH=src .venv/bin/python bench/c509_sizes.py [--algorithm ...]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import tempfile
from pathlib import Path

import cbor2
from cryptography import x509

from common import Headline, emit, md_table, parse_args
from iotdlm.c509 import DRAFT, decode_c509, encode_c509
from iotdlm.deployment import init_deployment
from iotdlm.pki.chain import der
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import device_subject, module_uri
from iotdlm.transfer import messages as m

PW = b"bench"
#: draft-ietf-cose-cbor-encoded-cert Appendix A.1 (tests/vectors/c509_rfc7925.*)
DRAFT_EXAMPLE = (316, 141)
TABLE_I = {"factory": "> 150", "DeviceUpdateInfo": "> 230"}


def certificates(algorithm: Algorithm, root: Path, now: dt.datetime) -> dict[str, x509.Certificate]:
    dep, cas = init_deployment(root, organization="SP1", algorithm=algorithm, dtypes=["sensor"], passphrase=PW, now=now)
    by_name = {c.name: c for c in cas}
    profiles = dep.profiles()
    pen = dep.config.enterprise_number
    out = {"root": dep.ca_certificate("root")} | {f"{n} CA": c.certificate for n, c in by_name.items()}
    for kind in ("factory", "operational"):
        out[kind] = by_name[kind].issue(
            profiles[kind], generate_key(algorithm).public_key(), device_subject("dev-00042", "SP1", "sensor"),
            now=now, serial=x509.random_serial_number(),
            general_names=profiles[kind].device_names("dev-00042", "sensor"), urls=dep.public_urls,
        )  # fmt: skip
    for kind, issuer in (("service", "service"), ("tls-server", "service"), ("ocsp", "operational")):
        out[kind] = by_name[issuer].issue(
            profiles[kind], generate_key(algorithm).public_key(), device_subject("km", "SP1", "module"),
            now=now, serial=x509.random_serial_number(), uris=[module_uri("km", enterprise_number=pen)],
            dns_names=["localhost"] if kind == "tls-server" else [], urls=dep.public_urls,
            ip_addresses=[ipaddress.ip_address("127.0.0.1")],
        )  # fmt: skip
    return out


def run(algorithm: Algorithm) -> tuple[str, list[Headline]]:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    with tempfile.TemporaryDirectory(prefix="iotdlm-bench-c509-") as d:
        certs = certificates(algorithm, Path(d), now)
    rows, sizes = [], {}
    for kind, cert in certs.items():
        c509 = encode_c509(der(cert))
        assert decode_c509(c509) == der(cert), kind  # lossless, or the figure means nothing
        sizes[kind] = (len(der(cert)), len(c509))
        rows.append([kind, len(der(cert)), len(c509), f"{len(c509) / len(der(cert)):.2f}", TABLE_I.get(kind, "")])
    factory = certs["factory"]
    fields = cbor2.loads(encode_c509(der(factory)))
    c509_tbs = len(cbor2.dumps(fields[:-1])) - 1  # the TBSCertificate group: the array's elements but the signature
    info = m.DeviceUpdateInfo(
        factory.tbs_certificate_bytes, now, now + dt.timedelta(days=30), m.VersionInfo(7, "https://sp1.example/suit/7")
    )
    dui = len(info.to_bytes())
    dui_c509 = dui - len(factory.tbs_certificate_bytes) + c509_tbs
    rows += [
        ["DeviceUpdateInfo (DER TBSCertificate, as sent)", dui, f"{dui_c509} (computed)", f"{dui_c509 / dui:.2f}",
         TABLE_I["DeviceUpdateInfo"]],
        ["draft Appendix A.1 (RFC 7925 profile), yardstick", *DRAFT_EXAMPLE,
         f"{DRAFT_EXAMPLE[1] / DRAFT_EXAMPLE[0]:.2f}", ""],
    ]  # fmt: skip
    table = md_table(
        ["certificate", f"DER bytes ({algorithm.value})", "C509 bytes", "C509 / DER", "Table I EDHOC/C509"], rows
    )
    table += f"\n\nC509 as in {DRAFT}: c509CertificateType 3, every certificate decoded back byte-identical. "
    table += _breakdown(fields)
    f_der, f_c509 = sizes["factory"]
    heads = [
        Headline("factory certificate in C509", "> 150 B", "lossless, < 0.7x DER", f"{f_c509} B of {f_der} B DER",
                 "met" if f_c509 < 0.7 * f_der else "missed", yardstick="the same certificate in DER",
                 ratio=round(f_c509 / f_der, 3)),
    ]  # fmt: skip
    return table, heads


def _breakdown(fields: list[object]) -> str:
    """Where the factory certificate's C509 bytes go (why it is well over Table I's 150 B)."""
    size = [len(cbor2.dumps(f)) for f in fields]
    exts = fields[9] if isinstance(fields[9], list) else []
    urls = sum(len(cbor2.dumps(v)) for v in exts[1::2] if isinstance(v, str) or (isinstance(v, list) and any(
        isinstance(x, str) and x.startswith("http") for x in v)))  # fmt: skip
    return (
        f"The factory certificate's C509 bytes: subject {size[6]}, issuer {size[3]}, public key {size[8]}, "
        f"signature {size[10]}, extensions {size[9]} (of which {urls} are the revocation and CA URLs: AIA "
        "OCSP + caIssuers, CRL distribution point, freshest CRL; the rest the device URN and "
        "hardwareModuleName, key identifiers, policy, key usages). Table I's > 150 B is an RFC 7925-like "
        "certificate without those pointers, as the draft's own example (141 B)."
    )


def main(args: argparse.Namespace) -> None:
    table, heads = run(Algorithm(args.algorithm))
    emit(
        "\n\n".join(["## C509 certificate sizes beside Table I's EDHOC/C509 column (seed 003, VIII-A)", table]),
        args,
        heads,
    )


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algorithm", default="ecdsa-p256", choices=[a.value for a in Algorithm], help="key algorithm")


if __name__ == "__main__":
    main(parse_args(__doc__.splitlines()[0], _extra))
