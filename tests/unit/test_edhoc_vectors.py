"""RFC 9529 trace 2 (EDHOC method 3, cipher suite 2: the suite the CoAP door runs) through lakers,
and our CCS encoder against the trace's credentials (ADR 0029).

What lakers-python (0.6) lets a test check: it takes no ephemeral key from the caller, so
message_2 and message_3 (and PRK_out) of the trace cannot be reproduced byte for byte; we check
that lakers as responder reads the trace's message_1 (C_I, suite negotiation: SUITES_I [6, 2]
selects 2), that a run with the trace's static keys and credentials agrees on PRK_out and the
OSCORE exporter on both sides, and that our CCS encoding gives the trace's CRED_I and CRED_R
byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import cbor2
import lakers
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.wire import coap_est as wire

T: dict[str, str] = json.loads((Path(__file__).parents[1] / "vectors" / "rfc9529_trace2.json").read_text())


def _h(name: str) -> bytes:
    return bytes.fromhex(T[name])


def _public(d: bytes) -> ec.EllipticCurvePublicKey:
    return ec.derive_private_key(int.from_bytes(d, "big"), ec.SECP256R1()).public_key()


def test_vector_is_self_consistent() -> None:
    assert _public(_h("X")).public_numbers().x.to_bytes(32, "big") == _h("G_X")
    assert _h("G_X") in _h("message_1")
    assert wire.same_key(_public(_h("R")), wire.ccs_public_key(cbor2.loads(_h("CRED_R"))))


def test_our_ccs_encoding_is_the_traces() -> None:
    assert wire.ccs_bytes(wire.ccs_for(_public(_h("R")), "", b"\x0a")) == _h("CRED_R")
    assert wire.ccs_bytes(wire.ccs_for(_public(_h("I")), "42-50-31-FF-EF-37-32-39", b"\x2b")) == _h("CRED_I")
    assert wire.same_key(_public(_h("I")), wire.ccs_public_key(cbor2.loads(_h("CRED_I"))))


def test_lakers_responder_reads_trace_message_1() -> None:
    responder = lakers.EdhocResponder(_h("R"), _h("CRED_R"))
    c_i, ead_1 = responder.process_message_1(_h("message_1"))
    assert bytes(c_i) == b"\x37"  # C_I = -24
    assert not ead_1
    message_2 = responder.prepare_message_2(lakers.CredentialTransfer.ByReference, b"\x27", None)
    assert len(message_2) > 32  # G_Y and the ciphertext (not comparable: lakers draws its own Y)


def test_handshake_with_trace_credentials() -> None:
    initiator = lakers.EdhocInitiator()
    responder = lakers.EdhocResponder(_h("R"), _h("CRED_R"))
    message_1 = initiator.prepare_message_1(b"\x37", None)
    responder.process_message_1(message_1)
    message_2 = responder.prepare_message_2(lakers.CredentialTransfer.ByReference, b"\x27", None)
    c_r, id_cred_r, _ = initiator.parse_message_2(message_2)
    assert bytes(c_r) == b"\x27"
    initiator.verify_message_2(_h("I"), _h("CRED_I"), lakers.credential_check_or_fetch(id_cred_r, _h("CRED_R")))
    message_3, i_prk_out = initiator.prepare_message_3(lakers.CredentialTransfer.ByReference, None)
    id_cred_i, _ = responder.parse_message_3(message_3)
    r_prk_out = responder.verify_message_3(lakers.credential_check_or_fetch(id_cred_i, _h("CRED_I")))
    assert bytes(i_prk_out) == bytes(r_prk_out)
    initiator.process_message_4(responder.prepare_message_4(None))
    assert initiator.edhoc_exporter(0, [], 16) == responder.edhoc_exporter(0, [], 16)


def test_lakers_refuses_a_wrong_credential() -> None:
    initiator = lakers.EdhocInitiator()
    responder = lakers.EdhocResponder(_h("R"), _h("CRED_R"))
    responder.process_message_1(initiator.prepare_message_1(b"\x37", None))
    message_2 = responder.prepare_message_2(lakers.CredentialTransfer.ByReference, b"\x27", None)
    initiator.parse_message_2(message_2)
    other = wire.ccs_bytes(wire.ccs_for(ec.generate_private_key(ec.SECP256R1()).public_key(), "", b"\x0a"))
    with pytest.raises(ValueError, match="EDHOCError"):
        initiator.verify_message_2(_h("I"), _h("CRED_I"), other)
