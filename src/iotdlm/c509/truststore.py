"""A truststore in C509: the draft's COSE_C509 bag (section 3.4, media type application/cose-c509+cbor).

``COSE_C509 = C509CertData / [ 2* C509CertData ]`` with ``C509CertData = bytes .cbor
C509Certificate``: one certificate is one byte string, several are an array of byte strings. Each
element is decoded back to DER with :func:`iotdlm.c509.decode_c509`, so a device verifies its chains
exactly as with a PEM truststore.

Pure: no I/O.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Final

import cbor2

from iotdlm.c509.codec import MAX_CERTIFICATE_BYTES, decode_c509, encode_c509
from iotdlm.errors import BadRequestError, TooLargeError

#: the most certificates a truststore bag holds
MAX_BAG_CERTIFICATES: Final = 64


def encode_c509_bag(ders: Sequence[bytes]) -> bytes:
    """DER certificates -> one COSE_C509 (raises UnsupportedError for one that has no C509 form)."""
    if not ders:
        raise ValueError("a C509 truststore holds at least one certificate")
    items = [encode_c509(d) for d in ders]
    return cbor2.dumps(items[0] if len(items) == 1 else items)


def decode_c509_bag(data: bytes) -> list[bytes]:
    """A COSE_C509 (untrusted bytes) -> the DER certificates, in order."""
    if not isinstance(data, bytes) or len(data) > MAX_BAG_CERTIFICATES * MAX_CERTIFICATE_BYTES:
        raise TooLargeError("a C509 truststore is too large", field="truststore")
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise BadRequestError("not a C509 truststore: the bytes are not well-formed CBOR", field="truststore") from exc
    if stream.tell() != len(data):
        raise BadRequestError("not a C509 truststore: bytes follow the CBOR item", field="truststore")
    items = [item] if isinstance(item, bytes) else item
    if not isinstance(items, list) or not items or not all(isinstance(i, bytes) for i in items):
        raise BadRequestError(
            "not a C509 truststore: expected a byte string or an array of byte strings (COSE_C509)", field="truststore"
        )
    if len(items) > MAX_BAG_CERTIFICATES:
        raise TooLargeError(f"a C509 truststore holds at most {MAX_BAG_CERTIFICATES} certificates", field="truststore")
    return [decode_c509(i) for i in items]
