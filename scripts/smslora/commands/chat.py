"""The command line of scripts/07_chat.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cli
from ..paths import FUSED_DIR

DESCRIPTION = "Step 7: talk to the classifier, or classify a file."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    cli.add_model_args(p, FUSED_DIR)
    p.add_argument("--input", type=Path, help="classify this file (.jsonl, .csv or .txt)")
    p.add_argument("--output", type=Path, help="write the verdicts here (JSONL)")
    cli.add_threshold_arg(p)
    return p


@cli.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    from .. import classify

    classify.run(args.model, args.adapter_path, args.threshold, args.input, args.output,
                 args.trust_remote_code)
