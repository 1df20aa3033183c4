"""Trust-transfer codecs (seed 003 Listings 1 and 2): round trips, named hostile cases, and
hypothesis on every decoder (arbitrary bytes -> only iotdlm errors)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotdlm.errors import (
    BadRequestError,
    BadSignatureError,
    IotdlmError,
    RejectedError,
    ReplayError,
    UntrustedError,
)
from iotdlm.pki.ca import ca_name
from iotdlm.pki.chain import der
from iotdlm.pki.keys import Algorithm, PrivateKey, generate_key
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_subject, device_uri, module_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.transfer import attestation, cose
from iotdlm.transfer import messages as m
from iotdlm.transfer.identity import TransferIdentity
from iotdlm.transfer.trust import TRANSFER_MODULE
from tests.helpers import NOW, ORG, Pki, make_pki

SP1_ID = "sp1.example"
SP2_ID = "sp2.example"


@dataclasses.dataclass
class Parties:
    """Two providers' PKIs (SP1's root is also the permanent CA), their transfer identities."""

    pki1: Pki
    pki2: Pki
    sp1: TransferIdentity
    sp2: TransferIdentity

    def factory(self, device_id: str, *, pki: Pki | None = None) -> tuple[PrivateKey, x509.Certificate]:
        key = generate_key(Algorithm.P256)
        cert = (
            (pki or self.pki1)
            .cas["factory"]
            .issue(
                DEFAULT_PROFILES["factory"],
                key.public_key(),
                device_subject(device_id, ORG, "sensor"),
                now=NOW,
                serial=x509.random_serial_number(),
                uris=[device_uri(device_id, enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
            )
        )
        return key, cert


def transfer_identity(pki: Pki, provider_id: str, *, module: str = TRANSFER_MODULE) -> TransferIdentity:
    key = generate_key(Algorithm.P256)
    cert = pki.cas["service"].issue(
        DEFAULT_PROFILES["service"],
        key.public_key(),
        ca_name(f"{provider_id} transfer", ORG),
        now=NOW,
        serial=x509.random_serial_number(),
        uris=[module_uri(module, enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )
    return TransferIdentity(provider_id, key, (cert, pki.cas["service"].certificate))


def make_parties() -> Parties:
    pki1, pki2 = make_pki(), make_pki()
    return Parties(pki1, pki2, transfer_identity(pki1, SP1_ID), transfer_identity(pki2, SP2_ID))


P = make_parties()
DEVICES = {d: P.factory(d) for d in ("d1", "d2")}
WINDOW = (NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=7))


def make_export(**kw: Any) -> bytes:
    entries = tuple(
        m.DeviceUpdateInfo(
            factory_tbs=c.tbs_certificate_bytes,
            not_before=WINDOW[0],
            not_after=WINDOW[1],
            version=m.VersionInfo(3, "https://sp1.example/suit/3"),
            ra_reference=attestation.measure(b"fw"),
        )
        for _k, c in DEVICES.values()
    )
    args: dict[str, Any] = {
        "entries": entries,
        "factory_certificates": tuple(der(c) for _k, c in DEVICES.values()),
        "audience": SP2_ID,
        "issued_at": NOW,
    }
    args.update(kw)
    return m.sign_update_info(m.UpdateInfoExport(**args), P.sp1.key, P.sp1.certificate)


def claims(**kw: Any) -> m.TransferClaims:
    args: dict[str, Any] = {
        "reset_not_before": NOW - dt.timedelta(minutes=1),
        "reset_not_after": NOW + dt.timedelta(days=1),
        "ra_uri": "https://ra.sp2.example/x",
        "update_uri": "https://updates.sp2.example/x",
        "update_first": True,
        "enroll_uri": "https://ca2.sp2.example:8443/.well-known/est",
        "fallback_uri": "https://sp2.example/fallback",
        "trust_anchors": (cose.cert_hash(der(P.pki2.root)),),
    }
    args.update(kw)
    return m.TransferClaims(**args)


def header(**kw: Any) -> m.CwtHeader:
    args: dict[str, Any] = {
        "issuer": SP2_ID,
        "audience": SP1_ID,
        "cti": b"c" * 16,
        "issued_at": NOW,
        "not_before": NOW,
        "expires": NOW + dt.timedelta(days=1),
    }
    args.update(kw)
    return m.CwtHeader(**args)


REF = b"r" * 32


def make_tm(signer: cose.CoseSigner | None = None, **kw: Any) -> bytes:
    tm = m.TransferMessage(header(**kw), REF, claims())
    return m.sign_transfer_message(tm, signer or P.sp2.signer(with_chain=False))


# --- UpdateInfoList ------------------------------------------------------------------------------------
def test_update_info_round_trip_and_sizes() -> None:
    token = make_export()
    v = m.open_update_info(token, pinned=P.sp1.certificate, audience=SP2_ID, now=NOW)
    assert [d.device_id for d in v.devices] == ["d1", "d2"]
    assert v.devices[0].info.version == m.VersionInfo(3, "https://sp1.example/suit/3")
    assert v.devices[0].info.ra_reference == attestation.measure(b"fw")
    assert v.transfer_ref == m.sha256(token)
    assert v.transfer_id == m.sha256(token)[:16].hex()
    # Listing 1 on its own: [* DeviceUpdateInfo], each [TBS, #6.1, #6.1, [seq, uri], ?ref]
    raw = cbor2.loads(m.encode_update_info_list(v.export.entries))
    assert isinstance(raw, list)
    assert len(raw) == 2
    assert raw[0][0] == DEVICES["d1"][1].tbs_certificate_bytes
    assert isinstance(raw[0][1], dt.datetime)  # tag 1


def _tamper_payload(token: bytes, change: Callable[[list[Any]], None]) -> bytes:
    """Re-sign a modified payload with SP1's key (so only the semantic checks can catch it)."""
    _h, p, _s = token.split(b".")
    obj = cbor2.loads(base64.urlsafe_b64decode(p + b"=" * (-len(p) % 4)))
    change(obj)
    from joserfc import jws

    from iotdlm.wire.envelope import jose_key

    reg = jws.JWSRegistry(algorithms=["ES256"])
    reg.max_payload_length = 1 << 24
    reg.max_header_length = 1 << 14
    hdr = {"alg": "ES256", "typ": m.JWS_TYP, "x5c": [base64.b64encode(der(P.sp1.certificate)).decode()]}
    return jws.serialize_compact(hdr, cbor2.dumps(obj), jose_key(P.sp1.key), registry=reg).encode()


