"""The command line of scripts/pipeline.py."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import cli
from ..paths import REPORTS_DIR, ROOT

DESCRIPTION = "Steps 1-6 and the report, in order, in one Python process: what `./runme.sh` runs."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--config", default=None,
                   help="training config (configs/NAME.yaml; default: the base model's own, "
                        "configs/BASE.yaml, if it has one, else 'default')")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    p.add_argument("--base", default=None, help="base model to start from (step 1's --base)")
    p.add_argument("--timings", type=Path, default=REPORTS_DIR / ".timings.tsv")
    return p


@cli.cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .. import pipeline, report

    timings = args.timings.resolve()
    os.chdir(ROOT)  # the steps' paths are relative to the project, as in the README
    timings.parent.mkdir(parents=True, exist_ok=True)
    timings.write_text("")
    code = pipeline.run_steps(pipeline.default_steps(args.config, args.resume, args.base),
                              timings)
    if code == 0:
        report.run(REPORTS_DIR, timings)
    return code
