"""Issuing-CA rotation, the pure parts (issue 16, ADR 0026): the generations and their states on
an injected clock, the generations document (hostile inputs, Hypothesis), and the device's
truststore after a /cacerts answer."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.clock import SystemClock
from iotdlm.device.truststore import same_truststore, updated_truststore
from iotdlm.errors import BadRequestError, ConflictError, UntrustedError
from iotdlm.pki import ca as pki_ca
from iotdlm.pki import rotation
from iotdlm.pki.keys import Algorithm, KeySigner, generate_key
from iotdlm.pki.rotation import CaState, Generation

ROLES = ("factory", "operational", "service")
T0 = SystemClock().now()  # the injected clock's start: today, moved by IOTDLM_CLOCK_OFFSET
DAY = dt.timedelta(days=1)


def rotated(overlap: dt.timedelta = 30 * DAY) -> list[Generation]:
    gens, _new = rotation.rotate(rotation.complete([], ROLES), "operational", now=T0, overlap=overlap)
    return gens


def test_generation_one_keeps_its_role_name_and_the_next_ones_are_numbered() -> None:
    gens, new = rotation.rotate(rotation.complete([], ROLES), "operational", now=T0, overlap=30 * DAY)
    assert new.name == "operational-2"
    assert rotation.active(gens, "operational") == new
    old = next(g for g in gens if g.name == "operational")
    assert (old.rotated_at, old.overlap_until) == (T0, T0 + 30 * DAY)
    assert rotation.active(gens, "factory").name == "factory"  # the other roles are untouched
    assert rotation.role_of("operational-2") == "operational"


@pytest.mark.parametrize(
    ("case", "at", "last_expiry", "state", "in_cacerts"),
    [
        ("in the overlap, nothing issued", T0 + DAY, None, CaState.ROTATED_OUT, True),
        ("in the overlap, certificates valid", T0 + DAY, T0 + 90 * DAY, CaState.ROTATED_OUT, True),
        ("after the overlap, certificates still valid", T0 + 31 * DAY, T0 + 90 * DAY, CaState.ROTATED_OUT, False),
        ("after the overlap and the last expiry", T0 + 91 * DAY, T0 + 90 * DAY, CaState.RETIRED, False),
        ("after the overlap, nothing issued", T0 + 31 * DAY, None, CaState.RETIRED, False),
        ("at the very end of the overlap", T0 + 30 * DAY, None, CaState.RETIRED, False),
        ("last expiry before the overlap ends", T0 + 10 * DAY, T0 + 5 * DAY, CaState.ROTATED_OUT, True),
    ],
)
def test_the_old_generation_s_state_on_the_clock(
    case: str, at: dt.datetime, last_expiry: dt.datetime | None, state: CaState, in_cacerts: bool
) -> None:
    old = next(g for g in rotated() if g.name == "operational")
    assert old.state(at, last_expiry) == state, case
    assert old.in_cacerts(at) is in_cacerts, case


def test_the_active_generation_is_active_whatever_the_date() -> None:
    new = rotation.active(rotated(), "operational")
    for at in (T0, T0 + 3650 * DAY):
        assert new.state(at, None) == CaState.ACTIVE
        assert new.in_cacerts(at)


@pytest.mark.parametrize(
    ("case", "role", "overlap", "error", "words"),
    [
        ("the service CA", "service", 30 * DAY, BadRequestError, "cannot be rotated"),
        ("an unknown CA", "root", 30 * DAY, BadRequestError, "cannot be rotated"),
        ("a negative overlap", "operational", -DAY, BadRequestError, "between 0 and"),
        ("an overlap of decades", "operational", 4000 * DAY, BadRequestError, "between 0 and"),
    ],
)
def test_rotations_refused(case: str, role: str, overlap: dt.timedelta, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        rotation.rotate(rotation.complete([], ROLES), role, now=T0, overlap=overlap)


def test_a_second_rotation_waits_for_the_first_overlap_to_end() -> None:
    gens = rotated(10 * DAY)
    with pytest.raises(ConflictError, match="still in its overlap"):
        rotation.rotate(gens, "operational", now=T0 + 9 * DAY, overlap=DAY)
    again, third = rotation.rotate(gens, "operational", now=T0 + 10 * DAY, overlap=DAY)
    assert third.name == "operational-3"
    assert [g.name for g in again if g.active] == ["factory", "service", "operational-3"]


def test_the_document_round_trips() -> None:
    gens = rotated()
    assert rotation.decode_generations(rotation.encode_generations(gens), ROLES) == gens
    # an absent role is generation 1, active
    assert rotation.decode_generations(b'{"version":1,"generations":[]}', ROLES) == rotation.complete([], ROLES)


def _doc(*gens: str) -> bytes:
    return b'{"version":1,"generations":[' + b",".join(g.encode() for g in gens) + b"]}"


ROT = '"rotated_at":"2030-01-01T00:00:00Z","overlap_until":"2030-01-31T00:00:00Z"'


@pytest.mark.parametrize(
    ("case", "data", "words"),
    [
        ("not JSON", b"\x00\xff", "not valid"),
        ("a list", b"[]", "not valid"),
        ("another version", b'{"version":2,"generations":[]}', "version 2"),
        ("an unknown field", b'{"version":1,"generations":[],"x":1}', "not valid"),
        ("an unknown role", _doc('{"role":"root","number":1}'), "unknown CA"),
        ("a gap", _doc('{"role":"operational","number":1,' + ROT + "}", '{"role":"operational","number":3}'), "gaps"),
        ("two actives", _doc('{"role":"operational","number":1}', '{"role":"operational","number":2}'), "no rotation"),
        ("newest rotated", _doc('{"role":"operational","number":1,' + ROT + "}"), "not the active"),
        (
            "a naive date",
            _doc(
                '{"role":"operational","number":1,"rotated_at":"2030-01-01T00:00:00","overlap_until":"2030-01-02T00:00:00"}',
                '{"role":"operational","number":2}',
            ),
            "time zone",
        ),
        (
            "overlap before rotation",
            _doc(
                '{"role":"operational","number":1,"rotated_at":"2030-01-02T00:00:00Z","overlap_until":"2030-01-01T00:00:00Z"}',
                '{"role":"operational","number":2}',
            ),
            "before its rotation",
        ),
        ("too large", b" " * (rotation.MAX_DOCUMENT_BYTES + 1), "larger than"),
    ],
)
def test_hostile_documents_are_refused_in_words(case: str, data: bytes, words: str) -> None:
    with pytest.raises(BadRequestError, match=words):
        rotation.decode_generations(data, ROLES)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_decoding_any_bytes_gives_generations_or_a_refusal(data: bytes) -> None:
    try:
        gens = rotation.decode_generations(data, ROLES)
    except BadRequestError:
        return
    assert sum(1 for g in gens if g.active and g.role == "operational") == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["factory", "operational"]), max_size=6), st.integers(0, 60))
def test_any_series_of_rotations_round_trips_with_one_active_per_role(roles: list[str], gap_days: int) -> None:
    gens = rotation.complete([], ROLES)
    now = T0
    for role in roles:
        now += dt.timedelta(days=gap_days + 1)
        try:
            gens, _new = rotation.rotate(gens, role, now=now, overlap=dt.timedelta(days=gap_days))
        except ConflictError:
            continue
        assert rotation.decode_generations(rotation.encode_generations(gens), ROLES) == gens
    for role in ROLES:
        assert sum(1 for g in gens if g.role == role and g.active) == 1


# --- the device's truststore after /cacerts ---------------------------------------------------------
def _ca(
    name: str, issuer: tuple[KeySigner, x509.Certificate] | None, *, now: dt.datetime = T0
) -> tuple[KeySigner, x509.Certificate]:
    signer = KeySigner(generate_key(Algorithm.P256))
    subject = pki_ca.ca_name(name, "T")
    if issuer is None:
        return signer, pki_ca.make_root(signer, subject, now=now, validity=3650 * DAY)
    cert = pki_ca.make_intermediate(issuer[0], issuer[1], signer.public_key, subject, now=now, validity=365 * DAY)
    return signer, cert


ROOT = _ca("Root", None)
OLD = _ca("Operational CA", ROOT)
NEW = _ca("Operational CA 2", ROOT)
OTHER_ROOT = _ca("Other Root", None)
FOREIGN = _ca("Foreign CA", OTHER_ROOT)


def test_the_truststore_takes_the_new_ca_during_the_overlap_and_drops_the_old_one_after() -> None:
    current = [OLD[1], ROOT[1]]
    during = updated_truststore(current, [OLD[1], NEW[1], ROOT[1]], T0)
    assert same_truststore(during, [OLD[1], NEW[1], ROOT[1]])
    after = updated_truststore(during, [NEW[1], ROOT[1]], T0 + DAY)
    assert same_truststore(after, [NEW[1], ROOT[1]])
    assert after[-1] == ROOT[1]


def test_cacerts_never_brings_a_root_or_a_ca_of_another_root() -> None:
    got = updated_truststore([OLD[1], ROOT[1]], [NEW[1], FOREIGN[1], OTHER_ROOT[1], ROOT[1]], T0)
    assert same_truststore(got, [NEW[1], ROOT[1]])


@pytest.mark.parametrize(
    ("case", "current", "cacerts", "now"),
    [
        ("only foreign CAs", [OLD[1], ROOT[1]], [FOREIGN[1], OTHER_ROOT[1]], T0),
        ("an empty answer", [OLD[1], ROOT[1]], [], T0),
        ("expired CAs only", [OLD[1], ROOT[1]], [NEW[1]], T0 + 400 * DAY),
        ("no root held", [OLD[1]], [NEW[1], ROOT[1]], T0),
    ],
)
def test_an_answer_that_names_no_usable_ca_changes_nothing(
    case: str, current: list[x509.Certificate], cacerts: list[x509.Certificate], now: dt.datetime
) -> None:
    with pytest.raises(UntrustedError):
        updated_truststore(current, cacerts, now)


def test_what_is_not_an_issuing_ca_under_a_held_root_stays() -> None:
    """A transfer certificate (or another root's CA) flashed beside the anchors is kept."""
    got = updated_truststore([OLD[1], FOREIGN[1], ROOT[1]], [NEW[1], ROOT[1]], T0)
    assert same_truststore(got, [NEW[1], FOREIGN[1], ROOT[1]])
