"""The command line of scripts/report.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cli
from ..paths import REPORTS_DIR

DESCRIPTION = "The before/after report: reports/report.md and report.json, from what steps 03-06 wrote."


@cli.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--reports", type=Path, default=REPORTS_DIR)
    p.add_argument("--timings", type=Path, default=None, help="step<TAB>seconds lines")
    args = p.parse_args(argv)
    from .. import report

    report.run(args.reports, args.timings)
