#!/usr/bin/env python
"""Step 4: evaluate a model -> reports/eval_<name>.json.

Two views: the tutorial's language-model table (loss, perplexity, token accuracy on the 10 fixed
messages) and what a spam filter is judged by (accuracy, precision, recall, F1, ROC-AUC, ham
false-positive rate, confusion matrix) on the whole held-out test split, with P(spam) from one
forward pass per message and the threshold chosen on validation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smslora import cli
from smslora.errors import UserError
from smslora.paths import ADAPTERS_DIR, BASELINE_DIR, DATA_DIR, REPORTS_DIR


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_model_args(p, BASELINE_DIR, "the base model")
    p.add_argument("--data", type=Path, default=DATA_DIR, help="folder with test.jsonl")
    p.add_argument("--name", default=None, help="report name (default: baseline or retrained)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=REPORTS_DIR, help="reports folder")
    p.add_argument("--tfidf", action="store_true",
                   help="evaluate the TF-IDF baselines on the training rows of --adapter-path "
                        "(default models/retrained/adapters) instead of a model")
    return p


@cli.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    if args.tfidf:
        from smslora import baselines

        baselines.run(args.adapter_path or ADAPTERS_DIR, args.data, args.out)
        return
    from smslora import evaluate

    name = args.name or ("retrained" if args.adapter_path or args.model != BASELINE_DIR
                         else "baseline")
    evaluate.run(args.model, args.adapter_path, args.data, name, args.out, args.batch_size,
                 args.trust_remote_code)


if __name__ == "__main__":
    cli.run(main)
