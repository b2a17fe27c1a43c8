"""The command line of scripts/05_stress_test.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cli
from ..paths import FUSED_DIR, REPORTS_DIR, STRESS_SUITE

DESCRIPTION = "Step 5: the stress test -> reports/stress_<name>.json."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    cli.add_model_args(p, FUSED_DIR)
    p.add_argument("--suite", type=Path, default=STRESS_SUITE)
    p.add_argument("--name", default=None, help="report name (default: the model folder's name)")
    p.add_argument("--out", type=Path, default=REPORTS_DIR)
    return p


@cli.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    from .. import stress

    stress.run(args.model, args.adapter_path, args.suite, args.name or args.model.name, args.out,
               args.trust_remote_code)
