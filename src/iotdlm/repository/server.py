"""HTTP(S) front of the vendor repository: TUF metadata and images as files, and sm's reports.

Routes (every error body is JSON ``{"code", "message"}``)::

    GET  /metadata/{name}     metadata/N.root.json, timestamp.json, N.snapshot.json, N.<role>.json
    GET  /targets/{path}      targets/<dtype>/<sha256>.<name> (consistent-snapshot names)
    POST /reports             application/jose: sm's signed download report (64 KiB at most)
    GET  /health              {"status": "ok"}

Files are streamed from disk (``web.FileResponse``). A path is served only if, once resolved, it
is a regular file inside its folder and no component is hidden (``.``-prefixed: temp files, locks):
anything else is 404. Keys, settings and reports are never reachable.

Every request is kept in :attr:`RepositoryServer.requests` (method, path, query, headers, body),
so tests can prove what clients sent -- Req.6: the version installed on a device never leaves the
factory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple

from aiohttp import web
from aiohttp.typedefs import Handler

from iotdlm.clock import Clock, SystemClock
from iotdlm.errors import (
    BadSignatureError,
    ConflictError,
    IotdlmError,
    NotAuthorizedError,
    NotFoundError,
    RejectedError,
    ReplayError,
    TooLargeError,
    UnavailableError,
    UntrustedError,
)
from iotdlm.repository.repo import VendorRepository
from iotdlm.wire.report import MAX_REPORT_BYTES

log = logging.getLogger(__name__)

REPORT_CONTENT_TYPE: Final = "application/jose"
_METADATA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.json$")
_BODY: Final = web.RequestKey("iotdlm.body", bytes)


class RecordedRequest(NamedTuple):
    """One request as the server received it (path and query still percent-encoded)."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


def http_status(exc: IotdlmError) -> int:
    """The HTTP status for an error, once, at this boundary."""
    if isinstance(exc, TooLargeError):
        return 413
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, BadSignatureError):
        return 401
    if isinstance(exc, UntrustedError | NotAuthorizedError):
        return 403
    if isinstance(exc, ReplayError | ConflictError):
        return 409
    if isinstance(exc, RejectedError):
        return 400
    if isinstance(exc, UnavailableError):
        return 503
    return 500


def _error(exc: IotdlmError) -> web.Response:
    status = http_status(exc)
    body = exc.to_wire() if status < 500 else {"code": "internal", "message": "internal error, see the server log"}
    return web.json_response(body, status=status)


def _not_found() -> web.Response:
    return _error(NotFoundError("no such file"))


def _inside(base: Path, relative: str) -> Path | None:
    """``base/relative`` if it is a regular, non-hidden file inside ``base`` once resolved, else None."""
    parts = relative.split("/")
    if not relative or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return None
    try:
        root = base.resolve()
        candidate = (root / relative).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
    except (OSError, ValueError):  # embedded NUL, name too long, loops
        return None
    return candidate


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the repository server listens on loopback only (127.0.0.1, ::1, localhost), not {host!r}")


class _BodyTooLarge(Exception):
    def __init__(self, partial: bytes) -> None:
        super().__init__("request body too large")
        self.partial = partial


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    """The request body, or _BodyTooLarge (carrying what was read) past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(16 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(b"".join(chunks)[: limit + 1])
    return b"".join(chunks)


class RepositoryServer:
    """The repository over HTTP(S) on a loopback address; an async context manager.

    ``port=0`` picks a free port; :attr:`url` says which (``http(s)://127.0.0.1:PORT``).
    """

    def __init__(
        self,
        repo: VendorRepository,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        clock: Clock | None = None,
        *,
        max_report_bytes: int = MAX_REPORT_BYTES,
        log_requests: bool = True,
    ) -> None:
        _check_loopback(host)
        self.repo = repo
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.max_report_bytes = max_report_bytes
        #: every request received, in completion order (kept only with ``log_requests``: it grows)
        self.requests: list[RecordedRequest] = []
        self.log_requests = log_requests
        self._runner: web.AppRunner | None = None

    # -- lifecycle
    async def __aenter__(self) -> RepositoryServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("server already started")
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise UnavailableError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("repository %s serving on %s", self.repo.path, self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        """Base URL: metadata under ``url + "/metadata/"``, images under ``url + "/targets/"``."""
        scheme = "https" if self.ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    # -- the application
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=self.max_report_bytes + 1)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metadata/{name}", self._metadata)
        app.router.add_get("/targets/{path:.*}", self._targets)
        app.router.add_post("/reports", self._report)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Request log: every request, whatever the route and outcome."""
        if not self.log_requests:
            return await handler(request)
        if request.path != "/reports" and request.body_exists:  # /reports reads (and records) its own
            try:
                request[_BODY] = await _read_bounded(request, self.max_report_bytes)
            except _BodyTooLarge as exc:
                request[_BODY] = exc.partial
        try:
            return await handler(request)
        finally:
            self.requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.rel_url.raw_path,
                    query=request.rel_url.raw_query_string,
                    headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers),
                    body=request.get(_BODY, b""),
                )
            )

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not _METADATA_NAME.match(name):
            return _not_found()
        path = _inside(self.repo.metadata_dir, name)
        if path is None:
            return _not_found()
        headers = {"Content-Type": "application/json"}
        if name == "timestamp.json":
            headers["Cache-Control"] = "no-store"  # the one file that changes in place
        return web.FileResponse(path, headers=headers)

    async def _targets(self, request: web.Request) -> web.StreamResponse:
        path = _inside(self.repo.targets_dir, request.match_info["path"])
        if path is None:
            return _not_found()
        return web.FileResponse(path, chunk_size=256 * 1024, headers={"Content-Type": "application/octet-stream"})

    async def _report(self, request: web.Request) -> web.Response:
        """Paper 4.4.5: sm reports a verified download."""
        if request.content_length is not None and request.content_length > self.max_report_bytes:
            return _error(TooLargeError(f"report exceeds {self.max_report_bytes} bytes"))
        try:
            body = await _read_bounded(request, self.max_report_bytes)
        except _BodyTooLarge as exc:
            request[_BODY] = exc.partial
            return _error(TooLargeError(f"report exceeds {self.max_report_bytes} bytes"))
        request[_BODY] = body
        if request.content_type != REPORT_CONTENT_TYPE:
            return web.json_response(
                {"code": "unsupported", "message": f"Content-Type must be {REPORT_CONTENT_TYPE}"}, status=415
            )
        try:
            report = await asyncio.to_thread(self.repo.record_report, body, now=self.clock.now())
        except IotdlmError as exc:
            if http_status(exc) >= 500:
                log.exception("report failed")
            return _error(exc)
        except Exception:
            log.exception("report failed unexpectedly")
            return web.json_response({"code": "internal", "message": "internal error, see the server log"}, status=500)
        return web.json_response(
            {
                "status": "recorded",
                "target_path": report.target_path,
                "release_counter": report.release_counter,
                "nonce": report.nonce,
            },
            status=201,
        )


__all__ = ["REPORT_CONTENT_TYPE", "RecordedRequest", "RepositoryServer", "http_status"]
