"""Start-up cost of the command line: ``iotdlm --help`` beside ``import click``.

Each figure is the median wall time of ``--runs`` fresh interpreters (this machine is shared and
noisy: read the ratios, not the seconds). Also prints, from ``python -X importtime``, what the
heavy packages cost ``import iotdlm.cli.main``, so a regression shows what got imported eagerly.

Run: ``PYTHONPATH=src .venv/bin/python bench/cli_startup.py [--runs 15]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python -c pass", ("-c", "pass")),
    ("python -c 'import click'", ("-c", "import click")),
    ("python -c 'import iotdlm.cli.main'", ("-c", "import iotdlm.cli.main")),
    ("iotdlm --help", ("-m", "iotdlm.cli.main", "--help")),
    ("iotdlm ca --help", ("-m", "iotdlm.cli.main", "ca", "--help")),
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def median_seconds(argv: tuple[str, ...], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL, env=_env())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: Packages whose import ``iotdlm --help`` should not pay for (click and rich it does need).
WATCHED = ("click", "rich", "cryptography", "sqlalchemy", "alembic", "nats", "aiohttp", "iotdlm.km", "iotdlm.store")


def import_costs(module: str) -> dict[str, int]:
    """Microseconds spent in each WATCHED package's own modules (the sum of their self times)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        check=True,
        capture_output=True,
        text=True,
        env=_env(),
    ).stderr
    costs: dict[str, int] = {}
    for line in out.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, _cumulative, name = line.removeprefix("import time:").split("|")
        for package in WATCHED:
            if name.strip() == package or name.strip().startswith(package + "."):
                costs[package] = costs.get(package, 0) + int(self_us)
    return costs


#: ``iotdlm --help`` may take at most this many times ``python -c "import click"`` (issue 14, stumble 14)
TARGET_HELP_RATIO = 5.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=None, help="fresh interpreters per case, median shown (15; 3 quick)")
    p.add_argument("--quick", action="store_true", help="3 runs per case: a smoke run, not for figures")
    p.add_argument("--md", type=Path, help="also write the Markdown section to this file")
    p.add_argument("--json", type=Path, help="also write the headline figures (for run_all.py) to this file")
    args = p.parse_args()
    runs = args.runs or (3 if args.quick else 15)
    figures = [(label, median_seconds(argv, runs)) for label, argv in CASES]
    click_s = figures[1][1]
    lines = ["## Command-line start-up", "", f"| command ({runs} runs, median) | seconds | / import click |"]
    lines.append("|---|---:|---:|")
    lines += [f"| `{label}` | {seconds:.3f} | {seconds / click_s:.1f} |" for label, seconds in figures]
    lines += ["", "packages imported by `import iotdlm.cli.main` (ms in their own modules):", "", "```"]
    costs = import_costs("iotdlm.cli.main")
    for name in WATCHED:
        lines.append(f"  {name:14} {costs[name] / 1000:8.1f}" if name in costs else f"  {name:14}      not imported")
    lines.append("```")
    if shutil.which("iotdlm") is None:
        lines.append("(no `iotdlm` on PATH: the figures run `python -m iotdlm.cli.main`, which is what it calls)")
    section = "\n".join(lines)
    print(section)
    help_ratio = dict(figures)["iotdlm --help"] / click_s
    head = {
        "what": "`iotdlm --help` start-up",
        "paper": "-",
        "target": f"<= {TARGET_HELP_RATIO:.1f}x",
        "measured": f"{dict(figures)['iotdlm --help'] * 1000:.0f} ms vs {click_s * 1000:.0f} ms",
        "verdict": "met" if help_ratio <= TARGET_HELP_RATIO else "missed",
        "yardstick": "`python -c 'import click'`",
        "ratio": round(help_ratio, 3),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    if args.md is not None:
        args.md.write_text(section + "\n", encoding="utf-8")
    if args.json is not None:
        args.json.write_text(json.dumps([head], indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