def _swap_tbs(o: list[Any]) -> None:
    o[0][0][0], o[0][1][0] = o[0][1][0], o[0][0][0]


def _dup_device(o: list[Any]) -> None:
    o[0][1] = o[0][0]
    o[1][1] = o[1][0]


@pytest.mark.parametrize(
    ("name", "make", "error", "match"),
    [
        ("wrong signer", lambda: m.sign_update_info(_exp(), P.sp2.key, P.sp2.certificate), UntrustedError, "agreed"),
        ("other audience", lambda: make_export(audience="sp3"), UntrustedError, "sp3"),
        ("too old", lambda: make_export(issued_at=NOW - dt.timedelta(days=31)), ReplayError, "older"),
        ("in the future", lambda: make_export(issued_at=NOW + dt.timedelta(hours=1)), ReplayError, "future"),
        ("TBS of another certificate", lambda: _tamper_payload(make_export(), _swap_tbs), BadRequestError, "TBS"),
        ("a device twice", lambda: _tamper_payload(make_export(), _dup_device), BadRequestError, "twice"),
        ("bag shorter", lambda: _tamper_payload(make_export(), lambda o: o.__setitem__(1, o[1][0])), BadRequestError,
         "factory certificates"),
        ("extra field", lambda: _tamper_payload(make_export(), lambda o: o.append(1)), BadRequestError, "payload"),
        ("altered", lambda: _flip(make_export(), -100), BadSignatureError, "signature"),
        ("not a JWS", lambda: b"abc", BadRequestError, "compact"),
    ],
)  # fmt: skip
def test_update_info_refusals(name: str, make: Callable[[], bytes], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        m.open_update_info(make(), pinned=P.sp1.certificate, audience=SP2_ID, now=NOW)


def _exp() -> m.UpdateInfoExport:
    return m.UpdateInfoExport(
        entries=(m.DeviceUpdateInfo(DEVICES["d1"][1].tbs_certificate_bytes, *WINDOW, m.VersionInfo(1, "")),),
        factory_certificates=(der(DEVICES["d1"][1]),),
        audience=SP2_ID,
        issued_at=NOW,
    )


def _flip(token: bytes, index: int) -> bytes:
    b = bytearray(token)
    b[index] = ord("A") if b[index] != ord("A") else ord("B")
    return bytes(b)


# --- x5bag ---------------------------------------------------------------------------------------------
def test_x5bag_rfc9360_shapes() -> None:
    one = m.encode_x5bag([der(DEVICES["d1"][1])])
    assert isinstance(cbor2.loads(one), bytes)  # COSE_X509 = bstr / [2* bstr]
    two = m.encode_x5bag([der(c) for _k, c in DEVICES.values()])
    assert isinstance(cbor2.loads(two), list)
    assert [c.serial_number for c in m.decode_x5bag(two)] == [c.serial_number for _k, c in DEVICES.values()]
    with pytest.raises(BadRequestError):
        m.decode_x5bag(cbor2.dumps([]))
    with pytest.raises(BadRequestError, match="certificate #0"):
        m.decode_x5bag(cbor2.dumps([b"not DER", b"x"]))
    with pytest.raises(BadRequestError, match="trailing"):
        m.decode_x5bag(one + b"\x00")


# --- TransferMessage ------------------------------------------------------------------------------------
def test_transfer_message_round_trip_and_claim_keys() -> None:
    token = make_tm()
    tm = m.open_transfer_message(token, pinned=P.sp2.certificate, audience=SP1_ID, now=NOW)
    assert tm.claims == claims()
    assert tm.transfer_ref == REF[: m.TRANSFER_REF_BYTES]  # the transfer id travels, not the whole hash
    msg = cose.parse_sign1(token, what="t", max_bytes=1 << 16)
    assert msg.typ == m.TYP_TRANSFER_MESSAGE
    assert msg.x5t() == (cose.SHA256_64_ALG, cose.cert_hash(der(P.sp2.certificate), cose.SHA256_64_ALG))
    raw = cbor2.loads(msg.payload)
    assert set(raw) == {1, 3, 4, 5, 6, 7, m.TRANSFER, m.TRANSFER_REF}
    group = raw[m.TRANSFER]  # Listing 2, in order, updateURI's (bstr, bool) flattened into it
    assert group[2] == b"https://ra.sp2.example/x"
    assert group[3:5] == [b"https://updates.sp2.example/x", True]
    assert group[7] == [[-16, cose.cert_hash(der(P.pki2.root))]]
    assert isinstance(group[0], dt.datetime)


def test_transfer_message_ra_uri_null_and_update_uri_empty() -> None:
    c = claims(ra_uri=None, update_uri="", update_first=False, trust_anchors=())
    token = m.sign_transfer_message(m.TransferMessage(header(), REF, c), P.sp2.signer(with_chain=False))
    tm = m.open_transfer_message(token, pinned=P.sp2.certificate, audience=SP1_ID, now=NOW)
    assert tm.claims.ra_uri is None
    group = cbor2.loads(cose.parse_sign1(token, what="t", max_bytes=1 << 16).payload)[m.TRANSFER]
    assert group[2] is None
    assert len(group) == 7  # no trustAnchors: the optional trailing item is left out


def _resign_claims(change: Callable[[dict[int, Any]], None]) -> bytes:
    token = make_tm()
    raw = cbor2.loads(cose.parse_sign1(token, what="t", max_bytes=1 << 16).payload)
    change(raw)
    return P.sp2.signer(with_chain=False).sign(cose.dumps(raw), typ=m.TYP_TRANSFER_MESSAGE)


@pytest.mark.parametrize(
    ("name", "make", "error", "match"),
    [
        ("expired", lambda: make_tm(
                issued_at=NOW - dt.timedelta(hours=3),
                not_before=NOW - dt.timedelta(hours=3),
                expires=NOW - dt.timedelta(hours=1),
            ), ReplayError, "expired"),
        ("not yet valid", lambda: make_tm(not_before=NOW + dt.timedelta(hours=1)), ReplayError, "not valid before"),
        ("issued in the future", lambda: make_tm(issued_at=NOW + dt.timedelta(hours=1)), ReplayError, "future"),
        ("other audience", lambda: make_tm(audience="sp9"), UntrustedError, "sp9"),
        ("signed by another key", lambda: make_tm(cose.CoseSigner(P.sp1.key, P.sp2.chain)), BadSignatureError,
         "signature"),
        ("names another certificate", lambda: make_tm(P.sp1.signer(with_chain=False)), UntrustedError, "agreed"),
        ("altered", lambda: _flip(make_tm(), -70), BadSignatureError, "signature"),
        ("unknown claim", lambda: _resign_claims(lambda c: c.__setitem__(-70099, 1)), BadRequestError, "not agreed"),
        ("missing enrollURI (items shift)", lambda: _resign_claims(lambda c: c[m.TRANSFER].pop(5)), BadRequestError,
         "must be"),
        ("too short", lambda: _resign_claims(lambda c: c.__setitem__(m.TRANSFER, c[m.TRANSFER][:6])), BadRequestError,
         "TransferMessage claim must be"),
        ("no TransferMessage claim", lambda: _resign_claims(lambda c: c.pop(m.TRANSFER)), BadRequestError,
         "TransferMessage"),
        ("updateURI flag not a bool", lambda: _resign_claims(lambda c: c[m.TRANSFER].__setitem__(4, b"x")),
         BadRequestError, "updateURI"),
        ("window reversed", lambda: _resign_claims(lambda c: c[m.TRANSFER].__setitem__(1, cbor2.CBORTag(1, 0))),
         BadRequestError, "inconsistent"),
        ("URI not http", lambda: _resign_claims(lambda c: c[m.TRANSFER].__setitem__(5, b"file:///etc")),
         BadRequestError, "URI"),
        ("anchor hash short", lambda: _resign_claims(lambda c: c[m.TRANSFER].__setitem__(7, [[-16, b"h" * 8]])),
         BadRequestError, "SHA-256"),
        ("anchor hash alg", lambda: _resign_claims(lambda c: c[m.TRANSFER].__setitem__(7, [[-15, b"h" * 32]])),
         BadRequestError, "trust anchor"),
        ("short cti", lambda: make_tm(cti=b"x"), BadRequestError, "cti"),
        ("a device message", lambda: m.sign_device_message(m.TransferMessage(header(), REF, claims()),
                                                          P.sp2.signer(with_chain=False)), BadRequestError, "typ"),
    ],
)  # fmt: skip
def test_transfer_message_refusals(name: str, make: Callable[[], bytes], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        m.open_transfer_message(make(), pinned=P.sp2.certificate, audience=SP1_ID, now=NOW)


def test_confirmation_round_trip_and_refusals() -> None:
    conf = m.Confirmation(header(), REF, (m.Enrolled("d1", b"h" * 32), m.Enrolled("d2", b"i" * 32)))
    token = m.sign_confirmation(conf, P.sp2.signer(with_chain=False))
    got = m.open_confirmation(token, pinned=P.sp2.certificate, audience=SP1_ID, now=NOW)
    assert got.enrolled == conf.enrolled
    assert m.peek_transfer_ref(token, typ=m.TYP_CONFIRMATION) == REF[: m.TRANSFER_REF_BYTES]
    with pytest.raises(BadRequestError, match="typ"):
        m.open_transfer_message(token, pinned=P.sp2.certificate, audience=SP1_ID, now=NOW)
    dup = m.Confirmation(header(), REF, (m.Enrolled("d1", b"h" * 32), m.Enrolled("d1", b"h" * 32)))
    with pytest.raises(BadRequestError, match="twice"):
        m.open_confirmation(
            m.sign_confirmation(dup, P.sp2.signer(with_chain=False)), pinned=P.sp2.certificate, audience=SP1_ID, now=NOW
        )


# --- hypothesis: every decoder, arbitrary bytes -> only iotdlm errors ----------------------------------------
def _only_iotdlm(fn: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(IotdlmError):
        fn(data)


DECODERS: dict[str, Callable[[bytes], object]] = {
    "UpdateInfoList": lambda b: m.open_update_info(b, pinned=P.sp1.certificate, audience=SP2_ID, now=NOW),
    "TransferMessage": lambda b: m.open_transfer_message(b, pinned=P.sp2.certificate, audience=SP1_ID, now=NOW),
    "device CWT": lambda b: m.peek_device_message(b),
    "confirmation": lambda b: m.open_confirmation(b, pinned=P.sp2.certificate, audience=SP1_ID, now=NOW),
    "x5bag": m.decode_x5bag,
    "evidence": attestation.peek_evidence,
    "transferRef": lambda b: m.peek_transfer_ref(b, typ=m.TYP_TRANSFER_MESSAGE),
    "TransferMessage payload": lambda b: m.TransferMessage.from_payload(b, what="x"),
}
SEEDS = {
    "UpdateInfoList": make_export(),
    "TransferMessage": make_tm(),
    "device CWT": m.sign_device_message(m.TransferMessage(header(), REF, claims()), P.sp1.signer(with_chain=True)),
    "confirmation": m.sign_confirmation(
        m.Confirmation(header(), REF, (m.Enrolled("d1", b"h" * 32),)), P.sp2.signer(with_chain=False)
    ),
    "x5bag": m.encode_x5bag([der(c) for _k, c in DEVICES.values()]),
    "evidence": attestation.make_evidence(
        lambda b: __import__("iotdlm.pki.keys", fromlist=["sign_bytes"]).sign_bytes(DEVICES["d1"][0], b),
        DEVICES["d1"][0].public_key(),  # type: ignore[arg-type]
        DEVICES["d1"][1],
        nonce=b"n" * 16,
        device_id="d1",
        measurement=b"m" * 32,
    ),
}
SEEDS["transferRef"] = SEEDS["TransferMessage"]
SEEDS["TransferMessage payload"] = cose.parse_sign1(SEEDS["TransferMessage"], what="t", max_bytes=1 << 16).payload


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_decoders_take_arbitrary_bytes(name: str, data: bytes) -> None:
    _only_iotdlm(DECODERS[name], data)


@pytest.mark.parametrize("name", sorted(DECODERS))
# a mutated certificate may carry a negative serial: cryptography warns (and will refuse it later)
@pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_decoders_take_mutated_messages(name: str, data: st.DataObject) -> None:
    seed = bytearray(SEEDS[name])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(seed) - 1))
        seed[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(seed)))
    _only_iotdlm(DECODERS[name], bytes(seed[:cut]) if data.draw(st.booleans()) else bytes(seed))


