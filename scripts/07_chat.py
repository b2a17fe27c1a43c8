#!/usr/bin/env python
"""Step 7: talk to the classifier, or classify a file.

Interactive: type a message, get the verdict and P(spam) (an empty line or Ctrl-D quits).
Batch: --input F.jsonl|.csv|.txt --output G.jsonl writes one line per message with `text`,
`label` (spam/ham) and `p_spam`, in the input's order. The file is streamed in chunks (any size,
bounded memory); an interrupted run resumes where it stopped when started again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smslora import cli
from smslora.paths import FUSED_DIR


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_model_args(p, FUSED_DIR)
    p.add_argument("--input", type=Path, help="classify this file (.jsonl, .csv or .txt)")
    p.add_argument("--output", type=Path, help="write the verdicts here (JSONL)")
    cli.add_threshold_arg(p)
    return p


@cli.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    from smslora import classify

    classify.run(args.model, args.adapter_path, args.threshold, args.input, args.output,
                 args.trust_remote_code)


if __name__ == "__main__":
    cli.run(main)
