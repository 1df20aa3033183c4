"""The pure checks of the outside witness (iotdlm.km.witness): a signed tree head against the
service CA, and whether a new head extends the kept one. End to end over cm: the integration test
test_audit_witness.py."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization

from iotdlm.errors import UntrustedError
from iotdlm.km import audit as km_audit
from iotdlm.km.witness import LogInconsistentError, check_extends, kept_head, verify_signed_head
from iotdlm.pki.ca import fingerprint
from iotdlm.store import Store
from iotdlm.wire import audit as fmt
from tests.helpers import NOW, make_pki

PKI = make_pki()
KM = PKI.module("km")
SERVICE_CA = PKI.cas["service"].certificate


def _heads(tmp_path: Path) -> tuple[Store, dict[int, fmt.TreeHead]]:
    store = Store.open(f"sqlite:///{tmp_path / 'a.db'}")
    heads: dict[int, fmt.TreeHead] = {}
    der = KM.cert.public_bytes(serialization.Encoding.DER)
    for i in range(1, 10):
        store.append_audit([km_audit.entry(NOW + dt.timedelta(seconds=i), fmt.ISSUANCE, "admin", f"s{i}")])
        if i in (3, 6, 9):
            cp = km_audit.checkpoint(store, KM.key, KM.cert, NOW + dt.timedelta(seconds=i))
            assert cp is not None
            heads[i] = km_audit.to_tree_head(cp, certificate=der)
    return store, heads


def test_a_head_signed_by_km_under_the_service_ca_verifies(tmp_path: Path) -> None:
    _store, heads = _heads(tmp_path)
    verify_signed_head(heads[9], SERVICE_CA, where="cm")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("no certificate", "carries no signer certificate"),
        ("another size", "has a bad signature"),
        ("another signer's certificate", "is not its signer"),
        ("pm's certificate", "not km"),
        ("signed before the certificate", "is not valid at"),
    ],
)
def test_anything_else_is_untrusted(tmp_path: Path, change: str, words: str) -> None:
    _store, heads = _heads(tmp_path)
    th = heads[9]
    pm = PKI.module("pm", "boardA").cert
    pm_der = base64.b64encode(pm.public_bytes(serialization.Encoding.DER)).decode()
    replace = msgspec.structs.replace
    forged = {
        "no certificate": replace(th, certificate=None),
        "another size": replace(th, size=10),
        "another signer's certificate": replace(th, certificate=pm_der),
        "pm's certificate": replace(th, signer=fingerprint(pm), certificate=pm_der),
        "signed before the certificate": replace(th, at=KM.cert.not_valid_before_utc - dt.timedelta(days=1)),
    }[change]
    with pytest.raises(UntrustedError, match=words):
        verify_signed_head(forged, SERVICE_CA, where="cm")


def test_extends_sizes_and_roots(tmp_path: Path) -> None:
    store, heads = _heads(tmp_path)
    proof = km_audit.consistency(store, 3, 9)
    check_extends(heads[3], heads[9], proof)
    check_extends(heads[9], heads[9], None)
    with pytest.raises(LogInconsistentError, match="truncated: cm serves a signed tree head of 6 records, smaller"):
        check_extends(heads[9], heads[6], None)
    with pytest.raises(LogInconsistentError, match="rewritten: cm serves a signed tree head of 9 records whose root"):
        check_extends(heads[9], msgspec.structs.replace(heads[9], root="0" * 64), None)
    with pytest.raises(LogInconsistentError, match="the consistency proof between 6 and 9 records fails"):
        check_extends(heads[6], heads[9], fmt.ConsistencyProof(first=6, second=9, proof=proof.proof))


def test_the_kept_head_is_the_largest_in_the_state_folder(tmp_path: Path) -> None:
    _store, heads = _heads(tmp_path)
    state = tmp_path / "w"
    assert kept_head(state) is None
    for n in (6, 3):
        km_audit.write_anchor(state, heads[n])
    got = kept_head(state)
    assert got is not None
    assert got.size == 6
