"""The validation authority's revocation semantics, judged by what relying parties see (OCSP,
full and delta CRLs, openssl verify):

- item 1: removeFromCRL (and certificateHold, which has no release) is refused wherever a
  reason enters, changes nothing, and no failure inside the VA reaches an OCSP client as an
  error: it is an internalError response (also over km's bus);
- item 4: the root's CRL lists revoked issuing CAs, and openssl rejects a leaf of a revoked CA;
- item 5: a module certificate (service CA) is revocable and shows on OCSP and its partition's CRL;
- item 6: a certificate superseded at re-enrollment is revoked (reason superseded) for OCSP and
  CRLs alike once its grace has passed.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.bus import subjects as s
from iotdlm.bus.memory import MemoryHub
from iotdlm.errors import BadRequestError, NotFoundError, UnavailableError
from iotdlm.km import KmService
from iotdlm.km.va import ROOT, VaSettings
from iotdlm.pki.crl import REASONS, revocation_reason
from tests.tools import attime
from tests.va_pki import URLS, World, make_world

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")

REFUSED = ["removeFromCRL", "remove_from_crl", "REMOVEFROMCRL", "certificateHold", "certificate_hold"]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    try:
        yield w
    finally:
        w.store.close()


def _listed(der: bytes) -> dict[int, x509.RevokedCertificate]:
    return {r.serial_number: r for r in x509.load_der_x509_crl(der)}


def _reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


# --- item 1: removeFromCRL / certificateHold; OCSP never fails ----------------------------------


@pytest.mark.parametrize("reason", REFUSED)
def test_remove_from_crl_and_hold_are_refused_everywhere_and_change_nothing(world: World, reason: str) -> None:
    cert = world.issue(device_id="dev-1")
    part = cert.serial_number % URLS.crl_partitions
    audit = world.store.count_audit()
    with pytest.raises(BadRequestError, match=r"removeFromCRL|certificateHold") as caught:
        world.va.revoke(cert.serial_number, issuer="operational", reason=reason, actor="t")
    assert caught.value.field == "reason"
    with pytest.raises(BadRequestError):
        world.va.revoke_device("dev-1", reason=reason, actor="t")
    with pytest.raises(BadRequestError):
        world.va.decommission("dev-1", reason=reason, actor="t")
    with pytest.raises(BadRequestError):
        world.va.revoke_ca("operational", reason=reason, actor="t")
    with pytest.raises(BadRequestError):  # the store refuses them too, should a caller skip the VA
        world.store.revoke_certificate(
            "operational", cert.serial_number, reason=reason, at=world.clock.now(), actor="t"
        )
    with pytest.raises(BadRequestError):
        world.store.revoke_device_certificates("dev-1", reason=reason, at=world.clock.now(), actor="t")
    rec = world.store.get_certificate("operational", cert.serial_number)
    assert rec is not None
    assert rec.status == "valid"
    assert world.store.get_device("dev-1").status == "active"  # type: ignore[union-attr]
    assert world.store.count_audit() == audit
    assert world.status(cert).certificate_status == ocsp.OCSPCertStatus.GOOD
    assert cert.serial_number not in _listed(world.va.generate_crl("operational", part).der)


def test_revocation_reason_names() -> None:
    assert revocation_reason(None) is None
    assert revocation_reason("unspecified") is None
    assert revocation_reason("key_compromise") == "keyCompromise"
    assert revocation_reason("superseded") == "superseded"
    with pytest.raises(BadRequestError, match="unknown revocation reason"):
        revocation_reason("because")


def test_a_stored_remove_from_crl_no_longer_breaks_the_crl_or_ocsp(world: World) -> None:
    """A removeFromCRL revocation stored before it was refused: the certificate stays revoked
    (published without a reason), its partition's full CRL can be made, OCSP answers revoked."""
    cert = world.issue()
    world.store.update_certificate_status(
        "operational", cert.serial_number, status="revoked", at=world.clock.now(), reason="removeFromCRL"
    )
    listed = _listed(world.va.generate_crl("operational", cert.serial_number % URLS.crl_partitions).der)
    assert _reason(listed[cert.serial_number]) is None
    resp = world.status(cert)
    assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason is None


