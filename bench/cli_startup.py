"""Start-up cost of the command line: ``iotdlm --help`` beside ``import click``.

Each figure is the median wall time of ``--runs`` fresh interpreters (this machine is shared and
noisy: read the ratios, not the seconds). Also prints, from ``python -X importtime``, what the
heavy packages cost ``import iotdlm.cli.main``, so a regression shows what got imported eagerly.

Run: ``PYTHONPATH=src .venv/bin/python bench/cli_startup.py [--runs 15]``.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15, help="fresh interpreters per case (the median is shown)")
    args = p.parse_args()
    figures = [(label, median_seconds(argv, args.runs)) for label, argv in CASES]
    click_s = figures[1][1]
    print(f"| command ({args.runs} runs, median) | seconds | / import click |")
    print("|---|---:|---:|")
    for label, seconds in figures:
        print(f"| `{label}` | {seconds:.3f} | {seconds / click_s:.1f} |")
    print()
    print("packages imported by `import iotdlm.cli.main` (ms in their own modules):")
    costs = import_costs("iotdlm.cli.main")
    for name in WATCHED:
        print(f"  {name:14} {costs[name] / 1000:8.1f}" if name in costs else f"  {name:14}      not imported")
    if shutil.which("iotdlm") is None:
        print("(no `iotdlm` on PATH: the figures run `python -m iotdlm.cli.main`, which is what it calls)")


if __name__ == "__main__":
    main()
