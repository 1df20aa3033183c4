"""Hypothesis over km's request path: whatever bytes arrive, km answers with an iotdlm error (a
wire code and a message) -- never another exception -- and stores nothing."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotdlm.clock import FixedClock
from iotdlm.errors import IotdlmError
from iotdlm.km import Km, KmSettings
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.store import Store
from iotdlm.wire import km as msg
from tests.helpers import NOW, ORG, make_csr, make_pki

PKI = make_pki()
PM = PKI.module("pm", "boardA")
CSR = make_csr(generate_key(Algorithm.P256), "dev-1")


@pytest.fixture(scope="module")
def km(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Km]:
    store = Store.open(f"sqlite:///{tmp_path_factory.mktemp('km') / 'km.db'}")
    yield Km(cas=PKI.cas, profiles=DEFAULT_PROFILES, store=store, clock=FixedClock(NOW), settings=KmSettings(ORG, None))
    store.close()


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=3000))
def test_arbitrary_bytes(km: Km, data: bytes) -> None:
    for op in (km.issue, km.issue_batch, km.renew):
        with contextlib.suppress(IotdlmError):
            op(data)
    assert km.store.count_certificates() == 0


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
        max_leaves=12,
    )
)
def test_signed_but_arbitrary_body(km: Km, body: object) -> None:
    """A validly signed envelope whose body is any JSON: schema errors, never crashes."""
    for op in (msg.OP_ISSUE, msg.OP_ISSUE_BATCH):
        token = PM.sealer.seal(op, body, aud="km", now=NOW)
        with contextlib.suppress(IotdlmError):
            (km.issue if op == msg.OP_ISSUE else km.issue_batch)(token)
    assert km.store.count_certificates() == 0


_CERT = base64.b64decode(
    json.loads(base64.urlsafe_b64decode(PM.sealer.seal("x", {}, aud="km", now=NOW).split(b".")[0] + b"=="))["x5c"][0]
)


@FUZZ
@given(st.integers(0, len(_CERT) - 1), st.integers(0, 255))
def test_mutated_signer_certificate(km: Km, pos: int, byte: int) -> None:
    """The x5c certificate altered byte by byte: refused as untrusted or malformed, never a crash."""
    cert = bytearray(_CERT)
    if cert[pos] == byte:
        return
    cert[pos] = byte
    token = PM.sealer.seal(msg.OP_ISSUE, msg.IssueItem("dev-1", "operational", csr=CSR), aud="km", now=NOW)
    header, payload, sig = token.split(b".")
    hdr = json.loads(base64.urlsafe_b64decode(header + b"=="))
    hdr["x5c"] = [base64.b64encode(bytes(cert)).decode()]
    forged = b".".join([_b64url(json.dumps(hdr).encode()), payload, sig])
    with pytest.raises(IotdlmError):
        km.issue(forged)
    assert km.store.count_certificates() == 0
