"""A trust transfer too large for one NATS message (issue 13 gap (a), docs/adr/0019), between two
real deployments (``open_side``: nats-server, km with the transfer handlers, cm on HTTPS): SP2
fetches SP1's UpdateInfoList in byte ranges, each with a signed fetch request of its own; SP2's
confirmation goes in parts. What does not fit is a 413 in words, never "km reply is not valid".

The fleet is minted cheaply but for real: pm asks SP1's km for the factory certificates in
batches over NATS (one key for every device: the key is not what this file tests)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from iotdlm.cli.transfer import transfer
from iotdlm.cm.config import Limits
from iotdlm.errors import TooLargeError, UntrustedError
from iotdlm.km.registry import FactoryRegistry
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.transfer import peer
from iotdlm.transfer import status as st
from iotdlm.transfer.messages import VersionInfo
from iotdlm.transfer.peer_handlers import outbox_path, publish_update_info
from iotdlm.transfer.peer_parts import PeerLimits, parse_content_range
from iotdlm.transfer.shell import Sp1Service, Sp2Service
from iotdlm.wire import km as kmsg
from tests.helpers import make_csr
from tests.integration.test_cm import LIMITS, ShiftClock
from tests.integration.test_transfer_peer import DTYPE, SP1_FALLBACK, SP1_ID, SP2_ID, Pair, Side, open_side

pytestmark = [pytest.mark.nats, pytest.mark.real_clock]


async def mint(side: Side, ids: list[str], profile: str = "factory") -> None:
    """Certificates of ``profile`` for ``ids`` from the side's km, asked for by pm in batches."""
    key = generate_key(Algorithm.P256)
    pm = await side.client(f"pm-{DTYPE}")
    for i in range(0, len(ids), kmsg.MAX_BATCH):
        items = [
            kmsg.IssueItem(device_id=d, profile=profile, csr=make_csr(key, d)) for d in ids[i : i + kmsg.MAX_BATCH]
        ]
        results = await pm.issue_batch(items)
        assert [r.error for r in results if r.error is not None] == []


@contextlib.asynccontextmanager
async def big_pair(
    tmp: Path, n: int, limits: PeerLimits | None = None, cm_limits: Limits = LIMITS
) -> AsyncIterator[tuple[Pair, list[str]]]:
    clock = ShiftClock()
    async with (
        open_side(tmp / "sp1", "SP1", SP1_ID, clock, limits, cm_limits) as sp1,
        open_side(tmp / "sp2", "SP2", SP2_ID, clock) as sp2,
    ):
        registrar = FactoryRegistry(sp2.store, clock, enroll_uri=f"{sp2.url}/.well-known/est")
        registrar.register_cas([sp1.dep.ca_certificate("root"), sp1.dep.ca_certificate("factory")], actor="sp2-op")
        ids = [f"big-{i:05d}" for i in range(n)]
        await mint(sp1, ids)
        yield (
            Pair(
                sp1,
                sp2,
                Sp1Service(store=sp1.store, identity=sp1.identity, clock=clock, fallback_uri=SP1_FALLBACK),
                Sp2Service(store=sp2.store, identity=sp2.identity, clock=clock, registrar=registrar),
                {},
            ),
            ids,
        )


