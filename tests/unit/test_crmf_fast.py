"""The direct raVerified builder and parser fast path agree byte for byte with pyasn1."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm import errors
from iotdlm.pki import crmf
from iotdlm.pki.crmf import asn1 as crmf_asn1
from iotdlm.pki.crmf import building as crmf_building
from iotdlm.pki.crmf import parsing as crmf_parsing
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import device_subject

KEYS = {alg: generate_key(alg).public_key() for alg in Algorithm}


@pytest.mark.parametrize("alg", list(Algorithm), ids=lambda a: a.value)
@pytest.mark.parametrize("cert_req_id", [0, 1, 127, 128, 255, 256, 65535, 2**31 - 1])
def test_builder_is_byte_identical_to_pyasn1(alg: Algorithm, cert_req_id: int) -> None:
    subject = device_subject("dev-é-1", "Fäctory", "boardA")
    reference = crmf_building._encode_messages([crmf_building._ra_verified_message(cert_req_id, subject, KEYS[alg])])
    assert crmf.build_ra_verified(cert_req_id, subject, KEYS[alg]) == reference


def test_many_is_byte_identical_to_pyasn1() -> None:
    items = [(i, device_subject(f"d{i}", "F", "u"), KEYS[Algorithm.P256]) for i in range(5)]
    reference = crmf_building._encode_messages([crmf_building._ra_verified_message(*it) for it in items])
    assert crmf.build_ra_verified_many(items) == reference


def _slow(der: bytes) -> crmf.CrmfRequest:
    return crmf_parsing._parse_message_asn1(der, 0)


_MESSAGES = crmf.build_ra_verified(9, device_subject("dev-1", "F", "u"), KEYS[Algorithm.P256])
_VALID = _MESSAGES[crmf_asn1.read_tlv(_MESSAGES, 0, len(_MESSAGES), "m")[1] :]  # the one CertReqMsg inside


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255), st.sampled_from(["flip", "insert", "delete"]))
def test_fast_path_never_disagrees_with_pyasn1(pos: int, byte: int, how: str) -> None:
    data = bytearray(_VALID)
    if how == "flip":
        data[pos] = byte
    elif how == "insert":
        data.insert(pos, byte)
    else:
        del data[pos]
    der = bytes(data)
    fast = crmf_parsing._fast_ra_verified(der, "m")
    try:
        slow = _slow(der)
    except errors.IotdlmError:
        assert fast is None  # the fast path never accepts what the full parser refuses
        return
    if fast is not None:
        assert (fast.cert_req_id, fast.subject, fast.public_key, fast.pop) == (
            slow.cert_req_id,
            slow.subject,
            slow.public_key,
            slow.pop,
        )


def test_fast_path_takes_the_common_case() -> None:
    assert crmf_parsing._fast_ra_verified(_VALID, "m") is not None
