"""pm's plan, on its own (pure: no bench, no store, no bus): which devices a run takes, which it
refuses or skips, and the steps each device does under each operation mode (Table 1)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotdlm import errors
from iotdlm.modes.table import Mode
from iotdlm.pm.flasher import DeviceOnBench
from iotdlm.pm.plan import allowed_steps, choose, chunks, plan_jobs
from iotdlm.pm.settings import PmSettings
from iotdlm.store import ProvisioningRecord
from iotdlm.store import records as rec
from iotdlm.wire import pm as m

DTYPE = "boardA"
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
EARLIER = NOW - dt.timedelta(days=1)
EVERY = ("software", "truststore", "config", "certificate:factory", "certificate:operational", "verify")


def settings(tmp_path: Path, profiles: tuple[str, ...] = ("factory", "operational")) -> PmSettings:
    return PmSettings(
        dtype=DTYPE,
        profiles=profiles,
        organization="Example",
        enroll_uri="https://ca.example/.well-known/est",
        update_uri=None,
        staging_dir=tmp_path / "staging",
    )


def dev(ref: str, device_id: str) -> DeviceOnBench:
    return DeviceOnBench(ref=f"/bench/{ref}", device_id=device_id, dtype=DTYPE)


def record(device_id: str, status: str, steps: tuple[str, ...], **kw: object) -> ProvisioningRecord:
    fields: dict[str, object] = {
        "device_id": device_id,
        "dtype": DTYPE,
        "status": status,
        "operator": "alice",
        "started_at": EARLIER,
        "updated_at": EARLIER,
        "steps_done": steps,
        "attempts": 1,
    }
    if status == rec.PROVISIONING_COMPLETE:
        fields["completed_at"] = EARLIER
    if status == rec.PROVISIONING_FAILED:
        fields["failed_step"] = "config"
    fields.update(kw)
    return ProvisioningRecord(**fields)  # type: ignore[arg-type]


# --- allowed_steps: the operation modes of Table 1 ----------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "allowed"),
    [
        pytest.param(None, set(EVERY), id="no mode published: every step"),
        pytest.param(Mode.PROVISIONING_SOFTWARE, {"software", "config", "verify"}, id="provisioning-software"),
        pytest.param(
            Mode.PROVISIONING_CERTIFICATE,
            {"truststore", "certificate:factory", "certificate:operational", "verify"},
            id="provisioning-certificate",
        ),
        pytest.param(Mode.CERTIFICATE_MANAGEMENT, {"verify"}, id="a mode that is not pm's: verify only"),
    ],
)
def test_allowed_steps_follow_the_mode(tmp_path: Path, mode: str | None, allowed: set[str]) -> None:
    assert allowed_steps(settings(tmp_path), mode) == allowed


def test_allowed_steps_only_name_the_policys_profiles(tmp_path: Path) -> None:
    got = allowed_steps(settings(tmp_path, ("factory",)), Mode.PROVISIONING_CERTIFICATE)
    assert got == {"truststore", "certificate:factory", "verify"}


# --- choose: the devices of a run ------------------------------------------------------------------


def test_choose_every_device_when_none_is_named() -> None:
    bench = [dev("a", "dev-1"), dev("b", "dev-2")]
    results, chosen = choose(DTYPE, bench, None)
    assert results == []
    assert chosen == bench


def test_choose_by_reference_its_last_part_or_device_id_once_each() -> None:
    a, b, c = dev("a", "dev-1"), dev("b", "dev-2"), dev("c", "dev-3")
    results, chosen = choose(DTYPE, [a, b, c], ["/bench/a", "b", "dev-3", "dev-1"])
    assert results == []
    assert chosen == [a, b, c]  # dev-1 is a again: taken once


def test_choose_reports_a_device_not_on_the_bench() -> None:
    results, chosen = choose(DTYPE, [dev("a", "dev-1")], ["nope"])
    assert chosen == []
    (r,) = results
    assert (r.device_id, r.status, r.failed_step, r.code) == ("nope", m.FAILED, "discover", errors.NotFoundError.code)
    assert "no boardA device 'nope' on the bench" in (r.message or "")


def test_choose_takes_neither_of_a_device_id_on_the_bench_twice() -> None:
    a, b, c = dev("a", "dev-1"), dev("b", "dev-1"), dev("c", "dev-2")
    results, chosen = choose(DTYPE, [a, b, c], None)
    assert chosen == [c]
    (r,) = results
    assert (r.device_id, r.failed_step, r.code) == ("dev-1", "discover", errors.ConflictError.code)
    assert "/bench/a, /bench/b" in (r.message or "")
    # named by its device id, it is ambiguous: not on the bench by that name
    results, chosen = choose(DTYPE, [a, b, c], ["dev-1"])
    assert chosen == []
    assert [r.code for r in results] == [errors.NotFoundError.code]


def test_choose_refuses_an_unusable_device_id() -> None:
    bad = dev("a", "../etc")
    results, chosen = choose(DTYPE, [bad, dev("b", "dev-2")], None)
    assert [d.device_id for d in chosen] == ["dev-2"]
    (r,) = results
    assert (r.device_id, r.ref, r.failed_step, r.code) == (
        "../etc",
        "/bench/a",
        "discover",
        errors.BadRequestError.code,
    )
    assert (r.message or "").startswith("the flasher read an unusable device id")


# --- plan_jobs: per device, from its record ----------------------------------------------------------


def plan(tmp_path: Path, records: dict[str, ProvisioningRecord], **kw: object) -> tuple[list[m.DeviceResult], list]:
    s = settings(tmp_path)
    args: dict[str, object] = {"operator": "bob", "force": False, "named": False, "allowed": set(s.steps), "now": NOW}
    args.update(kw)
    chosen = [dev(i, i) for i in ("dev-1", "dev-2")]
    return plan_jobs(s, chosen, records, **args)  # type: ignore[arg-type]


def test_plan_a_new_device_does_every_step(tmp_path: Path) -> None:
    results, jobs = plan(tmp_path, {})
    assert results == []
    for job in jobs:
        assert (job.todo, job.pending, job.done, job.attempts, job.started_at) == (list(EVERY), [], [], 1, NOW)
        assert job.operator == "bob"
        assert job.wants_certificates()


def test_plan_resumes_from_the_first_step_not_done(tmp_path: Path) -> None:
    old = record(
        "dev-1",
        rec.PROVISIONING_FAILED,
        ("software", "truststore"),
        release_counter=3,
        image_sha256="ab" * 32,
        certificates=(("factory", "1a"), ("legacy", "1b")),
    )
    _results, jobs = plan(tmp_path, {"dev-1": old})
    job = jobs[0]
    assert job.done == ["software", "truststore"]
    assert job.todo == ["config", "certificate:factory", "certificate:operational", "verify"]
    assert (job.release_counter, job.image_sha256, job.attempts, job.started_at) == (3, "ab" * 32, 2, EARLIER)
    assert job.certificates == {"factory": "1a"}  # a profile no longer in the policy is dropped
    assert job.forced_over == {}


@pytest.mark.parametrize(
    ("named", "status", "code"),
    [
        pytest.param(True, m.REFUSED, errors.ConflictError.code, id="named: refused"),
        pytest.param(False, m.SKIPPED, None, id="not named: skipped"),
    ],
)
def test_plan_leaves_a_complete_device_alone_unless_forced(
    tmp_path: Path, named: bool, status: str, code: str | None
) -> None:
    old = record("dev-1", rec.PROVISIONING_COMPLETE, EVERY, certificates=(("factory", "1a"),))
    results, jobs = plan(tmp_path, {"dev-1": old}, named=named)
    assert [j.device_id for j in jobs] == ["dev-2"]
    (r,) = results
    assert (r.device_id, r.status, r.code, r.certificates) == ("dev-1", status, code, {"factory": "1a"})
    assert ("give --force" in (r.message or "")) is named
    # forced: from scratch, and the earlier certificates are remembered for the record's message
    results, jobs = plan(tmp_path, {"dev-1": old}, named=named, force=True)
    assert results == []
    job = jobs[0]
    assert (job.todo, job.done, job.attempts, job.forced_over) == (list(EVERY), [], 2, {"factory": "1a"})


def test_plan_refuses_a_device_of_another_dtype_even_forced(tmp_path: Path) -> None:
    old = record("dev-1", rec.PROVISIONING_IN_PROGRESS, (), dtype="boardB")
    for force in (False, True):
        results, jobs = plan(tmp_path, {"dev-1": old}, force=force)
        (r,) = results
        assert (r.status, r.code) == (m.REFUSED, errors.ConflictError.code)
        assert "provisioned as dtype boardB" in (r.message or "")
        assert [j.device_id for j in jobs] == ["dev-2"]


def test_plan_verifies_only_once_every_other_step_is_done(tmp_path: Path) -> None:
    s = settings(tmp_path)
    software_only = allowed_steps(s, Mode.PROVISIONING_SOFTWARE)
    _results, jobs = plan(tmp_path, {}, allowed=software_only)
    assert jobs[0].todo == ["software", "config"]
    assert jobs[0].pending == ["truststore", "certificate:factory", "certificate:operational", "verify"]
    assert not jobs[0].wants_certificates()
    # the other mode, after the software run: the rest, then verify
    old = record(
        "dev-1", rec.PROVISIONING_IN_PROGRESS, ("software", "config"), release_counter=1, image_sha256="cd" * 32
    )
    _results, jobs = plan(tmp_path, {"dev-1": old}, allowed=allowed_steps(s, Mode.PROVISIONING_CERTIFICATE))
    assert jobs[0].todo == ["truststore", "certificate:factory", "certificate:operational", "verify"]
    assert jobs[0].pending == []


def test_chunks() -> None:
    assert [list(c) for c in chunks([1, 2, 3, 4, 5], 2)] == [[1, 2], [3, 4], [5]]
    assert list(chunks([], 3)) == []


# --- property: every name the operator gives is accounted for ------------------------------------------

_ids = st.sampled_from(["dev-1", "dev-2", "dev-3", "bad id", ""])
_refs = st.sampled_from(["a", "b", "c", "d"])


@given(
    bench=st.lists(st.tuples(_refs, _ids), max_size=6, unique_by=lambda t: t[0]),
    names=st.one_of(st.none(), st.lists(st.sampled_from(["a", "/bench/b", "dev-1", "dev-2", "bad id", "zz"]))),
)
def test_choose_accounts_for_every_device(bench: list[tuple[str, str]], names: list[str] | None) -> None:
    on_bench = [dev(ref, device_id) for ref, device_id in bench]
    results, chosen = choose(DTYPE, on_bench, names)
    ids = [d.device_id for d in chosen]
    assert len(ids) == len(set(ids)), "a device id is provisioned at most once per run"
    assert all(d in on_bench for d in chosen)
    assert not {r.device_id for r in results} & set(ids), "a device is either chosen or failed, not both"
    assert all(r.status == m.FAILED and r.failed_step == "discover" for r in results)
    if names is None:
        # every device on the bench is chosen or failed
        assert {d.device_id[:255] for d in on_bench} == set(ids) | {r.device_id for r in results}
    else:
        # every name is a device chosen, or a failure: the name not found, or the device it names
        failed = {r.device_id for r in results}
        for name in names:
            named = [d for d in on_bench if name in (d.ref, Path(d.ref).name, d.device_id)]
            assert name in failed or any(d in chosen or d.device_id in failed for d in named)