async def get(side: Side, tid: str, header: str, rng: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A raw GET of the UpdateInfoList at SP1's cm, as any HTTP client would send it."""
    headers = {peer.FETCH_HEADER: header, **({"Range": rng} if rng is not None else {})}
    ctx = ssl.create_default_context(cadata=side.root_pem.decode())
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{side.url}/transfer/{tid}/update-info", ssl=ctx, headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def fetch_header(pair: Pair, tid: str, offset: int = 0, **kw: Any) -> str:
    return peer.sign_fetch(
        tid, issuer=SP2_ID, audience=SP1_ID, now=pair.sp2.clock.now(),
        signer=pair.sp2.identity.signer(with_chain=False), offset=offset, **kw,
    )  # fmt: skip


async def test_parts_of_a_small_km_reply_make_the_list_and_the_confirmation_goes_in_parts(tmp_path: Path) -> None:
    async with big_pair(tmp_path, 24, PeerLimits(part_bytes=4096)) as (pair, ids):
        tid, token = pair.export(ids)
        assert len(token) > 5 * 4096  # ~1.5 KB a device: six parts or more
        # what an HTTP client sees: 206 and where the part lies
        status, headers, body = await get(pair.sp1, tid, fetch_header(pair, tid), "bytes=0-")
        assert status == 206
        part = parse_content_range(headers["Content-Range"])
        assert (part.start, part.end, part.total, body) == (0, 4095, len(token), token[:4096])
        status, headers, body = await get(pair.sp1, tid, fetch_header(pair, tid, 8192), "bytes=8192-")
        assert (status, headers["Content-Range"], body) == (206, f"bytes 8192-12287/{len(token)}", token[8192:12288])
        # the whole of it, as `transfer accept --from` fetches it
        async with pair.peer_client() as c:
            assert await c.fetch_update_info(tid) == token
            _, tm = pair.accept(token)
            assert "accepted" in await c.send_transfer_message(tid, tm)
            pair.enrolled_at_ca2(tid, ids)
            parts = pair.sp2svc.confirm_parts(tid, max_bytes=4096, max_devices=10)
            assert len(parts) == 3  # 10 + 10 + 4 devices
            assert all(len(p) <= 1024 for p in parts)  # ~45 B a device
            said = await c.send_confirmations(tid, parts)
        assert sum(int(s.split()[0]) for s in said) == len(ids)
        assert {r.status for r in pair.sp1svc.status(tid).values()} == {st.REVOKED_AT_CA1}


async def test_parts_refused_in_words_and_audited(tmp_path: Path) -> None:
    async with big_pair(tmp_path, 8, PeerLimits(part_bytes=2048)) as (pair, ids):
        tid, token = pair.export(ids)
        # a part asked for again with the same signed request: a replay
        header = fetch_header(pair, tid, 2048)
        assert (await get(pair.sp1, tid, header, "bytes=2048-"))[0] == 206
        status, _, body = await get(pair.sp1, tid, header, "bytes=2048-")
        assert (status, b"already used" in body) == (403, True)
        # a signed request for one part sent with the Range of another
        status, _, body = await get(pair.sp1, tid, fetch_header(pair, tid, 2048), "bytes=4096-")
        assert (status, b"asks for byte 2048 on, the relay for byte 4096 on" in body) == (403, True)
        # past the end, a Range that is not one, no Range for a list that takes several parts
        status, _, body = await get(pair.sp1, tid, fetch_header(pair, tid, len(token)), f"bytes={len(token)}-")
        assert (status, b"past the end" in body) == (400, True)
        status, _, body = await get(pair.sp1, tid, fetch_header(pair, tid), "bytes=0-10,20-30")
        assert (status, b"one byte range" in body) == (400, True)
        status, _, body = await get(pair.sp1, tid, fetch_header(pair, tid))
        assert status == 413
        assert b"one answer carries at most 2.0 KB: fetch it in parts" in body
        assert b"km reply is not valid" not in body
        audited = [r for r in pair.sp1.store.list_audit(kind="refused", limit=100)]
        assert len(audited) == 3  # the replay, the offset, past the end (km's refusals; cm's own are logged)
        # SP2 reads no more than its limit
        async with pair.peer_client(limits=PeerLimits(max_update_info_bytes=4096)) as c:
            with pytest.raises(TooLargeError, match=r"is \d+\.\d KB; this provider reads at most 4\.0 KB"):
                await c.fetch_update_info(tid)
        # a TransferMessage or confirmation over SP1's cm limit: 413, in words
        async with pair.peer_client() as c:
            with pytest.raises(TooLargeError, match=r"413.*the confirmation is 0\.6 MB; the limit is 0\.5 MB"):
                await c.send_confirmation(tid, b"\xa0" * 600_000)
        # an outbox altered at SP1 (same length): SP2 refuses the parts before it verifies the JWS
        outbox_path(pair.sp1.dep.root, tid).write_bytes(token[:100] + bytes([token[100] ^ 1]) + token[101:])
        async with pair.peer_client() as c:
            with pytest.raises(UntrustedError, match=f"is not the one transfer {tid} names"):
                await c.fetch_update_info(tid)


async def test_a_list_over_the_old_4_mib_relay_limit_goes_through(tmp_path: Path) -> None:
    """1,200 devices: km's reply with the whole list was ~3.8 KB a device, over the 4 MiB envelope
    from ~1,090 devices on ("403 km reply is not valid"). With the default limits it comes in parts."""
    async with big_pair(tmp_path, 1200) as (pair, ids):
        start = pair.sp1.clock.now()
        tid, token = pair.sp1svc.export(
            ids, peer_id=SP2_ID, peer_certificate=pair.sp2.identity.certificate,
            not_before=start, not_after=start + dt.timedelta(days=7), version=lambda d: VersionInfo(1, ""),
        )  # fmt: skip
        publish_update_info(pair.sp1.dep.root, tid, token)
        assert len(token) > PeerLimits().part_bytes * 3
        async with pair.peer_client() as c:
            uil = await c.fetch_update_info(tid)
        assert hashlib.sha256(uil).digest()[:16].hex() == tid
        got, _ = pair.accept(uil)
        assert got == tid
        assert len(pair.sp2svc.status(tid)) == 1200


async def test_the_cli_says_what_is_too_large_and_exits_4(tmp_path: Path) -> None:
    """SP1's cm takes 1 KiB bodies here: `confirm --send` is refused with 413 and the operator reads
    which message, its size, the limit and what to do -- exit 4, never "km reply is not valid"."""
    small_cm = dataclasses.replace(LIMITS, max_transfer_body_bytes=1024)
    async with big_pair(tmp_path, 40, cm_limits=small_cm) as (pair, ids):
        tid, token = pair.export(ids)
        _, tm = pair.accept(token)
        pair.sp1svc.accept(tm)
        pair.enrolled_at_ca2(tid, ids)
        root = tmp_path / "sp1-root.pem"
        root.write_bytes(pair.sp1.root_pem)
        (pair.sp2.dep.root / "transfer" / "identity" / "certificate.pem").write_bytes(
            certs_to_pem([pair.sp2.identity.certificate])
        )
        args = ["confirm", "--data", str(pair.sp2.dep.root), "--transfer", tid, "--send", pair.sp1.url,
                "--cacert", str(root)]  # fmt: skip
        out = await asyncio.to_thread(CliRunner().invoke, transfer, args)
    said = " ".join(out.output.split())
    assert out.exit_code == 4, said
    assert "413" in said
    assert "the confirmation is 2.0 KB; the limit is 1.0 KB: send the confirmation in parts" in said
    assert "not valid" not in said
