"""sm's only way out: the :class:`Fetcher` seam (cm will own it), and python-tuf's fetcher on top.

sm needs two operations from the outside world and nothing else:

- ``stream(url, max_length=...)``: a streaming GET (TUF metadata and images), cut off as soon as
  more than ``max_length`` bytes are announced or arrive;
- ``post(url, body, content_type=...)``: the signed download report.

:class:`HttpFetcher` does both over HTTP(S) with urllib3: TLS verified against a given CA bundle
or the system store, no proxy from the environment, no redirects -- and, given ``proxy_url``, only
through that forward proxy: cm's egress proxy (:mod:`iotdlm.cm.egress`; paper 4.4.1, sm reaches
the repository through cm). https goes through a CONNECT tunnel, so TLS stays end to end between
sm and the repository. With cm stopped there is no proxy and every fetch fails.
:class:`NoEgressFetcher` refuses everything without trying (operation modes where cm is off).

:class:`TufFetcher` adapts any :class:`Fetcher` to ``tuf.ngclient.FetcherInterface``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from iotdlm.errors import BadRequestError, TooLargeError, UnavailableError

log = logging.getLogger(__name__)

#: what sm says it is; nothing about the software it holds (Req.6)
USER_AGENT = "iotdlm-sm"
DEFAULT_CHUNK = 1024 * 1024
EGRESS_CLOSED = "egress is closed: cm is off (operation mode)"
#: largest reply body read for a POST (the repository answers a report with a small JSON)
MAX_POST_REPLY = 64 * 1024


class HttpStatusError(UnavailableError):
    """The server answered with an HTTP error status (kept in ``status``).

    Its own wire code, so :func:`iotdlm.errors.from_wire` still rebuilds plain ``unavailable``
    errors as :class:`~iotdlm.errors.UnavailableError`; the signature accepts what from_wire passes."""

    code = "http_status"

    def __init__(
        self, message: str, *, status: int = 0, field: str | None = None, device_id: str | None = None
    ) -> None:
        super().__init__(message, field=field, device_id=device_id)
        self.status = status


@dataclass(frozen=True)
class PostResponse:
    status: int
    body: bytes


class Fetcher(Protocol):
    """Egress for sm. Implementations raise :class:`~iotdlm.errors.UnavailableError` (or
    :class:`HttpStatusError`) when the far end cannot be reached or refuses, and
    :class:`~iotdlm.errors.TooLargeError` when a body exceeds ``max_length``."""

    def stream(self, url: str, *, max_length: int | None = None) -> AbstractContextManager[Iterator[bytes]]:
        """GET ``url``; the context yields the body chunk by chunk (never more than ``max_length``)."""
        ...

    def post(self, url: str, body: bytes, *, content_type: str) -> PostResponse: ...


class NoEgressFetcher:
    """Refuses every request: what sm gets when cm is off."""

    def stream(self, url: str, *, max_length: int | None = None) -> AbstractContextManager[Iterator[bytes]]:
        raise UnavailableError(EGRESS_CLOSED)

    def post(self, url: str, body: bytes, *, content_type: str) -> PostResponse:
        raise UnavailableError(EGRESS_CLOSED)


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class HttpFetcher:
    """Direct HTTP(S) egress with urllib3.

    ``ca_bundle``: PEM file of the CAs that may sign the repository's TLS certificate (default:
    the system store). Environment proxies are not used and redirects are not followed: sm talks to
    the configured repository only.
    """

    def __init__(
        self,
        *,
        ca_bundle: Path | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        chunk_size: int = DEFAULT_CHUNK,
        retries: int = 2,
        proxy_url: str | None = None,
    ) -> None:
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise BadRequestError(f"CA bundle {ca_bundle} does not exist", field="ca_bundle")
        if proxy_url is not None and urlsplit(proxy_url).scheme != "http":
            raise BadRequestError(f"the egress proxy must be an http:// URL, not {proxy_url!r}", field="proxy_url")
        self.chunk_size = chunk_size
        self.proxy_url = proxy_url
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._retries = urllib3.Retry(total=retries, connect=retries, read=0, redirect=0, status=0, other=0)
        ca_certs = str(ca_bundle) if ca_bundle is not None else None
        headers = {"User-Agent": USER_AGENT}
        self._pool: urllib3.PoolManager
        if proxy_url is not None:
            self._pool = urllib3.ProxyManager(
                proxy_url, num_pools=4, maxsize=4, cert_reqs="CERT_REQUIRED", ca_certs=ca_certs, headers=headers
            )
        else:
            self._pool = urllib3.PoolManager(
                num_pools=4, maxsize=4, cert_reqs="CERT_REQUIRED", ca_certs=ca_certs, headers=headers
            )

    def _request(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        if urlsplit(url).scheme not in ("http", "https"):
            raise BadRequestError(f"only http and https URLs are fetched, not {url!r}")
        try:
            return self._pool.request(
                method,
                url,
                body=body,
                headers=headers,
                preload_content=False,
                redirect=False,
                retries=self._retries,
                timeout=self._timeout,
                decode_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
            if self.proxy_url is not None and isinstance(reason, urllib3.exceptions.ProxyError):
                raise UnavailableError(
                    f"cannot reach {_where(url)} through the egress proxy {self.proxy_url} (is cm running, and is "
                    f"the repository on its allow-list?): {reason}"
                ) from exc
            raise UnavailableError(f"cannot reach {_where(url)}: {reason}") from exc

    @contextlib.contextmanager
    def stream(self, url: str, *, max_length: int | None = None) -> Iterator[Iterator[bytes]]:
        resp = self._request("GET", url, None, {"Accept-Encoding": "identity"})
        complete = False
        try:
            if resp.status != 200:
                raise HttpStatusError(
                    f"{_where(url)} answered HTTP {resp.status} for {urlsplit(url).path}", status=resp.status
                )
            announced = resp.headers.get("Content-Length")
            if max_length is not None and announced is not None and announced.isdigit() and int(announced) > max_length:
                raise TooLargeError(
                    f"{urlsplit(url).path} is announced as {announced} bytes, more than the {max_length} allowed; "
                    "not downloaded"
                )
            yield self._chunks(resp, url, max_length)
            complete = True
        finally:
            if not complete:
                # never drain an unwanted body (it may be huge): drop the connection
                resp.close()
            resp.release_conn()

    def _chunks(self, resp: urllib3.BaseHTTPResponse, url: str, max_length: int | None) -> Iterator[bytes]:
        received = 0
        try:
            while True:
                chunk = resp.read(self.chunk_size)
                if not chunk:
                    return
                received += len(chunk)
                if max_length is not None and received > max_length:
                    raise TooLargeError(
                        f"{urlsplit(url).path}: the server sent more than the {max_length} bytes allowed; cut off"
                    )
                yield chunk
        except urllib3.exceptions.HTTPError as exc:
            raise UnavailableError(f"download from {_where(url)} failed after {received} bytes: {exc}") from exc

    def post(self, url: str, body: bytes, *, content_type: str) -> PostResponse:
        resp = self._request("POST", url, body, {"Content-Type": content_type})
        try:
            data = resp.read(MAX_POST_REPLY + 1)
        except urllib3.exceptions.HTTPError as exc:
            raise UnavailableError(f"no answer from {_where(url)}: {exc}") from exc
        finally:
            resp.close()
            resp.release_conn()
        return PostResponse(status=resp.status, body=data[:MAX_POST_REPLY])

    def close(self) -> None:
        self._pool.clear()


class TufFetcher(FetcherInterface):
    """python-tuf's ngclient fetches through this: every byte goes through one :class:`Fetcher`.

    HTTP error statuses become ``DownloadHTTPError`` (ngclient stops looking for newer roots on
    404/403); every other error of the seam (egress closed, unreachable, too large) propagates as
    the iotdlm error it is, for :func:`iotdlm.sm.updater.map_error` to report.
    """

    def __init__(self, fetcher: Fetcher) -> None:
        self._fetcher = fetcher

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._chunks(url)

    def _chunks(self, url: str) -> Iterator[bytes]:
        try:
            with self._fetcher.stream(url) as chunks:
                yield from chunks
        except HttpStatusError as exc:
            raise tuf_exc.DownloadHTTPError(exc.message, exc.status) from exc
