"""CRLs: RFC 5280 shape of full and delta CRLs, reasons, size, speed, and openssl agrees."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError
from iotdlm.pki import crl as crl_mod
from iotdlm.pki.ca import IssuingCA, PublicUrls, ca_name, crl_partition
from iotdlm.pki.crl import REASONS, RevokedEntry, build_crl, max_entries_for, parse_reason
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.profiles import DEFAULT_PROFILES
from tests.helpers import NOW, ORG, Pki, make_pki, pem

URLS = PublicUrls("http://va.example:8080/", crl_partitions=4)
T0 = NOW + dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
def ca(pki: Pki) -> IssuingCA:
    return pki.cas["operational"]


def _serial(i: int) -> int:
    """A 159-bit serial, like x509.random_serial_number(), but reproducible."""
    return (1 << 158) + i


def _full(
    ca: IssuingCA, entries: list[RevokedEntry], number: int = 7, partition: int = 1
) -> x509.CertificateRevocationList:
    return build_crl(ca, entries, number=number, this_update=T0, next_update=T0 + DAY, partition=partition, urls=URLS)


def _delta(
    ca: IssuingCA, entries: list[RevokedEntry], number: int = 8, base: int = 7
) -> x509.CertificateRevocationList:
    t = T0 + dt.timedelta(hours=1)
    return build_crl(
        ca, entries, number=number, this_update=t, next_update=t + DAY, partition=1, urls=URLS, delta_base=base
    )


def _ski(ca: IssuingCA) -> bytes:
    return ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


# --- shape ------------------------------------------------------------------------------------


def test_full_crl_shape(ca: IssuingCA) -> None:
    entries = [RevokedEntry(_serial(3), T0, "keyCompromise"), RevokedEntry(_serial(1), T0, None)]
    crl = _full(ca, entries, number=42, partition=2)
    assert crl.is_signature_valid(ca.signer.public_key)
    assert crl.issuer == ca.certificate.subject
    assert crl.last_update_utc == T0
    assert crl.next_update_utc == T0 + DAY
    assert [r.serial_number for r in crl] == [_serial(1), _serial(3)]  # serial order

    ext = crl.extensions
    assert ext.get_extension_for_class(x509.CRLNumber).value.crl_number == 42
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical
    assert aki.value.key_identifier == _ski(ca)
    idp = ext.get_extension_for_class(x509.IssuingDistributionPoint)
    assert idp.critical
    assert idp.value.full_name == [x509.UniformResourceIdentifier("http://va.example:8080/crl/operational/2.crl")]
    assert idp.value.only_contains_user_certs
    assert not idp.value.only_contains_ca_certs
    assert not idp.value.indirect_crl
    assert not idp.value.only_contains_attribute_certs
    assert idp.value.only_some_reasons is None
    fresh = ext.get_extension_for_class(x509.FreshestCRL)
    assert not fresh.critical
    assert [dp.full_name for dp in fresh.value] == [
        [x509.UniformResourceIdentifier("http://va.example:8080/crl/operational/2.delta")]
    ]
    with pytest.raises(x509.ExtensionNotFound):
        ext.get_extension_for_class(x509.DeltaCRLIndicator)
    assert {e.oid for e in ext} == {
        x509.CRLNumber.oid,
        x509.AuthorityKeyIdentifier.oid,
        x509.IssuingDistributionPoint.oid,
        x509.FreshestCRL.oid,
    }


def test_delta_crl_shape(ca: IssuingCA) -> None:
    full = _full(ca, [RevokedEntry(_serial(1), T0, "superseded")], number=7)
    delta = _delta(ca, [RevokedEntry(_serial(2), T0, "keyCompromise")], number=9, base=7)
    assert delta.is_signature_valid(ca.signer.public_key)
    ext = delta.extensions
    assert ext.get_extension_for_class(x509.CRLNumber).value.crl_number == 9
    dci = ext.get_extension_for_class(x509.DeltaCRLIndicator)
    assert dci.critical
    assert dci.value.crl_number == 7
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == _ski(ca)
    # the delta's IDP is the base's, byte for byte (RFC 5280 6.3.3 (c)(2), OpenSSL check_delta_base)
    idp = ext.get_extension_for_class(x509.IssuingDistributionPoint)
    base_idp = full.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert idp.critical
    assert idp.value.public_bytes() == base_idp.value.public_bytes()
    with pytest.raises(x509.ExtensionNotFound):  # RFC 5280 5.2.6: MUST NOT appear in a delta
        ext.get_extension_for_class(x509.FreshestCRL)
    assert [r.serial_number for r in delta] == [_serial(2)]


def test_empty_crl_is_valid(ca: IssuingCA) -> None:
    crl = _full(ca, [])
    assert len(crl) == 0
    assert crl.is_signature_valid(ca.signer.public_key)
    reloaded = x509.load_der_x509_crl(crl.public_bytes(serialization.Encoding.DER))
    assert len(reloaded) == 0
    assert reloaded.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7


# --- reasons ----------------------------------------------------------------------------------


def _entry_reason(crl: x509.CertificateRevocationList, serial: int) -> x509.ReasonFlags | None:
    revoked = crl.get_revoked_certificate_by_serial_number(serial)
    assert revoked is not None
    try:
        return revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


REASON_TABLE = [
    ("keyCompromise", x509.ReasonFlags.key_compromise),
    ("cACompromise", x509.ReasonFlags.ca_compromise),
    ("affiliationChanged", x509.ReasonFlags.affiliation_changed),
    ("superseded", x509.ReasonFlags.superseded),
    ("cessationOfOperation", x509.ReasonFlags.cessation_of_operation),
    ("certificateHold", x509.ReasonFlags.certificate_hold),
    ("privilegeWithdrawn", x509.ReasonFlags.privilege_withdrawn),
    ("aACompromise", x509.ReasonFlags.aa_compromise),
    ("key_compromise", x509.ReasonFlags.key_compromise),
    ("unspecified", None),  # RFC 5280 5.3.1: absent rather than unspecified
    (None, None),
]


@pytest.mark.parametrize(("reason", "expected"), REASON_TABLE, ids=[str(r) for r, _ in REASON_TABLE])
def test_reason_round_trips(ca: IssuingCA, reason: str | None, expected: x509.ReasonFlags | None) -> None:
    crl = x509.load_der_x509_crl(
        _full(ca, [RevokedEntry(_serial(5), T0, reason)]).public_bytes(serialization.Encoding.DER)
    )
    assert _entry_reason(crl, _serial(5)) is expected
    revoked = crl.get_revoked_certificate_by_serial_number(_serial(5))
    assert revoked is not None
    assert revoked.revocation_date_utc == T0
    if expected is None:
        assert len(revoked.extensions) == 0


def test_remove_from_crl_only_in_delta(ca: IssuingCA) -> None:
    entry = RevokedEntry(_serial(6), T0, "removeFromCRL")
    assert _entry_reason(_delta(ca, [entry]), _serial(6)) is x509.ReasonFlags.remove_from_crl
    with pytest.raises(ValueError, match="removeFromCRL"):
        _full(ca, [entry])


@pytest.mark.parametrize(
    ("name", "flag"),
    [
        ("keyCompromise", x509.ReasonFlags.key_compromise),
        ("KEYCOMPROMISE", x509.ReasonFlags.key_compromise),
        ("key_compromise", x509.ReasonFlags.key_compromise),
        ("Key_Compromise", x509.ReasonFlags.key_compromise),
        (" superseded ", x509.ReasonFlags.superseded),
        ("cacompromise", x509.ReasonFlags.ca_compromise),
        ("ca_compromise", x509.ReasonFlags.ca_compromise),
        ("remove_from_crl", x509.ReasonFlags.remove_from_crl),
        ("aa_compromise", x509.ReasonFlags.aa_compromise),
    ],
)
def test_parse_reason_accepts(name: str, flag: x509.ReasonFlags) -> None:
    assert parse_reason(name) is flag


@pytest.mark.parametrize("name", ["", "compromised", "key compromise", "key-compromise", "1", "revoked", "None"])
def test_parse_reason_rejects_with_the_list(name: str) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_reason(name)
    assert "keyCompromise" in info.value.message
    assert "aACompromise" in info.value.message
    assert info.value.field == "reason"


def test_reasons_are_exactly_the_rfc5280_names() -> None:
    assert set(REASONS) == {f.value for f in x509.ReasonFlags}
    assert all(parse_reason(r).value == r for r in REASONS)


def test_unknown_reason_in_entry_is_bad_request(ca: IssuingCA) -> None:
    with pytest.raises(BadRequestError):
        _full(ca, [RevokedEntry(_serial(1), T0, "stolen")])


# --- caller mistakes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "entries", "match"),
    [
        ({"this_update": T0.replace(tzinfo=None)}, [], "timezone-aware"),
        ({"next_update": T0}, [], "after"),
        ({"number": -1}, [], "out of range"),
        ({"number": 1 << 159}, [], "out of range"),
        ({"partition": 4}, [], "partition"),
        ({"partition": -1}, [], "partition"),
        ({"delta_base": 7}, [], "below"),
        ({}, [RevokedEntry(_serial(1), T0, None), RevokedEntry(_serial(1), T0, "superseded")], "twice"),
        ({}, [RevokedEntry(_serial(1), T0.replace(tzinfo=None), None)], "timezone-aware"),
        ({}, [RevokedEntry(0, T0, None)], "positive"),
    ],
    ids=[
        "naive",
        "next<=this",
        "neg-number",
        "big-number",
        "partition-high",
        "partition-neg",
        "delta-base",
        "dup-serial",
        "naive-entry",
        "zero-serial",
    ],
)
def test_caller_mistakes_are_value_errors(
    ca: IssuingCA, kwargs: dict[str, object], entries: list[RevokedEntry], match: str
) -> None:
    args: dict[str, object] = {"number": 7, "this_update": T0, "next_update": T0 + DAY, "partition": 1, "urls": URLS}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_crl(ca, entries, **args)  # type: ignore[arg-type]


def test_other_timezones_are_converted_to_utc(ca: IssuingCA) -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    crl = build_crl(
        ca,
        [RevokedEntry(_serial(1), T0.astimezone(cet), None)],
        number=1,
        this_update=T0.astimezone(cet),
        next_update=(T0 + DAY).astimezone(cet),
        partition=0,
        urls=URLS,
    )
    assert crl.last_update_utc == T0
    revoked = crl.get_revoked_certificate_by_serial_number(_serial(1))
    assert revoked is not None
    assert revoked.revocation_date_utc == T0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.dictionaries(
        st.integers(min_value=1, max_value=(1 << 159) - 1),
        st.tuples(
            st.datetimes(
                min_value=dt.datetime(1950, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.UTC)
            ),
            st.sampled_from([*REASONS, None]),
        ),
        max_size=20,
    )
)
def test_entries_round_trip(ca: IssuingCA, entries: dict[int, tuple[dt.datetime, str | None]]) -> None:
    listed = [RevokedEntry(s, t, r) for s, (t, r) in entries.items()]
    crl = _delta(ca, listed)  # a delta takes every reason, removeFromCRL included
    back = x509.load_der_x509_crl(crl.public_bytes(serialization.Encoding.DER))
    assert len(back) == len(entries)
    for serial, (when, reason) in entries.items():
        revoked = back.get_revoked_certificate_by_serial_number(serial)
        assert revoked is not None
        assert revoked.revocation_date_utc == when.replace(microsecond=0)
        flag = None if reason in (None, "unspecified") else parse_reason(reason)
        assert _entry_reason(back, serial) is flag


# --- size and speed ---------------------------------------------------------------------------


def _many(
    n: int, *, start: int = 0, when: dt.datetime = T0, reason: str | None = "keyCompromise"
) -> list[RevokedEntry]:
    return [RevokedEntry(_serial(start + i), when, reason) for i in range(n)]


def _der_len(crl: x509.CertificateRevocationList) -> int:
    return len(crl.public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize(
    ("reason", "when", "per_entry"),
    [
        ("keyCompromise", T0, 53),
        (None, T0, 39),
        ("keyCompromise", dt.datetime(2051, 1, 1, tzinfo=dt.UTC), 55),  # GeneralizedTime
    ],
)
def test_per_entry_size(ca: IssuingCA, reason: str | None, when: dt.datetime, per_entry: int) -> None:
    # difference of two sizes: signature length jitter (ECDSA) is at most a few bytes
    small = _der_len(_full(ca, _many(1000, when=when, reason=reason)))
    large = _der_len(_full(ca, _many(3000, when=when, reason=reason)))
    assert round((large - small) / 2000) == per_entry
    assert per_entry <= crl_mod.ENTRY_BYTES_MAX


def test_max_entries_for_fits(ca: IssuingCA) -> None:
    limit = 64 * 1024
    n = max_entries_for(limit)
    assert n > 1000
    worst = _many(n, when=dt.datetime(2051, 1, 1, tzinfo=dt.UTC))
    long_urls = PublicUrls("http://" + "v" * 200 + ".example", crl_partitions=4)
    crl = build_crl(ca, worst, number=(1 << 159) - 1, this_update=T0, next_update=T0 + DAY, partition=3, urls=long_urls)
    assert _der_len(crl) <= limit
    # and not wastefully low: one worst-case CRL of a 10% bigger count would not fit in the limit
    assert _der_len(_full(ca, _many(int(n * 1.1), when=dt.datetime(2051, 1, 1, tzinfo=dt.UTC)))) > limit
    assert max_entries_for(100) == 0
    assert max_entries_for() == ((1 << 20) - crl_mod.CRL_OVERHEAD_BYTES) // crl_mod.ENTRY_BYTES_MAX


def test_does_not_add_entries_one_by_one(ca: IssuingCA, monkeypatch: pytest.MonkeyPatch) -> None:
    """add_revoked_certificate copies the list on every call (O(n^2)); build_crl must not use it."""

    def boom(self: object, revoked: object) -> None:
        raise AssertionError("add_revoked_certificate used")

    monkeypatch.setattr(x509.CertificateRevocationListBuilder, "add_revoked_certificate", boom)
    assert len(_full(ca, _many(10))) == 10


def test_timing_16000_entries(ca: IssuingCA) -> None:
    entries = [RevokedEntry(x509.random_serial_number(), T0, "keyCompromise") for _ in range(16_000)]
    start = time.perf_counter()
    crl = _full(ca, entries)
    elapsed = time.perf_counter() - start
    size = _der_len(crl)
    print(f"\nbuild_crl: 16,000 entries built and signed in {elapsed * 1000:.0f} ms, {size} bytes DER")
    assert len(crl) == 16_000
    assert crl.is_signature_valid(ca.signer.public_key)
    assert size <= crl_mod.CRL_OVERHEAD_BYTES + 16_000 * crl_mod.ENTRY_BYTES_MAX


# --- openssl ----------------------------------------------------------------------------------

openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False, timeout=30)


def _write_crl(path: Path, *crls: x509.CertificateRevocationList) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))
    return path


@pytest.fixture(scope="module")
def files(pki: Pki, ca: IssuingCA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("crl")
    out = {"root": d / "root.pem", "ca": d / "ca.pem", "chain": d / "chain.pem"}
    out["root"].write_bytes(pem(pki.root))
    out["ca"].write_bytes(pem(ca.certificate))
    out["chain"].write_bytes(pem(ca.certificate) + pem(pki.root))
    other = make_pki()
    out["other_chain"] = d / "other.pem"
    out["other_chain"].write_bytes(pem(other.cas["operational"].certificate) + pem(other.root))
    out["dir"] = d
    return out


def _issue(ca: IssuingCA, serial: int, path: Path) -> Path:
    cert = ca.issue(
        DEFAULT_PROFILES["operational"],
        generate_key(Algorithm.P256).public_key(),
        ca_name(f"device {serial:x}", ORG),
        now=NOW,
        serial=serial,
        urls=URLS,
    )
    path.write_bytes(pem(cert))
    return path


#: the time openssl verify checks at: the CRLs' and certificates' validity is relative to NOW
ATTIME = str(int((T0 + dt.timedelta(hours=3)).timestamp()))


@pytest.mark.openssl
@openssl
@pytest.mark.parametrize("kind", ["full", "delta", "empty"])
def test_openssl_crl_verify(ca: IssuingCA, files: dict[str, Path], kind: str) -> None:
    entries = [RevokedEntry(_serial(1), T0, "keyCompromise"), RevokedEntry(_serial(2), T0, None)]
    crl = {"full": lambda: _full(ca, entries), "delta": lambda: _delta(ca, entries), "empty": lambda: _full(ca, [])}[
        kind
    ]()
    der = files["dir"] / f"{kind}.der"
    der.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    ok = _run("crl", "-in", der, "-inform", "DER", "-noout", "-verify", "-CAfile", files["chain"])
    assert ok.returncode == 0, ok.stderr
    assert "verify OK" in ok.stdout + ok.stderr
    # and the check can fail: another hierarchy's CA does not verify it
    bad = _run("crl", "-in", der, "-inform", "DER", "-noout", "-verify", "-CAfile", files["other_chain"])
    assert "verify OK" not in bad.stdout + bad.stderr


def _verify(files: dict[str, Path], cert: Path, *crl_files: Path, deltas: bool = False) -> str:
    args: list[str | Path] = ["verify", "-attime", ATTIME, "-crl_check"]
    if deltas:
        # without -extended_crl, OpenSSL 3.0 may take a delta CRL for a complete one (see crl.py)
        args += ["-use_deltas", "-extended_crl"]
    for f in crl_files:
        args += ["-CRLfile", f]
    args += ["-CAfile", files["root"], "-untrusted", files["ca"], cert]
    res = _run(*args)
    return res.stdout + res.stderr


@pytest.mark.openssl
@openssl
def test_openssl_verify_crl_check_partitioned(ca: IssuingCA, files: dict[str, Path]) -> None:
    d = files["dir"]
    part = 1
    revoked = _serial(4 * 100 + part)
    good = _serial(4 * 101 + part)
    elsewhere = _serial(4 * 102 + 2)
    assert crl_partition(revoked, URLS.crl_partitions) == crl_partition(good, URLS.crl_partitions) == part
    assert crl_partition(elsewhere, URLS.crl_partitions) == 2
    revoked_pem = _issue(ca, revoked, d / "revoked.pem")
    good_pem = _issue(ca, good, d / "good.pem")
    elsewhere_pem = _issue(ca, elsewhere, d / "elsewhere.pem")
    crl_file = _write_crl(d / "p1.pem", _full(ca, [RevokedEntry(revoked, T0, "keyCompromise")], partition=part))

    out = _verify(files, revoked_pem, crl_file)
    assert "certificate revoked" in out
    assert "OK" not in out.replace("verification failed", "")
    out = _verify(files, good_pem, crl_file)
    assert f"{good_pem}: OK" in out
    # a certificate of another partition is out of this CRL's scope (its CDP does not match the IDP)
    out = _verify(files, elsewhere_pem, crl_file)
    assert "different CRL scope" in out


@pytest.mark.openssl
@openssl
def test_openssl_verify_with_delta(ca: IssuingCA, files: dict[str, Path]) -> None:
    d = files["dir"]
    in_base, in_delta, good = _serial(4 * 200 + 1), _serial(4 * 201 + 1), _serial(4 * 202 + 1)
    certs = {s: _issue(ca, s, d / f"{name}.pem") for s, name in ((in_base, "base"), (in_delta, "delta"), (good, "ok"))}
    full = _full(ca, [RevokedEntry(in_base, T0, "keyCompromise")], number=10)
    delta = _delta(ca, [RevokedEntry(in_delta, T0 + dt.timedelta(hours=1), "superseded")], number=11, base=10)
    both = _write_crl(d / "crl-base+delta.pem", full, delta)
    base_only = _write_crl(d / "crl-base.pem", full)

    assert "certificate revoked" in _verify(files, certs[in_base], both, deltas=True)
    assert "certificate revoked" in _verify(files, certs[in_delta], both, deltas=True)
    assert f"{certs[good]}: OK" in _verify(files, certs[good], both, deltas=True)
    # without the delta, the later revocation is not known yet
    assert f"{certs[in_delta]}: OK" in _verify(files, certs[in_delta], base_only)

    # Why the delta's IDP names the base CRL: with its own URL there, OpenSSL does not take it as
    # a delta of this base (check_delta_base compares the IDPs) and the later revocation is missed.
    assert delta.next_update_utc is not None
    builder = (
        x509.CertificateRevocationListBuilder(revoked_certificates=list(delta))
        .issuer_name(delta.issuer)
        .last_update(delta.last_update_utc)
        .next_update(delta.next_update_utc)
    )
    for ext in delta.extensions:
        value = ext.value
        if isinstance(value, x509.IssuingDistributionPoint):
            value = crl_mod._idp(URLS.crl(ca.name, 1, delta=True))
        builder = builder.add_extension(value, ext.critical)
    own_url_delta = ca.signer.sign_crl(builder)
    mismatched = _write_crl(d / "crl-base+own-url-delta.pem", full, own_url_delta)
    assert f"{certs[in_delta]}: OK" in _verify(files, certs[in_delta], mismatched, deltas=True)