_cbor = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.binary(max_size=40) | st.text(max_size=20)
    | st.floats(allow_nan=True),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.integers(-70010, 10) | st.text(max_size=5), children, max_size=6),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(obj=_cbor, tag=st.sampled_from([None, 1, 0, 2, 18, 61, 258, 24]))
def test_cwt_claim_and_cose_decoders_take_arbitrary_cbor(obj: Any, tag: int | None) -> None:
    """Well-formed CBOR of the wrong shape (including semantic tags cbor2 decodes itself)."""
    raw = cbor2.dumps(cbor2.CBORTag(tag, obj) if tag is not None else obj)
    for fn in DECODERS.values():
        _only_iotdlm(fn, raw)
    for fn in (
        lambda b: m.TransferMessage.from_payload(b, what="x"),
        lambda b: m.Confirmation.from_payload(b),
    ):
        _only_iotdlm(fn, raw)
    with contextlib.suppress(RejectedError):
        m.DeviceUpdateInfo.from_obj(obj, 0)


def test_depth_and_size_limits() -> None:
    deep = b"\x81" * 100 + b"\x00"
    with pytest.raises(BadRequestError, match=r"CBOR|nested"):
        cose.loads(deep, what="x", max_bytes=1000)
    with pytest.raises(RejectedError, match="exceeds"):
        m.open_transfer_message(b"\x00" * (m.MAX_CWT_BYTES + 1), pinned=P.sp2.certificate, audience=SP1_ID, now=NOW)


_cbor_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64) + 1, 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.builds(cbor2.CBORTag, st.just(1), st.integers(-5, 2**41))
)
_cbor = st.recursive(_cbor_leaf, lambda inner: st.lists(inner, max_size=9), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(group=st.lists(_cbor, max_size=9), ref=_cbor)
def test_listing_2_claim_takes_arbitrary_cbor(group: list[Any], ref: Any) -> None:
    """The TransferMessage claim (Listing 2 as an array) and transferRef hold any CBOR: the codec
    returns a checked message or refuses with an iotdlm error, nothing else."""
    raw = {**header().to_claims(), m.TRANSFER: group, m.TRANSFER_REF: ref}
    try:
        tm = m.TransferMessage.from_payload(cose.dumps(raw), what="t")
    except RejectedError:
        return
    assert len(tm.transfer_ref) == m.TRANSFER_REF_BYTES
    assert tm.claims.reset_not_before < tm.claims.reset_not_after
