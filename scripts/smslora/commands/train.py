"""The command line of scripts/03_train.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import cli
from ..config import (TrainConfig, add_config_args, config_flags, default_config_name,
                      load_config)
from ..paths import REPORTS_DIR

DESCRIPTION = "Step 3: LoRA fine-tuning -> models/retrained/adapters/."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--config", help="configs/NAME.yaml or a YAML path (default: the base "
                                    "model's own recipe, configs/BASE.yaml, if it has one, "
                                    "else 'default')")
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
        name = args["config"] or default_config_name(flags.get("model") or TrainConfig.model)
        cfg, resume = load_config(name, flags), None
    finetune.run(cfg, args["reports"], resume, args["trust_remote_code"])
