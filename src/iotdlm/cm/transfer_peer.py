"""cm's provider-to-provider routes of a trust transfer (issue 13, docs/adr/0011), at SP1's cm:

=============================================  ==============================================
``GET /transfer/{tid}/update-info``             SP2 fetches the UpdateInfoList; header
                                                ``Iotdlm-Transfer-Request``: SP2's signed fetch
                                                request (:mod:`iotdlm.transfer.peer`); with
                                                ``Range: bytes=N-`` one part of it (206), as
                                                large as km sends in one reply (ADR 0019)
``POST /transfer/{tid}/transfer-message``       SP2's TransferMessage (``application/cwt``)
``POST /transfer/{tid}/confirmation``           SP2's confirmation (``application/cwt``)
=============================================  ==============================================

cm decides nothing: it bounds the input, relays it to the transfer handlers where the store is
(km's workers, :mod:`iotdlm.transfer.peer_handlers`) and encodes the answer. Who may: whoever signed
with the transfer certificate SP1 pinned for this transfer -- checked there, and refusals audited
there. A refusal is one line of text: 400 malformed, 403 wrong signer / bad signature / replay / stale / another
transfer, 404 no such transfer, 409 out of order, 413 too large (a body over ``max_transfer_body_bytes``,
or an UpdateInfoList larger than one part asked for without ``Range``), 415 wrong type, 503 km away.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Set
from typing import Protocol

from aiohttp import web

from iotdlm.bus import subjects as s
from iotdlm.cm import est
from iotdlm.errors import BadRequestError, BadSignatureError, ReplayError, TooLargeError, UntrustedError
from iotdlm.transfer import peer
from iotdlm.transfer.peer_parts import content_range, megabytes, parse_range

CWT = "application/cwt"
JWS = "application/jose"
#: Table 1: the transfer handlers run where km runs
PEER_MODES = frozenset({"certificate-management"})


class PeerRelay(Protocol):
    """What cm needs: a km request with km's signed reply (:meth:`iotdlm.client.km.KmClient.transfer_peer`)."""

    async def transfer_peer(self, subject: str, body: bytes) -> bytes: ...


class PeerRefusedError(UntrustedError):
    """A replayed message of the peer provider, or one whose signature does not verify: 403 at cm
    (cm's table would make a replay a relay failure, 502, and a bad signature a 400)."""

    code = "transfer_refused"


class PeerRoutes:
    def __init__(
        self,
        relay: PeerRelay,
        *,
        require: Callable[[Set[str], str], None],
        read_body: Callable[[web.BaseRequest, int], Awaitable[bytes]],
        max_body: int = 512 * 1024,
    ) -> None:
        """``max_body``: the largest TransferMessage or confirmation taken (cm's
        ``Limits.max_transfer_body_bytes``)."""
        self.relay = relay
        self.require = require
        self.read_body = read_body
        self.max_body = max_body

    def add(self, app: web.Application) -> None:
        app.router.add_get("/transfer/{tid}/update-info", self.update_info)
        app.router.add_post("/transfer/{tid}/transfer-message", self._post(s.KM_TRANSFER_PEER_TRANSFER_MESSAGE))
        app.router.add_post("/transfer/{tid}/confirmation", self._post(s.KM_TRANSFER_PEER_CONFIRMATION))

    async def _relay(self, subject: str, tid: str, body: bytes, offset: int = 0) -> peer.PeerReply:
        req = peer.PeerRequest(transfer_id=tid, body=body, offset=offset)
        try:
            raw = await self.relay.transfer_peer(subject, peer.encode(req))
        except (ReplayError, BadSignatureError) as exc:
            raise PeerRefusedError(exc.message, field=exc.field) from exc
        return peer.decode_reply(raw)

    async def update_info(self, request: web.Request) -> web.Response:
        tid = peer.check_tid(request.match_info["tid"])
        header = request.headers.get(peer.FETCH_HEADER)
        if not header:
            raise UntrustedError(f"sign the request with the agreed transfer key: the {peer.FETCH_HEADER} header")
        asked = request.headers.get("Range")
        offset = parse_range(asked) if asked is not None else 0
        self.require(PEER_MODES, "serving an UpdateInfoList")
        out = await self._relay(s.KM_TRANSFER_PEER_UPDATE_INFO, tid, header.encode("ascii", "replace"), offset)
        headers = {"Content-Type": JWS, "Cache-Control": "no-store", "Accept-Ranges": "bytes"}
        if asked is None:
            if len(out.body) != out.total:
                raise TooLargeError(
                    f"the UpdateInfoList is {megabytes(out.total)}; one answer carries at most "
                    f"{megabytes(len(out.body))}: fetch it in parts with 'Range: bytes=N-' and a signed request "
                    "for each (iotdlm transfer accept --from does)"
                )
            return web.Response(body=out.body, headers=headers)
        if out.offset != offset or not out.body:
            raise BadRequestError(f"km answered byte {out.offset} on, not byte {offset} on")
        headers["Content-Range"] = content_range(offset, len(out.body), out.total)
        return web.Response(status=206, body=out.body, headers=headers)

    def _post(self, subject: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            tid = peer.check_tid(request.match_info["tid"])
            est.require_media_type(request.headers.get("Content-Type"), CWT)
            self.require(PEER_MODES, "relaying a message of the peer provider")
            body = await self._read_message(request, subject)
            if not body:
                raise BadRequestError("the body is empty: post the signed CWT")
            out = await self._relay(subject, tid, body)
            return web.json_response({"transfer": out.transfer_id, "summary": out.summary})

        return handler

    async def _read_message(self, request: web.Request, subject: str) -> bytes:
        confirmation = subject == s.KM_TRANSFER_PEER_CONFIRMATION
        try:
            return await self.read_body(request, self.max_body)
        except TooLargeError:
            size = f"is {megabytes(request.content_length)}" if request.content_length else "is larger"
            what, todo = (
                ("confirmation", "send the confirmation in parts (iotdlm transfer confirm --send does), or ")
                if confirmation
                else ("TransferMessage", "")
            )
            raise TooLargeError(
                f"the {what} {size}; the limit is {megabytes(self.max_body)}: {todo}raise "
                "max_transfer_body_bytes in SP1's cm.toml"
            ) from None


__all__ = ["CWT", "JWS", "PEER_MODES", "PeerRefusedError", "PeerRelay", "PeerRoutes"]
