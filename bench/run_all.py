"""Run every km benchmark and write docs/benchmarks.md.

Each benchmark runs as its own process (``bench/<name>.py --md F --json F [--quick]``), one after
the other, so they do not compete for the 2 cores. ``make bench`` runs this with the full settings.

Run: ``.venv/bin/python bench/run_all.py [--quick] [--out docs/benchmarks.md] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, Headline, log, machine_info, md_table

#: (script, title, extra arguments, needs py-spy)
BENCHES: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("fig11_csr_vs_crmf", "Fig. 11: CSR vs CRMF request generation", (), False),
    ("km_fig12", "Fig. 12: pm gets 1 and 100 certificates from km over NATS", (), False),
    ("km_throughput", "Sustained issuance throughput, persisted", (), False),
    (
        "profile_km",
        "km worker profile, batch 100",
        ("--workers", "2", "--batch", "100", "--duration", "8", "--idle", "--top", "15"),
        True,
    ),
    (
        "profile_km",
        "km worker profile, single requests",
        ("--workers", "2", "--batch", "1", "--duration", "8", "--idle", "--top", "15"),
        True,
    ),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (a smoke run)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="where to write the report")
    p.add_argument("--only", nargs="+", choices=sorted({b[0] for b in BENCHES}), help="run only these benchmarks")
    p.add_argument(
        "--py-spy",
        default=shutil.which("py-spy"),
        help="py-spy binary for the km worker profile sections (default: from PATH; skipped when absent)",
    )
    args = p.parse_args()

    info = machine_info()
    started = time.monotonic()
    sections: list[str] = []
    heads: list[Headline] = []
    failures: list[str] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="iotdlm-bench-out-") as tmp:
        for i, (name, title, extra, needs_pyspy) in enumerate(BENCHES):
            if args.only and name not in args.only:
                continue
            if needs_pyspy and not args.py_spy:
                log(f"run_all: {title}: skipped (no py-spy; pass --py-spy PATH)")
                skipped.append(title)
                continue
            md = Path(tmp) / f"{i}-{name}.md"
            js = Path(tmp) / f"{i}-{name}.json"
            cmd = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--md", str(md), "--json", str(js), *extra]
            if needs_pyspy:
                cmd += ["--py-spy", args.py_spy]
            if args.quick:
                cmd.append("--quick")
            log(f"run_all: {name}")
            t0 = time.monotonic()
            proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, check=False)
            took = time.monotonic() - t0
            log(f"run_all: {name} finished in {took:.0f} s (exit {proc.returncode})")
            if proc.returncode != 0 or not md.exists():
                failures.append(f"{name} (exit {proc.returncode})")
                sections.append(f"## {title}\n\n**This benchmark failed (exit {proc.returncode}); see its output.**")
                continue
            sections.append(md.read_text(encoding="utf-8").rstrip() + f"\n\n_This section took {took:.0f} s._")
            heads += [Headline(**h) for h in json.loads(js.read_text(encoding="utf-8"))]

    total = time.monotonic() - started
    header = [
        "# Benchmarks",
        "",
        "Figures measured by the scripts in `bench/` (one per section below), written by "
        "`bench/run_all.py`. Everything is real: a deployment in a temporary folder (P-256, SQLite store "
        "under the deployment), the embedded `nats-server` on a loopback port with one user per module, "
        "km as separate OS processes (`python -m iotdlm.cli.main km serve`), and pm connecting as "
        "`pm-<dtype>` and signing every request. Each script also measures the raw library baseline "
        "(cryptography on one thread) in the same run, because this machine is shared and noisy: read the "
        "figures beside it. No figure here is a test; nothing asserts on time.",
        "",
        "**Reproduce:** `make bench` (runs `.venv/bin/python bench/run_all.py`, about 3-4 minutes); one "
        "section: `.venv/bin/python bench/<script>.py`; a few-second smoke run: add `--quick`. The km worker "
        "profile sections need py-spy, which iotdlm does not depend on (`bench/run_all.py --py-spy PATH`; "
        "skipped without it). `iotdlm commit` below names the code that ran: when src/ is being edited, a "
        "clean export of a commit is benchmarked instead (`git archive HEAD src | tar -x -C /tmp/snap`, "
        "`echo <commit> > /tmp/snap/COMMIT`, `PYTHONPATH=/tmp/snap/src`).",
        "",
        "## Machine and run",
        "",
        md_table(["", ""], [[k, v] for k, v in info.items()] + [["run time", f"{total:.0f} s"]]),
        "",
        "## Summary",
        "",
        md_table(
            ["figure", "paper", "target", "measured here", "verdict"],
            [[h.what, h.paper, h.target, h.measured, h.verdict] for h in heads],
        ),
    ]
    if args.quick:
        header += ["", "**This is a `--quick` smoke run: too short and too few repeats for figures.**"]
    if failures:
        header += ["", f"**Failed: {', '.join(failures)}.**"]
    if skipped:
        header += [
            "",
            f"Not run (py-spy not available): {'; '.join(skipped)}. Install py-spy anywhere "
            "(`pip install --target /tmp/pyspy py-spy`) and pass `--py-spy /tmp/pyspy/bin/py-spy`.",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n", encoding="utf-8")
    log(f"run_all: wrote {args.out} in {total:.0f} s")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
