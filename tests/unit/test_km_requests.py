"""km tells the requester what its request asked for and the certificate does not carry
(issue 10 item 16): in the issue reply, for PKCS#10 and CRMF, and old peers still decode the reply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from cryptography import x509

from iotdlm.clock import FixedClock
from iotdlm.km import Km, KmSettings
from iotdlm.pki import crmf
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import device_subject
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.pki.requested import Requested, dropped
from iotdlm.store import Store
from iotdlm.wire import km as msg
from tests.helpers import NOW, ORG, make_csr, make_pki

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
PKI = make_pki()
PM = PKI.module("pm", "boardA")


@pytest.fixture
def km(tmp_path: Path) -> Iterator[Km]:
    store = Store.open(f"sqlite:///{tmp_path / 'km.db'}")
    yield Km(cas=PKI.cas, profiles=DEFAULT_PROFILES, store=store, clock=FixedClock(NOW), settings=KmSettings(ORG, None))
    store.close()


def _issue(km: Km, item: msg.IssueItem) -> msg.IssuedCertificate:
    reply = km.issue(PM.sealer.seal(msg.OP_ISSUE, item, aud="km", now=NOW))
    # what goes over the wire and back
    return msg.decode(msg.encode(reply), msg.IssuedCertificate)


def test_csr_asking_for_sans_extensions_and_subject_fields_is_told_what_was_dropped(km: Km) -> None:
    csr = (VECTORS / "csr_openssl_ext.der").read_bytes()  # openssl req -addext ..., see README
    reply = _issue(km, msg.IssueItem(device_id="dev-ext", profile="operational", csr=csr))
    assert set(reply.dropped) == {
        "subject O=Example",
        "subject L=Plant 4",
        "subjectAltName DNS:dev-ext.example.com",
        "subjectAltName IP:192.0.2.9",
        "extension keyUsage (the certificate carries the profile's)",
        "extension basicConstraints (the certificate carries the profile's)",
    }
    cert = x509.load_der_x509_certificate(reply.certificate)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_crmf_template_extras_are_reported(km: Km) -> None:
    cmp = crmf.unwrap_cmp((VECTORS / "cmp_openssl_ir_san.der").read_bytes())
    # pm's rule takes raVerified or signature POP: this is openssl's signature POP
    reply = _issue(km, msg.IssueItem(device_id="dev-san", profile="operational", crmf=cmp.cert_req_messages))
    assert set(reply.dropped) == {
        "subject O=Example",
        "subject OU=Line 4",
        "subjectAltName DNS:dev-san.example.com",
        "subjectAltName IP:192.0.2.7",
    }


def test_nothing_dropped_leaves_the_reply_as_before(km: Km) -> None:
    key = generate_key(Algorithm.P256)
    subject = device_subject("dev-1", ORG, "boardA")  # what pm sends: exactly what the CA issues
    item = msg.IssueItem(
        device_id="dev-1", profile="factory", crmf=crmf.build_ra_verified(0, subject, key.public_key())
    )
    reply = km.issue(PM.sealer.seal(msg.OP_ISSUE, item, aud="km", now=NOW))
    assert reply.dropped == ()
    assert b"dropped" not in msg.encode(reply)
    reply2 = _issue(km, msg.IssueItem(device_id="dev-2", profile="factory", csr=make_csr(key, "dev-2")))
    assert reply2.dropped == ()


def test_batch_items_carry_their_own_dropped(km: Km) -> None:
    csr = (VECTORS / "csr_openssl_ext.der").read_bytes()
    plain = make_csr(generate_key(Algorithm.P256), None)
    batch = msg.BatchIssueRequest(
        items=[
            msg.IssueItem(device_id="dev-ext", profile="factory", csr=csr),
            msg.IssueItem(device_id="dev-plain", profile="factory", csr=plain),
        ]
    )
    reply = km.issue_batch(PM.sealer.seal(msg.OP_ISSUE_BATCH, batch, aud="km", now=NOW))
    by_id = {r.device_id: r.certificate for r in reply.results}
    assert by_id["dev-ext"] is not None
    assert "subject L=Plant 4" in by_id["dev-ext"].dropped
    assert by_id["dev-plain"] is not None
    assert by_id["dev-plain"].dropped == ()


class _OldIssuedCertificate(msgspec.Struct, frozen=True):
    """IssuedCertificate as peers before the `dropped` field have it."""

    serial: str
    issuer: str
    profile: str
    device_id: str | None
    not_after: str
    certificate: bytes


def test_old_and_new_peers_read_each_other() -> None:
    new = msg.IssuedCertificate("1a", "factory", "factory", "d", "2030-01-01T00:00:00+00:00", b"\x30", dropped=("x",))
    old = msgspec.json.decode(msg.encode(new), type=_OldIssuedCertificate)
    assert old.serial == "1a"
    back = msg.decode(msg.encode(old), msg.IssuedCertificate)
    assert back.dropped == ()


def test_dropped_is_empty_when_nothing_was_asked() -> None:
    cert = PKI.cas["factory"].certificate
    assert dropped(Requested(subject=cert.subject), cert) == ()
    assert dropped(Requested(template_fields=("validity", "regInfo")), cert) == ("template validity", "CRMF regInfo")
    assert dropped(Requested(unreadable_extensions=True), cert) == ("the requested extensions (not readable)",)
