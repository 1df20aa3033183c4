"""HTTP caching of what the validation authority publishes (pure: no I/O).

Relying parties fetch OCSP responses and CRLs over plain HTTP (RFC 6960 A.1, RFC 5019, RFC 5280
4.2.1.13) and HTTP caches sit in between. RFC 5019 6.2 lists the headers a responder should send
with a GET answer; the same fit a CRL:

- ``Cache-Control: max-age=<seconds until nextUpdate>, public, no-transform, must-revalidate``
- ``Last-Modified`` (thisUpdate), ``Expires`` (nextUpdate), ``ETag`` (a hash of the body).

An OCSP response that echoes a nonce answers one request only: ``Cache-Control: no-cache``, as for
unsuccessful responses and anything we cannot read.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
from dataclasses import dataclass
from email.utils import format_datetime

from cryptography import x509
from cryptography.x509 import ocsp

from iotdlm.errors import NotFoundError

#: the longest max-age we advertise, whatever nextUpdate says (a revocation is visible at least this soon)
MAX_AGE_CAP = 7 * 24 * 3600

NO_CACHE = {"Cache-Control": "no-cache"}

_CRL_NAME = re.compile(r"^(0|[1-9][0-9]{0,4})\.(crl|delta)$")
_ISSUER = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def http_date(when: dt.datetime) -> str:
    return format_datetime(when.astimezone(dt.UTC), usegmt=True)


def etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@dataclass(frozen=True)
class Freshness:
    """What the caching headers of one published object depend on (all but ``now``)."""

    etag: str
    next_update: dt.datetime | None  # None: not for caches (no-cache)
    last_modified: str | None
    expires: str | None

    def headers(self, now: dt.datetime) -> dict[str, str]:
        if self.next_update is None:
            return {**NO_CACHE, "ETag": self.etag}
        max_age = max(0, min(MAX_AGE_CAP, int((self.next_update - now).total_seconds())))
        out = {"Cache-Control": f"max-age={max_age}, public, no-transform, must-revalidate", "ETag": self.etag}
        if self.expires is not None:
            out["Expires"] = self.expires
        if self.last_modified is not None:
            out["Last-Modified"] = self.last_modified
        return out


def freshness(body: bytes, *, this_update: dt.datetime | None, next_update: dt.datetime | None) -> Freshness:
    return Freshness(
        etag=etag(body),
        next_update=next_update,
        last_modified=http_date(this_update) if this_update is not None and next_update is not None else None,
        expires=http_date(next_update) if next_update is not None else None,
    )


def freshness_headers(
    body: bytes, *, this_update: dt.datetime | None, next_update: dt.datetime | None, now: dt.datetime
) -> dict[str, str]:
    """The caching headers of a published object valid from ``this_update`` to ``next_update``."""
    return freshness(body, this_update=this_update, next_update=next_update).headers(now)


def reusable_ocsp_answer(der: bytes) -> ocsp.OCSPResponse | None:
    """The parsed answer when it may be served again (successful, no nonce: a nonce answers one
    request only), None when it may not or does not parse."""
    try:
        resp = ocsp.load_der_ocsp_response(der)
        if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            return None
        resp.extensions.get_extension_for_class(x509.OCSPNonce)
    except x509.ExtensionNotFound:
        return resp
    except ValueError:
        return None
    return None


@functools.lru_cache(maxsize=4096)
def _ocsp_freshness(der: bytes) -> Freshness:
    """km answers from its cache with the same bytes each time: parse each distinct answer once."""
    resp = reusable_ocsp_answer(der)
    if resp is None:
        return Freshness(etag=etag(der), next_update=None, last_modified=None, expires=None)
    return freshness(der, this_update=resp.this_update_utc, next_update=resp.next_update_utc)


def ocsp_cache_headers(der: bytes, now: dt.datetime) -> dict[str, str]:
    """Caching headers for an OCSP response (DER) sent in answer to a GET."""
    headers = _ocsp_freshness(der).headers(now)
    if headers["Cache-Control"] == "no-cache":
        headers.pop("ETag", None)
    return headers


def crl_cache_headers(der: bytes, now: dt.datetime) -> dict[str, str]:
    """Caching headers for a CRL (DER)."""
    try:
        crl = x509.load_der_x509_crl(der)
        return freshness_headers(der, this_update=crl.last_update_utc, next_update=crl.next_update_utc, now=now)
    except ValueError:
        return dict(NO_CACHE)


def parse_crl_path(issuer: str, name: str) -> tuple[str, int, bool]:
    """(issuer, partition, delta) from ``/crl/{issuer}/{partition}.crl|.delta`` (the URLs
    :class:`iotdlm.pki.ca.PublicUrls` writes into certificates); NotFoundError otherwise."""
    m = _CRL_NAME.match(name)
    if not _ISSUER.match(issuer) or m is None:
        raise NotFoundError(
            f"no CRL at /crl/{issuer[:40]}/{name[:40]}; CRLs are at /crl/<issuer>/<partition>.crl|.delta"
        )
    return issuer, int(m.group(1)), m.group(2) == "delta"
