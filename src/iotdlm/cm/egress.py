"""sm's only way out: a forward HTTP proxy in cm, restricted to an allow-list of repository origins.

The paper (4.4.1) has sm reach the remote repository "through the communication module cm"; the
architecture adds that with cm off nothing can reach out. So sm's fetcher is configured with this
proxy (``http://127.0.0.1:3128`` by default) and has no other route: with cm stopped there is no
proxy and the fetch fails.

What it does (RFC 9110 9.3.6, RFC 9112 3.2.2):

- ``CONNECT host:port`` for ``https://`` origins: a byte tunnel; TLS is end to end between sm and
  the repository (cm neither sees nor alters the content, sm verifies the repository's certificate
  and, above that, TUF verifies the metadata).
- absolute-URI requests (``GET http://host/path HTTP/1.1``) for ``http://`` origins: the head is
  rewritten to origin form, hop-by-hop and ``Proxy-*`` headers dropped, ``Host`` set from the URI
  and ``Connection: close`` sent, then bytes flow both ways until the origin closes. One request
  per client connection.

Anything whose origin (scheme, host, port) is not on the allow-list gets 403; a request that is
not a proxy request 400; a head that does not arrive within ``head_timeout`` 408; a head larger
than ``max_head_bytes`` 431; an unreachable origin 502 (504 on timeout); beyond ``max_connections``
503. Exchanges with no byte either way for ``idle_timeout`` seconds are closed. Every refusal is
logged.

It is written on asyncio streams rather than aiohttp's server: a tunnel needs the raw socket after
the ``200``, which aiohttp's request handlers do not hand over. The head parser below is pure and
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from iotdlm.aio import cancel_and_wait
from iotdlm.cm.config import EgressConfig
from iotdlm.errors import BadRequestError, ModeError, NotAuthorizedError

log = logging.getLogger(__name__)

_METHOD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own, never forwarded
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "host",
    }
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024


@dataclass(frozen=True, order=True)
class Origin:
    scheme: str  # http | https
    host: str  # lowercase; an IPv6 address without brackets
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_origin(url: str) -> Origin:
    """An allow-list entry: ``http(s)://host[:port]`` with at most a ``/`` path (ValueError otherwise)."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"origin {url!r}: the scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"origin {url!r}: no user information in an origin")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"origin {url!r}: an origin is scheme://host[:port], without a path")
    host = parts.hostname
    if not host:
        raise ValueError(f"origin {url!r}: no host")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"origin {url!r}: bad port") from exc
    return Origin(parts.scheme, host.lower(), port)


