#!/usr/bin/env python
"""Step 5: the stress test -> reports/stress_<name>.json.

The 10 fixed messages plus the stress suite in data/stress_suite.jsonl (the tutorial's two
adversarial messages, its five "final boss" messages and modern smishing / hard ham written for
this project). Every miss is listed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smslora import cli
from smslora.paths import FUSED_DIR, REPORTS_DIR, STRESS_SUITE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_model_args(p, FUSED_DIR)
    p.add_argument("--suite", type=Path, default=STRESS_SUITE)
    p.add_argument("--name", default=None, help="report name (default: the model folder's name)")
    p.add_argument("--out", type=Path, default=REPORTS_DIR)
    return p


@cli.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    from smslora import stress

    stress.run(args.model, args.adapter_path, args.suite, args.name or args.model.name, args.out,
               args.trust_remote_code)


if __name__ == "__main__":
    cli.run(main)
