"""bench/run_all.py's summary: what it reads from each section's figures and where it writes them.

Nothing here runs a benchmark or looks at a time: the summary's parsing and its place in
docs/benchmarks.md (between markers, the rest of the page untouched) are checked on made-up figures."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def run_all() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        return importlib.import_module("run_all")


def head(run_all: Any, measured: str, **kw: Any) -> Any:
    fields = {"what": "a figure", "paper": "-", "target": ">= 0.5x", "measured": measured, "verdict": "met"}
    return run_all.Headline(**(fields | kw))


@pytest.mark.parametrize(
    ("measured", "yardstick", "ratio"),
    [
        ("741 certificates/s (raw cert-build 1,766/s per thread)", "raw cert-build", 741 / 1766),
        ("187/s (aiohttp hello, same TLS: 7,511/s)", "aiohttp hello, same TLS", 187 / 7511),
        ("CSR 2.21 ms, CRMF 1.01 ms (CRMF 2.2x faster)", "-", 2.2),
        ("289 B", "-", None),
        ("1.2.3/s (x 4/s)", "-", None),
        ("0/s (aiohttp hello: 0/s)", "-", None),  # no division by a yardstick of zero
    ],
)
def test_yardstick_and_ratio_are_read_from_the_measured_text(
    run_all: Any, measured: str, yardstick: str, ratio: float | None
) -> None:
    got_yardstick, got_ratio = run_all.yardstick_of(head(run_all, measured))
    assert got_yardstick == yardstick
    assert got_ratio == (pytest.approx(ratio) if ratio is not None else None)


def test_the_scripts_own_yardstick_and_ratio_win(run_all: Any) -> None:
    h = head(run_all, "741 certificates/s (raw 1,766/s)", yardstick="openssl", ratio=0.9)
    assert run_all.yardstick_of(h) == ("openssl", 0.9)


@given(text=st.text(max_size=200))
def test_any_measured_text_gives_a_finite_ratio_or_none(run_all: Any, text: str) -> None:
    _, ratio = run_all.yardstick_of(head(run_all, text))
    assert ratio is None or (math.isfinite(ratio) and ratio >= 0)


def test_the_summary_goes_between_the_markers_and_nothing_else_moves(run_all: Any, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    before, after = "# Benchmarks\n\nintro\n\n", "\n\n## A section of another helper\n\nkept as written\n"
    doc.write_text(before + f"{run_all.BEGIN}\nold summary\n{run_all.END}" + after)
    run_all.write_between_markers(doc, "new summary")
    run_all.write_between_markers(doc, "newer summary")
    text = doc.read_text()
    assert text == before + f"{run_all.BEGIN}\n\nnewer summary\n\n{run_all.END}" + after


def test_a_page_without_markers_gets_them_under_its_title(run_all: Any, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\nbody\n")
    run_all.write_between_markers(doc, "summary")
    assert doc.read_text() == f"# Benchmarks\n\n{run_all.BEGIN}\n\nsummary\n\n{run_all.END}\nbody\n"


def test_every_figure_and_every_failure_is_a_row_and_issue_15_is_checked(run_all: Any) -> None:
    sm = run_all.SECTIONS[[s.key for s in run_all.SECTIONS].index("sm")]
    cm = run_all.SECTIONS[[s.key for s in run_all.SECTIONS].index("cm-est")]
    figure = head(run_all, "500 MB/s vs 1,000 MB/s", what="sm verified download + store, 1024 MiB", ratio=0.5)
    results = [
        run_all.Result(sm, 3.0, 0, "1.00 1.00 1.00", "## sm", (figure,)),
        run_all.Result(cm, 9.0, 1, "2.00 2.00 2.00", "", ()),
    ]
    rows = run_all.summary_rows(results)
    assert [r[0] for r in rows] == ["sm", "cm-est"]
    assert rows[0][4] == "0.50x"
    assert "failed (exit 1)" in rows[1][1]
    issue = {r[0]: r for r in run_all.issue15_rows(results)}
    assert issue["sm verified download + store / openssl dgst -sha256"][2].startswith("0.50x")
    assert issue["EST simpleenroll through cm / aiohttp hello, same TLS"][2] == "not measured by this run"


def test_a_ceiling_fills_its_column_and_is_never_taken_for_the_figure(run_all: Any) -> None:
    floors = run_all.SECTIONS[[s.key for s in run_all.SECTIONS].index("floors")]
    nonce = "OCSP with nonce (signed on demand) / raw OCSP sign"
    ceiling = head(
        run_all, "0.19x (parts)", what=f"ceiling: {nonce}", ratio=0.19, verdict="out of reach: the parts alone miss it"
    )
    results = [run_all.Result(floors, 9.0, 0, "1.00 1.00 1.00", "## floors", (ceiling,))]
    issue = {r[0]: r for r in run_all.issue15_rows(results)}
    assert issue[nonce][2] == "not measured by this run"  # the pattern "nonce" matches the ceiling's name too
    assert issue[nonce][4] == "0.19x: out of reach: the parts alone miss it"
    assert issue["OCSP GET through cm / aiohttp hello"][4] == "-"


@pytest.mark.parametrize(
    ("ratio", "target", "verdict"),
    [
        (0.5, ">= 0.8x", "missed"),
        (0.8, ">= 0.8x", "met"),
        (2.0, "<= 3x", "met"),
        (3.5, "<= 3x", "missed"),
        (None, ">= 0.8x", "-"),
        (1.0, "1,000 in <= 30 s", "-"),
    ],
)
def test_issue_15_verdicts_come_from_the_ratio_and_the_target(
    run_all: Any, ratio: float | None, target: str, verdict: str
) -> None:
    assert run_all.judge(ratio, target) == verdict


def test_the_multihost_section_is_skipped_in_words_without_postgresql_or_root(
    run_all: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The several-hosts section starts its own PostgreSQL as the postgres user: without the
    binaries, or as another user than root, run_all says why and leaves it out."""
    (section,) = [s for s in run_all.SECTIONS if s.key == "multihost"]
    assert section.needs_postgres
    assert (BENCH / f"{section.script}.py").is_file()
    monkeypatch.setattr(run_all, "PG_INITDB", tmp_path / "initdb")
    assert "no PostgreSQL 15 binaries" in run_all.postgres_missing()
    (tmp_path / "initdb").write_text("")
    monkeypatch.setattr(run_all.os, "geteuid", lambda: 1000)
    assert "not root" in run_all.postgres_missing()
    monkeypatch.setattr(run_all.os, "geteuid", lambda: 0)
    assert run_all.postgres_missing() is None


def test_a_sections_cpu_counts_the_processes_it_started(run_all: Any) -> None:
    """run_timed reports the CPU of the script and of what it started and waited for: here a
    grandchild that burns 0.3 s of its own CPU time (process_time, so not a wall-clock guess)."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    script = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {burn!r}], check=True)\nsys.exit(3)\n"
    code, cpu = run_all.run_timed([sys.executable, "-c", script], timeout=120)
    assert code == 3
    assert cpu >= 0.3


def test_a_section_past_its_timeout_is_stopped(run_all: Any) -> None:
    code, cpu = run_all.run_timed([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)
    assert (code, cpu) == (-9, 0.0)
