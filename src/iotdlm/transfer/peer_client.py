"""SP2's HTTPS client of SP1's cm in a trust transfer (issue 13, docs/adr/0011): fetch the
UpdateInfoList with a signed fetch request, post the TransferMessage and the confirmation.

SP1's cm is authenticated by TLS against the anchors SP2 was given (SP1's root); SP2 by what it
signs with its agreed transfer key. A refusal comes back as the error of its HTTP status, with
cm's one line of text.

A large UpdateInfoList comes in parts (docs/adr/0019): one signed fetch request per byte range
(``Range: bytes=N-``), put together by :class:`~iotdlm.transfer.peer_parts.Assembly` and checked
against the transfer id; a large confirmation goes as several signed confirmations
(:meth:`send_confirmations`), each under SP1's body limit.
"""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from iotdlm.clock import Clock
from iotdlm.errors import (
    BadRequestError,
    ConflictError,
    IotdlmError,
    NotFoundError,
    TooLargeError,
    UnavailableError,
    UntrustedError,
)
from iotdlm.transfer import peer
from iotdlm.transfer.identity import TransferIdentity
from iotdlm.transfer.messages import MAX_CWT_BYTES
from iotdlm.transfer.peer_parts import Assembly, Part, PeerLimits, parse_content_range

#: the most parts SP2 asks for before it gives up (a cm answering a byte at a time)
MAX_PARTS = 4096
_STATUS: dict[int, type[IotdlmError]] = {
    400: BadRequestError,
    403: UntrustedError,
    404: NotFoundError,
    409: ConflictError,
    413: TooLargeError,
    415: BadRequestError,
}


def _context(anchors_pem: bytes | None) -> ssl.SSLContext:
    """TLS to SP1's cm: its certificate must chain to ``anchors_pem`` (None: the system's roots)."""
    cadata = anchors_pem.decode("ascii", "replace") if anchors_pem is not None else None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cadata)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class PeerClient:
    """``async with PeerClient(sp1_cm_url, identity=..., peer_id=..., anchors_pem=..., clock=...)``"""

    def __init__(
        self,
        base_url: str,
        *,
        identity: TransferIdentity,
        peer_id: str,
        anchors_pem: bytes | None,
        clock: Clock,
        timeout: float = 60.0,
        entropy: Callable[[int], bytes] = secrets.token_bytes,
        limits: PeerLimits | None = None,
    ) -> None:
        if not base_url.startswith("https://"):
            raise BadRequestError(f"{base_url[:80]!r}: the peer provider's cm is reached over https:// only")
        self.base_url = base_url.rstrip("/")
        self.identity = identity
        self.peer_id = peer_id
        self.clock = clock
        self.entropy = entropy
        self.limits = limits or PeerLimits()
        self._ssl = _context(anchors_pem)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PeerClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, tid: str, what: str) -> str:
        return f"{self.base_url}/transfer/{peer.check_tid(tid)}/{what}"

    async def _exchange(self, method: str, url: str, *, limit: int, **kw: Any) -> tuple[int, str | None, bytes]:
        """(status 200 or 206, its Content-Range, body) or the error of the refusal."""
        if self._session is None:
            raise RuntimeError("use PeerClient in `async with`")
        try:
            async with self._session.request(method, url, ssl=self._ssl, **kw) as resp:
                # read() returns what has arrived so far, not the whole body: read until EOF or over the limit
                buf = bytearray()
                while len(buf) <= limit:
                    chunk = await resp.content.read(limit + 1 - len(buf))
                    if not chunk:
                        break
                    buf += chunk
                if len(buf) > limit:
                    raise TooLargeError(f"{url} answered more than {limit} bytes")
                body = bytes(buf)
                if resp.status in (200, 206):
                    return resp.status, resp.headers.get("Content-Range"), body
                line = body.decode("utf-8", "replace").strip()[:300]
                if resp.status in (502, 503, 504):
                    raise UnavailableError(f"SP1's cm at {self.base_url} answered {resp.status}: {line}")
                cls = _STATUS.get(resp.status, IotdlmError)
                raise cls(f"SP1's cm refused it ({resp.status}): {line}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UnavailableError(f"SP1's cm at {self.base_url} did not answer: {exc or type(exc).__name__}") from exc

    async def fetch_update_info(self, tid: str) -> bytes:
        """SP1's UpdateInfoList for ``tid`` (a JWS; the caller verifies it: ``Sp2Service.accept``),
        in as many parts as SP1's km sends, each asked for with a signed fetch request of its own."""
        whole = Assembly(peer.check_tid(tid), self.limits.max_update_info_bytes)
        for _ in range(MAX_PARTS):
            offset = whole.next_offset()
            if offset is None:
                return whole.result()
            header = peer.sign_fetch(
                tid,
                issuer=self.identity.provider_id,
                audience=self.peer_id,
                now=self.clock.now(),
                signer=self.identity.signer(with_chain=False),
                entropy=self.entropy,
                offset=offset,
            )
            status, crange, body = await self._exchange(
                "GET", self._url(tid, "update-info"), limit=self.limits.max_update_info_bytes - offset,
                headers={peer.FETCH_HEADER: header, "Range": f"bytes={offset}-"},
            )  # fmt: skip
            if status == 200:  # the whole of it (a cm that ignores Range)
                if offset or not body:
                    raise BadRequestError(f"SP1's cm answered {len(body)} bytes as the whole UpdateInfoList")
                part = Part(0, len(body) - 1, len(body))
            elif crange is None:
                raise BadRequestError("SP1's cm answered a part (206) without saying which (no Content-Range)")
            else:
                part = parse_content_range(crange)
            if part.start != offset:
                raise UntrustedError(
                    f"SP1's cm answered bytes {part.start}-{part.end}, not the part from byte {offset}"
                )
            whole.add(part, body)
        raise TooLargeError(f"the UpdateInfoList of transfer {tid} did not arrive in {MAX_PARTS} parts")

    async def _post(self, tid: str, what: str, token: bytes) -> str:
        _status, _range, out = await self._exchange(
            "POST", self._url(tid, what), limit=MAX_CWT_BYTES, data=token, headers={"Content-Type": "application/cwt"}
        )
        try:
            summary = json.loads(out).get("summary", "")
        except (ValueError, AttributeError):
            summary = ""
        return str(summary)

    async def send_transfer_message(self, tid: str, token: bytes) -> str:
        return await self._post(tid, "transfer-message", token)

    async def send_confirmation(self, tid: str, token: bytes) -> str:
        return await self._post(tid, "confirmation", token)

    async def send_confirmations(self, tid: str, tokens: Sequence[bytes]) -> list[str]:
        """The parts of a large confirmation (``Sp2Service.confirm_parts``), one after the other:
        SP1 takes each as a confirmation of its own (its own cti), in one write each."""
        return [await self._post(tid, "confirmation", t) for t in tokens]


__all__ = ["PeerClient"]
