"""``--format pem|c509`` of the commands that write certificates (``ca issue``, ``ca certificate``,
``ca chain``): PEM as always, or C509 (draft-ietf-cose-cbor-encoded-cert, :mod:`iotdlm.c509`).

In C509 one certificate is a C509Certificate (``ca issue``; media type
application/cose-c509-cert+cbor) and several -- a certificate and its CA, a truststore -- are one
COSE_C509 bag (application/cose-c509+cbor), the form a constrained device stores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import click

from iotdlm.errors import UnsupportedError

FORMATS: Final = ("pem", "c509")
#: the file extension a folder of issued certificates gets, per format
SUFFIX: Final = {"pem": ".pem", "c509": ".c509"}


def format_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="pem",
        show_default=True,
        help=f"Write {what} as PEM, or as C509 (CBOR, binary: the compact form for constrained devices).",
    )


def encode_certificates(ders: Sequence[bytes], fmt: str, *, bag: bool, serial: str | None = None) -> bytes:
    """``ders`` in ``fmt``: PEM, or C509 (a single C509Certificate unless ``bag``).

    ``serial`` names a certificate that was issued before it was encoded: a refusal then says how
    to get it in PEM."""
    from cryptography import x509

    from iotdlm.c509 import encode_c509, encode_c509_bag
    from iotdlm.pki.chain import certs_to_pem

    if fmt == "pem":
        return certs_to_pem([x509.load_der_x509_certificate(d) for d in ders])
    try:
        return encode_c509_bag(ders) if bag or len(ders) != 1 else encode_c509(ders[0])
    except UnsupportedError as exc:
        hint = f" Certificate {serial} was issued: `iotdlm ca show {serial} --pem` prints it in PEM." if serial else ""
        raise UnsupportedError(f"cannot write C509: {exc.message}.{hint}", field="format") from exc
