"""The command line of scripts/03_train.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cli
from ..config import add_config_args, config_flags, load_config
from ..paths import REPORTS_DIR

DESCRIPTION = "Step 3: LoRA fine-tuning -> models/retrained/adapters/."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--config", help="configs/NAME.yaml or a YAML path (default: 'default')")
    add_config_args(p)
    p.add_argument("--reports", type=Path, default=REPORTS_DIR, help="where curves go")
    cli.add_trust_arg(p, "the model folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of --adapter-path from its last checkpoint "
                        "(its settings are the checkpoint's)")
    return p


@cli.cli
def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    flags = config_flags(args)
    from .. import checkpoint, finetune

    if args["resume"]:
        cfg, resume = checkpoint.resume_config(args["config"], flags)
    else:
        cfg, resume = load_config(args["config"] or "default", flags), None
    finetune.run(cfg, args["reports"], resume, args["trust_remote_code"])