@pytest.mark.parametrize("failing", ["certificate_status", "add_certificates"])
@pytest.mark.parametrize("error", [UnavailableError("database unreachable"), RuntimeError("a bug")])
def test_any_failure_while_answering_ocsp_is_an_internal_error_response(
    world: World, failing: str, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """The status read fails, or recording a new responder certificate does (first request)."""
    cert = world.issue()

    def fail(*_a: object, **_k: object) -> object:
        raise error

    setattr(world.store, failing, fail)
    for nonce in (True, False):
        der = world.va.ocsp(world.ocsp_request(cert, nonce=nonce))
        assert ocsp.load_der_ocsp_response(der).response_status == ocsp.OCSPResponseStatus.INTERNAL_ERROR
    assert str(error) in caplog.text  # logged with its cause


async def test_km_answers_internal_error_over_the_bus_when_the_store_fails(world: World) -> None:
    """What cm receives from km: an OCSP response, never an error reply it would turn into 500."""
    from iotdlm.km import Km, KmSettings
    from iotdlm.pki.profiles import DEFAULT_PROFILES
    from tests.helpers import ORG

    cert = world.issue()
    other = world.issue()
    km = Km(
        cas=world.pki.cas,
        profiles=DEFAULT_PROFILES,
        store=world.store,
        clock=world.clock,
        settings=KmSettings(organization=ORG, urls=URLS),
        va=world.va,
    )
    hub = MemoryHub()
    service = KmService(km, hub.bus("km"), identity=world.pki.km_identity())
    await service.start()
    cm = hub.bus("cm")
    try:
        good = ocsp.load_der_ocsp_response(await cm.request(s.KM_OCSP, world.ocsp_request(cert, nonce=True)))
        assert good.certificate_status == ocsp.OCSPCertStatus.GOOD

        def down(*_a: object) -> object:
            raise UnavailableError("database unreachable")

        world.store.certificate_status = down  # type: ignore[method-assign,assignment]
        # a certificate never asked about (the VA keeps the status rows it read)
        der = await cm.request(s.KM_OCSP, world.ocsp_request(other, nonce=True))
        assert ocsp.load_der_ocsp_response(der).response_status == ocsp.OCSPResponseStatus.INTERNAL_ERROR
    finally:
        await service.stop()
        await cm.close()


# --- item 4: the root's CRL -------------------------------------------------------------------


def test_the_root_crl_lists_a_revoked_issuing_ca_and_only_that(world: World) -> None:
    empty = x509.load_der_x509_crl(world.va.current_crl(ROOT, 0).der)
    assert len(empty) == 0
    assert empty.issuer == world.root.certificate.subject
    assert empty.is_signature_valid(world.root.certificate.public_key())  # type: ignore[arg-type]
    idp = empty.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert idp.critical
    assert idp.value.only_contains_ca_certs
    assert not idp.value.only_contains_user_certs
    # no distribution point name: openssl -crl_check_all also checks the self-signed root (which has
    # no CDP) against it, and finds a named IDP "different CRL scope" (pki/crl.py)
    assert idp.value.full_name is None
    assert idp.value.relative_name is None
    with pytest.raises(x509.ExtensionNotFound):
        empty.extensions.get_extension_for_class(x509.FreshestCRL)
    number = empty.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    rec = world.va.revoke_ca("service", reason="keyCompromise", actor="admin")
    assert (rec.issuer, rec.profile, rec.status) == (ROOT, "ca", "revoked")
    crl = x509.load_der_x509_crl(world.va.current_crl(ROOT, 0).der)  # made anew at the revocation
    serial = world.pki.cas["service"].certificate.serial_number
    assert [r.serial_number for r in crl] == [serial]
    assert _reason(crl.get_revoked_certificate_by_serial_number(serial)) == x509.ReasonFlags.key_compromise  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    assert [a.kind for a in world.store.list_audit(limit=100)].count("revocation") == 1
    # the schedule keeps it fresh like every other CRL
    world.clock.advance(dt.timedelta(days=2))
    assert world.va.refresh_due() == 3 * URLS.crl_partitions + 1
    assert [r.serial_number for r in x509.load_der_x509_crl(world.va.current_crl(ROOT, 0).der)] == [serial]


def test_the_root_crl_has_one_partition_and_no_delta(world: World) -> None:
    with pytest.raises(NotFoundError, match="no delta"):
        world.va.current_crl(ROOT, 0, delta=True)
    with pytest.raises(NotFoundError, match="partition 0"):
        world.va.current_crl(ROOT, 1)
    with pytest.raises(NotFoundError, match="no issuing CA"):
        world.va.revoke_ca("root", reason=None, actor="t")
    world.va.root = None  # a km without the root key does not pretend to publish it
    with pytest.raises(NotFoundError, match="no CA 'root'"):
        world.va.current_crl(ROOT, 0)


def _openssl_verify(
    world: World, tmp: Path, leaf: x509.Certificate, crls: list[bytes]
) -> subprocess.CompletedProcess[str]:
    (tmp / "root.pem").write_bytes(world.root.certificate.public_bytes(Encoding.PEM))
    (tmp / "ca.pem").write_bytes(world.pki.cas["operational"].certificate.public_bytes(Encoding.PEM))
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(Encoding.PEM))
    args = []
    for i, der in enumerate(crls):
        path = tmp / f"{i}.crl"
        path.write_bytes(x509.load_der_x509_crl(der).public_bytes(Encoding.PEM))
        args += ["-CRLfile", str(path)]
    return subprocess.run(
        [
            *("openssl", "verify", "-crl_check_all", *attime(world.clock.now())),
            *("-CAfile", str(tmp / "root.pem"), "-untrusted", str(tmp / "ca.pem"), *args, str(tmp / "leaf.pem")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.openssl
@needs_openssl
def test_openssl_rejects_a_leaf_of_a_revoked_issuing_ca(world: World, tmp_path: Path) -> None:
    leaf = world.issue()
    part = leaf.serial_number % URLS.crl_partitions

    root_crl = world.va.current_crl(ROOT, 0).der
    (tmp_path / "root.crl").write_bytes(root_crl)
    (tmp_path / "root.pem").write_bytes(world.root.certificate.public_bytes(Encoding.PEM))
    check = subprocess.run(
        [
            *("openssl", "crl", "-in", str(tmp_path / "root.crl"), "-inform", "DER", "-noout", "-verify"),
            *("-CAfile", str(tmp_path / "root.pem")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "verify OK" in check.stdout + check.stderr

    before = _openssl_verify(world, tmp_path, leaf, [root_crl, world.va.current_crl("operational", part).der])
    assert before.returncode == 0, before.stdout + before.stderr
    assert "leaf.pem: OK" in before.stdout

    world.va.revoke_ca("operational", reason="cACompromise", actor="admin")
    after = _openssl_verify(
        world, tmp_path, leaf, [world.va.current_crl(ROOT, 0).der, world.va.current_crl("operational", part).der]
    )
    assert after.returncode != 0
    assert "certificate revoked" in after.stdout + after.stderr
    # without the root's CRL, openssl cannot check the issuing CA at all (what the issue reported)
    missing = _openssl_verify(world, tmp_path, leaf, [world.va.current_crl("operational", part).der])
    assert "unable to get certificate CRL" in missing.stdout + missing.stderr


# --- item 5: module certificates ----------------------------------------------------------------


def test_a_module_certificate_is_revocable_and_shows_on_ocsp_and_its_partition_crl(world: World) -> None:
    cm_cert = world.issue("service", device_id=None)
    part = cm_cert.serial_number % URLS.crl_partitions
    assert world.status(cm_cert, issuer="service").certificate_status == ocsp.OCSPCertStatus.GOOD
    assert cm_cert.serial_number not in _listed(world.va.current_crl("service", part).der)
    world.va.revoke(cm_cert.serial_number, issuer="service", reason="keyCompromise", actor="admin")
    resp = world.status(cm_cert, issuer="service", nonce=False)
    assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert _reason(_listed(world.va.current_crl("service", part, delta=True).der)[cm_cert.serial_number]) == (
        x509.ReasonFlags.key_compromise
    )
    assert cm_cert.serial_number in _listed(world.va.generate_crl("service", part).der)


# --- item 6: superseded certificates ----------------------------------------------------------


def _supersede(world: World, old: x509.Certificate, new: x509.Certificate) -> dt.datetime:
    """What km does at re-enrollment (Km.commit): mark the old certificate superseded, now."""
    at = world.clock.now()
    world.store.update_certificate_status(
        "operational", old.serial_number, status="superseded", at=at, superseded_by=new.serial_number
    )
    return at


def _grace_world(tmp_path: Path, grace: dt.timedelta) -> World:
    return make_world(tmp_path, settings=VaSettings(urls=URLS, superseded_grace=grace))


@pytest.mark.parametrize("grace", [dt.timedelta(hours=1), dt.timedelta(minutes=10), dt.timedelta(0)])
def test_a_superseded_certificate_is_revoked_for_ocsp_and_crls_after_its_grace(
    tmp_path: Path, grace: dt.timedelta
) -> None:
    world = _grace_world(tmp_path, grace)
    try:
        old = world.issue(device_id="dev-1")
        part = old.serial_number % URLS.crl_partitions
        # a relying party asked before re-enrollment: a cached pre-signed "good" (no nonce)
        assert world.status(old, nonce=False).certificate_status == ocsp.OCSPCertStatus.GOOD
        base = world.va.generate_crl("operational", part)
        world.clock.advance(dt.timedelta(minutes=1))
        new = world.issue(device_id="dev-1")
        at = _supersede(world, old, new)
        effective = at + grace

        if grace:  # in its grace: still good, and to be asked again when the grace ends
            resp = world.status(old, nonce=True)
            assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
            assert resp.next_update_utc is not None
            assert resp.next_update_utc <= effective
            assert world.status(old, nonce=False).certificate_status == ocsp.OCSPCertStatus.GOOD
            assert old.serial_number not in _listed(world.va.generate_crl("operational", part).der)

        world.clock.advance(effective - world.clock.now() + dt.timedelta(seconds=1))
        for nonce in (False, True):  # the cached "good" is not served past the grace
            resp = world.status(old, nonce=nonce)
            assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED, nonce
            assert resp.revocation_reason == x509.ReasonFlags.superseded
            assert resp.revocation_time_utc == effective
        drec = world.va.generate_crl("operational", part, delta=True)
        assert drec.base_number == world.store.get_crl("operational", part, "full").number  # type: ignore[union-attr]
        assert drec.base_number >= base.number
        delta = _listed(drec.der)
        full = _listed(world.va.generate_crl("operational", part).der)
        for listed in (delta, full):
            entry = listed[old.serial_number]
            assert _reason(entry) == x509.ReasonFlags.superseded
            assert entry.revocation_date_utc == effective
        assert new.serial_number not in full
        assert world.status(new).certificate_status == ocsp.OCSPCertStatus.GOOD
        # a later delta (base made after the grace ended) no longer re-lists it; the full CRL does
        world.clock.advance(dt.timedelta(hours=1))
        world.va.generate_crl("operational", part)
        world.clock.advance(dt.timedelta(minutes=10))
        assert old.serial_number not in _listed(world.va.generate_crl("operational", part, delta=True).der)
        assert old.serial_number in _listed(world.va.current_crl("operational", part).der)
    finally:
        world.store.close()


def test_revoking_a_superseded_certificate_explicitly_takes_the_new_reason(world: World) -> None:
    old = world.issue(device_id="dev-1")
    new = world.issue(device_id="dev-1")
    _supersede(world, old, new)
    world.va.revoke(old.serial_number, issuer="operational", reason="keyCompromise", actor="admin")
    resp = world.status(old)
    assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason == x509.ReasonFlags.key_compromise
    assert resp.revocation_time_utc == world.clock.now().replace(microsecond=0)


def test_superseded_grace_is_checked(world: World) -> None:
    with pytest.raises(ValueError, match="superseded_grace"):
        VaSettings(urls=URLS, superseded_grace=dt.timedelta(seconds=-1))
    now = world.clock.now()
    with pytest.raises(ValueError, match="as_of"):
        world.store.iter_revoked("operational", 0, not_after_from=now, superseded_grace=dt.timedelta(hours=1))
    with pytest.raises(ValueError, match="negative"):
        world.store.iter_revoked(
            "operational", 0, not_after_from=now, superseded_grace=dt.timedelta(seconds=-1), as_of=now
        )


def test_the_deployment_config_carries_the_grace() -> None:
    from iotdlm.deployment import DeploymentConfig

    base = {"organization": "o", "algorithm": "ecdsa-p256", "public_url": "http://x", "dtypes": []}
    assert DeploymentConfig(**base).superseded_grace_seconds == 3600  # type: ignore[arg-type]
    DeploymentConfig(**base, superseded_grace_seconds=0).validate()  # type: ignore[arg-type]
    with pytest.raises(BadRequestError, match="superseded_grace_seconds"):
        DeploymentConfig(**base, superseded_grace_seconds=-1).validate()  # type: ignore[arg-type]


@given(st.one_of(st.none(), st.text(max_size=40), st.sampled_from([*REFUSED, "keyCompromise", "Superseded"])))
def test_revocation_reason_takes_any_text_and_never_lets_remove_from_crl_or_hold_through(name: str | None) -> None:
    try:
        out = revocation_reason(name)
    except BadRequestError as exc:
        field = exc.field
        out = None
    else:
        field = "reason"
        assert out is None or out in REASONS
    assert field == "reason"
    assert out not in ("removeFromCRL", "certificateHold", "unspecified")


def test_answers_with_a_nonce_reuse_the_status_row_until_a_revocation(world: World) -> None:
    """The VA keeps the status rows it read (nonce answers are signed each time, without reading
    the database each time); a revocation, here or announced by another worker, drops the row."""
    cert = world.issue(device_id="dev-rows")
    reads: list[int] = []
    original = world.store.certificate_status

    def counting(issuer: str, serial: int) -> tuple[str, dt.datetime | None, str | None] | None:
        reads.append(serial)
        return original(issuer, serial)

    world.store.certificate_status = counting  # type: ignore[method-assign]
    for _ in range(3):
        assert world.status(cert, nonce=True).certificate_status == ocsp.OCSPCertStatus.GOOD
    assert reads == [cert.serial_number]
    world.va.revoke(cert.serial_number, issuer="operational", reason="keyCompromise", actor="admin")
    assert world.status(cert, nonce=True).certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert len(reads) == 2
    # another worker revoked it (the store changed under this one): the event drops the row
    other = world.issue(device_id="dev-rows-2")
    assert world.status(other, nonce=True).certificate_status == ocsp.OCSPCertStatus.GOOD
    world.store.revoke_certificate(
        "operational", other.serial_number, reason="keyCompromise", at=world.clock.now(), actor="admin"
    )
    world.va.invalidate("operational", other.serial_number)
    assert world.status(other, nonce=True).certificate_status == ocsp.OCSPCertStatus.REVOKED
    # a row is kept no longer than the superseded grace
    world.clock.advance(world.va.settings.superseded_grace)
    before = len(reads)
    world.status(other, nonce=True)
    assert len(reads) == before + 1
