"""A large UpdateInfoList in parts and a large confirmation in parts (iotdlm.transfer.peer_parts,
docs/adr/0019): the Range and Content-Range parsers, SP2's assembly of parts (any order,
duplicates, gaps, tampering, too large), the offset in the signed fetch request, and the cut of
a confirmation. Named cases and hypothesis; real keys where something is signed."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError, IotdlmError, TooLargeError, UntrustedError
from iotdlm.transfer import peer, sp2
from iotdlm.transfer.messages import Enrolled, open_confirmation
from iotdlm.transfer.peer_parts import (
    Assembly,
    Part,
    PeerLimits,
    content_range,
    megabytes,
    parse_content_range,
    parse_range,
)
from iotdlm.transfer.shell import _batches
from iotdlm.transfer.trust import cert_der
from tests.helpers import NOW
from tests.unit.test_transfer_messages import SP1_ID, SP2_ID, transfer_identity
from tests.unit.test_transfer_peer import PKI, SP2, TID, _header_resigned, verify

SP1 = transfer_identity(PKI, SP1_ID)


def message(n: int = 5000) -> tuple[str, bytes]:
    """(transfer id, bytes) of a stand-in UpdateInfoList: the id is what SP2 checks the whole against."""
    data = bytes(i * 7 % 251 for i in range(n))
    return hashlib.sha256(data).digest()[:16].hex(), data


def parts_of(data: bytes, cuts: list[int]) -> list[tuple[Part, bytes]]:
    edges = sorted({0, len(data), *(c % len(data) for c in cuts)})
    return [(Part(a, b - 1, len(data)), data[a:b]) for a, b in itertools.pairwise(edges)]


# --- Range / Content-Range ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "offset"), [("bytes=0-", 0), ("bytes=524288-", 524288), (" bytes=5-9 ", 5)])
def test_ranges_sp2_asks_for(value: str, offset: int) -> None:
    assert parse_range(value) == offset


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("bytes=0-10,20-30", "one byte range"),
        ("bytes=-500", "one byte range"),
        ("items=0-", "one byte range"),
        ("bytes=9-5", "end comes before the start"),
        ("bytes=" + "9" * 16 + "-", "one byte range"),
        ("", "one byte range"),
    ],
)
def test_ranges_refused_in_words(value: str, words: str) -> None:
    with pytest.raises(BadRequestError, match=words):
        parse_range(value)


@pytest.mark.parametrize(
    "value", ["bytes 5-4/10", "bytes 0-10/10", "bytes */10", "bytes 0-1/2, 3-4/5", "bits 0-1/2", "bytes 0-1"]
)
def test_content_ranges_refused(value: str) -> None:
    with pytest.raises(BadRequestError, match="Content-Range"):
        parse_content_range(value)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 2**40), length=st.integers(1, 2**30), extra=st.integers(0, 2**30))
def test_content_range_round_trip(start: int, length: int, extra: int) -> None:
    total = start + length + extra
    part = parse_content_range(content_range(start, length, total))
    assert (part.start, part.length, part.total) == (start, length, total)
    assert parse_range(f"bytes={start}-") == start


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=80))
def test_range_parsers_take_arbitrary_text(text: str) -> None:
    for parse in (parse_range, parse_content_range):
        with contextlib.suppress(BadRequestError):
            parse(text)  # type: ignore[operator]


def test_sizes_in_words_and_limits_checked() -> None:
    assert (megabytes(600_000), megabytes(2048), megabytes(15 * 2**20)) == ("0.6 MB", "2.0 KB", "15.0 MB")
    with pytest.raises(ValueError, match="4 MiB"):
        PeerLimits(part_bytes=3 * 2**20)
    with pytest.raises(ValueError, match="at least 1024"):
        PeerLimits(max_body_bytes=10)


# --- SP2's assembly ---------------------------------------------------------------------------------------
def test_parts_in_order_make_the_message() -> None:
    tid, data = message()
    whole = Assembly(tid, 10_000)
    assert whole.next_offset() == 0
    for part, body in parts_of(data, [1000, 2000, 4000]):
        assert whole.next_offset() == part.start
        whole.add(part, body)
    assert whole.next_offset() is None
    assert whole.result() == data


def test_a_missing_part_is_asked_for_again_and_never_skipped() -> None:
    tid, data = message()
    whole = Assembly(tid, 10_000)
    parts = parts_of(data, [1000, 2000])
    whole.add(*parts[0])
    whole.add(*parts[2])
    assert whole.next_offset() == 1000
    with pytest.raises(BadRequestError, match="bytes from 1000 on are missing"):
        whole.result()


CASES: dict[str, tuple[Callable[[Assembly, bytes], None], type[IotdlmError], str]] = {
    "the same part twice, different bytes": (
        lambda w, d: (w.add(Part(0, 9, len(d)), d[:10]), w.add(Part(0, 9, len(d)), b"x" * 10)),  # type: ignore[func-returns-value]
        UntrustedError,
        "twice, and they differ",
    ),
    "an overlapping part that disagrees": (
        lambda w, d: (w.add(Part(0, 9, len(d)), d[:10]), w.add(Part(5, 14, len(d)), b"y" * 10)),  # type: ignore[func-returns-value]
        UntrustedError,
        "twice, and they differ",
    ),
    "another total": (
        lambda w, d: (w.add(Part(0, 9, len(d)), d[:10]), w.add(Part(10, 19, len(d) + 1), d[10:20])),  # type: ignore[func-returns-value]
        UntrustedError,
        "not parts of one message",
    ),
    "fewer bytes than the range": (lambda w, d: w.add(Part(0, 9, len(d)), d[:9]), BadRequestError, "sent 9 bytes"),
    "a range past the total": (lambda w, d: w.add(Part(0, 9, 5), d[:10]), BadRequestError, "not a range"),
    "over the limit": (lambda w, d: w.add(Part(0, 9, 20_000), d[:10]), TooLargeError, "reads at most 9.8 KB"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_parts_are_refused(name: str) -> None:
    act, error, words = CASES[name]
    tid, data = message()
    with pytest.raises(error, match=words):
        act(Assembly(tid, 10_000), data)


def test_parts_of_another_message_are_refused_at_the_end() -> None:
    tid, data = message()
    whole = Assembly(tid, 10_000)
    altered = data[:100] + bytes([data[100] ^ 1]) + data[101:]
    for part, body in parts_of(altered, [3000]):
        whole.add(part, body)
    with pytest.raises(UntrustedError, match=f"is not the one transfer {tid} names"):
        whole.result()


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(1, 3000))
def test_any_order_with_duplicates_and_overlaps_makes_the_message(data: st.DataObject, n: int) -> None:
    tid, whole_bytes = message(n)
    parts = parts_of(whole_bytes, data.draw(st.lists(st.integers(0, 10**6), max_size=12)))
    # overlapping extras: any range of the message, sent again
    for _ in range(data.draw(st.integers(0, 3))):
        a = data.draw(st.integers(0, n - 1))
        b = data.draw(st.integers(a, n - 1))
        parts.append((Part(a, b, n), whole_bytes[a : b + 1]))
    parts += data.draw(st.lists(st.sampled_from(parts), max_size=4))  # duplicates
    order = data.draw(st.permutations(parts))
    whole = Assembly(tid, n)  # the limit is the message's size: overlaps must not count twice against it
    for part, body in order:
        whole.add(part, body)
    assert whole.next_offset() is None
    assert whole.result() == whole_bytes


# --- the offset in the signed fetch request ------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(offset=st.integers(0, peer.MAX_OFFSET - 1))
def test_the_fetch_request_signs_its_offset(offset: int) -> None:
    value = peer.sign_fetch(
        TID, issuer=SP2_ID, audience=SP1_ID, now=NOW, signer=SP2.signer(with_chain=False), offset=offset
    )
    assert verify(value).offset == offset


@pytest.mark.parametrize("bad", [-1, "12", 2**40, True, 1.5])
def test_a_fetch_request_with_a_bad_offset_is_refused(bad: object) -> None:
    with pytest.raises(BadRequestError, match="offset"):
        verify(_header_resigned(lambda c: c.update({peer.CLAIM_OFFSET: bad})))


def test_relay_offsets_round_trip_and_are_bounded() -> None:
    req = peer.PeerRequest(transfer_id=TID, body=b"h", offset=524288)
    assert peer.decode_request(peer.encode(req)) == req
    with pytest.raises(BadRequestError, match="offset"):
        peer.decode_request(peer.encode(peer.PeerRequest(transfer_id=TID, body=b"h", offset=-1)))
    rep = peer.PeerReply(transfer_id=TID, body=b"part", offset=4, total=100)
    assert peer.decode_reply(peer.encode(rep)) == rep


# --- a confirmation in parts ----------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=60), min_size=1, max_size=120, unique=True),
    budget=st.integers(1, 6),
    most=st.integers(1, 200),
)
def test_confirmation_parts_stay_under_the_limits_and_name_every_device_once(
    ids: list[str], budget: int, most: int
) -> None:
    limit = 1024 + budget * 600
    enrolled = [Enrolled(d, hashlib.sha256(d.encode()).digest()) for d in ids]
    state = sp2.Sp2Transfer(
        transfer_id=TID, transfer_ref=bytes.fromhex(TID) * 2, provider_id=SP2_ID, peer_id=SP1_ID,
        peer_certificate=cert_der(SP1.certificate), created_at=NOW,
    )  # fmt: skip
    named: list[str] = []
    for batch in _batches(enrolled, limit - 1024, most):
        assert 1 <= len(batch) <= most
        token = sp2.confirmation(state, batch, NOW, signer=SP2.signer(with_chain=False))
        assert len(token) <= limit
        conf = open_confirmation(token, pinned=SP2.certificate, audience=SP1_ID, now=NOW)
        named += [e.device_id for e in conf.enrolled]
    assert named == ids
