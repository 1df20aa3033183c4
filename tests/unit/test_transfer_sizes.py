"""Seed 003 Table I: the trust-transfer messages stay "only a few hundred bytes" with P-256.
Sizes are deterministic (P-256 COSE signatures are 64 bytes, r||s; CBOR is canonical), so these
are exact checks of the encoding, not of time. The figures beside Table I are in docs/benchmarks.md
(``bench/transfer_sizes.py``)."""

from __future__ import annotations

import dataclasses
import datetime as dt

from iotdlm.pki.chain import der
from iotdlm.transfer import cose
from iotdlm.transfer import messages as m
from tests.helpers import NOW
from tests.unit.test_transfer_messages import DEVICES, P

#: the reference configuration: short but real URIs (SP2's RA verifier and EST base, SP1's fallback)
RA = "https://sp2.example/ra"
ENROLL = "https://sp2.example/est"
FALLBACK = "https://sp1.example/fb"
URI_BYTES = len(RA) + len(ENROLL) + len(FALLBACK)
CLAIMS = m.TransferClaims(
    reset_not_before=NOW,
    reset_not_after=NOW + dt.timedelta(days=7),
    ra_uri=RA,
    update_uri="",
    update_first=False,
    enroll_uri=ENROLL,
    fallback_uri="",  # SP2 leaves it to SP1 (VII-D: SP1 sets its own in every device's copy)
    trust_anchors=(cose.cert_hash(der(P.pki2.root)),),
)
REF = b"r" * 32


def transfer_message(claims: m.TransferClaims = CLAIMS) -> bytes:
    hdr = m.CwtHeader("sp2.example", "sp1.example", b"c" * 16, NOW, NOW, NOW + dt.timedelta(days=7))
    return m.sign_transfer_message(m.TransferMessage(hdr, REF, claims), P.sp2.signer(with_chain=False))


def device_message(claims: m.TransferClaims = CLAIMS, *, with_chain: bool = False) -> bytes:
    hdr = m.CwtHeader(None, "dev-00042", b"c" * 16, NOW, NOW, NOW + dt.timedelta(days=7))
    c = dataclasses.replace(claims, fallback_uri=FALLBACK)
    return m.sign_device_message(m.TransferMessage(hdr, REF, c), P.sp1.signer(with_chain=with_chain))


def test_per_device_message_at_most_300_bytes() -> None:
    assert len(device_message()) <= 300


def test_per_device_message_without_its_uris_at_most_230_bytes() -> None:
    """What does not depend on the deployment's URIs: COSE, the claims, the anchor hash."""
    assert len(device_message()) - URI_BYTES <= 230


def test_transfer_message_of_listing_2_at_most_250_bytes() -> None:
    """Listing 2's fields (what Table I's TransferMessage counts), with iss, aud, cti, times, x5t."""
    assert len(transfer_message(dataclasses.replace(CLAIMS, trust_anchors=()))) <= 250


def test_transfer_message_with_the_anchor_hash_at_most_290_bytes() -> None:
    assert len(transfer_message()) <= 290


def test_x5t_saves_the_chain() -> None:
    """The x5chain (SP1's transfer certificate and its CA) is what x5t replaces: about 1 KB."""
    assert len(device_message(with_chain=True)) - len(device_message()) >= 800


def test_device_update_info_is_about_its_tbs_certificate() -> None:
    """Table I's DeviceUpdateInfo (> 400 B with X.509): the TBSCertificate plus 30 bytes at most
    (two times, versionInfo with an empty URI), 32 more with an raReference."""
    (_k, cert) = DEVICES["d1"]
    info = m.DeviceUpdateInfo(cert.tbs_certificate_bytes, NOW, NOW, m.VersionInfo(7, ""))
    assert len(info.to_bytes()) - len(cert.tbs_certificate_bytes) <= 30
    with_ref = dataclasses.replace(info, ra_reference=b"h" * 32)
    assert len(with_ref.to_bytes()) - len(info.to_bytes()) == 34
