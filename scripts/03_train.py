#!/usr/bin/env python
"""Step 3: LoRA fine-tuning -> models/retrained/adapters/.

Settings come from configs/NAME.yaml (default: configs/default.yaml), then from the flags below;
the run folder keeps them in adapter_config.json. Ctrl-C or SIGTERM saves a checkpoint that
--resume continues.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smslora import cli
from smslora.config import add_config_args, config_flags, load_config
from smslora.paths import REPORTS_DIR


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="configs/NAME.yaml or a YAML path (default: 'default')")
    add_config_args(p)
    p.add_argument("--reports", type=Path, default=REPORTS_DIR, help="where curves go")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder to run its own Python code (off: refused)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of --adapter-path from its last checkpoint "
                        "(its settings are the checkpoint's)")
    return p


@cli.cli
def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    flags = config_flags(args)
    from smslora import checkpoint, finetune

    if args["resume"]:
        cfg, resume = checkpoint.resume_config(args["config"], flags)
    else:
        cfg, resume = load_config(args["config"] or "default", flags), None
    finetune.run(cfg, args["reports"], resume, args["trust_remote_code"])


if __name__ == "__main__":
    cli.run(main)
