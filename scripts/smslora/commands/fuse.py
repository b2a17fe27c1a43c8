"""The command line of scripts/06_fuse.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cli
from ..paths import ADAPTERS_DIR, BASELINE_DIR, DATA_DIR, FUSED_DIR, REPORTS_DIR

DESCRIPTION = "Step 6: fuse the LoRA adapters into the base -> models/retrained/fused/."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--model", type=Path, default=BASELINE_DIR, help="base model folder")
    p.add_argument("--adapter-path", type=Path, default=ADAPTERS_DIR)
    p.add_argument("--save-path", type=Path, default=FUSED_DIR)
    p.add_argument("--keep-quantized", action="store_true",
                   help="re-quantize the fused weights to the base's 4 bits (mlx-lm's default)")
    p.add_argument("--data", type=Path, default=DATA_DIR, help="folder with test.jsonl")
    p.add_argument("--max-delta", type=float, default=None,
                   help="largest |Δlogit| accepted between adapter and fused mode (default 0.01 "
                        "on a CPU; 0.05 on a GPU, whose float32 products round to TF32)")
    p.add_argument("--out", type=Path, default=REPORTS_DIR, help="reports folder")
    p.add_argument("--reuse", type=Path, default=None, metavar="EVAL_JSON",
                   help="04_evaluate's report of base + these adapters (e.g. "
                        "reports/eval_retrained.json): its test logits stand for the adapter "
                        "side of the check when it scored the same weights and messages")
    cli.add_trust_arg(p, "the model folder")
    return p


@cli.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    from .. import fuse

    fuse.run(args.model, args.adapter_path, args.save_path, args.data, args.out,
             not args.keep_quantized, args.max_delta, args.reuse, args.trust_remote_code)
