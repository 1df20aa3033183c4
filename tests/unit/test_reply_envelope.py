"""km's signed replies (ADR 0006): what :func:`iotdlm.wire.envelope.verify_reply` and
:class:`iotdlm.client.km.KmTrust` accept and refuse, without a bus."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.client.km import KmTrust
from iotdlm.errors import BadRequestError, BadSignatureError, IotdlmError, ReplayError, UntrustedError
from iotdlm.wire.envelope import jose_key, peek_signer, request_digest, verify_reply
from tests.helpers import NOW, make_pki

PKI = make_pki()
KM = PKI.module("km")
CM = PKI.module("cm")
SUBJECT = "iotdlm.v1.km.certificate.revoke"
REQUEST = b"a.sealed.request"
TRUST = KmTrust(PKI.cas["service"].certificate)


def _open(token: bytes, *, subject: str = SUBJECT, request: bytes = REQUEST, now: dt.datetime = NOW):
    alg, leaf = peek_signer(token)
    return verify_reply(token, TRUST.key_for(leaf, now), alg=alg, subject=subject, request=request, now=now)


def _seal(body: bytes = b'{"revoked":[]}', *, error: bool = False, signer=KM, now: dt.datetime = NOW) -> bytes:
    return signer.sealer.seal_reply(SUBJECT, REQUEST, body, error=error, now=now)


def test_round_trip_result_and_error() -> None:
    ok = _open(_seal())
    assert not ok.error
    assert json.loads(ok.body) == {"revoked": []}
    err = _open(_seal(b'{"code":"not_found","message":"no such certificate"}', error=True))
    assert err.error
    assert json.loads(err.body)["code"] == "not_found"


def test_bound_to_subject_and_request() -> None:
    token = _seal()
    with pytest.raises(BadRequestError, match=re.escape("answers 'iotdlm.v1.km.certificate.revoke', not")):
        _open(token, subject="iotdlm.v1.km.certificate.issue")
    with pytest.raises(BadRequestError, match="answers another request"):
        _open(token, request=b"another.sealed.request")


def test_outside_the_time_window() -> None:
    token = _seal(now=NOW - dt.timedelta(minutes=6))
    with pytest.raises(ReplayError):
        _open(token)


def test_signature_of_another_key_is_refused() -> None:
    token = _seal()
    alg, _ = peek_signer(token)
    with pytest.raises(BadSignatureError):
        verify_reply(token, jose_key(CM.key.public_key()), alg=alg, subject=SUBJECT, request=REQUEST, now=NOW)


def test_trust_refuses_other_modules_and_other_cas() -> None:
    cm_der = CM.cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(UntrustedError, match="names module cm, not km"):
        TRUST.key_for(cm_der, NOW)
    issuing = PKI.cas["operational"].certificate.public_bytes(serialization.Encoding.DER)
    with pytest.raises(UntrustedError, match="not by the service CA"):
        TRUST.key_for(issuing, NOW)
    with pytest.raises(UntrustedError, match=r"km reply is not valid: certificate: not an X\.509 certificate"):
        TRUST.key_for(b"\x30\x03\x02\x01\x01", NOW)


def test_trust_checks_validity_on_every_reply_even_when_cached() -> None:
    km_der = KM.cert.public_bytes(serialization.Encoding.DER)
    TRUST.key_for(km_der, NOW)  # cached now
    later = KM.cert.not_valid_after_utc + dt.timedelta(seconds=1)
    with pytest.raises(UntrustedError, match="signer certificate is not valid at"):
        TRUST.key_for(km_der, later)


def test_request_digest_is_base64url_sha256() -> None:
    assert request_digest(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"


_GOOD = _seal()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_GOOD) - 1), st.sampled_from(list(b"AZaz09-_.=!")))
def test_mutated_reply_never_crashes_nor_passes(pos: int, byte: int) -> None:
    data = bytearray(_GOOD)
    if data[pos] == byte:
        return
    data[pos] = byte
    try:
        reply = _open(bytes(data))
    except IotdlmError:
        return
    # base64url slack bits: only a change that decodes to the same bytes may pass
    assert reply.body == b'{"revoked":[]}'
    assert not reply.error


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_payload_signed_by_km_never_crashes(payload: bytes) -> None:
    """verify_reply's payload parser on any JSON-ish bytes km might (wrongly) have signed."""
    from joserfc import jws

    from iotdlm.wire import envelope

    token = jws.serialize_compact(
        {"alg": "ES256"}, payload, jose_key(KM.key), registry=envelope._registry("ES256")
    ).encode()
    with contextlib.suppress(IotdlmError):
        verify_reply(token, jose_key(KM.key.public_key()), alg="ES256", subject=SUBJECT, request=REQUEST, now=NOW)


def test_every_production_km_client_verifies_replies() -> None:
    """A KmClient without a trust does not verify km's replies (test harnesses only): every one
    the product builds (pm, cm, the CLI, the demo, the transfer tool) must pass ``trust=``."""
    import ast
    from pathlib import Path

    import iotdlm

    root = Path(iotdlm.__file__).parent
    calls = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if name in ("KmClient", "_Km"):
                    calls.append((path.relative_to(root), node.lineno, any(k.arg == "trust" for k in node.keywords)))
    assert len(calls) >= 7
    assert [c for c in calls if not c[2]] == []


async def test_a_km_reply_over_the_envelope_limit_is_too_large_not_untrusted() -> None:
    """Issue 13: a km reply over the 4 MiB envelope was 'km reply is not valid' (a 403 at cm); it is
    km saying too much at once, a 413 in words. The reply here is a real one, signed by km."""
    from iotdlm.bus import subjects as s
    from iotdlm.bus.memory import MemoryHub
    from iotdlm.client.km import KmClient
    from iotdlm.clock import FixedClock
    from iotdlm.errors import TooLargeError
    from iotdlm.wire import envelope

    hub = MemoryHub(permissions=None, max_payload=16 * 2**20)
    subject = s.KM_TRANSFER_PEER_UPDATE_INFO
    big = json.dumps({"body": "A" * envelope.MAX_ENVELOPE_BYTES}).encode()

    async def answer(m):  # type: ignore[no-untyped-def]
        return KM.sealer.seal_reply(subject, m.data, big if m.data == b"big" else b"{}", error=False, now=NOW)

    await hub.bus("km").serve(subject, answer)
    client = KmClient(hub.bus("cm"), CM.sealer, FixedClock(NOW), trust=TRUST)
    assert await client.transfer_peer(subject, b"small") == b"{}"
    with pytest.raises(TooLargeError, match=r"km's reply on .* is 5\.3 MB; the limit is 4\.0 MB") as caught:
        await client.transfer_peer(subject, b"big")
    assert "not valid" not in caught.value.message
