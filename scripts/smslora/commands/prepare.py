"""The command line of scripts/02_prepare_data.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cli
from ..paths import DATA_DIR, SUPPLEMENTS

DESCRIPTION = "Step 2: the SMS Spam Collection -> data/{train,valid,test}.jsonl."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--source", default="shipped",
                   help="'shipped' (data/SMSSpamCollection.tsv, default), 'hf' (ucirvine/sms_spam "
                        "from the Hub) or a path to a TSV/CSV/JSONL with text and label columns")
    p.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (data/)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--train-per-class", type=int, default=400,
                   help="messages per class in train.jsonl (the tutorial's balanced set)")
    p.add_argument("--valid-per-class", type=int, default=80)
    p.add_argument("--calibration-ham", type=int, default=480,
                   help="ham messages held out beside valid.jsonl (calibration.jsonl) so the two "
                        "together are at the natural ratio: the threshold is chosen on them")
    p.add_argument("--supplement", nargs="+", default=[str(f) for f in SUPPLEMENTS],
                   help="files of modern messages for train_all.jsonl and valid_modern.jsonl "
                        "(default: data/modern_sms.jsonl data/modern_sms_2.jsonl; 'none' to skip)")
    p.add_argument("--supplement-holdout", type=int, default=50,
                   help="messages of each label of each supplement file held out in "
                        "valid_modern.jsonl (the recipe and threshold are chosen on them too, "
                        "never trained on)")
    return p


@cli.cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    from .. import splits

    splits.run(args.source, args.out, test_fraction=args.test_fraction,
               train_per_class=args.train_per_class, valid_per_class=args.valid_per_class,
               seed=args.seed, supplement=None if args.supplement == ["none"] else args.supplement,
               calibration_ham=args.calibration_ham, supplement_holdout=args.supplement_holdout)
