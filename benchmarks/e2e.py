#!/usr/bin/env python
"""End to end: run ./runme.sh (the base's own recipe unless --config) and report each step's
wall time and the pipeline's peak resident memory.

runme.sh records every step's seconds in reports/.timings.tsv; this prints them as a table with
the total and the headline test metrics, and writes reports/bench_e2e.json (or --out).

    python benchmarks/e2e.py                 # ./runme.sh, then the table
    python benchmarks/e2e.py --base gemma3-270m
    python benchmarks/e2e.py --no-run        # the table of the last ./runme.sh
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import time
from pathlib import Path

import _project  # noqa: F401  (scripts/ on sys.path)
from smslora import cli
from smslora.artifacts import atomic_write_json
from smslora.errors import UserError, require
from smslora.paths import REPORTS_DIR, ROOT


@cli.cli
def main(argv=None):
    from train import machine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="runme.sh's --config (default: the base's)")
    p.add_argument("--base", default=None, help="runme.sh's --base (default: runme.sh's)")
    p.add_argument("--no-run", action="store_true", help="only read the last run's timings")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "bench_e2e.json")
    args = p.parse_args(argv)
    wall = peak = None
    if not args.no_run:
        command = [str(ROOT / "runme.sh")]
        command += ["--config", args.config] if args.config else []
        command += ["--base", args.base] if args.base else []
        tic = time.perf_counter()
        r = subprocess.run(command, cwd=ROOT)
        wall = time.perf_counter() - tic
        # the largest resident set of any finished child: the pipeline's one Python process
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
        if r.returncode != 0:
            raise UserError(f"./runme.sh failed with exit code {r.returncode}")
    timings = require(REPORTS_DIR / ".timings.tsv", "the step timings", "./runme.sh")
    steps = [line.split("\t") for line in timings.read_text().splitlines() if line.strip()]
    total = sum(float(s) for _, s in steps)
    report = json.loads(require(REPORTS_DIR / "report.json", "report.json",
                                "./runme.sh").read_text())
    test = (report.get("retrained") or {}).get("test", {})
    print(f"{machine()['cpu']}, {machine()['cores']} cores, base {args.base or 'default'}, "
          f"config {args.config or 'its own'}")
    print("| step | seconds |\n|---|---|")
    for name, s in steps:
        print(f"| {name} | {float(s):.1f} |")
    print(f"| total (steps) | {total:.1f} |")
    if wall is not None:
        print(f"runme.sh wall time (with setup): {wall:.1f} s; peak RSS {peak:.2f} GiB")
    if test:
        print(f"test: accuracy {test['accuracy']:.2%}, F1 {test['f1']:.3f}, ROC-AUC "
              f"{test['roc_auc']:.4f}, ham FPR {test['ham_false_positive_rate']:.2%}")
    atomic_write_json(args.out, {
        "machine": machine(), "base": args.base, "config": args.config,
        "steps": {n: float(s) for n, s in steps}, "total_s": total, "runme_wall_s": wall,
        "peak_rss_gib": peak, "test": test})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
