"""The command line of scripts/04_evaluate.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cli
from ..errors import UserError
from ..paths import ADAPTERS_DIR, BASELINE_DIR, DATA_DIR, REPORTS_DIR

DESCRIPTION = "Step 4: evaluate a model -> reports/eval_<name>.json."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    cli.add_model_args(p, BASELINE_DIR, "the base model")
    p.add_argument("--data", type=Path, default=DATA_DIR, help="folder with test.jsonl")
    p.add_argument("--name", default=None, help="report name (default: baseline or retrained)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=REPORTS_DIR, help="reports folder")
    p.add_argument("--tfidf", action="store_true",
                   help="evaluate the TF-IDF baselines on the training rows of --adapter-path "
                        "(default models/retrained/adapters) instead of a model")
    p.add_argument("--probe", action="store_true",
                   help="evaluate a frozen-feature probe instead: logistic regression on "
                        "--model's final hidden state (no fine-tuning), trained on the training "
                        "rows of --adapter-path -> reports/eval_probe-<base>.json")
    return p


@cli.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    if args.tfidf and args.probe:
        raise UserError("--tfidf and --probe are two runs: give one")
    if args.probe:
        from .. import probe

        probe.run(args.model, args.adapter_path or ADAPTERS_DIR, args.data, args.out,
                  args.trust_remote_code)
        return
    if args.tfidf:
        from .. import baselines

        baselines.run(args.adapter_path or ADAPTERS_DIR, args.data, args.out)
        return
    from .. import evaluate

    name = args.name or ("retrained" if args.adapter_path or args.model != BASELINE_DIR
                         else "baseline")
    evaluate.run(args.model, args.adapter_path, args.data, name, args.out, args.batch_size,
                 args.trust_remote_code)