class AllowList:
    """The origins sm may reach."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(parse_origin(o) for o in origins)

    def allows(self, origin: Origin) -> bool:
        return origin in self.origins


@dataclass(frozen=True)
class ProxyRequest:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


def parse_head(head: bytes) -> ProxyRequest:
    """Parse an HTTP/1.x request head (request line and header fields, up to the blank line).
    Strict: anything unusual is a BadRequestError (a proxy that guesses is a smuggling vector)."""
    if not head.endswith(b"\r\n\r\n"):
        raise BadRequestError("request head is not terminated by an empty line")
    try:
        text = head[:-4].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequestError("request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequestError("malformed request line")
    method, target, version = parts
    if not method or not set(method) <= _METHOD_CHARS:
        raise BadRequestError("malformed request method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequestError("only HTTP/1.0 and HTTP/1.1 are spoken here")
    if not target or any(c <= " " or c == "\x7f" for c in target):
        raise BadRequestError("malformed request target")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise BadRequestError("malformed header field")
        value = value.strip(" \t")
        if any((c < " " and c != "\t") or c == "\x7f" for c in value):
            raise BadRequestError("control character in a header field")
        headers.append((name, value))
    req = ProxyRequest(method, target, version, tuple(headers))
    lengths = [v for k, v in headers if k.lower() == "content-length"]
    encodings = [v for k, v in headers if k.lower() == "transfer-encoding"]
    if len(lengths) > 1 or (lengths and encodings):
        raise BadRequestError("ambiguous message length (Content-Length with Transfer-Encoding, or twice)")
    if lengths and not lengths[0].isdigit():
        raise BadRequestError("bad Content-Length")
    return req


def target_origin(req: ProxyRequest) -> Origin:
    """The origin a proxy request is for: CONNECT's authority (an https origin), or the absolute
    URI of any other method (an http origin; https:// in a plain request is refused, as a client
    must tunnel it)."""
    if req.method == "CONNECT":
        parts = urllib.parse.urlsplit("//" + req.target)
        try:
            port = parts.port
        except ValueError:
            raise BadRequestError("CONNECT target has a bad port") from None
        if (
            not parts.hostname
            or port is None
            or parts.username is not None
            or parts.path
            or parts.query
            or parts.fragment
        ):
            raise BadRequestError("CONNECT target must be host:port")
        return Origin("https", parts.hostname.lower(), port)
    if not req.target.lower().startswith("http://"):
        raise BadRequestError("not a proxy request: send an absolute http:// URI, or CONNECT host:port for https")
    parts = urllib.parse.urlsplit(req.target)
    try:
        port = parts.port or 80
    except ValueError:
        raise BadRequestError("request URI has a bad port") from None
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise BadRequestError("request URI must name a host, without user information")
    return Origin("http", parts.hostname.lower(), port)


def rewrite_head(req: ProxyRequest, origin: Origin) -> bytes:
    """The head sent to the origin for a forwarded (non-CONNECT) request."""
    parts = urllib.parse.urlsplit(req.target)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host = origin.authority if origin.port != _DEFAULT_PORTS[origin.scheme] else origin.authority.rsplit(":", 1)[0]
    lines = [f"{req.method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in req.headers if k.lower() not in _HOP_BY_HOP]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _status(code: int, reason: str, message: str) -> bytes:
    body = (" ".join(message.split())[:300] + "\n").encode("ascii", "replace")
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class EgressProxy:
    """The forward proxy. ``await start()``, then ``port``; ``await stop()`` closes the listener and
    every open exchange (with cm off, sm cannot reach out)."""

    def __init__(self, config: EgressConfig, *, admit: Callable[[], None] | None = None) -> None:
        """``admit`` is asked before each exchange and raises ModeError to refuse it (503): the
        operation mode (Table 1) lets sm out only in software-management."""
        self.config = config
        self.admit = admit
        self.allow = AllowList(config.allow_origins)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the egress proxy is not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the egress proxy is already started")
        self._server = await asyncio.start_server(
            self._accept, self.config.host, self.config.port, limit=self.config.max_head_bytes
        )
        self._port = self._server.sockets[0].getsockname()[1]
        log.info(
            "egress proxy on %s for %s", self.url, ", ".join(str(o) for o in sorted(self.allow.origins)) or "no origin"
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await cancel_and_wait(list(self._tasks), what="egress connections")
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.config.max_connections:
            self._refuse(writer, 503, "Service Unavailable", "too many connections through the egress proxy")
            await _close(writer)
            return
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("egress: connection ended: %s", exc)
        except asyncio.CancelledError:
            # stop() closing the exchange. Not re-raised: asyncio's stream server (3.11) reads
            # this task's exception() in a callback and would log a cancelled task as an error.
            log.debug("egress: exchange closed by stop()")
        except Exception:
            log.exception("egress: unexpected failure")
            self._refuse(writer, 500, "Internal Server Error", "internal error")
        finally:
            self._tasks.discard(task)
            await _close(writer)

    def _refuse(self, writer: asyncio.StreamWriter, code: int, reason: str, message: str) -> None:
        peer = writer.get_extra_info("peername")
        log.warning("egress refused %s: %d %s", peer, code, message)
        if not writer.is_closing():
            writer.write(_status(code, reason, message))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.head_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            self._refuse(writer, 408, "Request Timeout", f"no request head within {cfg.head_timeout:g} s")
            return
        except asyncio.LimitOverrunError:
            self._refuse(writer, 431, "Request Header Fields Too Large", "request head too large")
            return
        except asyncio.IncompleteReadError:
            return  # the client left before sending a head
        try:
            req = parse_head(head)
            origin = target_origin(req)
        except BadRequestError as exc:
            self._refuse(writer, 400, "Bad Request", exc.message)
            return
        if self.admit is not None:
            try:
                self.admit()
            except ModeError as exc:
                self._refuse(writer, 503, "Service Unavailable", exc.message)
                return
        if not self.allow.allows(origin):
            err = NotAuthorizedError(f"{origin} is not an allowed repository origin")
            self._refuse(writer, 403, "Forbidden", err.message)
            return
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                up_reader, up_writer = await asyncio.open_connection(origin.host, origin.port, limit=_CHUNK)
        except TimeoutError:
            self._refuse(writer, 504, "Gateway Timeout", f"{origin} did not answer within {cfg.connect_timeout:g} s")
            return
        except OSError as exc:
            self._refuse(writer, 502, "Bad Gateway", f"cannot reach {origin}: {exc.strerror or exc}")
            return
        try:
            if req.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                log.info("egress: tunnel to %s", origin)
            else:
                up_writer.write(rewrite_head(req, origin))
                log.info("egress: %s %s", req.method, urllib.parse.urlsplit(req.target)._replace(query="").geturl())
            await self._pipe(reader, writer, up_reader, up_writer)
        finally:
            await _close(up_writer)

    async def _pipe(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        up_r: asyncio.StreamReader,
        up_w: asyncio.StreamWriter,
    ) -> None:
        """Copy both ways until the origin closes, or nothing moves for ``idle_timeout`` seconds.
        The client ending its side is passed on (half close); the origin ending its side ends all."""
        loop = asyncio.get_running_loop()
        last = [loop.time()]

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while True:
                data = await src.read(_CHUNK)
                if not data:
                    break
                last[0] = loop.time()
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof() and not dst.is_closing():
                with contextlib.suppress(OSError):
                    dst.write_eof()

        upstream = asyncio.create_task(copy(client_r, up_w))
        downstream = asyncio.create_task(copy(up_r, client_w))
        try:
            while not downstream.done():
                remaining = last[0] + self.config.idle_timeout - loop.time()
                if remaining <= 0:
                    log.info("egress: closing an exchange idle for %g s", self.config.idle_timeout)
                    break
                await asyncio.wait({downstream}, timeout=remaining)
        finally:
            for t in (upstream, downstream):
                t.cancel()
            for t in (upstream, downstream):
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                    await t


async def _close(writer: asyncio.StreamWriter) -> None:
    if writer.is_closing():
        return
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)
